"""Exact pruned Lloyd (``prune=True``) against the plain search, for fits at the library's defaults.

Command, from the repository root::

    .venv/bin/python benchmarks/prune.py [--threads 2] [--repeats 2] [--json PATH]

``benchmarks/fair.py`` compares both at a fixed 20 iterations from a fixed init; this script asks what
a user at the defaults sees: ``fit_codebook(x, 256, init="k-means++", prune=...)`` with ``n_iter=50``, ``tol=1e-4``
(exact k-means++ seeding, the default until ``init="auto"`` became k-means||; the same for both settings), on

* ``wordllama``: 25,600 rows of the 32,000 x 256 token-embedding matrix of the ``wordllama`` wheel
  (fetched once into ``benchmarks/.cache/wordllama``, see ``wordllama_data.py``);
* ``mixture``: 100,000 x 64 rows of ``fair.py``'s gaussian mixture (256 centres, offset +3).

Each (data, prune) fit runs in a fresh process with ``--threads`` torch threads, after a one-iteration
warm-up on 2,000 rows; the runs are interleaved and the order flips each repeat. Reported per data
set: the seeding and iteration seconds of each setting (medians), the pruned fit's time over the
plain one, and the share of rows the bounds skipped at a few passes. Both settings must end with the
same inertia (they are the same fit); the script says so if they do not.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_CODES = 256


def worker(path: str, prune: bool, threads: int) -> dict:
    import vq_pipeline
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(path))
    vq_pipeline.fit_codebook(x[:2000], N_CODES, n_iter=1, init="k-means++", prune=prune, device="cpu")
    t = time.perf_counter()
    cb = vq_pipeline.fit_codebook(x, N_CODES, init="k-means++", prune=prune, device="cpu")
    wall = time.perf_counter() - t
    pruned = cb.timings.get("iteration_pruned", [])
    return {
        "wall_s": wall,
        "init_s": cb.timings["init_seconds"],
        "iterations_s": sum(cb.timings["iteration_seconds"]),
        "iterations": cb.stats["iterations"],
        "inertia": cb.stats["inertia"],
        "pruned_share": [p / x.shape[0] for p in pruned],
    }


def data(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    import fair
    import wordllama_data

    out = {"wordllama": folder / "wordllama.npy", "mixture": folder / "mixture.npy"}
    np.save(out["wordllama"], np.ascontiguousarray(wordllama_data.load()[:25_600], dtype=np.float32))
    rng = np.random.default_rng(0)
    n, dim = 100_000, 64
    centres = rng.standard_normal((N_CODES, dim), dtype=np.float32) * np.float32(fair.SPREAD / math.sqrt(dim))
    x = centres[rng.integers(N_CODES, size=n)] + fair.NOISE * rng.standard_normal((n, dim), dtype=np.float32)
    np.save(out["mixture"], (x + fair.OFFSET).astype(np.float32))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        path, prune, threads = args.worker
        print(json.dumps(worker(path, prune == "1", int(threads))))
        return 0
    folder = HERE / ".cache" / "prune"
    folder.mkdir(parents=True, exist_ok=True)
    files = data(folder)
    runs: dict[tuple[str, bool], list[dict]] = {(name, p): [] for name in files for p in (False, True)}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in range(args.repeats):
        for name, path in files.items():
            for prune in (True, False) if r % 2 == 0 else (False, True):
                cmd = [sys.executable, __file__, "--worker", str(path), "1" if prune else "0", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[(name, prune)].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"r{r} {name} prune={prune}: {runs[(name, prune)][-1]['wall_s']:.2f} s", file=sys.stderr)
    print(
        f"{started}, {args.threads} threads, {args.repeats} interleaved repeat(s), medians; "
        "`fit_codebook(x, 256)` at the defaults\n"
    )
    print(
        "| data | iterations | seeding s | iterations s: plain / pruned | whole fit: pruned / plain "
        "| rows skipped at passes 2, 5, 10, 20, last |"
    )
    print("|---|---|---|---|---|---|")
    for name in files:
        plain, pruned = runs[(name, False)], runs[(name, True)]
        same = {q["inertia"] for q in plain + pruned}
        med = lambda rows, k: statistics.median(q[k] for q in rows)  # noqa: E731
        share = pruned[0]["pruned_share"]
        at = [share[i - 1] for i in (2, 5, 10, 20) if i <= len(share)] + [share[-1]]
        print(
            f"| {name} | {plain[0]['iterations']} | {med(plain, 'init_s'):.2f} | {med(plain, 'iterations_s'):.2f} / "
            f"{med(pruned, 'iterations_s'):.2f} | **{med(pruned, 'wall_s') / med(plain, 'wall_s'):.2f}** | "
            f"{', '.join(f'{s:.2f}' for s in at)} |" + ("" if len(same) == 1 else " inertia DIFFERS")
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({f"{k[0]} prune={k[1]}": v for k, v in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
