"""Which seeding ``init="auto"`` should stand for: whole fits at the library's defaults, seeded by exact
greedy k-means++ against k-means||.

Command, from the repository root (scikit-learn installed, as in ``.venv``, for the digits)::

    .venv/bin/python benchmarks/default_init.py [--seeds 3] [--threads 2] [--json PATH]

Every fit is ``fit_codebook(train, K, init=..., seed=s, device="cpu")``, otherwise at the defaults
(``n_iter=50``, ``tol=1e-4``, L2), in a fresh process with ``--threads`` torch threads, after a small
warm-up fit; the two inits run interleaved, seed by seed. Data (each split 80% train, 20% new rows):

* ``wordllama``: the 32,000 x 256 token embeddings of the ``wordllama`` wheel (``wordllama_data.py``),
  K=256 and K=1024;
* ``digits``: scikit-learn's 1,797 x 64 digits, K=16 and K=64;
* ``mixture``: the gaussian mixture of ``benchmarks/seeding.py`` (K centres, noise 0.5, offset +3),
  125,000 x 64 with K=256 and 39,780 x 384 with K=256.

Reported per data set and init: the whole call and its seeding (``timings['init_seconds']``), medians
over the seeds; the iterations; and the mean objective (sum of squared distances to the nearest
centroid) on the training rows and on the new rows, as a ratio of k-means|| over k-means++.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
INITS = ("k-means++", "k-means||")


def worker(spec: dict) -> dict:
    import vq_pipeline
    import torch

    torch.set_num_threads(spec["threads"])
    train = torch.from_numpy(np.load(spec["train"]))
    new = torch.from_numpy(np.load(spec["new"]))
    k, init = spec["k"], spec["init"]
    vq_pipeline.fit_codebook(train[:2048], min(k, 32), init=init, device="cpu")  # warm-up
    t = time.perf_counter()
    cb = vq_pipeline.fit_codebook(train, k, init=init, seed=spec["seed"], device="cpu")
    wall = time.perf_counter() - t
    _, dist = cb.encode(new, return_distances=True)  # (n_new,) squared distances
    return {
        "wall_s": wall,
        "init_s": cb.timings["init_seconds"],
        "iterations": cb.stats["iterations"],
        "objective_train": cb.stats["inertia"],
        "objective_new": float(dist.double().sum()),
    }


def datasets(folder: Path) -> list[tuple[str, int, Path, Path]]:
    """(name, K, train .npy, new .npy) of every data set, written into ``folder``."""
    sys.path.insert(0, str(HERE))
    import seeding
    import wordllama_data

    def save(name: str, train: np.ndarray, new: np.ndarray) -> tuple[Path, Path]:
        paths = folder / f"{name}-train.npy", folder / f"{name}-new.npy"
        np.save(paths[0], np.ascontiguousarray(train, dtype=np.float32))
        np.save(paths[1], np.ascontiguousarray(new, dtype=np.float32))
        return paths

    out = []
    w = save("wordllama", *wordllama_data.split(wordllama_data.load()))
    out += [("wordllama 25600x256", 256, *w), ("wordllama 25600x256", 1024, *w)]
    from sklearn.datasets import load_digits

    digits = load_digits().data.astype(np.float32)  # (1797, 64)
    perm = np.random.default_rng(0).permutation(digits.shape[0])
    cut = int(0.8 * perm.size)
    d = save("digits", digits[perm[:cut]], digits[perm[cut:]])
    out += [("digits 1437x64", 16, *d), ("digits 1437x64", 64, *d)]
    for n, dim, k in ((125_000, 64, 256), (39_780, 384, 256)):
        x = seeding.mixture(n, dim, k, seed=1)  # rows in random order: the last 20% are new rows
        cut = int(0.8 * n)
        m = save(f"mixture-{dim}", x[:cut], x[cut:])
        out.append((f"mixture {cut}x{dim}", k, *m))
    return out


def run(spec: dict, script: str = __file__, env: dict | None = None) -> dict:
    """``script --worker SPEC`` in a fresh process (environment ``env``, default this one's); its result."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True, cwd=HERE.parent
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    records = []
    with tempfile.TemporaryDirectory(prefix="vq-default-init-") as tmp:
        for name, k, train, new in datasets(Path(tmp)):
            for seed in range(args.seeds):
                for init in INITS if seed % 2 == 0 else INITS[::-1]:
                    spec = {"train": str(train), "new": str(new), "k": k, "init": init, "seed": seed}
                    rec = {"data": name, "k": k, "init": init, "seed": seed, **run({**spec, "threads": args.threads})}
                    records.append(rec)
                    print(
                        f"{name} K={k} {init:9s} seed {seed}: {rec['wall_s']:.2f} s (seeding {rec['init_s']:.2f} s, "
                        f"{rec['iterations']} iterations)",
                        flush=True,
                    )
    if args.json:
        record = {"started": started, "threads": args.threads, "records": records}
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"\nstarted {started}, {args.threads} threads; medians over {args.seeds} seeds, objectives summed over them")
    print()
    print(
        "| data | K | whole fit, s: k-means++ / k-means|| | ratio | seeding, s | iterations "
        "| objective, k-means|| / k-means++: train | new rows |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, k in dict.fromkeys((r["data"], r["k"]) for r in records):
        by = {i: [r for r in records if r["data"] == name and r["k"] == k and r["init"] == i] for i in INITS}

        def med(init: str, key: str) -> float:
            return statistics.median(r[key] for r in by[init])

        def total(init: str, key: str) -> float:
            return sum(r[key] for r in by[init])

        a, b = INITS
        wall_a, wall_b = med(a, "wall_s"), med(b, "wall_s")
        print(
            f"| {name} | {k} | {wall_a:.2f} / {wall_b:.2f} | {wall_b / wall_a:.2f} "
            f"| {med(a, 'init_s'):.2f} / {med(b, 'init_s'):.2f} "
            f"| {med(a, 'iterations'):.0f} / {med(b, 'iterations'):.0f} "
            f"| {total(b, 'objective_train') / total(a, 'objective_train'):.4f} "
            f"| {total(b, 'objective_new') / total(a, 'objective_new'):.4f} |"
        )


if __name__ == "__main__":
    main()
