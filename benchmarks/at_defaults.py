"""Every library entirely at its own defaults: the time of one whole fit call, and the objective it reaches.

Command, from the repository root (FAISS and scikit-learn installed, as in ``.venv-bench``; a peer that is
not installed is skipped with a message)::

    .venv-bench/bin/python benchmarks/at_defaults.py [--quick] [--seeds 3] [--data LIST] [--methods LIST] [--json PATH]

``fair.py`` gives every library the same initial centroids and the same 20 iterations, which isolates
the Lloyd loop. A user who calls each library with only K sees something else: its own seeding, its
own stopping rule, its own sampling. Here each fit runs that way, in a fresh process that imports only
its library (``harness.run_worker``), with 2 threads, after an untimed warm-up call on 2,048 rows:

* ``ours``: ``vq_pipeline.fit_codebook(x, K, seed=s, device="cpu")`` (k-means|| seeding, at most 50
  iterations, relative objective decrease ``tol=1e-3`` since 2026-12-08, ``1e-4`` before);
* ``sklearn``: ``sklearn.cluster.KMeans(K, random_state=s).fit(x)`` (greedy k-means++, one run, at
  most 300 iterations, ``tol=1e-4`` relative to the data's variance on the centres' shift);
* ``faiss``: ``faiss.Kmeans(d, K, seed=1234 + s).train(x)`` (K random rows as the start, 25
  iterations, and a random sample of ``256 K`` rows when there are more);

and, only when named in ``--methods``, our own variants at otherwise default settings:

* ``ours-kpp``: ``init="k-means++"`` (exact greedy seeding; the question "which seeding should
  ``init="auto"`` stand for" was answered with k-means|| by this comparison);
* ``ours-prune``: ``prune=True`` (exact pruned Lloyd; same fit, both must reach the same objective).

The parent then computes each codebook's objective in float64 over all training rows and over the new
rows (``harness.objective``). Data (``--data``), each split 80% training and 20% new rows:
``wordllama`` (the token embeddings, ``harness.wordllama``: 25,600 / 6,400 rows × 256, K=256 and 1024),
``mixture`` (``harness.mixture``, seed 1: 125,000 × 64 and 39,780 × 384, K=256) and ``digits``
(scikit-learn's 1,797 × 64, K=16 and 64; not in the default) and ``big`` (``harness.mixture``, seed 1: 1,000,000 × 32
with K=100 and 250,000 × 128 with K=1024, the large shapes of ``fair.py``; not in the default: FAISS samples
``256 K`` rows of them, and ``init="auto"`` fits ours from such a sample first). ``--quick``: 4,000 rows of each, one K,
one seed. Reported: medians over the seeds of the seconds, seeding seconds (ours) and iterations, and the
mean objectives over ours'. Writes JSON and markdown (default ``benchmarks/results/at_defaults-<UTC time>``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import harness

METHODS = ("ours", "ours-kpp", "ours-prune", "sklearn", "faiss")
DEFAULT_METHODS = ("ours", "sklearn", "faiss")
OUR_KW: dict[str, dict[str, Any]] = {"ours": {}, "ours-kpp": {"init": "k-means++"}, "ours-prune": {"prune": True}}
NEEDS = {"sklearn": ["sklearn", "threadpoolctl"], "faiss": ["faiss"]}
DATA = ("wordllama", "mixture", "digits", "big")
DEFAULT_DATA = ("wordllama", "mixture")
QUICK_ROWS = 4000


def worker(spec: dict) -> dict:
    x = np.load(spec["train"])
    k, seed, method = spec["k"], spec["seed"], spec["method"]
    warm = x[:2048]
    init_s = None
    if method in OUR_KW:
        from vq_pipeline.runtime import apply_omp_waits

        apply_omp_waits()  # before torch, as the vq command and the flows do for users
        import vq_pipeline
        import torch  # noqa: F401 - for limit_threads

        harness.limit_threads(spec["threads"])
        kw = OUR_KW[method]
        vq_pipeline.fit_codebook(warm, min(k, 64), device="cpu", **kw)
        cb, seconds = harness.timed(lambda: vq_pipeline.fit_codebook(x, k, seed=seed, device="cpu", **kw))
        centroids, iterations = cb.centroids.numpy(), cb.stats["iterations"]
        init_s = cb.timings.get("init_seconds")
    elif method == "sklearn":
        from sklearn.cluster import KMeans

        harness.limit_threads(spec["threads"])
        KMeans(min(k, 64), random_state=seed).fit(warm)
        km, seconds = harness.timed(lambda: KMeans(k, random_state=seed).fit(x))
        centroids, iterations = km.cluster_centers_.astype(np.float32), int(km.n_iter_)
    else:
        import faiss

        harness.limit_threads(spec["threads"])
        faiss.Kmeans(x.shape[1], min(k, 64), seed=1234 + seed).train(warm)
        km = faiss.Kmeans(x.shape[1], k, seed=1234 + seed)
        _, seconds = harness.timed(lambda: km.train(x))
        centroids, iterations = km.centroids, len(km.iteration_stats)
    np.save(spec["out"], np.ascontiguousarray(centroids, dtype=np.float32))
    return {"seconds": seconds, "init_seconds": init_s, "iterations": iterations}


def datasets(names: list[str], folder: Path, quick: bool) -> list[tuple[str, int, Path, Path]]:
    """(name, K, train .npy, new .npy) of every data set named, written into ``folder``."""

    def save(name: str, train: np.ndarray, new: np.ndarray) -> tuple[Path, Path]:
        paths = folder / f"{name}-train.npy", folder / f"{name}-new.npy"
        np.save(paths[0], np.ascontiguousarray(train, dtype=np.float32))
        np.save(paths[1], np.ascontiguousarray(new, dtype=np.float32))
        return paths

    def sets(name: str, stem: str, x: np.ndarray, ks: tuple[int, ...], split_seed: int | None) -> list:
        if quick:
            x, ks = x[:QUICK_ROWS], ks[:1]
        if split_seed is None:  # rows already in random order: the last 20% are new rows
            cut = int(0.8 * len(x))
            train, new = x[:cut], x[cut:]
        else:
            train, new = harness.split(x, seed=split_seed)
        paths = save(stem, train, new)
        return [(f"{name} {len(train)}×{x.shape[1]}", k, *paths) for k in ks]

    out: list[tuple[str, int, Path, Path]] = []
    for name in names:
        if name == "wordllama":
            out += sets("wordllama", "wordllama", harness.wordllama(), (256, 1024), harness.SPLIT_SEED)
        elif name == "digits":
            out += sets("digits", "digits", harness.digits(), (16, 64), 0)
        elif name == "big":
            for n, dim, k in ((1_000_000, 32, 100), (250_000, 128, 1024)):
                out += sets("mixture", f"mixture-{dim}-big", harness.mixture(n, dim, k, seed=1), (k,), None)
        else:
            for n, dim, k in ((125_000, 64, 256), (39_780, 384, 256)):
                out += sets("mixture", f"mixture-{dim}", harness.mixture(n, dim, k, seed=1), (k,), None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows of each data set, one K, one seed")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per data set (default 3; --quick: 1)")
    ap.add_argument("--data", default=",".join(DEFAULT_DATA), help=f"comma-separated subset of {','.join(DATA)}")
    ap.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/at_defaults-<time>.json")
    args = ap.parse_args()
    if args.worker:
        return harness.serve(worker, args.worker)
    methods = [m for m in args.methods.split(",") if m]
    data = [d for d in args.data.split(",") if d]
    bad = sorted(set(methods) - set(METHODS)) + sorted(set(data) - set(DATA))
    if bad:
        ap.error(f"unknown {bad}: --methods takes {','.join(METHODS)}, --data {','.join(DATA)}")
    methods = harness.installed(methods, NEEDS)
    seeds = args.seeds or (1 if args.quick else 3)
    started = harness.now()
    out = args.json or harness.results_path("at_defaults", args.quick, started)
    records = []
    with tempfile.TemporaryDirectory(prefix="vq-at-defaults-") as tmp:
        for name, k, train, new in datasets(data, Path(tmp), args.quick):
            x_train, x_new = np.load(train), np.load(new)
            for seed, method in harness.interleave(methods, seeds):
                c_path = Path(tmp) / f"c-{method}.npy"
                spec = {"train": str(train), "k": k, "seed": seed, "method": method, "out": str(c_path)}
                rec = {"data": name, "k": k, "seed": seed, "method": method, **harness.run_worker(__file__, spec)}
                if "error" not in rec:
                    c = np.load(c_path)
                    rec["objective_train"] = harness.objective(x_train, c)
                    rec["objective_new"] = harness.objective(x_new, c)
                records.append(rec)
                print(
                    f"{name} K={k} seed {seed} {method:10s}: "
                    + (rec["error"] if "error" in rec else f"{rec['seconds']:.2f} s, {rec['iterations']} iterations"),
                    file=sys.stderr,
                    flush=True,
                )
    lines = [
        f"{started:%Y-%m-%d %H:%M} UTC, {harness.THREADS} threads; medians over {seeds} seed(s); objectives: "
        "mean over the seeds, as a ratio to ours",
        "",
        "| data | K | method | seconds | seeding s | iterations | objective, train rows | new rows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, k in dict.fromkeys((r["data"], r["k"]) for r in records):
        rows = [r for r in records if r["data"] == name and r["k"] == k and "error" not in r]
        ours = [r for r in rows if r["method"] == "ours"] or rows
        ref_train = statistics.mean(r["objective_train"] for r in ours) if ours else None
        ref_new = statistics.mean(r["objective_new"] for r in ours) if ours else None
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                lines.append(f"| {name} | {k} | {method} | failed (see the errors in the JSON) | | | | |")
                continue
            train = statistics.mean(r["objective_train"] for r in mine) / ref_train
            new = statistics.mean(r["objective_new"] for r in mine) / ref_new
            lines.append(
                f"| {name} | {k} | {method} | {harness.median([r['seconds'] for r in mine]):.2f} "
                f"| {harness.fmt(harness.median([r['init_seconds'] for r in mine]), '.2f')} "
                f"| {harness.median([r['iterations'] for r in mine]):.0f} | {train:.4f} | {new:.4f} |"
            )
    md = "\n".join(lines)
    record = {
        "started": started.isoformat(timespec="seconds"),
        "machine": harness.machine_info(("vq-pipeline", "torch", "faiss-cpu", "scikit-learn", "numpy")),
        "command": " ".join(sys.argv),
        "seeds": seeds,
        "methods": methods,
        "data": data,
        "records": records,
    }
    harness.write_results(out, record, md)
    print(md)
    print(f"\nJSON: {out} (tables: {out.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
