"""Streaming one big parquet row group: our page reader (parquet_pages) vs pyarrow's ParquetFile.iter_batches.

Command (from the repository root, after ``make install``; pyarrow comes with the ``test`` extra)::

    .venv/bin/python benchmarks/parquet_read.py [--dir /tmp/pq_bench] [--shapes 1000000x128 200000x384]
        [--batch-rows 8192 65536] [--repeats 3] [--methods ours pyarrow ...] [--no-checks]
        [--json benchmarks/results/parquet_read.json]

Question (issue 24): ``vq_pipeline/parquet_thrift.py`` + ``parquet_pages.py`` parse footers and page
headers by hand so that :func:`vq_pipeline.io.tables.iter_batches` reads a batch inside a large row group
without decoding the whole group (polars decodes whole row groups). Does
``pyarrow.parquet.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(...)`` do as
well in time and peak memory, on every layout ours handles?

What it does:

1. Writes, with polars (its defaults: zstd, v1 pages, page index), one file per shape holding a single
   row group of ``n`` rows: ``id`` (Int64) and ``emb`` (``pl.Array(pl.Float32, dim)``, standard normal).
2. Streams each whole file in batches, every (method, file, batch size) in a fresh child process,
   interleaved repeats, medians. Methods:

   * ``ours``: ``vq_pipeline.io.tables.iter_batches(source, column="emb", id_column="id", batch_rows=B)``,
     as the library streams a table (page by page through ParquetPages for a batch inside a larger row
     group; the child counts ParquetPages.read calls to prove it). Its ``Batch.x`` is the float32 tensor.
   * ``pyarrow``: ``ParquetFile(path, buffer_size=1<<20, pre_buffer=False).iter_batches(batch_size=B,
     columns=["emb", "id"])``, each batch converted to the same (B, dim) float32 torch tensor with the
     checks ``_to_tensor`` makes (no null rows, no null elements): ``FixedSizeListArray.values``
     (offset-corrected) -> ``torch.from_dlpack`` -> ``view(-1, dim)``, zero copy; ids ``to_numpy()``.
   * ``pyarrow_defaults``: the same with ``ParquetFile(path)`` (pre_buffer=True, buffer_size=0): reference.
   * ``polars_batches``: ``pl.scan_parquet(path).select("emb", "id").collect_batches(chunk_size=B)``,
     converted as ``_to_tensor`` does (``to_numpy`` -> ``torch.from_dlpack``): reference.
   * ``polars_whole``: ``pl.read_parquet(path)`` then slices: what reading the whole row group costs.

   Each child reports: wall seconds of the streaming loop (hashing the output excluded, timed apart),
   MiB/s of decoded data (embeddings + ids), peak RSS growth = VmHWM - VmRSS after imports (VmHWM is
   ru_maxrss without what Linux carries over exec from the parent; ru_maxrss - base is reported too),
   and a sha256 of every batch's x bytes and ids bytes in order, plus the batch sizes. The hashes of
   all methods must agree (byte-for-byte the same rows and values).
3. Layout checks on small files (``--no-checks`` skips them): every codec polars and pyarrow write
   (uncompressed, snappy, gzip, lz4, zstd, brotli), pyarrow v1 / v2 pages, with and without a page
   index, the embedding as a fixed-size list and as a variable list, other embedding dtypes, kept
   columns of every kind (strings, structs, nested lists, tz datetimes, nulls), several row groups,
   nulls in the embedding column, and corrupt / truncated files (pyarrow in child processes, so a crash
   would show). For each: does ours go page by page, does pyarrow read it, and are the outputs equal.

Results: a table on stdout and JSON (default ``benchmarks/results/parquet_read.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ours", "pyarrow", "pyarrow_defaults", "polars_batches", "polars_whole"]

# ----------------------------------------------------------------------------------------- child code

_CHILD_PRELUDE = """
import hashlib, json, resource, sys, time

def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))  # kB

def _maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux

method, path, batch_rows, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
"""

_CHILD_BODY = {
    "ours": """
import numpy as np, torch
try:  # the package layout moves: vq_pipeline.tables, or vq_pipeline.io.tables
    import vq_pipeline.parquet_pages as parquet_pages
    from vq_pipeline.tables import discover, iter_batches
except ImportError:
    import vq_pipeline.io.parquet_pages as parquet_pages
    from vq_pipeline.io.tables import discover, iter_batches
_calls = [0]
_read = parquet_pages.ParquetPages.read
def _counted(self, *a, **k):
    _calls[0] += 1
    return _read(self, *a, **k)
parquet_pages.ParquetPages.read = _counted

def stream(path):
    (source,) = discover([path])
    for b in iter_batches(source, column="emb", id_column="id", batch_rows=batch_rows):
        yield b.x, b.ids.to_numpy()
def extra():
    return {"pages_reads": _calls[0]}
""",
    "pyarrow": """
import numpy as np, torch
import pyarrow as pa, pyarrow.parquet as pq
KW = dict(buffer_size=1 << 20, pre_buffer=False) if method == "pyarrow" else {}

def to_tensor(col):
    # the checks _to_tensor makes, then zero copy: FixedSizeListArray.values -> DLPack -> (n, dim) view
    if col.null_count:
        raise ValueError("null embedding row")
    d = col.type.list_size
    values = col.values.slice(col.offset * d, len(col) * d)  # .values ignores the list array's offset
    if values.null_count:
        raise ValueError("null element")
    if values.type != pa.float32():
        raise TypeError(values.type)
    return torch.from_dlpack(values).view(len(col), d)

def stream(path):
    pf = pq.ParquetFile(path, **KW)
    for rb in pf.iter_batches(batch_size=batch_rows, columns=["emb", "id"]):
        yield to_tensor(rb.column("emb")), rb.column("id").to_numpy()
def extra():
    return {}
""",
    "polars_batches": """
import numpy as np, torch, polars as pl

def to_tensor(s):
    if s.null_count() or s.explode().null_count():
        raise ValueError("nulls")
    return torch.from_dlpack(s.rechunk().to_numpy())

def stream(path):
    for df in pl.scan_parquet(path).select("emb", "id").collect_batches(chunk_size=batch_rows):
        yield to_tensor(df["emb"]), df["id"].to_numpy()
def extra():
    return {}
""",
    "polars_whole": """
import numpy as np, torch, polars as pl

def stream(path):
    df = pl.read_parquet(path, columns=["emb", "id"])
    x, ids = torch.from_dlpack(df["emb"].to_numpy()), df["id"].to_numpy()
    for i in range(0, len(x), batch_rows):
        yield x[i : i + batch_rows], ids[i : i + batch_rows]
def extra():
    return {}
""",
}
_CHILD_BODY["pyarrow_defaults"] = _CHILD_BODY["pyarrow"]

_CHILD_MAIN = """
base_rss, base_maxrss = _status("VmRSS"), _maxrss()
for _ in stream(warm):  # a small file of the same kind: readers, thread pools and allocator set up
    pass
warm_rss = _status("VmRSS")
h, sizes, rows, nbytes, hash_s = hashlib.sha256(), [], 0, 0, 0.0
t0 = time.perf_counter()
for x, ids in stream(path):
    t1 = time.perf_counter()
    assert x.dtype == torch.float32 and x.is_contiguous() and ids.dtype == np.int64
    h.update(memoryview(x.numpy()).cast("B"))
    h.update(memoryview(np.ascontiguousarray(ids)).cast("B"))
    sizes.append(int(x.shape[0]))
    rows += int(x.shape[0])
    nbytes += x.numel() * 4 + ids.nbytes
    hash_s += time.perf_counter() - t1
wall = time.perf_counter() - t0 - hash_s
print(json.dumps({"method": method, "rows": rows, "bytes": nbytes, "seconds": wall, "hash_seconds": hash_s,
                  "base_rss_mib": base_rss / 1024, "peak_rss_mib": _status("VmHWM") / 1024,
                  "growth_mib": (_status("VmHWM") - base_rss) / 1024,
                  "maxrss_growth_mib": (_maxrss() - base_rss) / 1024,
                  "warm_rss_mib": warm_rss / 1024, "growth_after_warm_mib": (_status("VmHWM") - warm_rss) / 1024,
                  "sha256": h.hexdigest(), "n_batches": len(sizes),
                  "sizes_exact": all(s == batch_rows for s in sizes[:-1]) and 0 < sizes[-1] <= batch_rows,
                  **extra()}))
"""


SRC = ROOT  # where the children import vq_pipeline from (--src)


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def run_child(method: str, path: Path, batch_rows: int, warm: Path) -> dict:
    code = _CHILD_PRELUDE + _CHILD_BODY[method] + _CHILD_MAIN
    proc = subprocess.run(
        [sys.executable, "-c", code, method, str(path), str(batch_rows), str(warm)],
        capture_output=True,
        text=True,
        cwd=SRC,
        env=_child_env(),
        timeout=900,
    )
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- data

_GEN = """
import sys, numpy as np, polars as pl, pyarrow.parquet as pq
path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(n * 1000 + d)
x = rng.standard_normal((n, d), dtype=np.float32)
pl.DataFrame({"id": np.arange(n, dtype=np.int64), "emb": x}).write_parquet(path + ".tmp", row_group_size=n)
md = pq.ParquetFile(path + ".tmp").metadata
assert md.num_row_groups == 1 and md.num_rows == n
import os; os.replace(path + ".tmp", path)
"""


def generate(folder: Path, n: int, d: int) -> Path:
    path = folder / f"emb_{n}x{d}.parquet"
    if not path.exists():  # a child of its own: the driver stays small
        subprocess.run([sys.executable, "-c", _GEN, str(path), str(n), str(d)], check=True, cwd=ROOT)
    return path


# ----------------------------------------------------------------------------------------- layout checks

_CHECKS = r'''
import hashlib, json, subprocess, sys, warnings
from pathlib import Path
import numpy as np, polars as pl, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq, torch
from vq_pipeline.errors import InvalidInputError, VQError
try:
    from vq_pipeline import tables
except ImportError:
    from vq_pipeline.io import tables
discover, iter_batches = tables.discover, tables.iter_batches

folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
out = {}

def pa_to_tensor(col):
    """What a pyarrow-based _to_tensor would do: refuse nulls, then (n, dim) float32 (float64 kept)."""
    if col.null_count:
        raise InvalidInputError("null row")
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        values = col.values.slice(col.offset * d, len(col) * d)
    else:  # variable list: lengths must all be equal
        lengths = pc.list_value_length(col).to_numpy()
        d = int(lengths[0]) if len(lengths) else 0
        if (lengths != d).any():
            raise InvalidInputError("ragged")
        values = col.flatten()
    if values.null_count:
        raise InvalidInputError("null element")
    arr = values.to_numpy(zero_copy_only=False)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)).view(len(col), d)

def digest_ours(path, batch_rows, keep=()):
    (source,) = discover([path])
    h, sizes, kept = hashlib.sha256(), [], []
    for b in iter_batches(source, column="emb", id_column="id", batch_rows=batch_rows, keep=list(keep)):
        h.update(b.x.contiguous().numpy().tobytes()); h.update(b.ids.to_numpy().tobytes()); sizes.append(len(b))
        if keep:
            kept.append(b.keep)
    return h.hexdigest(), sizes, (pl.concat(kept) if kept else None)

def digest_pa(path, batch_rows, keep=()):
    pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    h, sizes, kept = hashlib.sha256(), [], []
    for rb in pf.iter_batches(batch_size=batch_rows, columns=["emb", "id", *[k for k in keep if k != "emb"]]):
        x = pa_to_tensor(rb.column("emb"))
        h.update(x.numpy().tobytes()); h.update(rb.column("id").to_numpy().tobytes()); sizes.append(rb.num_rows)
        if keep:
            kept.append(pl.from_arrow(rb).select(list(keep)))
    return h.hexdigest(), sizes, (pl.concat(kept) if kept else None)

def pages_used(path, columns):
    (source,) = discover([path])
    r = tables._Rows(source, columns, None)
    try:
        return r._pages is not None
    finally:
        r.close()

rng = np.random.default_rng(0)
n, d = 5000, 16
emb = np.round(rng.standard_normal((n, d)), 2).astype(np.float32)  # compressible: codecs do work
base = pl.DataFrame({"id": rng.permutation(n).astype(np.int64), "emb": emb})
mixed = base.with_columns(
    pl.Series("text", [None if i % 6 == 0 else f"t{i % 20}" for i in range(n)]),
    pl.Series("lists", [None if i % 7 == 0 else list(range(i % 4)) for i in range(n)], dtype=pl.List(pl.Int32)),
    pl.Series("nested", [[[i], []] if i % 5 else None for i in range(n)], dtype=pl.List(pl.List(pl.Int64))),
    pl.Series("struct", [{"a": i, "b": [float(i)] * (i % 3)} for i in range(n)]),
    pl.Series("emb_nulls", [None if i % 11 == 3 else emb[i, :2].tolist() for i in range(n)], dtype=pl.Array(pl.Float32, 2)),
    pl.Series("flag", rng.random(n) < 0.5),
    pl.datetime_range(pl.datetime(2026, 1, 1), pl.datetime(2026, 1, 1) + pl.duration(seconds=n - 1), "1s", eager=True, time_zone="UTC").alias("when"),
)
keep = ["emb", "text", "lists", "nested", "struct", "emb_nulls", "flag", "when"]

# 1. codecs x writers x page versions x page index, emb as Array and as List; one row group (page by page)
layouts = []
for codec in ["uncompressed", "snappy", "gzip", "lz4", "zstd", "brotli"]:
    layouts.append(("polars", codec, None, None))
    for version in ["1.0", "2.0"]:
        for index in [False, True]:
            layouts.append(("pyarrow", "none" if codec == "uncompressed" else codec, version, index))
rows = []
for writer, codec, version, index in layouts:
    for emb_kind in ["array", "list"]:
        frame = mixed if emb_kind == "array" else mixed.with_columns(pl.col("emb").cast(pl.List(pl.Float32)))
        name = f"{writer}-{codec}-{version}-{index}-{emb_kind}.parquet"
        path = folder / name
        if writer == "polars":
            frame.write_parquet(path, compression=codec, row_group_size=n, data_page_size=8192)
        else:
            pq.write_table(frame.to_arrow(), path, compression=codec, row_group_size=n, data_page_size=8192,
                           data_page_version=version, write_page_index=index)
        row = {"file": name, "writer": writer, "codec": codec, "pages": version, "page_index": index, "emb": emb_kind}
        row["ours_page_by_page"] = pages_used(path, ["emb", "id", *keep])
        whole = pl.read_parquet(path).select(keep)
        try:
            o = digest_ours(path, 777, keep)
            row["ours_ok"] = o[2].equals(whole)
        except Exception as exc:
            o = None; row["ours_ok"] = f"{type(exc).__name__}: {exc}"[:200]
        try:
            p = digest_pa(path, 777, keep)
            row["pyarrow_kept_equal_polars"] = p[2].equals(whole)
            row["pyarrow_kept_schema_equal"] = p[2].schema == whole.schema
            if not row["pyarrow_kept_schema_equal"]:
                row["schema_diff"] = {c: [str(whole.schema[c]), str(p[2].schema[c])] for c in keep if whole.schema[c] != p[2].schema[c]}
        except Exception as exc:
            p = None; row["pyarrow_kept_equal_polars"] = f"{type(exc).__name__}: {exc}"[:200]
        row["x_ids_identical"] = bool(o and p and o[0] == p[0] and o[1] == p[1])
        rows.append(row)
out["layouts"] = rows

# 2. other embedding dtypes (one row group, batches inside it)
dt_rows = []
for label, dtype in [("Array(Float64)", pl.Array(pl.Float64, d)), ("Array(Int8)", pl.Array(pl.Int8, d)),
                     ("Array(Int64)", pl.Array(pl.Int64, d)), ("Array(UInt8)", pl.Array(pl.UInt8, d)),
                     ("Array(Float16)", pl.Array(pl.Float16, d)) if hasattr(pl, "Float16") else (None, None),
                     ("List(Float32)", pl.List(pl.Float32))]:
    if label is None:
        continue
    path = folder / f"dtype-{label}.parquet"
    row = {"dtype": label}
    try:
        src = np.abs(emb) if label == "Array(UInt8)" else emb
        base.with_columns(pl.Series("emb", src).cast(dtype)).write_parquet(path, row_group_size=n)
    except Exception as exc:
        row["write"] = f"{type(exc).__name__}: {exc}"[:200]; dt_rows.append(row); continue
    row["ours_page_by_page"] = pages_used(path, ["emb", "id"])
    row["pyarrow_type"] = str(pq.ParquetFile(path).schema_arrow.field("emb").type)
    try:
        o = digest_ours(path, 600)
    except Exception as exc:
        o = None; row["ours"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        p = digest_pa(path, 600)
    except Exception as exc:
        p = None; row["pyarrow"] = f"{type(exc).__name__}: {exc}"[:200]
    row["x_ids_identical"] = bool(o and p and o[:2] == p[:2])
    dt_rows.append(row)
out["dtypes"] = dt_rows

# 3. several row groups: exact batch sizes across row-group boundaries
path = folder / "many-groups.parquet"
base.write_parquet(path, row_group_size=333)
o, p = digest_ours(path, 1000), digest_pa(path, 1000)
out["many_row_groups"] = {"ours_sizes_exact": set(o[1][:-1]) == {1000}, "pyarrow_sizes": sorted(set(p[1])),
                          "x_ids_identical": o[:2] == p[:2]}

# 4. nulls in the embedding column (a null row; a null element inside a vector)
null_rows = []
for label, series in [
    ("null row 1234", pl.Series("emb", [None if i == 1234 else emb[i].tolist() for i in range(n)], dtype=pl.Array(pl.Float32, d))),
    ("null element in row 2345", pl.Series("emb", [[*emb[i, :3].tolist(), None, *emb[i, 4:].tolist()] if i == 2345 else emb[i].tolist() for i in range(n)], dtype=pl.Array(pl.Float32, d))),
]:
    path = folder / f"nulls-{label.replace(' ', '_')}.parquet"
    base.with_columns(series).write_parquet(path, row_group_size=n)
    row = {"case": label, "ours_page_by_page": pages_used(path, ["emb", "id"])}
    try:
        digest_ours(path, 1000); row["ours"] = "no error"
    except VQError as exc:
        row["ours"] = str(exc)[:160]
    pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    found = []
    for i, rb in enumerate(pf.iter_batches(batch_size=1000, columns=["emb"])):
        col = rb.column("emb")
        if col.null_count:
            found.append(("null row", i * 1000 + pc.index(pc.is_null(col), True).as_py()))
        elif col.values.null_count:
            first = pc.index(pc.is_null(col.values), True).as_py()
            found.append(("null element", i * 1000 + first // d))
    row["pyarrow_sees"] = found
    null_rows.append(row)
out["nulls"] = null_rows

# 5. corrupt and truncated files: pyarrow in child processes (a crash kills only the child)
frame = pl.DataFrame({"id": np.arange(2000), "emb": np.round(rng.standard_normal((2000, 16)), 1).astype(np.float32)})
goods = {"polars": folder / "good-polars.parquet", "pyarrow": folder / "good-pyarrow.parquet",
         "pyarrow-lists": folder / "good-pyarrow-lists.parquet"}
frame.write_parquet(goods["polars"], row_group_size=700)
pq.write_table(frame.to_arrow(), goods["pyarrow"], row_group_size=700, data_page_size=4000)
pq.write_table(frame.with_columns(pl.col("emb").cast(pl.List(pl.Float32))).to_arrow(), goods["pyarrow-lists"],
               row_group_size=700, data_page_size=4000)
READER = r"""
import sys, pyarrow as pa, pyarrow.parquet as pq, pyarrow.compute as pc
for p in sys.argv[1:]:
    try:
        pf = pq.ParquetFile(p, buffer_size=1 << 20, pre_buffer=False)
        for rb in pf.iter_batches(batch_size=300, columns=["emb", "id"]):
            col = rb.column("emb")
            if col.null_count or pc.list_flatten(col).null_count:
                raise ValueError("nulls")
            pc.list_flatten(col).to_numpy(); rb.column("id").to_numpy()
        print(p, "ok", flush=True)
    except Exception as exc:
        print(p, "error", type(exc).__name__, str(exc).splitlines()[0][:120].replace(" ", "_") if str(exc) else "", flush=True)
"""
import random
rnd = random.Random(0)
corrupt = {}
for kind, good in goods.items():
    raw = good.read_bytes()
    files = []
    for trial in range(60):
        at = rnd.randrange(len(raw) // 10, len(raw) - 8) if trial % 2 else rnd.randrange(len(raw) - 600, len(raw) - 8)
        flipped = bytearray(raw); flipped[at] ^= rnd.randrange(1, 256)
        f = folder / f"bad-{kind}-{trial}.parquet"; f.write_bytes(bytes(flipped)); files.append(f)
    cut = folder / f"cut-{kind}.parquet"; cut.write_bytes(raw[: len(raw) // 2]); files.append(cut)
    results, todo, crashes = {}, [str(f) for f in files], []
    while todo:
        proc = subprocess.run([sys.executable, "-c", READER, *todo], capture_output=True, text=True, timeout=300)
        for line in proc.stdout.splitlines():
            p, verdict, *rest = line.split(" ")
            results[p] = (verdict, *rest)
        todo = [t for t in todo if t not in results]
        if proc.returncode != 0 and todo:
            crashes.append((todo[0], proc.returncode)); results[todo[0]] = ("CRASH", str(proc.returncode)); todo = todo[1:]
    ours = {"ok": 0, "named_error": 0, "other": []}
    for f in files:
        try:
            digest_ours(f, 300); ours["ok"] += 1
        except VQError as exc:
            ours["named_error"] += ("Fix:" in str(exc) and f.name in str(exc))
        except BaseException as exc:
            ours["other"].append(f"{f.name}: {type(exc).__name__}")
    verdicts = [r[0] for r in results.values()]
    errtypes = sorted({r[1] for r in results.values() if r[0] == "error"})
    corrupt[kind] = {"files": len(files), "pyarrow_ok": verdicts.count("ok"), "pyarrow_error": verdicts.count("error"),
                     "pyarrow_crash": verdicts.count("CRASH"), "pyarrow_error_types": errtypes,
                     "pyarrow_truncated": results[str(cut)], "ours": ours}
out["corrupt"] = corrupt
print(json.dumps(out))
'''


def run_checks(folder: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECKS, str(folder)],
        capture_output=True,
        text=True,
        cwd=SRC,
        env=_child_env(),
        timeout=1800,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the parquet files go (default: a temp folder)")
    ap.add_argument("--shapes", nargs="+", default=["1000000x128", "200000x384"])
    ap.add_argument("--batch-rows", nargs="+", type=int, default=[8192, 65536])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--src", type=Path, default=ROOT, help="folder holding the vq_pipeline package to measure "
                    "(e.g. a `git archive HEAD vq_pipeline` export; default: this checkout)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "parquet_read.json")
    args = ap.parse_args()
    global SRC
    SRC = args.src.resolve()

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pq_bench_", dir="/tmp")
        folder = Path(tmp.name)
    else:
        folder = args.dir
        folder.mkdir(parents=True, exist_ok=True)

    import polars as pl  # noqa: F401 - versions only
    import pyarrow as pa

    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": {"pyarrow": pa.__version__, "polars": sys.modules["polars"].__version__},
        "command": " ".join([Path(sys.executable).relative_to(ROOT).as_posix() if sys.executable.startswith(str(ROOT))
                             else sys.executable, *sys.argv]),
        "vq_pipeline_from": str(SRC),
        "runs": [],
        "summary": [],
    }
    files = []
    for shape in args.shapes:
        n, d = (int(v) for v in shape.split("x"))
        t0 = time.perf_counter()
        path = generate(folder, n, d)
        files.append((shape, n, d, path, generate(folder, 20_000, d)))
        print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)

    for rep in range(args.repeats):  # interleaved: a slow spell of the machine hits every method alike
        for shape, _, _, path, warm in files:
            for batch_rows in args.batch_rows:
                for method in args.methods:
                    r = run_child(method, path, batch_rows, warm)
                    r.update(shape=shape, batch_rows=batch_rows, repeat=rep, file_mib=path.stat().st_size / 2**20)
                    report["runs"].append(r)
                    if "error" in r:
                        print(f"  {shape} B={batch_rows} {method}: ERROR {r['error'][-300:]}", flush=True)
                    else:
                        print(f"  rep {rep} {shape} B={batch_rows} {method}: {r['seconds']:.2f} s, "
                              f"+{r['growth_mib']:.0f} MiB (+{r['growth_after_warm_mib']:.0f} after warm-up)", flush=True)

    header = (f"| shape | file MiB | batch | method | wall s (median) | MiB/s | peak RSS growth MiB (VmHWM) | "
              f"growth after warm-up MiB | ru_maxrss growth MiB | batches exact | same bytes as ours | pages reads |")
    lines = [header, "|---" * 12 + "|"]
    for shape, n, d, path, _ in files:
        for batch_rows in args.batch_rows:
            ours_sha = {r["sha256"] for r in report["runs"] if r.get("method") == "ours" and r["shape"] == shape
                        and r["batch_rows"] == batch_rows and "sha256" in r}
            for method in args.methods:
                rs = [r for r in report["runs"] if r["method"] == method and r["shape"] == shape
                      and r["batch_rows"] == batch_rows and "error" not in r]
                if not rs:
                    lines.append(f"| {shape} | | {batch_rows} | {method} | ERROR | | | | | | | |")
                    continue
                sec = statistics.median(r["seconds"] for r in rs)
                growth = statistics.median(r["growth_mib"] for r in rs)
                maxrss = statistics.median(r["maxrss_growth_mib"] for r in rs)
                after_warm = statistics.median(r["growth_after_warm_mib"] for r in rs)
                mibs = rs[0]["bytes"] / 2**20 / sec
                shas = {r["sha256"] for r in rs}
                same = (shas == ours_sha) if ours_sha else None
                s = {"shape": shape, "batch_rows": batch_rows, "method": method, "repeats": len(rs),
                     "seconds_median": sec, "seconds_all": [r["seconds"] for r in rs], "mib_per_s": mibs,
                     "growth_mib_median": growth, "growth_mib_all": [r["growth_mib"] for r in rs],
                     "maxrss_growth_mib_median": maxrss, "growth_after_warm_mib_median": after_warm, "rows": rs[0]["rows"], "decoded_mib": rs[0]["bytes"] / 2**20,
                     "file_mib": rs[0]["file_mib"], "sizes_exact": all(r["sizes_exact"] for r in rs),
                     "same_bytes_as_ours": same, "pages_reads": rs[0].get("pages_reads")}
                report["summary"].append(s)
                lines.append(f"| {shape} | {s['file_mib']:.0f} | {batch_rows} | {method} | {sec:.2f} | {mibs:.0f} | "
                             f"{growth:.0f} | {after_warm:.0f} | {maxrss:.0f} | {s['sizes_exact']} | {same} | "
                             f"{'' if s['pages_reads'] is None else s['pages_reads']} |")
    table = "\n".join(lines)
    print()
    print(table)
    report["table"] = table

    if not args.no_checks:
        t0 = time.perf_counter()
        report["checks"] = run_checks(folder / "checks")
        print(f"\nlayout checks ({time.perf_counter() - t0:.0f} s):")
        print(json.dumps(report["checks"], indent=1)[:20000])

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
