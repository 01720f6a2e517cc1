"""Every library entirely at its own defaults: the time of one whole fit call, and the objective it reaches.

Command, from the repository root (FAISS and scikit-learn installed, as in ``.venv-bench``)::

    .venv-bench/bin/python benchmarks/at_defaults.py [--seeds 3] [--json PATH]

``fair.py`` gives every library the same initial centroids and the same 20 iterations, which isolates
the Lloyd loop. A user who calls each library with only K sees something else: its own seeding, its
own stopping rule, its own sampling. Here each fit runs that way, in a fresh process that imports only
its library, with 2 threads (``OMP_NUM_THREADS`` etc.; ``torch.set_num_threads``,
``faiss.omp_set_num_threads``, ``threadpoolctl``), after an untimed warm-up call on 2,048 rows:

* ``ours``: ``vq_pipeline.fit_codebook(x, K, seed=s, device="cpu")`` (k-means|| seeding, at most 50
  iterations, relative objective decrease ``tol=1e-4``);
* ``sklearn``: ``sklearn.cluster.KMeans(K, random_state=s).fit(x)`` (greedy k-means++, one run, at
  most 300 iterations, ``tol=1e-4`` relative to the data's variance on the centres' shift);
* ``faiss``: ``faiss.Kmeans(d, K, seed=1234 + s).train(x)`` (K random rows as the start, 25
  iterations, and a random sample of ``256 K`` rows when there are more).

The parent then computes each codebook's objective in float64 over all training rows and over the
new rows (the sum of squared distances to the nearest centroid). Data, l2: the ``wordllama`` token
embeddings (25,600 training and 6,400 new rows, ``wordllama_data.py``) with K=256 and 1024, and the
gaussian mixture of ``seeding.py`` (80% training, 20% new rows), 125,000 x 64 and 39,780 x 384,
K=256. Reported: medians over the seeds of the seconds, and the mean objectives over ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import default_init  # noqa: E402 - a sibling script

THREADS = 2
METHODS = ("ours", "sklearn", "faiss")


def worker(spec: dict) -> dict:
    x = np.load(spec["train"])
    k, seed, method = spec["k"], spec["seed"], spec["method"]
    warm = x[:2048]
    if method == "ours":
        import vq_pipeline  # before torch: it chooses its OpenMP waits, as for users
        import torch

        torch.set_num_threads(THREADS)
        vq_pipeline.fit_codebook(warm, min(k, 64), device="cpu")
        t = time.perf_counter()
        cb = vq_pipeline.fit_codebook(x, k, seed=seed, device="cpu")
        seconds = time.perf_counter() - t
        centroids, iterations = cb.centroids.numpy(), cb.stats["iterations"]
    elif method == "sklearn":
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=THREADS)  # noqa: F841 - in force while it lives
        KMeans(min(k, 64), random_state=seed).fit(warm)
        t = time.perf_counter()
        km = KMeans(k, random_state=seed).fit(x)
        seconds = time.perf_counter() - t
        centroids, iterations = km.cluster_centers_.astype(np.float32), int(km.n_iter_)
    else:
        import faiss

        faiss.omp_set_num_threads(THREADS)
        faiss.Kmeans(x.shape[1], min(k, 64), seed=1234 + seed).train(warm)
        t = time.perf_counter()
        km = faiss.Kmeans(x.shape[1], k, seed=1234 + seed)
        km.train(x)
        seconds = time.perf_counter() - t
        centroids, iterations = km.centroids, len(km.iteration_stats)
    out = Path(spec["out"])
    np.save(out, np.ascontiguousarray(centroids, dtype=np.float32))
    return {"seconds": seconds, "iterations": iterations, "centroids": str(out)}


def objective(x: np.ndarray, c: np.ndarray) -> float:
    """Sum over the rows of the squared distance to the nearest centroid, in float64, in chunks."""
    c64 = c.astype(np.float64)
    cn = np.square(c64).sum(axis=1)
    total = 0.0
    for lo in range(0, x.shape[0], 4096):
        xb = x[lo : lo + 4096].astype(np.float64)
        d = np.square(xb).sum(axis=1)[:, None] - 2.0 * xb @ c64.T + cn[None, :]
        total += float(np.maximum(d.min(axis=1), 0.0).sum())
    return total


def datasets(folder: Path) -> list[tuple[str, int, Path, Path]]:
    """``default_init.py``'s data sets without the digits: (name, K, train .npy, new .npy)."""
    return [d for d in default_init.datasets(folder) if not d[0].startswith("digits")]


def run(spec: dict) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(THREADS)
    return default_init.run(spec, __file__, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    records = []
    with tempfile.TemporaryDirectory(prefix="vq-at-defaults-") as tmp:
        for name, k, train, new in datasets(Path(tmp)):
            x_train, x_new = np.load(train), np.load(new)
            for seed in range(args.seeds):
                order = METHODS[seed % len(METHODS) :] + METHODS[: seed % len(METHODS)]  # interleaved, rotated
                for method in order:
                    out = Path(tmp) / f"c-{method}.npy"
                    spec = {"train": str(train), "k": k, "seed": seed, "method": method, "out": str(out)}
                    rec = {"data": name, "k": k, "seed": seed, "method": method, **run(spec)}
                    c = np.load(out)
                    rec["objective_train"] = objective(x_train, c)
                    rec["objective_new"] = objective(x_new, c)
                    records.append(rec)
                    print(
                        f"{name} K={k} seed {seed} {method:8s}: {rec['seconds']:.2f} s, {rec['iterations']} iterations"
                    )
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "threads": THREADS, "records": records}, indent=1))
    print(f"\nstarted {started}, {THREADS} threads; medians over {args.seeds} seeds; objectives: mean over the seeds,")
    print("as a ratio to ours\n")
    print("| data | K | method | seconds | iterations | objective, train rows | new rows |")
    print("|---|---|---|---|---|---|---|")
    for name, k in dict.fromkeys((r["data"], r["k"]) for r in records):
        rows = [r for r in records if r["data"] == name and r["k"] == k]
        ours = [r for r in rows if r["method"] == "ours"]
        ref_train = statistics.mean(r["objective_train"] for r in ours)
        ref_new = statistics.mean(r["objective_new"] for r in ours)
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            secs = statistics.median(r["seconds"] for r in mine)
            its = statistics.median(r["iterations"] for r in mine)
            train = statistics.mean(r["objective_train"] for r in mine) / ref_train
            new = statistics.mean(r["objective_new"] for r in mine) / ref_new
            print(f"| {name} | {k} | {method} | {secs:.2f} | {its:.0f} | {train:.4f} | {new:.4f} |")


if __name__ == "__main__":
    main()
