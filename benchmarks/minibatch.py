"""One pass of mini-batch K-means over 8 batches against a full Lloyd fit, on real embeddings.

Command, from the repository root (the project venv has scikit-learn through the ``test`` extra)::

    .venv/bin/python benchmarks/minibatch.py [--quick] [--seeds 3] [--threads 2] [--data digits,wordllama] [--json PATH]

Data (float32):

* ``digits``: scikit-learn's bundled digits, 1797 x 64, K = 16.
* ``wordllama``: the 32,000 x 256 token-embedding matrix of the ``wordllama`` wheel, K = 256
  (``harness.wordllama``: the wheel is fetched once with ``pip download wordllama --no-deps`` into
  ``benchmarks/.cache/wordllama`` and the matrix cached there as ``.npy``; wordllama is never installed).

For every seed, the rows are shuffled with that seed and split into 8 equal batches; the mini-batch
methods see the same batches in the same order, once:

* ``vq full Lloyd``: ``fit_codebook(x, K, seed=seed)`` at its defaults (the reference of the ratios);
* ``vq minibatch``: ``vq_pipeline.fit_minibatch(batches, K, FitSettings(seed=seed))`` at its defaults
  (k-means++ and 5 Lloyd iterations on the first batch; per batch two exact assignments with the
  running-mean update, then under-used codes moved to split crowded codes where that pays);
* ``vq minibatch plain``: the same with ``init_iter=0, batch_iter=1, split_ratio=0`` (plain Sculley:
  k-means++ on the first batch, one assignment and running mean per batch), for comparison;
* ``sklearn MiniBatchKMeans.partial_fit``: ``MiniBatchKMeans(K, random_state=seed)`` at its defaults,
  ``partial_fit`` on each batch.

Each (method, seed) runs in a fresh process that imports only what it measures (``harness.run_worker``),
with ``--threads`` threads, after a small warm-up call;
seconds are the whole calls a user waits for. The parent computes every inertia the same way: the
sum over all rows of the squared L2 distance to the nearest centroid, in float64. The table gives
medians over seeds (ratio: median of the per-seed ratios to that seed's full Lloyd fit; the range
follows in brackets). The target: the minibatch ratio within 1.05 and at most scikit-learn's.
``--quick``: digits only, one seed. Writes JSON and markdown (default ``benchmarks/results/minibatch-<UTC time>``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

import harness

N_BATCHES = 8
DATASETS = {"digits": 16, "wordllama": 256}
METHODS = ("vq full Lloyd", "vq minibatch", "vq minibatch plain", "sklearn MiniBatchKMeans.partial_fit")
NEEDS = {"sklearn MiniBatchKMeans.partial_fit": ["sklearn", "threadpoolctl"]}
PLAIN = {"init_iter": 0, "batch_iter": 1, "split_ratio": 0.0}


def load(name: str) -> np.ndarray:
    """(n_rows, dim) float32 embeddings of a named data set."""
    return harness.digits() if name == "digits" else harness.wordllama()


def batches(x: np.ndarray, seed: int) -> list[np.ndarray]:
    return np.array_split(x[np.random.default_rng(seed).permutation(len(x))], N_BATCHES)


def worker(spec: dict) -> dict:
    """Run one method on one seed's batches in this (fresh) process; save the centroids, return the seconds."""
    method, data, seed = spec["method"], spec["data"], spec["seed"]
    x = load(data)
    k = DATASETS[data]
    parts = batches(x, seed)
    if method.startswith("sklearn"):
        from sklearn.cluster import MiniBatchKMeans

        harness.limit_threads(spec["threads"])
        warm = MiniBatchKMeans(4, random_state=0)
        warm.partial_fit(parts[0][:64])

        def run() -> object:
            model = MiniBatchKMeans(k, random_state=seed)
            for b in parts:
                model.partial_fit(b)
            return model

        model, seconds = harness.timed(run)
        centroids = model.cluster_centers_
    else:
        import torch  # noqa: F401 - for limit_threads
        from vq_pipeline import FitSettings, fit_codebook, fit_minibatch
        from vq_pipeline.fitting.minibatch import StreamSettings

        harness.limit_threads(spec["threads"])
        fit_minibatch([parts[0][:64]], 4, FitSettings(device="cpu"))  # warm-up
        fit_codebook(parts[0][:64], 4, device="cpu")
        if method == "vq full Lloyd":
            codebook, seconds = harness.timed(lambda: fit_codebook(x, k, seed=seed, device="cpu"))
        elif method == "vq minibatch plain":
            codebook, seconds = harness.timed(lambda: fit_minibatch(parts, k, FitSettings(seed=seed, device="cpu"), StreamSettings(**PLAIN)))
        else:
            codebook, seconds = harness.timed(lambda: fit_minibatch(parts, k, FitSettings(seed=seed, device="cpu")))
        centroids = codebook.centroids.numpy()
    np.save(spec["out"], np.ascontiguousarray(centroids, dtype=np.float32))
    return {"seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="digits only, one seed: a smoke check")
    ap.add_argument("--seeds", type=int, default=None, help="default 3; --quick: 1")
    ap.add_argument("--threads", type=int, default=harness.THREADS)
    ap.add_argument("--data", default=None, help="comma-separated subset of digits,wordllama (default both)")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/minibatch-<time>.json")
    args = ap.parse_args()
    if args.worker:
        return harness.serve(worker, args.worker)
    seeds = args.seeds or (1 if args.quick else 3)
    data_sets = (args.data or ("digits" if args.quick else ",".join(DATASETS))).split(",")
    methods = harness.installed(METHODS, NEEDS)
    started = harness.now()
    out = args.json or harness.results_path("minibatch", args.quick, started)
    results: dict[str, list[dict[str, object]]] = {}
    md: list[str] = [f"{started:%Y-%m-%d %H:%M} UTC, {args.threads} threads, one fresh process per (method, seed)"]
    with tempfile.TemporaryDirectory(prefix="vq-minibatch-") as tmp:
        for data in data_sets:
            x = load(data)
            k = DATASETS[data]
            md.append(f"\n### {data}: {x.shape[0]} x {x.shape[1]}, K = {k}, {N_BATCHES} batches, {seeds} seeds\n")
            rows = []
            for seed in range(seeds):
                for method in methods:  # interleaved: every method once per seed
                    c_path = Path(tmp) / "centroids.npy"
                    spec = {"method": method, "data": data, "seed": seed, "out": str(c_path)}
                    rec = harness.run_worker(__file__, spec, threads=args.threads)
                    if "error" in rec:
                        print(f"{data} seed {seed} {method}: {rec['error']}", file=sys.stderr, flush=True)
                        continue
                    rows.append(
                        {
                            "method": method,
                            "seed": seed,
                            "inertia": harness.objective(x, np.load(c_path)),
                            "seconds": float(rec["seconds"]),
                        }
                    )
            full = {r["seed"]: r["inertia"] for r in rows if r["method"] == METHODS[0]}
            for r in rows:
                r["ratio"] = r["inertia"] / full[r["seed"]] if r["seed"] in full else None
            md.append("| method | inertia | ratio to full Lloyd | seconds |\n|---|---|---|---|")
            for method in methods:
                mine = [r for r in rows if r["method"] == method]
                ratios = [r["ratio"] for r in mine if r["ratio"] is not None]
                if not mine or not ratios:
                    md.append(f"| {method} | failed | | |")
                    continue
                md.append(
                    f"| {method} | {statistics.median(r['inertia'] for r in mine):.5g} | "
                    f"{statistics.median(ratios):.4f} [{min(ratios):.4f}, {max(ratios):.4f}] | "
                    f"{statistics.median(r['seconds'] for r in mine):.2f} |"
                )
            per_seed = {m: [f"{r['ratio']:.4f}" for r in rows if r["method"] == m and r["ratio"]] for m in methods[1:]}
            md.append(f"\nper-seed ratios: {per_seed}")
            results[data] = rows
    text = "\n".join(md)
    record = {
        "started": started.isoformat(timespec="seconds"),
        "machine": harness.machine_info(("vq-pipeline", "torch", "scikit-learn", "numpy")),
        "command": " ".join(sys.argv),
        "threads": args.threads,
        "seeds": seeds,
        "results": results,
    }
    harness.write_results(out, record, text)
    print(text)
    print(f"\nJSON: {out} (tables: {out.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
