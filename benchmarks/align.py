"""How many rows keep their code across a refit, by how the refit's codes are numbered.

Command, from the repository root::

    .venv/bin/python benchmarks/align.py [--quick] [--data digits,wordllama] [--wordllama PATH] [--seeds N] [--json PATH]

Data (real embeddings, metric l2, torch engine on the CPU):

* ``digits``: scikit-learn's digits, 1,797 x 64 (8x8 images; shipped with scikit-learn), K=16.
* ``wordllama``: the 32,000 x 256 token embedding matrix of the ``wordllama`` wheel
  (``l2_supercat_256.safetensors``, float16, read as float32), K=128. Not a dependency: ``harness.wordllama``
  fetches the wheel once into ``benchmarks/.cache/wordllama`` (``--wordllama`` takes a wheel, its
  ``.safetensors`` or a ``.npy`` instead).

Each data set is shuffled (seed 0) and split into old rows (60%), new rows (20%) and held-out rows
(20%). The reference codebook is a cold fit (``init='k-means++'``, seed 0) on the old rows. Two refits replace it:

* ``cold``: a cold fit of the old rows with another seed (1, 2, ... one row per seed);
* ``warm``: a fit of the old and the new rows started from the reference's centroids (what the
  scheduled pipeline does), one row.

For each refit, the share of held-out rows whose code under the refit equals their code under the
reference, with the refit's codes numbered (a) as fitted, (b) by closest centroids, (c) by
co-occurrence on the refit's training rows (what the pipeline does, with at most 100k rows), and
(d) the best any renumbering can do on the held-out rows themselves (Hungarian on their own
co-occurrence table: the ceiling, since the refit's cells differ from the reference's). ``align s``
is the time of (c): both encodes and the matching. ``--quick``: digits, one cold refit. Results: a markdown
table and JSON (default ``benchmarks/results/align-<UTC time>.json`` / ``.md``). Quality, not speed: it runs
in this one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import harness
from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.compute.align import cooccurrence, kept_rows, match_by_cooccurrence


def kept(codebook: Codebook, x: torch.Tensor, ref_codes: np.ndarray) -> float:
    return kept_rows(codebook.encode(x, engine="torch").numpy(), ref_codes) / len(x)


def measure(name: str, x: np.ndarray, n_codes: int, seeds: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(x[rng.permutation(len(x))])
    n_old, n_new = int(0.6 * len(x)), int(0.2 * len(x))
    old, new, held = x[:n_old], x[n_old : n_old + n_new], x[n_old + n_new :]
    ref = fit_codebook(old, n_codes, init="k-means++", seed=0, engine="torch")
    ref_codes = ref.encode(held, engine="torch").numpy()
    refits = [
        (f"cold, seed {s}", fit_codebook(old, n_codes, init="k-means++", seed=s, engine="torch"), old)
        for s in range(1, seeds + 1)
    ]
    both = torch.cat([old, new])
    refits.append(("warm, old + new rows", fit_codebook(both, n_codes, init=ref, engine="torch"), both))
    rows = []
    for label, refit, train in refits:
        sample = train[torch.from_numpy(np.sort(rng.permutation(len(train))[:100_000]))]
        t0 = time.perf_counter()
        by_rows = refit.aligned_to(ref, sample, engine="torch")
        seconds = time.perf_counter() - t0
        by_centroids = refit.aligned_to(ref, method="centroids")
        codes = refit.encode(held, engine="torch").numpy()
        best = match_by_cooccurrence(cooccurrence(codes, ref_codes, n_codes, n_codes))
        rows.append(
            {
                "data": f"{name} {x.shape[0]}x{x.shape[1]}, K={n_codes}",
                "refit": label,
                "held_out": len(held),
                "none": kept(refit, held, ref_codes),
                "centroids": kept(by_centroids, held, ref_codes),
                "cooccurrence": kept(by_rows, held, ref_codes),
                "best": kept_rows(codes, ref_codes, best) / len(held),
                "align_rows": len(sample),
                "align_seconds": seconds,
            }
        )
        print(f"{rows[-1]['data']}: {label} done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, one cold refit: a smoke check")
    parser.add_argument("--data", default=None, help="comma-separated subset of digits,wordllama (default both)")
    parser.add_argument(
        "--wordllama", type=Path, help="a wordllama wheel, its .safetensors or a .npy (default: the cache)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="cold refits per data set (seeds 1..N; default 2)")
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/align-<time>.json")
    args = parser.parse_args()
    torch.set_num_threads(harness.THREADS)
    seeds = args.seeds or (1 if args.quick else 2)
    data = (args.data or ("digits" if args.quick else "digits,wordllama")).split(",")
    started = harness.now()
    out = args.json or harness.results_path("align", args.quick, started)
    rows = []
    if "digits" in data:
        rows += measure("digits", harness.digits(), 16, seeds)
    if "wordllama" in data:
        rows += measure("wordllama", harness.wordllama(args.wordllama), 128, seeds)
    lines = [
        f"{started:%Y-%m-%d %H:%M} UTC, {harness.THREADS} torch threads, held-out rows keeping their code",
        "",
        "| data | refit | (a) as fitted | (b) centroids | (c) co-occurrence | (d) best possible | align s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['refit']} | {r['none']:.1%} | {r['centroids']:.1%} | {r['cooccurrence']:.1%} "
            f"| {r['best']:.1%} | {r['align_seconds']:.2f} ({r['align_rows']} rows) |"
        )
    md = "\n".join(lines)
    record = {
        "started": started.isoformat(timespec="seconds"),
        "machine": harness.machine_info(),
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    harness.write_results(out, record, md)
    print(md)
    print(f"\nJSON: {out} (tables: {out.with_suffix('.md')})")


if __name__ == "__main__":
    main()
