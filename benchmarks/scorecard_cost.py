"""What the scorecard costs against one encode pass of the same table.

Command (from the repository root)::

    .venv/bin/python benchmarks/scorecard_cost.py [--rows 200000] [--dim 256] [--repeats 3] [--quick] [--json PATH]

Question (issue 26): a fit and every scheduled run compute the scorecard
(:func:`vq_pipeline.compute.scorecard.scorecard`) on a sample of at most
:data:`~vq_pipeline.compute.scorecard.DEFAULT_SAMPLE_ROWS` rows; does it cost at most 10% of one encode pass?

What it does, in this one process (vq_pipeline, torch and numpy; 2 threads): generates ``rows`` x ``dim``
embeddings (:func:`vq_pipeline.jobs.demo.generate_embeddings`, 64 clusters, seed 0), fits a flat codebook of
256 codes and a residual one of 3 x 256 on the first 20,000 rows (3 iterations: the codebook's quality does
not change the cost), then, interleaved ``repeats`` times: one whole ``codebook.encode(x)`` and the scorecard
of the seeded sample the fit uses (:func:`vq_pipeline.fitting.options.codebook_scorecard`). Prints and records
the best time of each and their ratio.

Writes ``benchmarks/results/scorecard_cost-<UTC time>.json`` and ``.md`` (``--quick``: 50,000 rows, one
repeat, under ``benchmarks/.cache/results/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import harness
import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 50_000, 1
    started = harness.now()
    harness.limit_threads(harness.THREADS)
    import torch

    from vq_pipeline import fit_codebook
    from vq_pipeline.compute.scorecard import DEFAULT_SAMPLE_ROWS, sample_rows
    from vq_pipeline.fitting.options import SCORECARD_STREAM, codebook_scorecard
    from vq_pipeline.jobs.demo import generate_embeddings

    info = harness.machine_info()
    x = torch.from_numpy(np.asarray(generate_embeddings(args.rows, args.dim, 64, seed=0), dtype=np.float32))
    sample = x[torch.from_numpy(sample_rows(args.rows, DEFAULT_SAMPLE_ROWS, [0, SCORECARD_STREAM]))]
    cases = []
    for name, kw in (("flat 256", {}), ("residual 3 x 256", {"codec": "residual", "levels": 3})):
        cb = fit_codebook(x[:20_000], 256, n_iter=3, seed=0, device="cpu", **kw)
        encode_s, card_s = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            cb.encode(x, device="cpu")
            encode_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            codebook_scorecard(cb, sample)
            card_s.append(time.perf_counter() - t)
        case = {
            "codebook": name,
            "encode_s": min(encode_s),
            "scorecard_s": min(card_s),
            "share": min(card_s) / min(encode_s),
            "encode_runs": encode_s,
            "scorecard_runs": card_s,
        }
        cases.append(case)
        print(f"{name:18s} encode {case['encode_s']:.3f} s, scorecard {case['scorecard_s']:.4f} s: {case['share']:.1%}")
    lines = [
        f"## Scorecard cost ({args.rows:,} x {args.dim}, sample {DEFAULT_SAMPLE_ROWS:,} rows, 2 threads)",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC, {info.get('cpu', '')}, load at start {info['load_at_start']:.1f}. "
        f"Command: `python benchmarks/scorecard_cost.py {' '.join(sys.argv[1:])}`. Best of {args.repeats}.",
        "",
        "| codebook | encode pass s | scorecard s | share |",
        "|---|---|---|---|",
        *(f"| {c['codebook']} | {c['encode_s']:.3f} | {c['scorecard_s']:.4f} | {c['share']:.1%} |" for c in cases),
    ]
    path = args.json or harness.results_path("scorecard_cost", args.quick, started)
    record = {"args": vars(args) | {"json": str(args.json)}, "machine": info, "cases": cases}
    harness.write_results(path, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
