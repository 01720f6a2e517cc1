"""One pass of mini-batch K-means over 8 batches against a full Lloyd fit, on real embeddings.

Command, from the repository root (the project venv has scikit-learn through the ``test`` extra)::

    .venv/bin/python benchmarks/minibatch.py [--seeds 3] [--threads 2] [--data digits,wordllama] [--json PATH]

Data (float32):

* ``digits``: scikit-learn's bundled digits, 1797 x 64, K = 16.
* ``wordllama``: the 32,000 x 256 token-embedding matrix of the ``wordllama`` wheel, K = 256, through
  ``benchmarks/wordllama_data.py`` (the wheel is fetched once with ``pip download wordllama --no-deps``
  into ``--cache``, default ``benchmarks/.cache/wordllama``, and the matrix cached there as ``.npy``;
  wordllama is never installed or imported).

For every seed, the rows are shuffled with that seed and split into 8 equal batches; the mini-batch
methods see the same batches in the same order, once:

* ``vq full Lloyd``: ``fit_codebook(x, K, seed=seed)`` at its defaults (the reference of the ratios);
* ``vq minibatch``: ``vq_pipeline.minibatch.fit_minibatch(batches, K, seed=seed)`` at its defaults
  (k-means++ and 5 Lloyd iterations on the first batch; per batch two exact assignments with the
  running-mean update, then under-used codes moved to split crowded codes where that pays);
* ``vq minibatch plain``: the same with ``init_iter=0, batch_iter=1, split_ratio=0`` (plain Sculley:
  k-means++ on the first batch, one assignment and running mean per batch), for comparison;
* ``sklearn MiniBatchKMeans.partial_fit``: ``MiniBatchKMeans(K, random_state=seed)`` at its defaults,
  ``partial_fit`` on each batch.

Each (method, seed) runs in a fresh process that imports only what it measures, with ``--threads``
threads (``torch.set_num_threads``, ``threadpoolctl`` for scikit-learn), after a small warm-up call;
seconds are the whole calls a user waits for. The parent computes every inertia the same way: the
sum over all rows of the squared L2 distance to the nearest centroid, in float64. The table gives
medians over seeds (ratio: median of the per-seed ratios to that seed's full Lloyd fit; the range
follows in brackets). The target: the minibatch ratio within 1.05 and at most scikit-learn's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import wordllama_data

N_BATCHES = 8
DATASETS = {"digits": 16, "wordllama": 256}
METHODS = ("vq full Lloyd", "vq minibatch", "vq minibatch plain", "sklearn MiniBatchKMeans.partial_fit")
PLAIN = {"init_iter": 0, "batch_iter": 1, "split_ratio": 0.0}


def load(name: str, cache: Path) -> np.ndarray:
    """(n_rows, dim) float32 embeddings of a named data set."""
    if name == "digits":
        from sklearn.datasets import load_digits

        return load_digits().data.astype(np.float32)
    return wordllama_data.load(cache)


def batches(x: np.ndarray, seed: int) -> list[np.ndarray]:
    return np.array_split(x[np.random.default_rng(seed).permutation(len(x))], N_BATCHES)


def inertia(x: np.ndarray, c: np.ndarray) -> float:
    """Sum over rows of the squared L2 distance to the nearest row of c, float64."""
    c64 = c.astype(np.float64)
    c_sq = (c64**2).sum(axis=1)
    total = 0.0
    for start in range(0, len(x), 4096):
        xb = x[start : start + 4096].astype(np.float64)
        d = (xb**2).sum(axis=1, keepdims=True) + c_sq - 2.0 * xb @ c64.T
        total += float(np.maximum(d.min(axis=1), 0.0).sum())
    return total


def worker(method: str, data: str, seed: int, cache: Path, threads: int, out: Path) -> None:
    """Run one method on one seed's batches in this (fresh) process; save centroids and seconds."""
    x = load(data, cache)
    k = DATASETS[data]
    parts = batches(x, seed)
    if method.startswith("sklearn"):
        from sklearn.cluster import MiniBatchKMeans
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            warm = MiniBatchKMeans(4, random_state=0)
            warm.partial_fit(parts[0][:64])
            t0 = time.perf_counter()
            model = MiniBatchKMeans(k, random_state=seed)
            for b in parts:
                model.partial_fit(b)
            seconds = time.perf_counter() - t0
        centroids = model.cluster_centers_
    else:
        import torch

        from vq_pipeline import fit_codebook
        from vq_pipeline.minibatch import fit_minibatch

        torch.set_num_threads(threads)
        fit_minibatch([parts[0][:64]], 4, device="cpu")  # warm-up
        fit_codebook(parts[0][:64], 4, device="cpu")
        t0 = time.perf_counter()
        if method == "vq full Lloyd":
            codebook = fit_codebook(x, k, seed=seed, device="cpu")
        elif method == "vq minibatch plain":
            codebook = fit_minibatch(parts, k, seed=seed, device="cpu", **PLAIN)
        else:
            codebook = fit_minibatch(parts, k, seed=seed, device="cpu")
        seconds = time.perf_counter() - t0
        centroids = codebook.centroids.numpy()
    np.savez(out, centroids=centroids, seconds=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=",".join(DATASETS))
    ap.add_argument("--cache", type=Path, default=wordllama_data.CACHE)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "DATA", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, data, seed = args.worker
        worker(method, data, int(seed), args.cache, args.threads, args.out)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results: dict[str, list[dict[str, object]]] = {}
    for data in args.data.split(","):
        x = load(data, args.cache)
        k = DATASETS[data]
        print(f"\n### {data}: {x.shape[0]} x {x.shape[1]}, K = {k}, {N_BATCHES} batches, {args.seeds} seeds\n")
        rows = []
        for seed in range(args.seeds):
            for method in METHODS:  # interleaved: every method once per seed
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "result.npz"
                    cmd = [sys.executable, __file__, "--worker", method, data, str(seed)]
                    cmd += ["--out", str(out), "--cache", str(args.cache), "--threads", str(args.threads)]
                    subprocess.run(cmd, check=True, env=env)
                    r = np.load(out)
                    rows.append(
                        {
                            "method": method,
                            "seed": seed,
                            "inertia": inertia(x, r["centroids"]),
                            "seconds": float(r["seconds"]),
                        }
                    )
        full = {r["seed"]: r["inertia"] for r in rows if r["method"] == METHODS[0]}
        for r in rows:
            r["ratio"] = r["inertia"] / full[r["seed"]]
        print("| method | inertia | ratio to full Lloyd | seconds |\n|---|---|---|---|")
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            ratios = [r["ratio"] for r in mine]
            print(
                f"| {method} | {statistics.median(r['inertia'] for r in mine):.5g} | "
                f"{statistics.median(ratios):.4f} [{min(ratios):.4f}, {max(ratios):.4f}] | "
                f"{statistics.median(r['seconds'] for r in mine):.2f} |"
            )
        per_seed = {m: [f"{r['ratio']:.4f}" for r in rows if r["method"] == m] for m in METHODS[1:]}
        print(f"\nper-seed ratios: {per_seed}")
        results[data] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
