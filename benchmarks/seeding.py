"""Seeding time and quality: our greedy k-means++ (exact, pruned), our k-means||, scikit-learn's kmeans_plusplus.

Command, from the repository root (scikit-learn and threadpoolctl installed, as in ``.venv``)::

    .venv/bin/python benchmarks/seeding.py [--repeats 3] [--shapes 31824x384x256,200000x128x1024,100000x64x256]
        [--wordllama PATH] [--methods LIST] [--json PATH]

``--wordllama`` takes the ``.safetensors`` file inside the ``wordllama`` wheel (real token embeddings,
32,000 x 256; ``pip download wordllama --no-deps -d DIR``, then unzip ``wordllama/weights/*.safetensors``);
it is a benchmark input only, not a dependency (or the ``.npy`` that ``benchmarks/wordllama_data.py``
caches in ``benchmarks/.cache/wordllama/``). The other data sets are the gaussian mixture of
``benchmarks/fair.py`` (K centres some 5.7 apart, noise 0.5 per coordinate, offset by +3: not centred).

Every measurement runs in its own fresh process (``--worker``) that imports only what it measures, with
2 threads (``OMP_NUM_THREADS`` etc. in its environment, ``torch.set_num_threads(2)``,
``threadpoolctl.threadpool_limits(2)`` for scikit-learn), after an untimed warm-up call on the first
4,096 rows; ``OMP_WAIT_POLICY`` is each library's default (vq_pipeline chooses its own on
import). The methods run interleaved, ``--repeats`` times; the table gives medians and the load average.

Methods:

* ``ours-k-means++``: :func:`vq_pipeline.seeding.kmeans_plus_plus` called directly (CPU, default memory budget);
* ``ours-fit``: ``fit_codebook(x, K, n_iter=0, init='k-means++', engine='torch', device='cpu')``, the whole
  call (it also validates and fingerprints the rows and runs one E step), and its ``timings['init_seconds']``;
* ``ours-k-means||``: :func:`vq_pipeline.seeding.kmeans_parallel` called directly;
* ``sklearn``: ``sklearn.cluster.kmeans_plusplus(x, K, random_state=seed)`` (greedy, ``2 + ln K`` trials).

Quality (computed after the clock stops, once per method and data set: the seeds do not change between
repeats): the k-means objective (sum of squared distances to the nearest centre) of the seeds, and after
20 Lloyd iterations from them (``fit_codebook(init=seeds, n_iter=20, tol=0)``, the same Lloyd for all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
THREADS = 2
SEED = 0
N_LLOYD = 20
SHAPES = "31824x384x256,200000x128x1024,100000x64x256"
METHODS = ("ours-k-means++", "ours-fit", "ours-k-means||", "sklearn")
WARMUP_ROWS = 4096


def mixture(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    """(n, dim) float32: the gaussian mixture of ``benchmarks/fair.py`` (K centres, noise 0.5, offset +3)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim), dtype=np.float32) * np.float32(4.0 / math.sqrt(dim))  # (k, dim)
    out = centres[rng.integers(k, size=n)]  # (n, dim)
    out += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    out += 3.0
    return out


def wordllama(path: str) -> np.ndarray:
    """(32000, 256) float32 token embeddings from the wordllama wheel's safetensors file, or from the
    ``.npy`` that ``benchmarks/wordllama_data.py`` caches."""
    if path.endswith(".npy"):
        return np.ascontiguousarray(np.load(path), dtype=np.float32)
    from safetensors.numpy import load_file

    tensors = load_file(path)
    (emb,) = [v for k, v in tensors.items() if "embedding" in k] or list(tensors.values())[:1]
    return np.ascontiguousarray(emb.astype(np.float32))


# ----------------------------------------------------------------------------- worker (fresh process)


def worker(spec: dict) -> dict:
    method, k = spec["method"], spec["k"]
    x_np = np.load(spec["x"])
    out: dict = {"method": method, "data": spec["data"], "repeat": spec["repeat"], "load1_start": os.getloadavg()[0]}
    if method == "sklearn":
        from sklearn.cluster import kmeans_plusplus
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=THREADS)  # noqa: F841 - in force while it lives
        kmeans_plusplus(x_np[:WARMUP_ROWS], min(k, 64), random_state=SEED)
        t0 = time.perf_counter()
        seeds, _ = kmeans_plusplus(x_np, k, random_state=SEED)
        out["seconds"] = time.perf_counter() - t0
        seeds = seeds.astype(np.float32)
    else:
        import vq_pipeline  # noqa: F401 - before torch: it chooses the OpenMP waits, as for users
        import torch

        from vq_pipeline import fit_codebook
        from vq_pipeline.engines.torch import TorchEngine
        from vq_pipeline.settings import DEFAULT_MEMORY_BUDGET
        from vq_pipeline.seeding import kmeans_parallel, kmeans_plus_plus

        torch.set_num_threads(THREADS)
        x = torch.from_numpy(x_np)
        cpu = torch.device("cpu")

        def seed_with(rows: torch.Tensor, n_codes: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(SEED)
            if method == "ours-k-means++":
                return kmeans_plus_plus(rows, n_codes, generator=g, memory_budget=DEFAULT_MEMORY_BUDGET, device=cpu)
            return kmeans_parallel(
                rows, n_codes, generator=g, engine=TorchEngine(cpu), memory_budget=DEFAULT_MEMORY_BUDGET, device=cpu
            )

        if method == "ours-fit":
            warm = x[:WARMUP_ROWS]
            fit_codebook(warm, min(k, 64), n_iter=0, init="k-means++", seed=SEED, engine="torch", device="cpu")
            t0 = time.perf_counter()
            cb = fit_codebook(x, k, n_iter=0, init="k-means++", seed=SEED, engine="torch", device="cpu")
            out["seconds"] = time.perf_counter() - t0
            out["init_seconds"] = cb.timings["init_seconds"]
            seeds = cb.centroids.numpy()
        else:
            seed_with(x[:WARMUP_ROWS], min(k, 64))
            t0 = time.perf_counter()
            seeds = seed_with(x, k).numpy()
            out["seconds"] = time.perf_counter() - t0
    out["load1_end"] = os.getloadavg()[0]
    if spec["quality"]:
        out.update(quality(x_np, seeds))
    return out


def quality(x_np: np.ndarray, seeds: np.ndarray) -> dict:
    """The objective of the seeds and after N_LLOYD Lloyd iterations from them (our exact Lloyd)."""
    import vq_pipeline  # noqa: F401
    import torch

    from vq_pipeline import fit_codebook

    torch.set_num_threads(THREADS)
    x, c = torch.from_numpy(x_np), torch.from_numpy(np.ascontiguousarray(seeds))
    k = c.shape[0]
    at_seeds = fit_codebook(x, k, init=c, n_iter=0, engine="torch", device="cpu").stats["inertia"]
    after = fit_codebook(x, k, init=c, n_iter=N_LLOYD, tol=0.0, engine="torch", device="cpu").stats["inertia"]
    return {"objective_seeds": at_seeds, "objective_lloyd": after}


# ----------------------------------------------------------------------------- parent


def run_worker(spec: dict) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(THREADS)
    env.pop("OMP_WAIT_POLICY", None)  # each library's own default
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} on {spec['data']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated NxDIMxK gaussian mixtures")
    ap.add_argument("--wordllama", help="path of wordllama's .safetensors file (32,000 x 256, K=256)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    methods = args.methods.split(",")
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vq-seeding-") as tmp:
        datasets: list[tuple[str, str, int]] = []
        if args.wordllama:
            path = Path(tmp) / "wordllama.npy"
            np.save(path, wordllama(args.wordllama))
            datasets.append(("wordllama 32000x256", str(path), 256))
        for shape in filter(None, args.shapes.split(",")):
            n, dim, k = map(int, shape.split("x"))
            path = Path(tmp) / f"{shape}.npy"
            np.save(path, mixture(n, dim, k, seed=1))
            datasets.append((f"mixture {n}x{dim}", str(path), k))
        for name, path, k in datasets:
            for repeat in range(args.repeats):
                for method in methods:  # interleaved
                    spec = {"method": method, "data": name, "x": path, "k": k, "repeat": repeat, "quality": repeat == 0}
                    rec = run_worker(spec)
                    rec["k"] = k
                    records.append(rec)
                    print(
                        f"{name} K={k} {method:15s} repeat {repeat}: {rec['seconds']:.2f} s "
                        f"(load {rec['load1_start']:.1f})",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    print()
    print(
        "| data | K | method | seconds (median) | / scikit-learn | init_seconds | objective: seeds "
        "| after 20 Lloyd | load (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, k in datasets:
        rows = [r for r in records if r["data"] == name]
        sk = [r["seconds"] for r in rows if r["method"] == "sklearn"]
        sk_median = statistics.median(sk) if sk else None
        sk_obj = next((r for r in rows if r["method"] == "sklearn" and "objective_seeds" in r), None)
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            secs = statistics.median(r["seconds"] for r in mine)
            q = next(r for r in mine if "objective_seeds" in r)
            ratio = f"{secs / sk_median:.3f}" if sk_median else "-"
            init = mine[0].get("init_seconds")
            init_s = f"{statistics.median(r['init_seconds'] for r in mine):.2f}" if init is not None else "-"
            rel = ""
            if sk_obj is not None and method != "sklearn":
                rel = f" ({q['objective_lloyd'] / sk_obj['objective_lloyd']:.4f}x)"
            load = statistics.median(r["load1_start"] for r in mine)
            print(
                f"| {name} | {k} | {method} | {secs:.2f} | {ratio} | {init_s} | {q['objective_seeds']:.6g} | "
                f"{q['objective_lloyd']:.6g}{rel} | {load:.1f} |"
            )
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
