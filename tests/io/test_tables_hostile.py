"""Reading tables that a careless or hostile world hands over: one huge row group, names that look like
globs, symlinked folders, in-place edits, corrupt bytes, odd id columns, odd --keep lists."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_pipeline import InvalidInputError, VQError, fit_codebook
from vq_pipeline.io import tables
from vq_pipeline.io.discovery import Source, discover
from vq_pipeline.io.tables import duplicate_ids, fingerprint, inspect_source, iter_batches, read_table, sample_rows
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.encode_state import state_dir
from vq_pipeline.settings import EncodeOptions, EncodeSettings

ROOT = Path(__file__).resolve().parents[2]


def embeddings(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def write_one_row_group(path: Path, x: np.ndarray, *, writer: str) -> None:
    """One row group holding every row: polars (with a page index) or pyarrow's defaults (snappy,
    v1 data pages, no page index, the vectors as a fixed-size list)."""
    if writer == "polars":
        pl.DataFrame({"id": np.arange(len(x)), "emb": x}).write_parquet(path, row_group_size=len(x))
    else:
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
        pq.write_table(pa.table({"id": np.arange(len(x)), "emb": emb}), path, row_group_size=len(x))
    assert pq.ParquetFile(path).metadata.num_row_groups == 1


# ----------------------------------------------------------------- 1. memory and time follow batch_rows

_STREAM = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np, polars as pl
    from vq_pipeline.io import tables

    def peak_rss():  # this process's own high-water mark (ru_maxrss would include the parent's, from before exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    path, warm, batch_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])


    def stream(path):
        (source,) = tables.discover([path])
        n = tables.inspect_source(source, column="emb").n_rows
        h, sizes = hashlib.sha256(), []
        for b in tables.iter_batches(source, column="emb", id_column="id", batch_rows=batch_rows):
            sizes.append((b.offset, len(b)))
            h.update(b.x.numpy().tobytes())
            h.update(b.ids.to_numpy().tobytes())
        return source, n, h.hexdigest(), sizes


    def sample(source, n):
        positions = np.sort(np.random.default_rng(0).choice(n, 3000, replace=False))
        ((_, _, x),) = tables.sample_rows([source], [n], positions, column="emb", batch_rows=batch_rows)
        return hashlib.sha256(x.numpy().tobytes()).hexdigest()


    sample(*stream(warm)[:2])  # a small file of the same kind first: polars' readers and threads are set up
    base = peak_rss()
    source, n, sha, sizes = stream(path)
    streamed = peak_rss()
    sample_sha = sample(source, n)
    sampled = peak_rss()
    print(json.dumps({"base": base, "streamed": streamed, "sampled": sampled, "sha": sha, "sizes": sizes,
                      "sample_sha": sample_sha}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["polars", "pyarrow"])
def test_a_one_row_group_file_streams_in_bounded_memory_with_exact_batches(tmp_path: Path, writer: str) -> None:
    n, dim, batch_rows = 300_000, 128, 4096
    x = embeddings(n, dim)  # random floats do not compress: the row group is as large on disk as decoded
    decoded = x.nbytes  # 154 MB
    path, warm = tmp_path / "one_group.parquet", tmp_path / "warm.parquet"
    write_one_row_group(path, x, writer=writer)
    write_one_row_group(warm, x[:20_000], writer=writer)
    proc = subprocess.run(
        [sys.executable, "-c", _STREAM, str(path), str(warm), str(batch_rows)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # Byte-exact: the batches are the file's rows in order, batch_rows at a time.
    want = hashlib.sha256()
    for start in range(0, n, batch_rows):
        want.update(x[start : start + batch_rows].tobytes())
        want.update(np.arange(start, min(n, start + batch_rows), dtype=np.int64).tobytes())
    assert got["sha"] == want.hexdigest()
    assert got["sizes"] == [[s, min(batch_rows, n - s)] for s in range(0, n, batch_rows)]
    positions = np.sort(np.random.default_rng(0).choice(n, 3000, replace=False))
    assert got["sample_sha"] == hashlib.sha256(x[positions].tobytes()).hexdigest()
    # Memory follows the batch (2 MB of embeddings), not the 154 MB row group.
    grew = (got["streamed"] - got["base"]) * 1024
    sampled = (got["sampled"] - got["base"]) * 1024
    assert grew < decoded / 4, f"streaming grew RSS by {grew / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB row group"
    assert sampled < decoded / 4, f"sampling grew RSS by {sampled / 2**20:.0f} MiB"


@pytest.mark.parametrize("writer", ["polars", "pyarrow"])
def test_a_one_row_group_file_encodes_like_the_same_rows_in_small_row_groups(tmp_path: Path, writer: str) -> None:
    x = embeddings(5000, 16, seed=1)
    for name in ("one", "many"):
        (tmp_path / "in" / name).mkdir(parents=True)
    write_one_row_group(tmp_path / "in" / "one" / "t.parquet", x, writer=writer)
    pl.DataFrame({"id": np.arange(5000), "emb": x}).write_parquet(tmp_path / "in" / "many" / "t.parquet", row_group_size=97)
    codebook = fit_codebook(torch.from_numpy(x[:2000]), 8, seed=0)
    for name in ("one", "many"):
        encode_tables([tmp_path / "in" / name], codebook, tmp_path / name, EncodeSettings(column="emb", id_column="id"), EncodeOptions(batch_rows=333))
    one, many = read_table(tmp_path / "one" / "t.parquet"), read_table(tmp_path / "many" / "t.parquet")
    assert one.equals(many) and one["id"].to_list() == list(range(5000))
    assert torch.equal(torch.from_numpy(one["code"].to_numpy().astype(np.int64)), codebook.encode(torch.from_numpy(x)))


def mixed_frame(n: int, seed: int) -> pl.DataFrame:
    """Every kind of column a table may carry next to its embeddings, nulls included."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 5)).astype(np.float32)
    return pl.DataFrame(
        {
            "id": rng.permutation(n).astype(np.int64),
            "emb": emb,
            "emb_nulls": pl.Series([None if i % 11 == 3 else emb[i, :2].tolist() for i in range(n)], dtype=pl.Array(pl.Float32, 2)),
            "lists": pl.Series([None if i % 7 == 0 else list(range(i % 4)) for i in range(n)], dtype=pl.List(pl.Int32)),
            "nested": pl.Series([[[i], []] if i % 5 else None for i in range(n)], dtype=pl.List(pl.List(pl.Int64))),
            "text": [None if i % 6 == 0 else f"t{rng.integers(0, 20)}" for i in range(n)],
            "struct": [{"a": i, "b": [float(i)] * (i % 3)} for i in range(n)],
            "flag": rng.random(n) < 0.5,
            "when": pl.datetime_range(pl.datetime(2026, 1, 1), pl.datetime(2026, 1, 1) + pl.duration(seconds=n - 1), "1s", eager=True, time_zone="UTC"),
        }
    )


WRITERS = [
    "polars",
    "pyarrow-snappy-1.0",
    "pyarrow-gzip-1.0",
    "pyarrow-none-1.0",
    "pyarrow-zstd-1.0",
    "pyarrow-zstd-2.0",
    "pyarrow-snappy-2.0-index",
]


def write_with(frame: pl.DataFrame, path: Path, writer: str, row_group_size: int) -> None:
    if writer == "polars":
        frame.write_parquet(path, row_group_size=row_group_size, data_page_size=1024)
        return
    _, compression, version, *index = writer.split("-")
    pq.write_table(
        frame.to_arrow(),
        path,
        row_group_size=row_group_size,
        data_page_size=1024,
        compression=compression,
        data_page_version=version,
        write_page_index=bool(index),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_rows=st.integers(1, 1500),
    row_group_size=st.integers(1, 2000),
    n_batches=st.integers(1, 12),
    writer=st.sampled_from(WRITERS),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_page_by_page_reads_equal_whole_file_reads(
    tmp_path: Path, n_rows: int, row_group_size: int, n_batches: int, writer: str, seed: int
) -> None:
    batch_rows = -(-n_rows // n_batches) + seed % 3
    frame = mixed_frame(n_rows, seed)
    path = tmp_path / f"{writer}-{n_rows}-{row_group_size}-{seed}.parquet"
    write_with(frame, path, writer, row_group_size)
    (source,) = discover([path])
    keep = [c for c in frame.columns if c != "id"]
    # Page by page, except v1 pages of list columns compressed with a codec the reader cannot open.
    assert (tables._Rows(source, ["id", *keep], None)._pages is None) == (writer == "pyarrow-zstd-1.0")
    whole = pl.read_parquet(path)
    batches = list(iter_batches(source, column="emb", id_column="id", batch_rows=batch_rows, keep=keep))
    assert [b.offset for b in batches] == list(range(0, n_rows, batch_rows))
    got = pl.concat([b.keep.with_columns(b.ids) for b in batches]).select(whole.columns)
    assert got.equals(whole) and got.schema == whole.schema
    assert torch.equal(torch.cat([b.x for b in batches]), torch.from_numpy(frame["emb"].to_numpy().copy()))


def test_sampled_rows_are_named_by_their_row_numbers(tmp_path: Path) -> None:
    x = embeddings(1000, 4).tolist()
    x[637] = None
    path = tmp_path / "t.parquet"
    pl.DataFrame({"emb": pl.Series(x, dtype=pl.Array(pl.Float32, 4))}).write_parquet(path, row_group_size=1000)
    (source,) = discover([path])
    ((_, local, got),) = sample_rows([source], [1000], np.array([3, 500, 999]), column="emb", batch_rows=64)
    assert local.tolist() == [3, 500, 999] and torch.equal(got, torch.tensor([x[3], x[500], x[999]]))
    with pytest.raises(InvalidInputError, match=r"column='emb' of .*t\.parquet.* is null at row 637;"):
        sample_rows([source], [1000], np.array([3, 500, 637, 999]), column="emb")


# ----------------------------------------------------------------- 2. literal paths, 3. symlinked folders


def in_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    return folder


def small_table(path: Path, value: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": [0, 1], "emb": np.full((2, 3), value, dtype=np.float32)}).write_parquet(path)
    return path


def test_a_path_that_exists_is_literal_even_with_glob_characters(tmp_path: Path) -> None:
    literal = small_table(tmp_path / "emb[1].parquet", 1.0)
    small_table(tmp_path / "emb1.parquet", 2.0)
    (source,) = discover([literal])
    assert source.uri == str(literal) and source.key == "emb[1].parquet"
    assert next(iter_batches(source, column="emb", batch_rows=10)).x[0, 0] == 1.0
    # A path that does not exist is a glob: here it matches only emb1.parquet.
    assert [s.key for s in discover([tmp_path / "emb[0-9].parquet"])] == ["emb1.parquet"]
    assert [s.key for s in discover([tmp_path / "emb*.parquet"])] == ["emb1.parquet", "emb[1].parquet"]
    folder = tmp_path / "runs[2026]"
    small_table(folder / "part-0.parquet", 3.0)
    assert [s.key for s in discover([folder])] == ["part-0.parquet"]


def test_symlinked_folders_are_followed_once_with_keys_as_seen(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    small_table(root / "real" / "a.parquet", 1.0)
    small_table(outside / "ext" / "b.parquet", 2.0)
    small_table(outside / "ext" / "deeper" / "c.parquet", 3.0)
    (root / "link").symlink_to(outside / "ext", target_is_directory=True)
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "alias").symlink_to(root / "real", target_is_directory=True)  # a folder reached twice
    (outside / "ext" / "back").symlink_to(outside / "ext", target_is_directory=True)  # a cycle behind a link
    (root / "file-link.parquet").symlink_to(outside / "ext" / "b.parquet")
    want = ["file-link.parquet", "link/b.parquet", "link/deeper/c.parquet", "real/a.parquet"]
    sources = discover([root])
    assert [s.key for s in sources] == want
    assert all(Path(s.uri) == root / s.key for s in sources)  # the paths the user sees, not resolved ones
    assert [s.key for s in discover([root / "**" / "*.parquet"])] == want
    assert [s.key for s in discover([str(root) + "/*/*.parquet"])] == ["alias/a.parquet", "link/b.parquet", "real/a.parquet"]


# ----------------------------------------------------------------- 4. change detection


def test_an_in_place_edit_that_restores_size_and_mtime_is_encoded_again(tmp_path: Path) -> None:
    def table(seed: int) -> bytes:
        path = tmp_path / f"tmp-{seed}.parquet"
        frame = pl.DataFrame({"id": np.arange(400), "emb": embeddings(400, 8, seed=seed)})
        frame.write_parquet(path, compression="uncompressed", statistics=False)
        return path.read_bytes()

    first, second = table(1), table(2)
    assert len(first) == len(second) and first != second
    path = tmp_path / "in" / "t.parquet"
    path.parent.mkdir()
    path.write_bytes(first)
    codebook = fit_codebook(torch.from_numpy(embeddings(400, 8, seed=1)), 4, seed=0)
    out = tmp_path / "codes"
    assert encode_tables([path.parent], codebook, out, EncodeSettings(column="emb")).encoded == ["t.parquet"]
    st = os.stat(path)
    with open(path, "r+b") as f:  # same inode, same size
        f.write(second)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns, os.stat(path).st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    again = encode_tables([path.parent], codebook, out, EncodeSettings(column="emb"))
    assert again.encoded == ["t.parquet"] and again.skipped == []
    codes = read_table(out / "t.parquet")["code"].to_numpy().astype(np.int64)
    assert np.array_equal(codes, codebook.encode(torch.from_numpy(embeddings(400, 8, seed=2))).numpy())
    assert encode_tables([path.parent], codebook, out, EncodeSettings(column="emb")).skipped == ["t.parquet"]


# ----------------------------------------------------------------- 5. corrupt files


def corrupt_files(tmp_path: Path) -> list[Path]:
    """Real parquet files of two writers, compressible (so flipped bytes break compressed pages)."""
    rng = np.random.default_rng(0)
    frame = pl.DataFrame({"id": np.arange(2000), "emb": np.round(rng.standard_normal((2000, 16)), 1).astype(np.float32)})
    a, b, c = (tmp_path / f"good-{name}.parquet" for name in ("polars", "pyarrow", "pyarrow-lists"))
    frame.write_parquet(a, row_group_size=700)
    pq.write_table(frame.to_arrow(), b, row_group_size=700, data_page_size=4000)
    lists = frame.with_columns(pl.col("emb").cast(pl.List(pl.Float32)))  # v1 pages found by their repetition levels
    pq.write_table(lists.to_arrow(), c, row_group_size=700, data_page_size=4000)
    return [a, b, c]


def touch_everything(path: Path) -> None:
    (source,) = discover([path])
    info = inspect_source(source, column="emb", id_column="id")
    for _ in iter_batches(source, column="emb", id_column="id", batch_rows=300):
        pass
    duplicate_ids([source], "id")
    sample_rows([source], [info.n_rows], np.arange(0, info.n_rows, 7), column="emb")
    fingerprint(source)


def test_flipped_bytes_give_errors_that_name_the_file_never_a_panic(tmp_path: Path, capfd) -> None:
    rnd = random.Random(0)
    escaped, messages = [], []
    for good in corrupt_files(tmp_path):
        raw = good.read_bytes()
        bad = tmp_path / f"bad-{good.name}"
        for trial in range(100):
            at = rnd.randrange(len(raw) // 10, len(raw) - 8) if trial % 2 else rnd.randrange(len(raw) - 600, len(raw) - 8)
            flipped = bytearray(raw)
            flipped[at] ^= rnd.randrange(1, 256)
            bad.write_bytes(bytes(flipped))
            try:
                touch_everything(bad)
            except VQError as exc:
                messages.append(str(exc))
            except BaseException as exc:  # noqa: BLE001 - polars' PanicException is a BaseException
                escaped.append(f"{good.name} byte {at}: {type(exc).__name__}: {str(exc)[:150]}")
    capfd.readouterr()  # Rust prints its panics' backtraces; they are not the test's output
    assert not escaped, escaped[:5]
    assert len(messages) > 50
    for message in messages:
        assert "bad-good-" in message and "Fix:" in message, message
    assert any("at rows" in m for m in messages)


def test_a_truncated_file_names_rows_nowhere_and_the_fix(tmp_path: Path) -> None:
    good = corrupt_files(tmp_path)[1]
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InvalidInputError, match=r"cut\.parquet.*cannot be read.*Fix: rewrite or remove the file"):
        touch_everything(tmp_path / "cut.parquet")
    with pytest.raises(InvalidInputError, match=r"cannot be read"):
        read_table(tmp_path / "cut.parquet")


# ----------------------------------------------------------------- 6. id columns


def test_id_columns_of_different_types_name_both_files_and_types(tmp_path: Path) -> None:
    x = embeddings(10, 4)
    pl.DataFrame({"id": pl.Series(range(10), dtype=pl.Int64), "emb": x}).write_parquet(in_dir(tmp_path) / "a.parquet")
    pl.DataFrame({"id": pl.Series(range(10, 20), dtype=pl.Int32), "emb": x}).write_parquet(tmp_path / "in" / "b.parquet")
    codebook = fit_codebook(torch.from_numpy(x), 2, seed=0)
    with pytest.raises(InvalidInputError) as err:
        encode_tables([tmp_path / "in"], codebook, tmp_path / "out", EncodeSettings(column="emb", id_column="id"))
    message = str(err.value)
    for part in ("a.parquet", "b.parquet", "Int64", "Int32", "Fix: cast the id column to one type"):
        assert part in message, message
    assert "\n" not in message


def test_null_ids_are_reported_as_nulls_with_file_and_row(tmp_path: Path) -> None:
    x = embeddings(10, 4)
    ids = pl.Series([0, 1, 2, None, 4, None, 6, 7, 8, 9], dtype=pl.Int64)
    pl.DataFrame({"id": ids, "emb": x}).write_parquet(in_dir(tmp_path) / "a.parquet")
    codebook = fit_codebook(torch.from_numpy(x), 2, seed=0)
    with pytest.raises(InvalidInputError, match=r"id_column='id' is null at row 3 of .*a\.parquet.*2 null ids") as err:
        encode_tables([tmp_path / "in"], codebook, tmp_path / "out", EncodeSettings(column="emb", id_column="id"))
    assert "duplicate" not in str(err.value)


# ----------------------------------------------------------------- 7. --keep


def test_the_embedding_column_can_be_kept(tmp_path: Path) -> None:
    x = embeddings(50, 4)
    path = tmp_path / "in" / "a.parquet"
    pl.DataFrame({"id": np.arange(50), "emb": x, "note": [f"n{i}" for i in range(50)]}).write_parquet(in_dir(tmp_path) / "a.parquet")
    codebook = fit_codebook(torch.from_numpy(x), 3, seed=0)
    encode_tables([path], codebook, tmp_path / "out", EncodeSettings(column="emb", id_column="id", keep=["emb", "note"]), EncodeOptions(batch_rows=7))
    out = read_table(tmp_path / "out" / "a.parquet")
    assert out.columns == ["id", "code", "emb", "note"]
    assert out["emb"].dtype == pl.Array(pl.Float32, 4) and np.array_equal(out["emb"].to_numpy(), x)


@pytest.mark.parametrize(
    ("keep", "id_column", "pattern"),
    [
        (["code"], "id", r"keep='code' clashes with a column the code table writes itself"),
        (["distance"], "id", r"keep='distance' clashes"),
        (["id"], "id", r"keep='id' clashes with the id column"),
        (["row"], None, r"keep='row' clashes with the id column"),
        (["note", "note"], "id", r"names 'note' twice"),
    ],
)
def test_kept_columns_that_clash_are_refused_before_any_work(
    tmp_path: Path, keep: list[str], id_column: str | None, pattern: str
) -> None:
    x = embeddings(20, 4)
    path = tmp_path / "in" / "a.parquet"
    columns = {"id": np.arange(20), "emb": x, "note": ["n"] * 20, "code": [1] * 20, "row": [2] * 20, "distance": [0.0] * 20}
    pl.DataFrame(columns).write_parquet(in_dir(tmp_path) / "a.parquet")
    codebook = fit_codebook(torch.from_numpy(x), 2, seed=0)
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=pattern) as err:
        encode_tables([path], codebook, out, EncodeSettings(column="emb", id_column=id_column, keep=keep))
    assert "Fix:" in str(err.value) and "rewrite or remove" not in str(err.value)
    assert not out.exists() and not state_dir(out).exists()


def test_a_missing_column_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    path = small_table(tmp_path / "a.parquet", 1.0)
    with pytest.raises(InvalidInputError, match=r"keep='nope' is not a column") as err:
        list(iter_batches(Source(str(path), "a.parquet"), column="emb", batch_rows=5, keep=["nope"]))
    assert "rewrite or remove" not in str(err.value)
