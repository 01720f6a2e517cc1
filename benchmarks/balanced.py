"""Balanced codes (``balance=``): the error against the unconstrained fit, the collision rate of 3 x 256 residual
ids, and the time of a large balanced fit, each case in a fresh process.

Command, from the repository root::

    .venv/bin/python benchmarks/balanced.py [--quick] [--time-rows N] [--time-iters I] [--json PATH]

Cases (2 threads each, ``engine="torch", device="cpu"``, ``seed=0``, ``balance=0.05``):

* ``error-digits`` (1,797 x 64, K=16), ``error-mixture`` (``harness.mixture(20000, 32, 20)``, K=64),
  ``error-wordllama`` (the 25,600 training rows of ``harness.split(harness.wordllama())``, K=256): the flat
  fit's inertia with and without ``balance``, their ratio, the largest code against the cap, and the
  stated gap of the last capped assignment (``stats["balance"]``).
* ``ids-wordllama``: 3 x 256 residual ids of the same rows: the plain fit encoded greedily against the
  balanced fit encoded under the cap (``encode_balanced``, every level capped); the collision rate (the
  share of rows whose whole tuple another row shares) and the largest level-0 code.
* ``ids-minilm``: the same on MiniLM-like rows: 25,600 x 384 clustered unit-norm sentence-encoder-like
  embeddings (``vq_pipeline.jobs.demo.generate_embeddings(25600, 384, 256, seed=0)``; 384 is MiniLM's width).
* ``time``: ``--time-rows`` x 128 mixture rows (``harness.mixture(n, 128, 100)``), K=1024: the seconds of the
  fit with and without ``balance``, ``n_iter=--time-iters`` and ``tol=0``, or at the library's defaults
  (``FitSettings``: ``n_iter=50``, and ``tol=1e-3`` since 2026-12-08, ``1e-4`` before) with ``--time-iters 0``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

EPS = 0.05


def _data(name: str, quick: bool) -> tuple[np.ndarray, int]:
    if name == "digits":
        return harness.digits(), 16
    if name == "mixture":
        return harness.mixture(4000 if quick else 20000, 32, 20, seed=0), 64
    if name == "minilm":
        from vq_pipeline.jobs.demo import generate_embeddings

        return generate_embeddings(8000 if quick else 25600, 384, 256, seed=0), 256
    train, _ = harness.split(harness.wordllama(), n_rows=8000 if quick else None)
    return train, 256


def worker(spec: dict) -> dict:
    import torch

    harness.limit_threads(spec["threads"])
    from vq_pipeline import fit_codebook
    from vq_pipeline.compute.balanced import code_cap, encode_balanced
    from vq_pipeline.compute.semantic_ids import collision_stats

    cpu = dict(engine="torch", device="cpu", seed=0)
    case, quick = spec["case"], spec["quick"]
    if case.startswith("error-"):
        x, k = _data(case.removeprefix("error-"), quick)
        x = torch.from_numpy(x)
        plain, s_plain = harness.measure(lambda: fit_codebook(x, k, **cpu))
        bal, s_bal = harness.measure(lambda: fit_codebook(x, k, balance=EPS, **cpu))
        return {
            "rows": x.shape[0],
            "n_codes": k,
            "inertia_plain": plain.stats["inertia"],
            "inertia_balanced": bal.stats["inertia"],
            "ratio": bal.stats["inertia"] / plain.stats["inertia"],
            "max_code_plain": int(plain.counts.max()),
            "max_code_balanced": int(bal.counts.max()),
            "cap": code_cap(x.shape[0], k, EPS),
            "balance_stats": bal.stats["balance"],
            "seconds_plain": s_plain["wall_s"],
            "seconds_balanced": s_bal["wall_s"],
            "load1": s_bal["load1"],
        }
    if case.startswith("ids-"):
        x, _ = _data(case.removeprefix("ids-"), quick)
        x = torch.from_numpy(x)
        rq = dict(codec="residual", levels=3, **cpu)
        plain, s_plain = harness.measure(lambda: fit_codebook(x, 256, **rq))
        bal, s_bal = harness.measure(lambda: fit_codebook(x, 256, balance=EPS, **rq))
        codes_plain = plain.encode(x, engine="torch", device="cpu").numpy()
        codes_bal, levels = encode_balanced(
            bal.centroids, bal.metric, x, EPS, codec="residual", engine="torch", device="cpu"
        )
        codes_bal = codes_bal.numpy()
        return {
            "rows": x.shape[0],
            "cap": code_cap(x.shape[0], 256, EPS),
            "collision_rate_plain": collision_stats(codes_plain)["collision_rate"],
            "collision_rate_balanced": collision_stats(codes_bal)["collision_rate"],
            "n_unique_plain": collision_stats(codes_plain)["n_unique"],
            "n_unique_balanced": collision_stats(codes_bal)["n_unique"],
            "max_level0_plain": int(np.bincount(codes_plain[:, 0]).max()),
            "max_level_balanced": [a.max_code_size for a in levels],
            "relative_gap_levels": [a.relative_gap for a in levels],
            "mse_plain": plain.stats["mse"],
            "mse_balanced_fit_greedy": bal.stats["mse"],
            "seconds_plain": s_plain["wall_s"],
            "seconds_balanced": s_bal["wall_s"],
        }
    n, iters = spec["time_rows"], spec["time_iters"]
    x = torch.from_numpy(harness.mixture(n, 128, 100, seed=0))
    common = dict(n_iter=iters, tol=0.0, **cpu) if iters else cpu
    plain, s_plain = harness.measure(lambda: fit_codebook(x, 1024, **common))
    bal, s_bal = harness.measure(lambda: fit_codebook(x, 1024, balance=EPS, **common))
    return {
        "rows": n,
        "iterations_plain": plain.stats["iterations"],
        "iterations_balanced": bal.stats["iterations"],
        "seconds_plain": s_plain["wall_s"],
        "seconds_balanced": s_bal["wall_s"],
        "ratio_inertia": bal.stats["inertia"] / plain.stats["inertia"],
        "max_code_balanced": int(bal.counts.max()),
        "cap": code_cap(n, 1024, EPS),
        "balance_stats": bal.stats["balance"],
        "load1": s_bal["load1"],
        "extra_peak_rss_mib": s_bal["extra_peak_rss_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default="error-digits,error-mixture,error-wordllama,ids-wordllama,ids-minilm,time")
    ap.add_argument("--time-rows", type=int, default=100_000)
    ap.add_argument("--time-iters", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.worker:
        return harness.serve(worker, args.worker)
    started = harness.now()
    path = Path(args.json) if args.json else harness.results_path("balanced", args.quick, started)
    log = harness.log_path(path)
    log.parent.mkdir(parents=True, exist_ok=True)
    record: dict = {"machine": harness.machine_info(), "started": started.isoformat(), "balance": EPS, "cases": {}}
    lines = [f"# Balanced codes (balance={EPS}), {started:%Y-%m-%d %H:%M} UTC", ""]
    with log.open("w") as f:
        for case in args.cases.split(","):
            spec = {"case": case, "quick": args.quick, "time_rows": args.time_rows, "time_iters": args.time_iters}
            rec = harness.run_worker(__file__, spec, log=f)
            record["cases"][case] = rec
            shown = {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in rec.items()}
            lines.append(f"- **{case}**: {shown}")
            print(lines[-1], flush=True)
    harness.write_results(path, record, "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
