"""How far one exact Lloyd iteration and one encode pass are from the bare sgemm of the same shape.

Command, from the repository root::

    .venv/bin/python benchmarks/gemm_floor.py [--quick] [--n-iter 5] [--shapes LIST] [--json PATH]

The physical limit of an exact E step is one GEMM of ``2 n K d`` flops at the machine's best sgemm rate
(plus one read of the rows). For each shape (200k x 128, K=1024; 100k x 64, K=256; 50k x 384, K=256;
1M x 32, K=100; ``--quick``: small ones), in its own fresh process with 2 threads:

* ``floor``: the product ``[x | 1] (n, d+1) @ W (d+1, K)`` in blocks of 16,384 rows (the torch engine's
  block), written into one reused (16,384, K) float32 buffer, timed with ``torch.mm`` (MKL in the CPU wheel)
  and with ``numpy.matmul`` (OpenBLAS), best of 3 each; the faster library is the floor;
* ``square``: the rate of a 4096^3 sgemm in each library (best of 3), and ``2 n K d`` at the better rate;
* ours: ``fit_codebook(x, K, init=<first K rows>, n_iter, tol=0, engine="torch", device="cpu")`` on
  ``harness.mixture(n, d, 100)`` rows, the median of its iterations' seconds (``timings["iteration_seconds"]``,
  the final evaluation pass included), and one ``Codebook.encode(x)`` pass (best of 2).

Prints and records each time as a ratio to the same-shape floor and to the square-rate floor. Writes
``benchmarks/results/gemm_floor-<UTC time>.json`` and ``.md`` (``--quick``: under ``benchmarks/.cache/results/``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {"200k-128-1024": (200_000, 128, 1024), "100k-64-256": (100_000, 64, 256), "50k-384-256": (50_000, 384, 256),
          "1m-32-100": (1_000_000, 32, 100)}  # fmt: skip
QUICK = {"20k-64-256": (20_000, 64, 256), "20k-32-100": (20_000, 32, 100)}
BLOCK = 16_384


def _best(call, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def worker(spec: dict) -> dict:
    import numpy as np
    import torch

    from vq_pipeline import fit_codebook

    harness.limit_threads(spec["threads"])
    n, d, k = spec["shape"]
    x = torch.from_numpy(harness.mixture(n, d, 100, seed=0))
    aug = torch.cat([x, torch.ones(n, 1)], dim=1)  # (n, d + 1)
    w = torch.randn(d + 1, k)
    out = torch.empty(BLOCK, k)
    blocks = [aug[a : a + BLOCK] for a in range(0, n, BLOCK)]

    def torch_pass() -> None:
        for b in blocks:
            torch.mm(b, w, out=out[: b.shape[0]])

    np_blocks, np_w, np_out = [b.numpy() for b in blocks], w.numpy(), out.numpy()

    def numpy_pass() -> None:
        for b in np_blocks:
            np.matmul(b, np_w, out=np_out[: b.shape[0]])

    same = {"torch": _best(torch_pass, 3), "numpy": _best(numpy_pass, 3)}
    sq = torch.randn(4096, 4096)
    sq_np = sq.numpy()
    flops_sq = 2 * 4096**3
    rate = {
        "torch": flops_sq / _best(lambda: torch.mm(sq, sq), 3),
        "numpy": flops_sq / _best(lambda: np.matmul(sq_np, sq_np), 3),
    }
    floor_same = min(same.values())
    floor_rate = 2 * n * k * d / max(rate.values())
    cb = fit_codebook(x, k, init=x[:k], n_iter=spec["n_iter"], tol=0.0, engine="torch", device="cpu", seed=0)
    per_iter = statistics.median(cb.timings["iteration_seconds"])
    encode_s = _best(lambda: cb.encode(x, engine="torch", device="cpu"), 2)
    return {
        "shape": [n, d, k],
        "gemm_same_shape_s": same,
        "sgemm_4096_gflops": {lib: r / 1e9 for lib, r in rate.items()},
        "floor_same_shape_s": floor_same,
        "floor_by_rate_s": floor_rate,
        "iteration_s": per_iter,
        "iterations": cb.stats["iterations"],
        "encode_s": encode_s,
        "iteration_over_floor": per_iter / floor_same,
        "iteration_over_rate_floor": per_iter / floor_rate,
        "encode_over_floor": encode_s / floor_same,
        "load1": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-iter", type=int, default=5)
    ap.add_argument("--shapes", help=f"comma-separated names among {', '.join(SHAPES)}")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.worker:
        return harness.serve(worker, args.worker)
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    started = harness.now()
    path = Path(args.json) if args.json else harness.results_path("gemm_floor", args.quick, started)
    log = harness.log_path(path)
    log.parent.mkdir(parents=True, exist_ok=True)
    record: dict = {"machine": harness.machine_info(), "started": started.isoformat(), "n_iter": args.n_iter}
    lines = [
        f"# Lloyd iteration and encode pass against the sgemm floor, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"{record['machine']['cpu']}, {harness.THREADS} threads, "
        f"load at start {record['machine']['load_at_start']:.1f}. "
        f"Command: `python benchmarks/gemm_floor.py {' '.join(sys.argv[1:])}`.",
        "",
        "| shape | GEMM torch s | GEMM numpy s | 4096³ GF/s torch / numpy | iteration s | / floor | / rate floor "
        "| encode s | / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    record["shapes"] = {}
    with log.open("w") as f:
        for name, shape in shapes.items():
            spec = {"shape": shape, "n_iter": args.n_iter, "threads": harness.THREADS}
            r = harness.run_worker(__file__, spec, log=f)
            record["shapes"][name] = r
            if "iteration_s" not in r:
                lines.append(f"| {name} | failed: {r.get('error', '?')} |")
                continue
            g, s = r["gemm_same_shape_s"], r["sgemm_4096_gflops"]
            lines.append(
                f"| {name} | {g['torch']:.3f} | {g['numpy']:.3f} | {s['torch']:.0f} / {s['numpy']:.0f} "
                f"| {r['iteration_s']:.3f} | {r['iteration_over_floor']:.2f} | {r['iteration_over_rate_floor']:.2f} "
                f"| {r['encode_s']:.3f} | {r['encode_over_floor']:.2f} |"
            )
            print(lines[-1], flush=True)
    harness.write_results(path, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
