"""Fits on a CPU shared with busy processes, with torch's threads following the idle CPUs and without.

Command, from the repository root::

    .venv/bin/python benchmarks/share_cpus.py [--quick] [--repeats 5] [--busy 2] [--json PATH]

Each measurement is a fresh process (2 threads, as every benchmark here) whose first call is timed, as a
scheduled job's is: ``fit_codebook(x, 256, init=<first 256 rows>, n_iter=10, tol=0, engine="torch",
device="cpu")`` on ``harness.mixture(100000, 64, 100)`` rows (``--quick``: 20,000), then one
``Codebook.encode(x)``. Two modes: ``share`` (the default, :func:`vq_pipeline.runtime.share_cpus`) and
``fixed`` (``VQ_SHARE_CPUS=0``: 2 threads throughout); two conditions: quiet, and with ``--busy`` busy-loop
processes running. Modes are interleaved within each repeat. Prints the median and the worst fit and encode
seconds per mode and condition, and the slowdown of each mode from quiet to busy.

Writes ``benchmarks/results/share_cpus-<UTC time>.json`` and ``.md`` (``--quick``: under ``benchmarks/.cache/``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

MODES = ("share", "fixed")


def worker(spec: dict) -> dict:
    import torch

    from vq_pipeline import fit_codebook

    harness.limit_threads(spec["threads"])
    x = torch.from_numpy(harness.mixture(spec["rows"], 64, 100, seed=0))
    t0 = time.perf_counter()
    cb = fit_codebook(x, 256, init=x[:256], n_iter=10, tol=0.0, engine="torch", device="cpu")
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cb.encode(x, engine="torch", device="cpu")
    encode_s = time.perf_counter() - t0
    return {"fit_s": fit_s, "encode_s": encode_s, "threads_after": torch.get_num_threads()}


def _run(mode: str, rows: int, log) -> dict:
    env_before = os.environ.get("VQ_SHARE_CPUS")
    os.environ["VQ_SHARE_CPUS"] = "1" if mode == "share" else "0"
    try:
        return harness.run_worker(__file__, {"rows": rows}, log=log)
    finally:
        if env_before is None:
            os.environ.pop("VQ_SHARE_CPUS")
        else:
            os.environ["VQ_SHARE_CPUS"] = env_before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.worker:
        return harness.serve(worker, args.worker)
    rows = 20_000 if args.quick else 100_000
    repeats = 1 if args.quick else args.repeats
    started = harness.now()
    path = Path(args.json) if args.json else harness.results_path("share_cpus", args.quick, started)
    log = harness.log_path(path)
    log.parent.mkdir(parents=True, exist_ok=True)
    record: dict = {"machine": harness.machine_info(), "started": started.isoformat(), "rows": rows, "runs": []}
    with log.open("w") as f:
        for condition in ("quiet", "busy"):
            busy = []
            if condition == "busy":
                code = "while True:\n    pass\n"
                busy = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(args.busy)]
                time.sleep(2)
            try:
                for r, mode in harness.interleave(MODES, repeats):
                    rec = {"condition": condition, "mode": mode, "repeat": r, **_run(mode, rows, f)}
                    record["runs"].append(rec)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    lines = [
        f"# Fits on a shared CPU: threads that follow the idle CPUs (share) or 2 throughout (fixed), "
        f"{started:%Y-%m-%d %H:%M} UTC",
        "",
        f"{record['machine']['cpu']}, {harness.THREADS} threads, {rows:,} x 64 rows, K=256, 10 iterations, cold "
        f"processes; busy = {args.busy} busy-loop processes; {repeats} interleaved repeats. Command: "
        f"`python benchmarks/share_cpus.py {' '.join(sys.argv[1:])}`.",
        "",
        "| condition | mode | fit s, median (worst) | encode s, median (worst) |",
        "|---|---|---|---|",
    ]
    med: dict = {}
    for condition in ("quiet", "busy"):
        for mode in MODES:
            runs = [r for r in record["runs"] if (r["condition"], r["mode"]) == (condition, mode) and "fit_s" in r]
            if not runs:
                continue
            fit = [r["fit_s"] for r in runs]
            enc = [r["encode_s"] for r in runs]
            med[condition, mode] = (statistics.median(fit), statistics.median(enc))
            lines.append(
                f"| {condition} | {mode} | {statistics.median(fit):.2f} ({max(fit):.2f}) "
                f"| {statistics.median(enc):.3f} ({max(enc):.3f}) |"
            )
    lines += ["", "Slowdown, busy over quiet (medians): " + "; ".join(
        f"{mode}: fit {med['busy', mode][0] / med['quiet', mode][0]:.2f}x, "
        f"encode {med['busy', mode][1] / med['quiet', mode][1]:.2f}x"
        for mode in MODES if ("busy", mode) in med and ("quiet", mode) in med
    )]  # fmt: skip
    record["medians"] = {f"{c}/{m}": v for (c, m), v in med.items()}
    harness.write_results(path, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
