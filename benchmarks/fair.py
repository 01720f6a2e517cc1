"""vq-pipeline against FAISS, scikit-learn and the KeOps tutorial, each in a fresh process (the numbers that count).

Setup (once; see ``benchmarks/README.md``)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install -e '.[bench]'

Command, from the repository root::

    .venv-bench/bin/python benchmarks/fair.py [--quick] [--repeats R] [--n-iter N] [--methods LIST] [--shapes LIST]
        [--busy N] [--cold] [--json PATH]

Why fresh processes: a library measured in a process that has already loaded others is not measured as
its users run it (FAISS took 2.0 s per iteration at 200k x 128, K=1024 in a process where torch and
vq_pipeline had loaded their OpenMP runtimes, and 0.54 s alone). So every measurement here is
``harness.run_worker(fair.py, spec)``, a fresh process that imports only what it measures:

* ``ours``: ``vq_pipeline.fit_codebook`` (defaults, ``init=<tensor>``, ``tol=0``, ``device='cpu'``) and
  ``Codebook.encode`` (defaults, ``device='cpu'``); ``ours-prune``: the same with ``prune=True`` (exact
  pruned Lloyd; its encode is the same call as ours', a measure of the noise); ``ours-keops`` (only when
  named in ``--methods``): the same with ``engine='keops'``, our other engine, for the choice ``engine='auto'``
  makes on the CPU (e.g. ``--methods ours,ours-keops --shapes 20000x2x50,100000x8x64,100000x64x256``);
* FAISS: ``faiss.Kmeans(d, K, niter, max_points_per_centroid=<all rows>, spherical=<cosine>).train``
  and ``IndexFlatL2`` / ``IndexFlatIP`` ``.search(x, 1)``. FAISS by default trains on a subsample of
  ``256 * K`` rows; ``max_points_per_centroid`` is raised so that it trains on every row like the others;
* scikit-learn: ``KMeans(n_clusters=K, init=<array>, n_init=1, max_iter, tol=0).fit`` and ``.predict``
  (l2 only: scikit-learn has no cosine k-means);
* the KeOps K-means tutorial's loop (``((x_i - c_j) ** 2).sum(-1).argmin``, ``scatter_add_``, divide by
  counts; l2 only). It gets the vectorizing compiler flags vq-pipeline gives KeOps (KeOps' stock flags
  are several times slower on CPU), and its own kernel cache under ``.cache/keops-tutorial``.

A peer that is not installed in the interpreter (FAISS in the project's ``.venv``) is skipped with a message.

Before its measured call, every worker makes one untimed warm-up call of the same kind on the first 4K
rows (one iteration for a fit): imports done lazily inside a library, thread pools and KeOps' kernel
compilation are one-time costs that a pipeline pays once, not per call, and each method is spared them alike.
With ``--cold`` there is none: the measured call is the process's first, as a scheduled job's is.
With ``--busy N``, N busy-loop processes run during the whole measurement: a CPU shared with other jobs.

The parent process imports only the standard library and numpy. It writes each shape's data once as
``.npy`` files (``harness.mixture_files``: a seeded float32 gaussian mixture of K centres, offset by +3 so
it is not centred; the centres are close enough that no method converges before 20 iterations; encode rows
are 2N new rows of the same mixture), and every worker loads them before it starts its clock. All
methods start from the same centroids (the first K rows; L2-normalized for cosine) and run the same
number of Lloyd iterations (``--n-iter``, 20) without early stopping (``tol=0``). Encoding uses one
common codebook for all: the mixture's centres (+3; normalized for cosine).

Threads: 2 for everybody (``harness.worker_env`` and ``harness.limit_threads``). Nothing else is set:
``OMP_WAIT_POLICY`` is whatever each library does by default (each worker records what ours chose).

Cosine (ours vs FAISS): both get the raw rows. Ours normalizes inside its call; FAISS's call normalizes a
copy with ``faiss.normalize_L2`` first (what a user must do), and that is timed with it.

Figures, per method and shape:

* fit, whole call: wall time of ``fit_codebook`` / ``train`` / ``fit`` / the tutorial's loop, divided by
  the iterations done (``n_iter`` unless a method stopped on its own; then flagged);
* fit, pure iteration (where the method exposes it): ours, the median of
  ``codebook.timings['iteration_seconds']``; FAISS, the median increment of ``iteration_stats[i]['time']``;
  the tutorial, its own per-iteration timing; scikit-learn exposes none;
* encode: rows per second of one whole call on the 2N new rows;
* exactness: encoded rows whose code differs from a float64 oracle's, counted over decisive rows only
  (oracle second-best minus best > 1e-5 x second-best);
* peak memory: the worker's peak RSS during the call minus its RSS just before it, MiB (``harness.measure``);
* load: ``/proc/pressure/cpu`` "some" total over the call's wall time ("stall": the share of time some
  task waited for a CPU; 0 = quiet) and ``os.getloadavg()``. The machine may be shared: read the ratios
  with these columns.

Runs are interleaved (for each repeat, every method in turn, the order rotated) and medians of ``R``
(3) repeats are reported. Prints markdown tables; writes every raw number as JSON and the tables as
markdown (default ``benchmarks/results/fair-<UTC time>.json`` / ``.md``; ``--quick``: ``benchmarks/.cache/``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import harness

THREADS = harness.THREADS
TIE_RTOL = 1e-5
# (n, dim, K)
SHAPES_L2 = [(200_000, 128, 1024), (100_000, 64, 256), (50_000, 384, 256), (1_000_000, 32, 100)]
SHAPES_COSINE = [(100_000, 64, 256), (50_000, 384, 256)]
QUICK_L2 = [(6_000, 16, 32)]
QUICK_COSINE = [(6_000, 16, 32)]
METHODS = ("ours", "ours-prune", "ours-keops", "faiss", "sklearn", "tutorial")
DEFAULT_METHODS = ("ours", "ours-prune", "faiss", "sklearn", "tutorial")
OURS = ("ours", "ours-prune", "ours-keops")
PEERS = ("faiss", "sklearn", "tutorial")
COSINE_METHODS = ("ours", "ours-prune", "ours-keops", "faiss")
NEEDS = {
    "faiss": ["faiss"],
    "sklearn": ["sklearn", "threadpoolctl"],
    "tutorial": ["pykeops"],
    "ours-keops": ["pykeops"],
}
NAMES = {
    "ours": "ours",
    "ours-prune": "ours, prune=True",
    "ours-keops": "ours, engine='keops'",
    "faiss": "FAISS",
    "sklearn": "scikit-learn",
    "tutorial": "KeOps tutorial",
}
# The compiler flags vq-pipeline gives KeOps (its KeOps engine's NATIVE_CXXFLAGS), for the tutorial.
KEOPS_CXXFLAGS = "-march=native -fno-trapping-math -fno-signed-zeros -fassociative-math"


# ----------------------------------------------------------------------------- measuring, in the worker


def _keops_cache() -> Path:
    """A cache folder for the tutorial's KeOps kernels, per CPU, flags and versions (kernels built with
    ``-march=native`` only run on the CPU that built them)."""
    cpu = ""
    try:
        cpu = "|".join(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("model name", "flags"))
        )[:4096]
    except OSError:
        pass
    key = "|".join([cpu, platform.machine(), KEOPS_CXXFLAGS, sys.version.split()[0], harness.version("torch") or ""])
    return harness.REPO / ".cache" / "keops-tutorial" / hashlib.sha256(key.encode()).hexdigest()[:12]


def _tutorial_fit(LazyTensor: Any, torch: Any, x: Any, init: Any, n_iter: int) -> tuple[Any, list[float]]:
    """The KeOps K-means tutorial's loop, as published (its first-K init replaced by the shared one)."""
    N, D = x.shape
    K = init.shape[0]
    c = init.clone()
    x_i = LazyTensor(x.view(N, 1, D))
    times = []
    for _ in range(n_iter):
        t0 = time.perf_counter()
        c_j = LazyTensor(c.view(1, K, D))
        D_ij = ((x_i - c_j) ** 2).sum(-1)
        cl = D_ij.argmin(dim=1).long().view(-1)
        c.zero_()
        c.scatter_add_(0, cl[:, None].repeat(1, D), x)
        Ncl = torch.bincount(cl, minlength=K).type_as(c).view(K, 1)
        c /= Ncl
        times.append(time.perf_counter() - t0)
    return c, times


def _tutorial_encode(LazyTensor: Any, x: Any, c: Any) -> Any:
    N, D = x.shape
    x_i = LazyTensor(x.view(N, 1, D))
    c_j = LazyTensor(c.view(1, c.shape[0], D))
    return ((x_i - c_j) ** 2).sum(-1).argmin(dim=1).long().view(-1)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process; imports only the measured library."""
    method, task, metric = spec["method"], spec["task"], spec["metric"]
    folder, n_iter, threads = Path(spec["dir"]), spec["n_iter"], spec["threads"]
    cosine = metric == "cosine"
    rec: dict[str, Any] = {"method": method, "task": task, "metric": metric}
    if task == "fit":
        x = np.load(folder / "x.npy")
        init = np.load(folder / ("init_cosine.npy" if cosine else "init.npy"))
    else:
        x = np.load(folder / "x2.npy")
        codebook = np.load(folder / ("codebook_cosine.npy" if cosine else "codebook.npy"))
    n, d = x.shape
    # One untimed warm-up call on the first rows (imports, thread pools, kernels), then the measured call;
    # none with --cold: the measured call is the process's first, as a scheduled job's is.
    warm = 0 if spec.get("cold") else min(n, 4 * (init.shape[0] if task == "fit" else codebook.shape[0]))

    if method in OURS:
        from vq_pipeline.runtime import apply_omp_waits

        apply_omp_waits()  # before torch, as the vq command and the flows do for users
        import vq_pipeline
        import torch

        harness.limit_threads(threads)
        rec["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
        rec["gomp_spincount"] = os.environ.get("GOMP_SPINCOUNT")
        fit_codebook, Codebook = vq_pipeline.fit_codebook, vq_pipeline.Codebook  # lazy imports, before the clock
        kw: dict[str, Any] = {"ours": {}, "ours-prune": {"prune": True}, "ours-keops": {"engine": "keops"}}[method]
        if task == "fit":
            init_t = torch.from_numpy(init)
            if warm:
                fit_codebook(x[:warm], init.shape[0], metric=metric, init=init_t, n_iter=1, tol=0.0, device="cpu", **kw)
            cb, m = harness.measure(
                lambda: fit_codebook(
                    x, init.shape[0], metric=metric, init=init_t, n_iter=n_iter, tol=0.0, device="cpu", **kw
                )
            )
            rec["iterations"] = int(cb.stats["iterations"])
            rec["pruned_share"] = [p / n for p in cb.timings.get("iteration_pruned", [])]
            rec["pure_iter_s"] = statistics.median(cb.timings["iteration_seconds"])
            rec["engine"] = cb.settings.get("engine")
        else:
            book = Codebook(
                centroids=torch.from_numpy(codebook),
                counts=torch.zeros(codebook.shape[0], dtype=torch.int64),
                metric=metric,
            )
            ekw = {"engine": "keops"} if method == "ours-keops" else {}
            if warm:
                book.encode(x[:warm], device="cpu", **ekw)
            codes, m = harness.measure(lambda: book.encode(x, device="cpu", **ekw))
    elif method == "faiss":
        import faiss

        harness.limit_threads(threads)
        if task == "fit":
            k = init.shape[0]
            mppc = max(256, math.ceil(n / k) + 1)  # every row is trained on (default: a sample of 256 * K)

            def fit(x: np.ndarray, n_iter: int) -> Any:
                xs = x
                if cosine:
                    xs = x.copy()
                    faiss.normalize_L2(xs)
                km = faiss.Kmeans(d, k, niter=n_iter, max_points_per_centroid=mppc, spherical=cosine, verbose=False)
                km.train(xs, init_centroids=init)
                return km

            if warm:
                fit(x[:warm], 1)
            km, m = harness.measure(lambda: fit(x, n_iter))
            times = [s["time"] for s in km.iteration_stats]  # cumulative seconds
            rec["iterations"] = len(times)
            rec["pure_iter_s"] = float(np.median(np.diff([0.0, *times])))
            rec["max_points_per_centroid"] = mppc
        else:

            def enc(x: np.ndarray) -> Any:
                xs = x
                if cosine:
                    xs = x.copy()
                    faiss.normalize_L2(xs)
                index = faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)
                index.add(codebook)
                return index.search(xs, 1)[1][:, 0]

            if warm:
                enc(x[:warm])
            codes, m = harness.measure(lambda: enc(x))
    elif method == "sklearn":
        from sklearn.cluster import KMeans

        harness.limit_threads(threads)
        if task == "fit":
            if warm:
                KMeans(n_clusters=init.shape[0], init=init, n_init=1, max_iter=1, tol=0).fit(x[:warm])
            km, m = harness.measure(
                lambda: KMeans(n_clusters=init.shape[0], init=init, n_init=1, max_iter=n_iter, tol=0).fit(x)
            )
            rec["iterations"] = int(km.n_iter_)
            rec["pure_iter_s"] = None
        else:
            k = codebook.shape[0]
            km = KMeans(n_clusters=k, init=codebook, n_init=1, max_iter=1).fit(codebook)  # a fitted estimator
            km.cluster_centers_ = codebook.copy()
            if warm:
                km.predict(x[:warm])
            codes, m = harness.measure(lambda: km.predict(x))
    elif method == "tutorial":
        os.environ["CXXFLAGS"] = KEOPS_CXXFLAGS
        os.environ["KEOPS_CACHE_FOLDER"] = str(_keops_cache())
        os.environ.setdefault("PYKEOPS_VERBOSE", "0")
        _keops_cache().mkdir(parents=True, exist_ok=True)
        import torch
        from pykeops.torch import LazyTensor

        harness.limit_threads(threads)
        xt = torch.from_numpy(x)
        if task == "fit":
            it = torch.from_numpy(init)
            if warm:
                _tutorial_fit(LazyTensor, torch, xt[:warm], it, 1)  # compiles or loads the kernel
            (_, times), m = harness.measure(lambda: _tutorial_fit(LazyTensor, torch, xt, it, n_iter))
            rec["iterations"] = n_iter
            rec["pure_iter_s"] = statistics.median(times)
        else:
            ct = torch.from_numpy(codebook)
            if warm:
                _tutorial_encode(LazyTensor, xt[:warm], ct)  # compiles or loads the kernel
            codes, m = harness.measure(lambda: _tutorial_encode(LazyTensor, xt, ct))
            codes = codes.numpy()
    else:
        raise SystemExit(f"method={method!r} is unknown; expected one of {METHODS}")
    rec.update(m)
    if task == "fit":
        rec["whole_iter_s"] = m["wall_s"] / max(rec["iterations"], 1)
    else:
        rec["rows_per_s"] = n / m["wall_s"]
        codes = codes.numpy() if hasattr(codes, "numpy") and not isinstance(codes, np.ndarray) else np.asarray(codes)
        np.save(spec["codes"], codes.astype(np.int64).reshape(-1))
    return rec


# ----------------------------------------------------------------------------- the parent


def oracle_top2(x: np.ndarray, c: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 best code, best and second-best distance (squared L2 / 1 - cos) of every row of x."""
    c64 = c.astype(np.float64)
    if metric == "cosine":
        c64 /= np.linalg.norm(c64, axis=1, keepdims=True)
    shift = c64.mean(0)
    cs = c64 - shift
    cn = np.square(cs).sum(1)
    best, d1, d2 = [], [], []
    for s in range(0, x.shape[0], 8192):
        xb = x[s : s + 8192].astype(np.float64)
        if metric == "cosine":
            xb /= np.linalg.norm(xb, axis=1, keepdims=True)
            d = 1.0 - xb @ c64.T
        else:
            xs = xb - shift
            d = np.square(xs).sum(1, keepdims=True) - 2.0 * (xs @ cs.T) + cn  # centred: exact enough in float64
        two = np.argpartition(d, 1, axis=1)[:, :2]  # (b, 2), unordered
        v = np.take_along_axis(d, two, axis=1)
        swap = v[:, 1] < v[:, 0]
        two[swap] = two[swap][:, ::-1]
        v[swap] = v[swap][:, ::-1]
        best.append(two[:, 0]), d1.append(v[:, 0]), d2.append(v[:, 1])
    return np.concatenate(best), np.concatenate(d1), np.concatenate(d2)


def mismatch(codes: np.ndarray, orc: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, int]:
    best, d1, d2 = orc
    decisive = (d2 - d1) > TIE_RTOL * np.abs(d2)
    differ = codes != best
    return {
        "rows_wrong": int((differ & decisive).sum()),
        "rows_decisive": int(decisive.sum()),
        "rows_differing_incl_ties": int(differ.sum()),
    }


def run_shape(
    n: int,
    dim: int,
    k: int,
    metric: str,
    methods: list[str],
    n_iter: int,
    repeats: int,
    tmp: Path,
    log_file: Any,
    cold: bool = False,
) -> dict[str, Any]:
    folder = tmp / f"{n}x{dim}k{k}"
    if not (folder / "x.npy").exists():
        shutil.rmtree(tmp, ignore_errors=True)  # one shape's data on disk at a time
        harness.mixture_files(n, dim, k, folder)
    x2 = np.load(folder / "x2.npy", mmap_mode="r")
    orc = oracle_top2(x2, np.load(folder / ("codebook_cosine.npy" if metric == "cosine" else "codebook.npy")), metric)
    del x2
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r, m in harness.interleave(methods, repeats):
        rec: dict[str, Any] = {"repeat": r}
        for task in ("fit", "encode"):
            spec = {
                "method": m,
                "task": task,
                "metric": metric,
                "dir": str(folder),
                "n_iter": n_iter,
                "codes": str(folder / f"codes-{m}.npy"),
                "cold": cold,
            }
            print(f"--- {n}x{dim} K={k} {metric} r{r} {m} {task}", file=log_file, flush=True)
            res = harness.run_worker(__file__, spec, threads=THREADS, log=log_file)
            res.setdefault("method", m)
            res.setdefault("task", task)
            if task == "encode" and "error" not in res:
                res["mismatch"] = mismatch(np.load(spec["codes"]), orc)
                Path(spec["codes"]).unlink()
            rec[task] = res
        runs[m].append(rec)
        f, e = rec["fit"], rec["encode"]
        print(
            f"    r{r} {m:10s} fit {harness.fmt(f.get('whole_iter_s'))} s/iter (pure {harness.fmt(f.get('pure_iter_s'))}) "
            f"encode {harness.fmt(e.get('rows_per_s'), '.3g')} rows/s  "
            f"stall {harness.fmt(f.get('cpu_stall'), '.2f')}/{harness.fmt(e.get('cpu_stall'), '.2f')}"
            + (f"  ERROR {f.get('error') or e.get('error')}" if "error" in f or "error" in e else ""),
            file=sys.stderr,
            flush=True,
        )
    out: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "k": k,
        "metric": metric,
        "n_iter": n_iter,
        "repeats": repeats,
        "methods": {},
    }
    for m in methods:
        ok_f = [q["fit"] for q in runs[m] if "error" not in q["fit"]]
        ok_e = [q["encode"] for q in runs[m] if "error" not in q["encode"]]

        def med(rows: list[dict[str, Any]], key: str) -> float | None:
            return harness.median([q.get(key) for q in rows])

        out["methods"][m] = {
            "fit_whole_iter_s": med(ok_f, "whole_iter_s"),
            "fit_pure_iter_s": med(ok_f, "pure_iter_s"),
            "pruned_share": ok_f[0].get("pruned_share") if ok_f else None,
            "fit_wall_s": med(ok_f, "wall_s"),
            "iterations": sorted({q["iterations"] for q in ok_f}),
            "encode_rows_per_s": med(ok_e, "rows_per_s"),
            "encode_wall_s": med(ok_e, "wall_s"),
            "fit_extra_peak_rss_mib": med(ok_f, "extra_peak_rss_mib"),
            "encode_extra_peak_rss_mib": med(ok_e, "extra_peak_rss_mib"),
            "peak_rss_hidden": any(q.get("peak_rss_hidden") for q in ok_f + ok_e),
            "mismatch": ok_e[-1]["mismatch"] if ok_e else None,
            "mismatch_all_equal": len({json.dumps(q["mismatch"]) for q in ok_e}) <= 1,
            "cpu_stall_fit": med(ok_f, "cpu_stall"),
            "cpu_stall_encode": med(ok_e, "cpu_stall"),
            "load1": med(ok_f + ok_e, "load1"),
            "errors": [q[t]["error"] for q in runs[m] for t in ("fit", "encode") if "error" in q[t]],
            "runs": runs[m],
        }
    ms = out["methods"]
    peers = [m for m in PEERS if m in ms]
    ours = ms.get("ours", {})
    fit_peers = [m for m in peers if ms[m]["fit_whole_iter_s"] is not None]
    enc_peers = [m for m in peers if ms[m]["encode_rows_per_s"] is not None]
    if fit_peers and ours.get("fit_whole_iter_s"):
        bp = min(fit_peers, key=lambda m: ms[m]["fit_whole_iter_s"])
        out["fit_best_peer"], out["fit_ratio"] = bp, ours["fit_whole_iter_s"] / ms[bp]["fit_whole_iter_s"]
        pure = [m for m in fit_peers if ms[m]["fit_pure_iter_s"] is not None]
        if pure and ours.get("fit_pure_iter_s"):
            bpp = min(pure, key=lambda m: ms[m]["fit_pure_iter_s"])
            out["fit_pure_best_peer"], out["fit_pure_ratio"] = bpp, ours["fit_pure_iter_s"] / ms[bpp]["fit_pure_iter_s"]
    if enc_peers and ours.get("encode_rows_per_s"):
        bp = max(enc_peers, key=lambda m: ms[m]["encode_rows_per_s"])
        out["encode_best_peer"], out["encode_ratio"] = bp, ms[bp]["encode_rows_per_s"] / ours["encode_rows_per_s"]
    return out


def _ours_waits(res: dict[str, Any]) -> str:
    """What ours' workers chose for their OpenMP waits, e.g. 'GOMP_SPINCOUNT=100000 in 12 of 12 calls'."""
    seen: dict[str, int] = {}
    for row in res["rows"]:
        for m in OURS:
            for run in row["methods"].get(m, {}).get("runs", []):
                for task in ("fit", "encode"):
                    rec = run.get(task, {})
                    if "omp_wait_policy" not in rec and "gomp_spincount" not in rec:
                        continue
                    if rec.get("omp_wait_policy"):
                        key = f"OMP_WAIT_POLICY={rec['omp_wait_policy']}"
                    elif rec.get("gomp_spincount"):
                        key = f"GOMP_SPINCOUNT={rec['gomp_spincount']}"
                    else:
                        key = "neither variable set"
                    seen[key] = seen.get(key, 0) + 1
    total = sum(seen.values())
    return ", ".join(f"{k} in {v} of {total} calls" for k, v in seen.items()) or "not recorded"


_num = harness.fmt


def _label(row: dict[str, Any]) -> str:
    n = row["n"]
    ns = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)
    return f"{ns} × {row['dim']}, K={row['k']}"


def tables(res: dict[str, Any]) -> str:
    methods = [m for m in METHODS if any(m in row["methods"] for row in res["rows"])]
    heads = " | ".join(NAMES[m] for m in methods)
    sep = "---|" * len(methods)
    lines = [
        "#### Fit: seconds per iteration of the whole call (wall time / iterations; median of the repeats)",
        "",
        f"| shape | metric | {heads} | ours / best peer | CPU stall | load (1 min) |",
        f"|---|---|{sep}---|---|---|",
    ]

    def stall(row: dict[str, Any], key: str) -> str:
        vals = [v[key] for v in row["methods"].values() if v.get(key) is not None]
        return _num(statistics.median(vals), ".2f") if vals else "n/a"

    def load(row: dict[str, Any]) -> str:
        vals = [v["load1"] for v in row["methods"].values() if v.get("load1") is not None]
        return _num(statistics.median(vals), ".1f") if vals else "n/a"

    for row in res["rows"]:
        ms = row["methods"]
        cells = []
        for m in methods:
            v = ms.get(m)
            if v is None or v["fit_whole_iter_s"] is None:
                cells.append("n/a")
                continue
            flag = "" if v["iterations"] == [row["n_iter"]] else f" ({'/'.join(map(str, v['iterations']))} it)"
            cells.append(f"{v['fit_whole_iter_s']:.4g}{flag}")
        ratio = f"**{row['fit_ratio']:.2f}** ({NAMES[row['fit_best_peer']]})" if "fit_ratio" in row else "n/a"
        lines.append(
            f"| {_label(row)} | {row['metric']} | {' | '.join(cells)} | {ratio} | {stall(row, 'cpu_stall_fit')} "
            f"| {load(row)} |"
        )
    lines += [
        "",
        "#### Fit: seconds per iteration, pure (as each method times its own iterations; median)",
        "",
        f"| shape | metric | {heads} | ours / best peer |",
        f"|---|---|{sep}---|",
    ]
    for row in res["rows"]:
        ms = row["methods"]
        cells = [
            "n/a" if m not in ms or ms[m]["fit_pure_iter_s"] is None else f"{ms[m]['fit_pure_iter_s']:.4g}"
            for m in methods
        ]
        ratio = (
            f"{row['fit_pure_ratio']:.2f} ({NAMES[row['fit_pure_best_peer']]})" if "fit_pure_ratio" in row else "n/a"
        )
        lines.append(f"| {_label(row)} | {row['metric']} | {' | '.join(cells)} | {ratio} |")
    lines += [
        "",
        "#### Encode: rows per second of one whole call on 2N new rows (median); ratio = ours' time / best peer's time",
        "",
        f"| shape | metric | {heads} | ours / best peer | CPU stall | load (1 min) |",
        f"|---|---|{sep}---|---|---|",
    ]
    for row in res["rows"]:
        ms = row["methods"]
        cells = [
            "n/a" if m not in ms or ms[m]["encode_rows_per_s"] is None else f"{ms[m]['encode_rows_per_s']:.3g}"
            for m in methods
        ]
        ratio = f"**{row['encode_ratio']:.2f}** ({NAMES[row['encode_best_peer']]})" if "encode_ratio" in row else "n/a"
        lines.append(
            f"| {_label(row)} | {row['metric']} | {' | '.join(cells)} | {ratio} | {stall(row, 'cpu_stall_encode')} "
            f"| {load(row)} |"
        )
    lines += [
        "",
        "#### Exactness (encode: decisive rows whose code differs from the float64 oracle's) "
        "and extra peak RSS (MiB, fit / encode)",
        "",
        f"| shape | metric | {heads} |",
        f"|---|---|{sep}",
    ]
    for row in res["rows"]:
        ms = row["methods"]
        cells = []
        for m in methods:
            v = ms.get(m)
            if v is None or v["mismatch"] is None:
                cells.append("n/a")
                continue
            mm = v["mismatch"]
            hidden = "≥" if v["peak_rss_hidden"] else ""
            fr, er = (v[f"{t}_extra_peak_rss_mib"] for t in ("fit", "encode"))
            cells.append(
                f"{mm['rows_wrong']}/{mm['rows_decisive']}; "
                f"{hidden}{_num(None if fr is None else max(fr, 0), '.0f')} / "
                f"{_num(None if er is None else max(er, 0), '.0f')}"
            )
        lines.append(f"| {_label(row)} | {row['metric']} | {' | '.join(cells)} |")
    pruned = [row for row in res["rows"] if row["methods"].get("ours-prune", {}).get("pruned_share")]
    if pruned:
        n_it = max(len(row["methods"]["ours-prune"]["pruned_share"]) for row in pruned)
        marks = sorted({1, 2, 3, 5, 8, 10, 15, n_it} & set(range(1, n_it + 1)))
        lines += [
            "",
            "#### ours, prune=True: share of rows whose search the bounds skipped, per E step (first repeat), "
            "and the whole fit's time over ours' (prune=False, the default)",
            "",
            f"| shape | metric | {' | '.join(f'E step {i}' for i in marks)} | pruned / unpruned, whole fit |",
            f"|---|---|{'---|' * len(marks)}---|",
        ]
        for row in pruned:
            ms = row["methods"]
            share = ms["ours-prune"]["pruned_share"]
            cells = [f"{share[i - 1]:.2f}" if i <= len(share) else "" for i in marks]
            base, pr = ms.get("ours", {}).get("fit_whole_iter_s"), ms["ours-prune"]["fit_whole_iter_s"]
            speed = f"{pr / base:.2f}" if base and pr else "n/a"
            lines.append(f"| {_label(row)} | {row['metric']} | {' | '.join(cells)} | {speed} |")
    errors = [
        f"{_label(row)} {row['metric']} {m}: {e}"
        for row in res["rows"]
        for m, v in row["methods"].items()
        for e in v["errors"]
    ]
    if errors:
        lines += ["", "Errors (see the log): " + "; ".join(errors)]
    return "\n".join(lines)


def engines_table(res: dict[str, Any]) -> str:
    """Our two engines side by side, when ``ours-keops`` ran: keops' time over torch's (``ours``)."""
    rows = [r for r in res["rows"] if "ours-keops" in r["methods"] and "ours" in r["methods"]]
    if not rows:
        return ""
    lines = [
        "",
        "",
        "#### Our engines: engine='keops' over the default (torch on the CPU), time ratios",
        "",
        "| shape | metric | fit, whole call | fit, pure iteration | encode |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        t, k = row["methods"]["ours"], row["methods"]["ours-keops"]

        def ratio(a: float | None, b: float | None) -> str:
            return _num(a / b if a and b else None, ".2f")

        enc = ratio(t["encode_rows_per_s"], k["encode_rows_per_s"])
        lines.append(
            f"| {_label(row)} | {row['metric']} | {ratio(k['fit_whole_iter_s'], t['fit_whole_iter_s'])} "
            f"| {ratio(k['fit_pure_iter_s'], t['fit_pure_iter_s'])} | {enc} |"
        )
    return "\n".join(lines)


def parse_shapes(text: str | None, quick: bool) -> list[tuple[tuple[int, int, int], str]]:
    """``NxDxK[:cosine]`` items (any shape), or the default plan."""
    if not text:
        plan = [(s, "l2") for s in (QUICK_L2 if quick else SHAPES_L2)]
        return plan + [(s, "cosine") for s in (QUICK_COSINE if quick else SHAPES_COSINE)]
    plan = []
    for item in filter(None, (w.strip() for w in text.split(","))):
        shape, _, metric = item.partition(":")
        try:
            n, d, k = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes item {item!r}: expected NxDxK[:cosine], e.g. 100000x64x256:cosine") from None
        if metric not in ("", "l2", "cosine") or not 0 < k <= n:
            raise SystemExit(f"--shapes item {item!r}: expected metric l2 or cosine and 0 < K <= N")
        plan.append(((n, d, k), metric or "l2"))
    return plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat: a smoke check")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick: 1)")
    ap.add_argument("--n-iter", type=int, default=20, help="Lloyd iterations for every method (default 20)")
    ap.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    ap.add_argument(
        "--shapes",
        default=None,
        help="comma-separated NxDxK[:cosine], e.g. 1000000x32x100,100000x64x256:cosine (default: the standard set)",
    )
    ap.add_argument(
        "--json", type=Path, default=None, help="where to write (default: benchmarks/results/fair-<time>.json)"
    )
    ap.add_argument(
        "--busy",
        type=int,
        default=0,
        help="run this many busy-loop processes for the whole run: every method measured on a shared CPU",
    )
    ap.add_argument("--cold", action="store_true", help="no warm-up call: each measured call is its process's first")
    args = ap.parse_args()
    if args.worker:
        return harness.serve(worker, args.worker)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods={args.methods!r}: unknown {unknown}; expected a subset of {','.join(METHODS)}")
    methods = harness.installed(methods, NEEDS)
    if not methods:
        ap.error("no method left to measure")
    repeats = args.repeats or (1 if args.quick else 3)
    plan = parse_shapes(args.shapes, args.quick)
    started = harness.now()
    out = args.json or harness.results_path("fair", args.quick, started)
    log_path = harness.log_path(out)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    machine = harness.machine_info(
        ("vq-pipeline", "torch", "faiss-cpu", "scikit-learn", "pykeops", "numpy", "threadpoolctl")
    )
    res: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "n_iter": args.n_iter,
        "repeats": repeats,
        "tie_rtol": TIE_RTOL,
        "methods": methods,
        "busy_processes": args.busy,
        "cold": args.cold,
        "rows": [],
    }
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vq-fair-"))
    busy = [subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"]) for _ in range(args.busy)]
    try:
        with open(log_path, "w") as log_file:
            for (n, dim, k), metric in plan:
                ms = [m for m in methods if metric == "l2" or m in COSINE_METHODS]
                print(f"== {n} x {dim}, K={k}, {metric}: {', '.join(ms)}", file=sys.stderr, flush=True)
                res["rows"].append(run_shape(n, dim, k, metric, ms, args.n_iter, repeats, tmp, log_file, args.cold))
    finally:
        for p in busy:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t_start
    v = machine["versions"]
    md = "\n".join(
        [
            f"## vq-pipeline vs peers, each in a fresh process (CPU) — {machine['cpu']}, nproc {machine['nproc']}, "
            f"{THREADS} threads each",
            "",
            f"{started:%Y-%m-%d %H:%M} UTC, commit `{machine['commit']}`"
            f"{' (vq_pipeline/ modified since)' if machine['vq_pipeline_modified_since_commit'] else ''}, "
            f"{res['seconds']:.0f} s. Command: `{res['command']}`. vq-pipeline {v['vq-pipeline']}, torch {v['torch']}, "
            f"faiss-cpu {v['faiss-cpu']}, scikit-learn {v['scikit-learn']}, pykeops {v['pykeops']}, numpy {v['numpy']}, "
            f"Python {machine['python']}. {args.n_iter} iterations, tol=0, same data and initial centroids for all, "
            f"{repeats} interleaved repeat(s), medians. FAISS's `max_points_per_centroid` is raised so it trains on "
            f"every row (its default samples 256 × K rows). OMP_WAIT_POLICY in the environment: "
            f"{machine['omp_wait_policy_env'] or 'unset'} (in ours' workers: {_ours_waits(res)})."
            + (f" {args.busy} busy-loop processes ran throughout (`--busy`)." if args.busy else "")
            + (" Cold: no warm-up call, each measured call its process's first (`--cold`)." if args.cold else ""),
            "",
            tables(res) + engines_table(res),
        ]
    )
    harness.write_results(out, res, md)
    print(md)
    print(f"\nJSON: {out} (tables: {out.with_suffix('.md')}); workers' output: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
