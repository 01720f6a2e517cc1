"""OpenMP waits on a quiet and on a contended CPU: PASSIVE, a bounded spin and ACTIVE (vq_pipeline picks PASSIVE or
the bounded spin on import, by the CPU's pressure: ``vq_pipeline._omp_wait_settings``).

Command, from the repository root::

    .venv/bin/python benchmarks/omp_wait_policy.py [--hogs 4] [--rounds 3]

For each policy, in a fresh subprocess (the policy is read once, when torch loads its OpenMP runtime)
and for each condition, quiet then loaded (``--hogs`` busy-looping processes started by this script
and stopped by PID afterwards), it times with 2 torch threads:

* a Lloyd iteration of 100k x 64, K=256 (torch engine, first-K init, median of
  ``timings['iteration_seconds']`` over ``--rounds`` fits of 3 iterations);
* k-means++ seeding of 8192 x 16, K=32 (``timings['init_seconds']`` of ``fit_codebook(n_iter=0)``,
  median over ``--rounds``).

"Quiet" is only as quiet as the (shared) machine: each cell records its CPU pressure
(``/proc/pressure/cpu``) and load average. Prints a markdown table; writes JSON (default
``benchmarks/results/omp_wait_policy.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, statistics, sys, time
import vq_pipeline
import torch
from vq_pipeline import fit_codebook
torch.set_num_threads(2)
rounds = int(sys.argv[1])
def psi():
    try:
        for ln in open('/proc/pressure/cpu'):
            if ln.startswith('some'):
                return int(ln.rsplit('total=', 1)[1])
    except OSError:
        return None
g = torch.Generator().manual_seed(0)
x = (torch.randn(100_000, 64, generator=g) + 3).contiguous()
small = torch.randn(8192, 16, generator=g)
fit_codebook(x[:5000], 256, init="first", n_iter=1, tol=0.0, engine="torch", device="cpu")  # warm-up
p0, t0 = psi(), time.perf_counter()
its, seeds = [], []
for _ in range(rounds):
    cb = fit_codebook(x, 256, init="first", n_iter=3, tol=0.0, engine="torch", device="cpu")
    its += cb.timings["iteration_seconds"]
    cb = fit_codebook(small, 32, init="k-means++", n_iter=0, engine="torch", device="cpu", seed=1)
    seeds.append(cb.timings["init_seconds"])
wall = time.perf_counter() - t0
p1 = psi()
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "spincount": os.environ.get("GOMP_SPINCOUNT"), "lloyd_s_per_iter": statistics.median(its),
                  "lloyd_all": its, "kmeanspp_s": statistics.median(seeds), "kmeanspp_all": seeds,
                  "cpu_stall": None if p0 is None or p1 is None else (p1 - p0) / 1e6 / wall,
                  "load1": os.getloadavg()[0], "wall_s": wall}))
"""


# What each row sets: PASSIVE and ACTIVE as named; "bounded spin" leaves OMP_WAIT_POLICY unset and sets only
# GOMP_SPINCOUNT (what vq_pipeline does on import when neither is set: vq_pipeline._OMP_SPIN_COUNT spins).
POLICIES = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "bounded spin": {"GOMP_SPINCOUNT": None},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def run_child(policy: str, rounds: int, spin: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({k: v if v is not None else str(spin) for k, v in POLICIES[policy].items()}, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(rounds)], env=env, capture_output=True, text=True, timeout=600
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description="OpenMP wait policy under contention")
    ap.add_argument("--hogs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--spin", type=int, default=None, help="GOMP_SPINCOUNT of the bounded-spin row (default: vq_pipeline's)"
    )
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "omp_wait_policy.json")
    args = ap.parse_args()
    spin = args.spin
    if spin is None:
        sys.path.insert(0, str(REPO))
        import vq_pipeline

        spin = vq_pipeline._OMP_SPIN_COUNT
    rows = []
    for condition in ("quiet", "loaded"):
        hogs: list[subprocess.Popen] = []
        if condition == "loaded":
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
            time.sleep(2)
        try:
            for policy in POLICIES:
                r = run_child(policy, args.rounds, spin)
                r["policy"] = policy if policy != "bounded spin" else f"unset, GOMP_SPINCOUNT={spin}"
                r["condition"] = condition if condition == "quiet" else f"{args.hogs} busy processes"
                rows.append(r)
                print(
                    f"  {condition:6s} {policy:8s} lloyd {r['lloyd_s_per_iter']:.3f} s/iter  k-means++ {r['kmeanspp_s']:.3f} s  "
                    f"stall {r['cpu_stall']:.2f} load {r['load1']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nproc": os.cpu_count(), "rows": rows},
            indent=1,
        )
    )
    print(
        "| condition | OpenMP waits | Lloyd s/iter (100k×64, K=256) | k-means++ s (8192×16, K=32) | CPU stall | load (1 min) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['condition']} | {r['policy']} | {r['lloyd_s_per_iter']:.3f} | {r['kmeanspp_s']:.3f} | {r['cpu_stall']:.2f} | {r['load1']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
