"""Every codec at every byte budget against FAISS: one table to choose a codec from, in fresh processes.

Command, from the repository root (FAISS in the interpreter's environment: the ``.venv-bench`` of
``benchmarks/README.md``, or ``faiss-cpu`` in the project venv)::

    .venv-bench/bin/python benchmarks/byte_budget.py [--quick] [--repeats R] [--budgets 8,16,32,64,128,256]
                                                     [--methods LIST] [--queries N] [--json PATH]

FAISS missing: its methods are skipped with a message; ours (and the numpy sign-bit baseline) still run.

Data: the ``wordllama`` token-embedding matrix, 32,000 x 256 float32 (``harness.wordllama``), split by the seeded
permutation of ``harness.split`` into 25,600 training rows and 6,400 new rows (``--quick``: the first 8,000 rows of
the permutation, 6,400 / 1,600, 200 queries and one repeat).

Budgets, in bytes per vector of the 256-d rows (``--budgets`` picks some), and the methods at each:

* product codes with 8-bit codes (K = 256 per level), ``levels`` = bytes (8 ... 256; 256 / levels dims a slice):
  ``ours-pqL`` ``fit_codebook(train, 256, codec="product", levels=L)``, ``ours-opq-pqL`` the same with
  ``rotation="opq"``, ``faiss-pqL`` ``faiss.ProductQuantizer(d, L, 8)``, ``faiss-opq-pqL``
  ``faiss.OPQMatrix(d, L)`` trained, then ``ProductQuantizer(d, L, 8)`` trained on the rotated rows; encode
  ``pq.compute_codes(opq.apply(x))``, decode ``opq.reverse_transform(pq.decode(codes))``;
* residual codes at 8 and 16 bytes: ``ours-rqL`` ``codec="residual", levels=L``, ``faiss-rqL``
  ``faiss.ResidualQuantizer(d, L, 8)`` at its defaults (beam 5 in train and encode);
* 32 bytes, binary codes (one bit per dimension): ``ours-bin`` ``codec="binary"`` (rotation none), ``ours-bin-random``
  and ``ours-bin-itq`` (``rotation="random" | "itq"``); ``signbits`` the baseline users build for FAISS's
  ``IndexBinaryFlat``: the bits of ``x > mean`` (training mean), packed, decoded as ``mean ± s`` with ``s`` the
  per-dimension mean ``|x - mean|`` on the training rows (numpy only: it runs without FAISS too); ``faiss-itq``
  ``faiss.ITQTransform(d, d, True)`` at its defaults (PCA then ITQ, trained on at most 10 x d rows), bits
  ``apply(x) > 0``, decoded the same way in its rotated space and rotated back (its transform is orthogonal);
* 128 bytes: ``ours-sq4`` ``codec="scalar", bits=4`` against ``faiss-sq4``
  ``faiss.ScalarQuantizer(d, QT_4bit)``; 256 bytes: ``ours-sq8`` / ``faiss-sq8`` (``QT_8bit``), all with min/max
  ranges (both defaults); ``ours-sq4-quantile`` / ``ours-sq8-quantile`` with ``scalar_range="quantile"``,
  ``ours-sq4-mse`` / ``ours-sq8-mse`` with ``scalar_range="mse"``.

Our fits run at the library's defaults otherwise (``seed=0``, ``device="cpu"``); FAISS at its own.

Figures, per method (one fresh process each that imports only what it measures, like ``fair.py`` and
``codecs.py``; one untimed warm-up fit and encode on the first 1,024 rows, with 2 levels for our residual codes;
2 threads for everybody):

* train seconds: the whole fit / train call(s) on the training rows;
* encode rows/s: one whole encode call on the new rows (ours: ``cb.encode(new)``, unpacked codes; FAISS:
  ``compute_codes``, after ``opq.apply`` / ``itq.apply`` where there is one; sign bits: ``np.packbits(x > mean)``);
* new-row error: mean over the new rows of the squared L2 norm of ``x - decode(encode(x))``, in float64;
* recall@10: N (1,000) seeded query rows drawn from the new rows; for each, its true 10 nearest neighbours among the
  other new rows (exact float64 L2 on the original vectors) against the 10 nearest by float64 L2 between the query's
  original vector and the decoded vectors of the other new rows (asymmetric search, as FAISS's ``IndexPQ`` and
  ``IndexScalarQuantizer`` search); the share found, averaged over the queries. Binary codes also get the symmetric
  Hamming recall: the 10 nearest by Hamming distance between packed codes, ties broken by row index;
* bytes per vector (for our scalar and binary codes also the width of ``cb.pack(codes)``, their file form), peak
  RSS of the worker, and the load it ran under (``/proc/pressure/cpu`` stall share, load average).

Runs are interleaved (every method once per repeat, the order rotated), medians of R (3) repeats. The errors and
recalls are seeded and do not move between repeats (their spread is recorded). Targets (issue 27) are printed as
met / not met with their figures, from the ratios of this run:

* OPQ + product at 16 x 8 bits: error <= 1.0x FAISS ``OPQMatrix`` + ``ProductQuantizer``, train time <= 0.5x;
* scalar 8-bit: error <= 1.0x FAISS ``QT_8bit``, encode rows/s >= FAISS's;
* binary: recall@10 of decoded vectors >= the sign-bit baseline at equal bytes; with ITQ measurably higher than it
  (the mean per-query difference at least twice its standard error).

A method that fails is recorded with its error in its row; the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import harness

THREADS = harness.THREADS
SEED = 0
WARM_ROWS = 1024
QUICK_ROWS = 8000
QUERIES = 1000
QUICK_QUERIES = 200
QUERY_SEED = 27
TOP = 10
BUDGETS = (8, 16, 32, 64, 128, 256)
RESIDUAL_BUDGETS = (8, 16)


def method_table(dim: int, budgets: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Every method at the given budgets: library, codec, levels, rotation, bits, bytes, label, FAISS pair."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, **kw: Any) -> None:
        out[name] = {"rotation": "none", "bits": 8, "levels": 1, "pair": None, "scalar_range": "minmax", **kw}

    for b in budgets:
        if dim % b == 0:
            add(f"faiss-pq{b}", lib="faiss", codec="product", levels=b, bytes=b, label=f"FAISS PQ {b}×8")
            add(f"faiss-opq-pq{b}", lib="faiss", codec="product", levels=b, rotation="opq", bytes=b,
                label=f"FAISS OPQ + PQ {b}×8")  # fmt: skip
            add(f"ours-pq{b}", lib="ours", codec="product", levels=b, bytes=b, label=f"ours product {b}×8",
                pair=f"faiss-pq{b}")  # fmt: skip
            add(f"ours-opq-pq{b}", lib="ours", codec="product", levels=b, rotation="opq", bytes=b,
                label=f"ours product {b}×8, rotation=opq", pair=f"faiss-opq-pq{b}")  # fmt: skip
        if b in RESIDUAL_BUDGETS:
            add(f"faiss-rq{b}", lib="faiss", codec="residual", levels=b, bytes=b, label=f"FAISS RQ {b}×8 (beam 5)")
            add(f"ours-rq{b}", lib="ours", codec="residual", levels=b, bytes=b, label=f"ours residual {b}×8",
                pair=f"faiss-rq{b}")  # fmt: skip
        if b * 8 == dim:
            add("signbits", lib="numpy", codec="binary", bytes=b, label="sign bits (IndexBinaryFlat baseline)")
            add("faiss-itq", lib="faiss", codec="binary", rotation="itq", bytes=b, label="FAISS ITQTransform + sign")
            for rot, suffix in (("none", ""), ("random", "-random"), ("itq", "-itq")):
                add(f"ours-bin{suffix}", lib="ours", codec="binary", rotation=rot, bytes=b, pair="signbits",
                    label=f"ours binary, rotation={rot}")  # fmt: skip
        for bits in (4, 8):
            if b * 8 == dim * bits:
                add(f"faiss-sq{bits}", lib="faiss", codec="scalar", bits=bits, bytes=b, label=f"FAISS SQ QT_{bits}bit")
                add(f"ours-sq{bits}", lib="ours", codec="scalar", bits=bits, bytes=b, pair=f"faiss-sq{bits}",
                    label=f"ours scalar {bits}-bit")  # fmt: skip
                for rng in ("quantile", "mse"):
                    add(
                        f"ours-sq{bits}-{rng}",
                        lib="ours",
                        codec="scalar",
                        bits=bits,
                        scalar_range=rng,
                        bytes=b,
                        pair=f"faiss-sq{bits}",
                        label=f"ours scalar {bits}-bit, scalar_range={rng}",
                    )
    return out


# ----------------------------------------------------------------------------- evaluation (numpy, every worker)


def sq_error(x: np.ndarray, xr: np.ndarray) -> float:
    """Mean over rows of the squared L2 norm of x - xr, float64."""
    if xr.shape != x.shape:
        raise ValueError(f"decode returned shape {xr.shape}; expected {x.shape}")
    total = 0.0
    for s in range(0, x.shape[0], 4096):
        total += float(np.square(x[s : s + 4096].astype(np.float64) - xr[s : s + 4096].astype(np.float64)).sum())
    return total / x.shape[0]


def nearest_l2(queries: np.ndarray, q_rows: np.ndarray, base: np.ndarray, k: int = TOP) -> np.ndarray:
    """(nq, k) row indices of ``base``: the k nearest to each query by float64 L2, the query's own row
    (``q_rows``) left out, nearest first."""
    b64 = base.astype(np.float64)
    bn = np.square(b64).sum(1)
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for s in range(0, queries.shape[0], 256):
        q = queries[s : s + 256].astype(np.float64)
        d = bn[None, :] - 2.0 * (q @ b64.T)  # + |q|^2, constant per query
        d[np.arange(q.shape[0]), q_rows[s : s + 256]] = np.inf
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
        out[s : s + 256] = np.take_along_axis(part, order, 1)
    return out


def nearest_hamming(packed: np.ndarray, q_rows: np.ndarray, k: int = TOP) -> np.ndarray:
    """(nq, k) indices: the k nearest rows to each query row by Hamming distance between packed codes,
    the query left out, ties broken by row index."""
    n, nb = packed.shape
    pad = (-nb) % 8
    words = np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)  # (n, ceil(nb / 8))
    out = np.empty((q_rows.size, k), dtype=np.int64)
    for s in range(0, q_rows.size, 128):
        qi = q_rows[s : s + 128]
        d = np.bitwise_count(words[qi][:, None, :] ^ words[None, :, :]).sum(2, dtype=np.int64)
        d[np.arange(qi.size), qi] = np.iinfo(np.int64).max
        out[s : s + 128] = np.argsort(d, axis=1, kind="stable")[:, :k]
    return out


def hits(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query: how many of its true neighbours were found."""
    return np.array([np.intersect1d(f, t).size for f, t in zip(found, truth, strict=True)], dtype=np.int64)


def evaluate(new: np.ndarray, xr: np.ndarray, folder: Path, packed: np.ndarray | None, rec: dict[str, Any]) -> None:
    """Error and recall of one method's decoded new rows (and Hamming recall of its packed bits)."""
    q_rows, truth = np.load(folder / "queries.npy"), np.load(folder / "truth.npy")
    rec["new_error"] = sq_error(new, xr)
    h = hits(nearest_l2(new[q_rows], q_rows, xr), truth)
    rec["recall"] = float(h.mean() / TOP)
    rec["hits"] = h.tolist()
    if packed is not None:
        hh = hits(nearest_hamming(packed, q_rows), truth)
        rec["hamming_recall"] = float(hh.mean() / TOP)
        rec["hamming_hits"] = hh.tolist()


# ----------------------------------------------------------------------------- the workers


def _numpy(a: Any) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def _ours(m: dict[str, Any], train: np.ndarray, new: np.ndarray, rec: dict[str, Any]) -> Any:
    from vq_pipeline.runtime import apply_omp_waits

    apply_omp_waits()  # before torch, as the vq command and the flows do for users
    import torch  # noqa: F401 - for limit_threads

    import vq_pipeline

    harness.limit_threads(rec["threads"])
    codec = m["codec"]
    kw: dict[str, Any] = {"codec": codec, "seed": SEED, "device": "cpu"}
    if codec in ("product", "residual"):
        n_codes, kw["levels"] = 256, m["levels"]
    else:
        n_codes = 2 ** m["bits"] if codec == "scalar" else 2
    if codec == "scalar":
        kw["bits"], kw["scalar_range"] = m["bits"], m["scalar_range"]
    if m["rotation"] != "none":
        kw["rotation"] = m["rotation"]

    def fit(x: np.ndarray, **extra: Any) -> Any:
        return vq_pipeline.fit_codebook(x, n_codes, **kw, **extra)

    # a residual warm-up keeps 2 levels: 1,024 rows leave too few distinct residuals for 8 or 16 levels of 256 codes
    warm_kw = {"n_iter": 1, "levels": 2} if codec == "residual" else {"n_iter": 1} if codec == "product" else {}
    warm = vq_pipeline.fit_codebook(train[:WARM_ROWS], n_codes, **{**kw, **warm_kw})
    warm.decode(warm.encode(new[:WARM_ROWS]))
    cb, rec["train_s"] = harness.timed(lambda: fit(train))
    rec["codebook"] = {k: str(getattr(cb, k, "<missing>")) for k in ("codec", "levels", "n_codes", "dim")}
    rec["stats"] = json.loads(json.dumps(getattr(cb, "stats", None), default=str))
    rec["settings"] = json.loads(json.dumps(getattr(cb, "settings", None), default=str))
    if m["rotation"] != "none" and getattr(cb, "rotation", None) is None:
        rec["api_notes"].append(f"rotation={m['rotation']!r} fitted, but cb.rotation is None")
    cb.encode(new[:WARM_ROWS])
    codes, rec["encode_s"] = harness.timed(lambda: cb.encode(new))
    codes = _numpy(codes)
    xr, rec["decode_s"] = harness.timed(lambda: _numpy(cb.decode(codes)))
    packed = None
    if codec in ("scalar", "binary"):
        try:
            p = _numpy(cb.pack(codes))
            rec["packed_bytes"] = int(p.shape[1]) if p.ndim == 2 else None
        except Exception as e:  # noted, the codes are measured all the same
            rec["api_notes"].append(f"cb.pack: {type(e).__name__}: {e}")
    if codec == "binary":
        packed = np.packbits(codes.astype(np.uint8), axis=1)
        if rec.get("packed_bytes") is not None and not np.array_equal(_numpy(cb.pack(codes)), packed):
            rec["api_notes"].append("cb.pack(codes) differs from np.packbits(codes, axis=1)")
    return xr, packed


def _faiss(m: dict[str, Any], train: np.ndarray, new: np.ndarray, rec: dict[str, Any]) -> Any:
    import faiss

    harness.limit_threads(rec["threads"])
    d, codec, levels = train.shape[1], m["codec"], m["levels"]

    if codec == "scalar":
        qtype = faiss.ScalarQuantizer.QT_8bit if m["bits"] == 8 else faiss.ScalarQuantizer.QT_4bit

        def fit(x: np.ndarray) -> Any:
            q = faiss.ScalarQuantizer(d, qtype)
            q.train(x)
            return q

        def encode(q: Any, x: np.ndarray) -> Any:
            return q.compute_codes(x)

        def decode(q: Any, c: Any) -> np.ndarray:
            return q.decode(c)

    elif codec == "residual" or (codec == "product" and m["rotation"] == "none"):

        def fit(x: np.ndarray) -> Any:
            q = faiss.ProductQuantizer(d, levels, 8) if codec == "product" else faiss.ResidualQuantizer(d, levels, 8)
            q.train(x)
            return q

        def encode(q: Any, x: np.ndarray) -> Any:
            return q.compute_codes(x)

        def decode(q: Any, c: Any) -> np.ndarray:
            return q.decode(c)

    elif codec == "product":  # OPQ, then PQ on the rotated rows

        def fit(x: np.ndarray) -> Any:
            opq = faiss.OPQMatrix(d, levels)
            opq.train(x)
            pq = faiss.ProductQuantizer(d, levels, 8)
            pq.train(opq.apply(x))
            return opq, pq

        def encode(q: Any, x: np.ndarray) -> Any:
            return q[1].compute_codes(q[0].apply(x))

        def decode(q: Any, c: Any) -> np.ndarray:
            return q[0].reverse_transform(q[1].decode(c))

    else:  # ITQ, then sign bits decoded to mean +- scale in the rotated space

        def fit(x: np.ndarray) -> Any:
            t = faiss.ITQTransform(d, d, True)
            t.train(x)
            a = faiss.vector_to_array(t.pca_then_itq.A).reshape(d, d).astype(np.float64)
            mean = faiss.vector_to_array(t.mean).astype(np.float64)
            u = (x.astype(np.float64) - mean) @ a.T
            return t, a, mean, np.abs(u).mean(0)

        def encode(q: Any, x: np.ndarray) -> Any:
            return np.packbits(q[0].apply(x) > 0, axis=1)

        def decode(q: Any, c: Any) -> np.ndarray:
            _, a, mean, s = q
            signs = np.unpackbits(c, axis=1, count=d).astype(np.float64) * 2.0 - 1.0
            return (mean + (signs * s) @ a).astype(np.float32)

    warm = fit(train[:WARM_ROWS])
    decode(warm, encode(warm, new[:WARM_ROWS]))
    q, rec["train_s"] = harness.timed(lambda: fit(train))
    if codec == "binary":
        a = q[1]
        rec["itq_orthogonality"] = float(np.abs(a @ a.T - np.eye(d)).max())
    encode(q, new[:WARM_ROWS])
    codes, rec["encode_s"] = harness.timed(lambda: encode(q, new))
    rec["packed_bytes"] = int(codes.shape[1])
    xr, rec["decode_s"] = harness.timed(lambda: decode(q, codes))
    return xr, (codes if codec == "binary" else None)


def _signbits(m: dict[str, Any], train: np.ndarray, new: np.ndarray, rec: dict[str, Any]) -> Any:
    d = train.shape[1]

    def fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x64 = x.astype(np.float64)
        mean = x64.mean(0)
        return mean.astype(np.float32), np.abs(x64 - mean).mean(0)

    def encode(q: Any, x: np.ndarray) -> np.ndarray:
        return np.packbits(x > q[0], axis=1)

    def decode(q: Any, c: np.ndarray) -> np.ndarray:
        signs = np.unpackbits(c, axis=1, count=d).astype(np.float64) * 2.0 - 1.0
        return (q[0] + signs * q[1]).astype(np.float32)

    warm = fit(train[:WARM_ROWS])
    decode(warm, encode(warm, new[:WARM_ROWS]))
    q, rec["train_s"] = harness.timed(lambda: fit(train))
    encode(q, new[:WARM_ROWS])
    codes, rec["encode_s"] = harness.timed(lambda: encode(q, new))
    rec["packed_bytes"] = int(codes.shape[1])
    xr, rec["decode_s"] = harness.timed(lambda: decode(q, codes))
    return xr, codes


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One method in this (fresh) process; imports only the measured library."""
    pressure = harness.Pressure()
    folder = Path(spec["dir"])
    train, new = np.load(folder / "train.npy"), np.load(folder / "new.npy")
    m = method_table(train.shape[1], tuple(spec["budgets"]))[spec["method"]]
    rec: dict[str, Any] = {"method": spec["method"], "threads": spec["threads"], "api_notes": []}
    try:
        run = {"ours": _ours, "faiss": _faiss, "numpy": _signbits}[m["lib"]]
        xr, packed = run(m, train, new, rec)
        evaluate(new, np.asarray(xr), folder, packed, rec)
    except Exception as e:  # recorded in the row, the harness goes on
        rec["error"] = f"{type(e).__name__}: {e}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    rec["peak_rss_mib"] = harness.status_mib("VmHWM")
    rec["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["cpu_stall"] = pressure.stall()
    rec["load1"] = os.getloadavg()[0]
    return rec


# ----------------------------------------------------------------------------- the parent


def summarize(runs: dict[str, list[dict[str, Any]]], table: dict[str, dict[str, Any]], n_new: int) -> list[dict]:
    """One record per method: medians over the repeats, the spread of the error, ratios to its FAISS pair."""
    rows: dict[str, dict[str, Any]] = {}
    for name, recs in runs.items():
        m = table[name]
        ok = [r for r in recs if "error" not in r]

        def med(key: str, ok: list[dict[str, Any]] = ok) -> float | None:
            return harness.median([r.get(key) for r in ok])

        errs = [r["new_error"] for r in ok]
        row = {
            "method": name,
            "label": m["label"],
            "library": m["lib"],
            "bytes": m["bytes"],
            "pair": m["pair"],
            "repeats_ok": len(ok),
            "errors": sorted({r["error"] for r in recs if "error" in r}),
            "api_notes": sorted({n for r in recs for n in r.get("api_notes", [])}),
            "train_s": med("train_s"),
            "encode_s": med("encode_s"),
            "decode_s": med("decode_s"),
            "new_error": med("new_error"),
            "new_error_spread": (max(errs) - min(errs)) if errs else None,
            "recall": med("recall"),
            "hamming_recall": med("hamming_recall"),
            "packed_bytes": med("packed_bytes"),
            "peak_rss_mib": med("peak_rss_mib"),
            "cpu_stall": med("cpu_stall"),
            "load1": med("load1"),
            "hits": ok[0]["hits"] if ok else None,  # seeded: the same every repeat (the spread says so)
        }
        row["encode_rows_per_s"] = n_new / row["encode_s"] if row["encode_s"] else None
        rows[name] = row
    for row in rows.values():
        peer = rows.get(row["pair"]) if row["pair"] else None
        for key in ("train_s", "encode_rows_per_s", "new_error", "recall"):
            ok = peer is not None and row[key] is not None and peer[key]
            row[f"ratio_{key}"] = row[key] / peer[key] if ok else None
    return sorted(rows.values(), key=lambda r: (r["bytes"], list(table).index(r["method"])))


def paired_gain(a: list[int] | None, b: list[int] | None) -> tuple[float, float] | None:
    """Mean per-query recall difference a - b and its standard error (paired over the same queries)."""
    if not a or not b:
        return None
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / TOP
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["method"]: r for r in rows}
    out: list[dict[str, Any]] = []

    def ok(r: dict[str, Any] | None) -> bool:
        return r is not None and r["repeats_ok"] > 0

    def add(name: str, met: bool | None, figures: str) -> None:
        out.append({"target": name, "met": met, "figures": figures})

    o, f = by.get("ours-opq-pq16"), by.get("faiss-opq-pq16")
    if ok(o) and ok(f):
        e, t = o["ratio_new_error"], o["ratio_train_s"]
        add(
            "OPQ + product 16×8: error <= 1.0× FAISS OPQMatrix + PQ, train time <= 0.5×",
            e <= 1.0 and t <= 0.5,
            f"error {o['new_error']:.4g} vs {f['new_error']:.4g} ({e:.3f}×); train {o['train_s']:.3g} s vs "
            f"{f['train_s']:.3g} s ({t:.2f}×)",
        )
    else:
        add("OPQ + product 16×8 against FAISS OPQ + PQ", None, "a method missing or failed")
    for name, how in (("ours-sq8", "min/max ranges (the default)"), ("ours-sq8-mse", "scalar_range=mse")):
        o, f = by.get(name), by.get("faiss-sq8")
        if ok(o) and ok(f):
            e, s = o["ratio_new_error"], o["ratio_encode_rows_per_s"]
            add(
                f"scalar 8-bit, {how}: error <= 1.0× FAISS QT_8bit, encode rows/s >= FAISS's",
                e <= 1.0 and s >= 1.0,
                f"error {o['new_error']:.4g} vs {f['new_error']:.4g} ({e:.4f}×); encode "
                f"{o['encode_rows_per_s']:.3g} vs {f['encode_rows_per_s']:.3g} rows/s ({s:.2f}×)",
            )
        else:
            add(f"scalar 8-bit, {how}, against FAISS QT_8bit", None, "a method missing or failed")
    base = by.get("signbits")
    wants = (("ours-bin", "recall@10 >= sign bits"), ("ours-bin-itq", "recall@10 measurably above sign bits"))
    for name, want in wants:
        o = by.get(name)
        if not (ok(o) and ok(base)):
            add(f"binary ({name}): {want}", None, "a method missing or failed")
            continue
        gain = paired_gain(o["hits"], base["hits"])
        assert gain is not None
        met = gain[0] >= 0 if name == "ours-bin" else gain[0] >= 2 * gain[1] and gain[0] > 0
        add(
            f"binary ({o['label']}): {want}",
            met,
            f"recall@10 {o['recall']:.4f} vs {base['recall']:.4f} (difference {gain[0]:+.4f}, standard error "
            f"{gain[1]:.4f}); Hamming recall@10 {harness.fmt(o['hamming_recall'], '.4f')} vs "
            f"{harness.fmt(base['hamming_recall'], '.4f')}",
        )
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| bytes | method | new-row error | recall@10 | Hamming recall@10 | train s | encode rows/s | ours/FAISS error "
        "| ours/FAISS train time | ours/FAISS encode rows/s | peak RSS MiB | CPU stall | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["label"] + (" (failed)" if r["repeats_ok"] == 0 else "")
        paired = r["pair"] is not None
        ratio = [harness.fmt(r[f"ratio_{k}"], ".3f" if k == "new_error" else ".2f") if paired else "—"
                 for k in ("new_error", "train_s", "encode_rows_per_s")]  # fmt: skip
        lines.append(
            f"| {r['bytes']} | {label} | {harness.fmt(r['new_error'])} | {harness.fmt(r['recall'], '.3f')} "
            f"| {harness.fmt(r['hamming_recall'], '.3f') if r['hamming_recall'] is not None else '—'} "
            f"| {harness.fmt(r['train_s'], '.3g')} | {harness.fmt(r['encode_rows_per_s'], '.3g')} | {ratio[0]} "
            f"| {ratio[1]} | {ratio[2]} | {harness.fmt(r['peak_rss_mib'], '.0f')} "
            f"| {harness.fmt(r['cpu_stall'], '.2f')} | {harness.fmt(r['load1'], '.1f')} |"
        )
    notes = [f"{r['label']}: {e}" for r in rows for e in r["errors"]]
    notes += [f"{r['label']}: API: {n}" for r in rows for n in r["api_notes"]]
    if notes:
        lines += ["", "Errors and API notes (details in the workers' log):", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def targets_md(ts: list[dict[str, Any]]) -> str:
    word = {True: "**met**", False: "**not met**", None: "not measured"}
    return "\n".join(f"- {t['target']}: {word[t['met']]} — {t['figures']}" for t in ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows, {QUICK_QUERIES} queries, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick: 1)")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="bytes per vector, comma-separated")
    ap.add_argument("--methods", default="", help="comma-separated method names (default: all at the budgets)")
    ap.add_argument("--queries", type=int, default=None, help=f"query rows for recall (default {QUERIES})")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/byte_budget-<time>.json")
    args = ap.parse_args()
    if args.worker:
        return harness.serve(worker, args.worker)
    try:
        budgets = tuple(sorted({int(b) for b in args.budgets.split(",") if b}))
    except ValueError:
        ap.error(f"--budgets={args.budgets!r}: expected comma-separated byte counts, e.g. 16,32")
    x = harness.wordllama()
    table = method_table(x.shape[1], budgets)
    methods = [m for m in args.methods.split(",") if m] or list(table)
    unknown = sorted(set(methods) - set(table))
    if unknown:
        ap.error(
            f"--methods={args.methods!r}: unknown {unknown} at budgets {budgets}; expected some of {','.join(table)}"
        )
    methods = harness.installed(methods, {m: ["faiss"] for m in table if table[m]["lib"] == "faiss"})
    repeats = args.repeats or (1 if args.quick else 3)
    train, new = harness.split(x, n_rows=QUICK_ROWS if args.quick else None)
    n_queries = min(args.queries or (QUICK_QUERIES if args.quick else QUERIES), new.shape[0])
    q_rows = np.sort(np.random.default_rng(QUERY_SEED).choice(new.shape[0], n_queries, replace=False))
    truth = nearest_l2(new[q_rows], q_rows, new)
    started = harness.now()
    out = args.json or harness.results_path("byte_budget", args.quick, started)
    log_path = harness.log_path(out)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    machine = harness.machine_info(("vq-pipeline", "torch", "faiss-cpu", "numpy"))
    res: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "repeats": repeats,
        "budgets": budgets,
        "methods": {m: table[m] for m in methods},
        "data": {
            "source": "wordllama l2_supercat_256 token embeddings",
            "split_seed": harness.SPLIT_SEED,
            "train_rows": int(train.shape[0]),
            "new_rows": int(new.shape[0]),
            "dim": int(x.shape[1]),
            "new_mean_sq_norm": float(np.square(new.astype(np.float64)).sum(1).mean()),
            "queries": n_queries,
            "query_seed": QUERY_SEED,
        },
    }
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vq-byte-budget-"))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    try:
        for name, arr in (("train", train), ("new", new), ("queries", q_rows), ("truth", truth)):
            np.save(tmp / f"{name}.npy", arr)
        with open(log_path, "w") as log_file:
            for r, m in harness.interleave(methods, repeats):
                print(f"--- r{r} {m}", file=log_file, flush=True)
                spec = {"method": m, "dir": str(tmp), "budgets": list(budgets)}
                rec = harness.run_worker(__file__, spec, threads=THREADS, log=log_file)
                rec.setdefault("method", m)
                rec["repeat"] = r
                runs[m].append(rec)
                print(
                    f"r{r} {m:16s} train {harness.fmt(rec.get('train_s'), '.3g')} s, encode "
                    f"{harness.fmt(rec.get('encode_s'), '.3g')} s, error {harness.fmt(rec.get('new_error'))}, "
                    f"recall@10 {harness.fmt(rec.get('recall'), '.3f')}"
                    + (f"  ERROR {rec['error']}" if "error" in rec else ""),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t_start
    rows = summarize(runs, table, int(new.shape[0]))
    res["rows"] = rows
    res["targets"] = targets(rows)
    res["runs"] = runs
    v, dt = machine["versions"], res["data"]
    md = (
        f"## Every byte budget against FAISS on wordllama token embeddings "
        f"({THREADS} threads each, fresh processes)\n\n"
        f"{started:%Y-%m-%d %H:%M} UTC, {machine['cpu']}, nproc {machine['nproc']}, load at start "
        f"{machine['load_at_start']:.1f}; commit `{machine['commit']}`"
        f"{' (vq_pipeline/ modified since)' if machine['vq_pipeline_modified_since_commit'] else ''}; "
        f"{res['seconds']:.0f} s. Command: `{res['command']}`. vq-pipeline {v['vq-pipeline']}, torch {v['torch']}, "
        f"faiss-cpu {v['faiss-cpu']}, numpy {v['numpy']}, Python {machine['python']}.\n\n"
        f"Data: {dt['train_rows']} train / {dt['new_rows']} new rows × {dt['dim']} (split seed {harness.SPLIT_SEED}); "
        f"mean squared norm of the new rows {dt['new_mean_sq_norm']:.4g}. Error: mean over new rows of the squared L2 "
        f"of x - decode(encode(x)). Recall@10: {n_queries} seeded query rows (seed {QUERY_SEED}) against the other "
        f"new rows, true neighbours by exact L2, found by L2 to the decoded rows (Hamming: between packed codes). "
        f"{repeats} interleaved repeat(s), medians; ratios against the FAISS method of equal bytes.\n\n"
        + markdown_table(rows)
        + "\n\nTargets (issue 27):\n\n"
        + targets_md(res["targets"])
    )
    harness.write_results(out, res, md)
    print(md)
    print(f"\nJSON: {out} (tables: {out.with_suffix('.md')}); workers' output: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
