"""CPU benchmark of the two compute engines: chunked torch GEMM vs KeOps.

Command, from the repository root::

    .venv/bin/python benchmarks/engines.py [--quick] [--scale S] [--rounds R] [--json PATH]

``--quick`` scales every row count by 0.1 (a smoke run); ``--scale`` scales them further.
``--help`` lists the options that control re-measurement on a busy machine.

For every shape (n_rows x dim, n_codes, metric) the data are seeded float32 gaussian blobs (n_codes
random centres, unit spread, noise 0.5, every coordinate offset by +3 so the data are not centred),
and every engine starts from the same centroids (the first n_codes rows). Measured, on ``device='cpu'``:

* fit: seconds per Lloyd iteration, the median of ``codebook.timings['iteration_seconds']`` of
  ``fit_codebook(x, K, init=<same tensor>, n_iter=5, tol=0.0, engine=...)``, pooled over ``--rounds``
  (default 2) fits per engine, interleaved torch, keops, torch, keops, after one warm-up fit each
  (for KeOps the warm-up compiles the formula). Ratios are keops / torch: the machine may be shared,
  so ratios of medians mean more than absolute numbers.
* keops-default: the same fit timing for KeOps built with its default compiler flags (no
  ``-march=native``), in a subprocess with ``VQ_KEOPS_CXXFLAGS=""`` and its own cache folder under
  ``benchmarks/results/``; only on the shapes marked for it (the small ones), as it is much slower.
* encode: rows per second of ``codebook.encode(x)``, median of 3 interleaved calls after a warm-up,
  both engines encoding with the same codebook (the one the first torch fit produced).
* exactness: fraction of rows whose code differs from a float64 brute-force oracle (chunked
  ``torch.cdist``), counted only over rows whose best and second-best oracle distances differ by more
  than 1e-4 relative to the second-best (rows closer to a tie than that are left out).

torch runs with ``torch.set_num_threads(2)``; KeOps' OpenMP loops use the OpenMP default (all
cores) unless ``OMP_NUM_THREADS`` says otherwise; both use the OpenMP wait policy the package sets
(``OMP_WAIT_POLICY``, unless the environment chose one). On a shared machine other processes
inflate the timings, so each shape records the share of its wall time that some task waited for a
CPU (Linux ``/proc/pressure/cpu``); a shape above ``--max-stall`` is measured again (``--retries``)
and the quietest attempt is kept. A markdown table is printed and the full results are written as JSON
(default ``benchmarks/results/engines.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
# vq_pipeline is imported before torch so that its OpenMP wait policy (OMP_WAIT_POLICY, read once
# when torch loads its OpenMP runtime) applies here as it does for a user of the package.
try:
    import vq_pipeline  # noqa: F401
except ImportError:  # not installed: import the package from the repository root
    sys.path.insert(0, str(REPO))
    import vq_pipeline  # noqa: F401

import torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NATIVE_CACHE = REPO / ".cache" / "keops"
DEFAULT_FLAGS_CACHE = RESULTS / "keops-cache-default-flags"
TORCH_THREADS = 2
N_ITER = 5
FIT_ROUNDS = 2  # timed fits per engine, interleaved torch, keops, torch, keops
ENCODE_REPEATS = 3
TIE_RTOL = 1e-4
OFFSET = 3.0
NOISE = 0.5
RETRY_PAUSE_S = 5.0  # pause before re-measuring a shape run on a busy CPU


@dataclass(frozen=True)
class Shape:
    """One benchmark case; ``n`` is the nominal row count before ``--scale``."""

    n: int
    dim: int
    k: int
    metric: str = "l2"
    default_flags: bool = False  # also time KeOps built with its default compiler flags

    @property
    def seed(self) -> int:
        return 7919 * self.n + 104729 * self.dim + self.k  # same data for every metric and run

    def label(self, n: int) -> str:
        return f"{n // 1000}k x {self.dim}, K={self.k}" if n % 1000 == 0 else f"{n} x {self.dim}, K={self.k}"


SHAPES: tuple[Shape, ...] = (
    Shape(20_000, 2, 50, default_flags=True),
    Shape(100_000, 8, 64, default_flags=True),
    Shape(100_000, 64, 256),
    Shape(100_000, 64, 256, "cosine"),
    Shape(50_000, 128, 1024),
    Shape(200_000, 32, 100),
    Shape(20_000, 384, 256),
    Shape(20_000, 384, 256, "cosine"),
)


def scaled_rows(shape: Shape, scale: float) -> int:
    return max(shape.k * 2, int(round(shape.n * scale)))


def make_blobs(n: int, dim: int, n_centres: int, seed: int) -> torch.Tensor:
    """(n, dim) float32 gaussian blobs around ``n_centres`` random centres, offset by ``OFFSET``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_centres, dim, generator=g)  # (n_centres, dim)
    labels = torch.randint(n_centres, (n,), generator=g)  # (n,)
    noise = NOISE * torch.randn(n, dim, generator=g)  # (n, dim)
    return (centres[labels] + noise + OFFSET).contiguous()


def fit_seconds_per_iter(x: torch.Tensor, init: torch.Tensor, shape: Shape, engine: str) -> tuple[list[float], Any]:
    """Per-iteration seconds of one timed fit, and the codebook it produced."""
    from vq_pipeline import fit_codebook

    cb = fit_codebook(x, shape.k, metric=shape.metric, init=init, n_iter=N_ITER, tol=0.0, engine=engine, device="cpu")
    return list(cb.timings["iteration_seconds"]), cb


def warm_up(x: torch.Tensor, shape: Shape, engine: str) -> float:
    """One small fit (and so one compile, for KeOps); returns its wall time in seconds."""
    from vq_pipeline import fit_codebook

    rows = min(x.shape[0], max(4 * shape.k, 4096))
    t0 = time.perf_counter()
    fit_codebook(x[:rows], shape.k, metric=shape.metric, init=x[: shape.k].clone(), n_iter=1, tol=0.0,
                 engine=engine, device="cpu")
    return time.perf_counter() - t0


def oracle(x: torch.Tensor, centroids: torch.Tensor, metric: str, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 brute force: (n,) best code and (n,) bool 'decisive' (not within TIE_RTOL of a tie).

    Distances are squared L2 to the codebook's centroids, after L2-normalizing the rows for cosine
    (the same function the engines compute, in float64).
    """
    c = centroids.double()  # (k, dim)
    shift = c.mean(dim=0)  # (dim,) centring keeps cdist's matrix-product form accurate
    cs = c - shift
    best = torch.empty(x.shape[0], dtype=torch.int64)
    decisive = torch.empty(x.shape[0], dtype=torch.bool)
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk].double()  # (b, dim)
        if metric == "cosine":
            xb = xb / torch.linalg.vector_norm(xb, dim=1, keepdim=True)
        d = torch.cdist(xb - shift, cs).square()  # (b, k)
        top = d.topk(2, dim=1, largest=False, sorted=True)
        d1, d2 = top.values[:, 0], top.values[:, 1]
        best[start : start + chunk] = top.indices[:, 0]
        decisive[start : start + chunk] = (d2 - d1) > TIE_RTOL * d2.clamp_min(1e-300)
    return best, decisive


def mismatch(codes: torch.Tensor, best: torch.Tensor, decisive: torch.Tensor) -> dict[str, Any]:
    wrong = (codes != best) & decisive
    n_dec = int(decisive.sum())
    return {
        "fraction": int(wrong.sum()) / max(n_dec, 1),
        "rows_wrong": int(wrong.sum()),
        "rows_decisive": n_dec,
        "rows_differing_incl_ties": int((codes != best).sum()),
    }


def bench_shape(shape: Shape, n: int, rounds: int = FIT_ROUNDS) -> dict[str, Any]:
    """Fit, encode and exactness for one shape with both engines in this process."""
    x = make_blobs(n, shape.dim, shape.k, shape.seed)
    init = x[: shape.k].clone()
    engines = ("torch", "keops")
    warm = {eng: warm_up(x, shape, eng) for eng in engines}
    iters: dict[str, list[float]] = {eng: [] for eng in engines}
    inertia: dict[str, list[float]] = {eng: [] for eng in engines}
    codebooks: dict[str, Any] = {}
    for _ in range(rounds):
        for eng in engines:
            seconds, cb = fit_seconds_per_iter(x, init, shape, eng)
            iters[eng] += seconds
            inertia[eng].append(float(cb.stats["inertia"]))
            codebooks.setdefault(eng, cb)
    shared = codebooks["torch"]
    enc_times: dict[str, list[float]] = {eng: [] for eng in engines}
    codes: dict[str, torch.Tensor] = {}
    for eng in engines:
        shared.encode(x, engine=eng, device="cpu")  # warm-up
    for _ in range(ENCODE_REPEATS):
        for eng in engines:
            t0 = time.perf_counter()
            codes[eng] = shared.encode(x, engine=eng, device="cpu")
            enc_times[eng].append(time.perf_counter() - t0)
    best, decisive = oracle(x, shared.centroids, shape.metric)
    s_iter = {eng: statistics.median(iters[eng]) for eng in engines}
    s_min = {eng: min(iters[eng]) for eng in engines}
    ti, ki = inertia["torch"][0], inertia["keops"][0]
    return {
        "fit_s_per_iter": s_iter,
        "fit_iteration_seconds": iters,
        "keops_over_torch": s_iter["keops"] / s_iter["torch"],
        "fit_min_s_per_iter": s_min,
        "keops_over_torch_min": s_min["keops"] / s_min["torch"],
        "warm_up_seconds": warm,
        "fit_inertia": inertia,
        "fit_inertia_rel_diff_keops_vs_torch": abs(ki - ti) / max(abs(ti), 1e-300),
        "encode_rows_per_s": {eng: n / statistics.median(enc_times[eng]) for eng in engines},
        "encode_seconds": enc_times,
        "mismatch": {eng: mismatch(codes[eng], best, decisive) for eng in engines},
    }


def keops_cpp_flags() -> str:
    """The C++ flags KeOps compiles with in this process (imports pykeops through the engine)."""
    from vq_pipeline.engines import keops

    if not keops.available():
        return f"unavailable: {keops.unavailable_reason()}"
    import keopscore

    return str(keopscore.config.get_cpp_flags())


def default_flags_worker(specs: list[dict[str, Any]], out: Path) -> None:
    """Subprocess body: KeOps fit timing with default flags for the given shapes, written to ``out``."""
    torch.set_num_threads(TORCH_THREADS)
    results: list[dict[str, Any]] = [{"cpp_flags": keops_cpp_flags()}]
    for spec in specs:
        n = spec.pop("n_rows")
        shape = Shape(**spec)
        x = make_blobs(n, shape.dim, shape.k, shape.seed)
        warm = warm_up(x, shape, "keops")
        seconds, _ = fit_seconds_per_iter(x, x[: shape.k].clone(), shape, "keops")
        results.append({"warm_up_seconds": warm, "iteration_seconds": seconds,
                        "s_per_iter": statistics.median(seconds)})
    out.write_text(json.dumps(results))


def run_default_flags(jobs: list[tuple[Shape, int]], timeout: float) -> tuple[str, list[dict[str, Any] | None]]:
    """Time KeOps with its default compiler flags in a fresh process; (flags, one result per job)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "keops-default-flags.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, VQ_KEOPS_CXXFLAGS="", VQ_KEOPS_CACHE_DIR=str(DEFAULT_FLAGS_CACHE))
    env.pop("CXXFLAGS", None)  # it would win over VQ_KEOPS_CXXFLAGS
    specs = [dict(asdict(shape), n_rows=n) for shape, n in jobs]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--default-flags-worker", json.dumps(specs), "--json", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s", [None] * len(jobs)
    if proc.returncode != 0 or not out.exists():
        return f"failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}", [None] * len(jobs)
    results = json.loads(out.read_text())
    return results[0]["cpp_flags"], results[1:]


def cpu_pressure_us() -> int | None:
    """Total microseconds some task waited for a CPU (Linux PSI), or None where unavailable."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(some.rsplit("total=", 1)[1])


def quietest(measure: Callable[[], Any], *, retries: int, max_stall: float, deadline: float) -> tuple[Any, list[float]]:
    """Run ``measure`` until the CPU was quiet enough, at most ``1 + retries`` times, pausing between.

    The machine may be shared: when the share of wall time some task waited for a CPU during an
    attempt exceeds ``max_stall``, the attempt is repeated (unless ``deadline``, a
    ``time.perf_counter()`` value, has passed). Returns the result of the quietest attempt and the
    stall share of every attempt.
    """
    best: Any = None
    best_stall = float("inf")
    stalls: list[float] = []
    for _ in range(retries + 1):
        t0, p0 = time.perf_counter(), cpu_pressure_us()
        value = measure()
        p1 = cpu_pressure_us()
        stall = 0.0 if p0 is None or p1 is None else (p1 - p0) / 1e6 / (time.perf_counter() - t0)
        stalls.append(stall)
        if stall < best_stall:
            best, best_stall = value, stall
        if p0 is None or stall <= max_stall or time.perf_counter() > deadline:
            break
        time.sleep(RETRY_PAUSE_S)  # let a burst of other work pass
    return best, stalls


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "nproc": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def fmt_rate(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"


def fmt_frac(m: dict[str, Any]) -> str:
    return "0" if m["rows_wrong"] == 0 else f"{m['fraction']:.1e} ({m['rows_wrong']})"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| shape | metric | torch s/iter | keops s/iter | keops/torch | keops-default s/iter "
            "| torch encode rows/s | keops encode rows/s | torch mismatch | keops mismatch | stalled |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        res = r["result"]
        d = r.get("keops_default")
        lines.append(
            f"| {r['label']} | {r['metric']} | {fmt_s(res['fit_s_per_iter']['torch'])} "
            f"| {fmt_s(res['fit_s_per_iter']['keops'])} | {res['keops_over_torch']:.2f} "
            f"| {fmt_s(d['s_per_iter'] if d else None)} "
            f"| {fmt_rate(res['encode_rows_per_s']['torch'])} | {fmt_rate(res['encode_rows_per_s']['keops'])} "
            f"| {fmt_frac(res['mismatch']['torch'])} | {fmt_frac(res['mismatch']['keops'])} "
            f"| {r['cpu_stalled']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="rows scaled by 0.1 (a smoke run)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every shape's row count by this")
    parser.add_argument("--rounds", type=int, default=FIT_ROUNDS, help="timed fits per engine (interleaved)")
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a shape run on a busy CPU")
    parser.add_argument("--max-stall", type=float, default=0.1,
                        help="CPU-pressure share above which a shape is re-measured (default 0.1)")
    parser.add_argument("--retry-until", type=float, default=360.0,
                        help="no re-measurement starts after this many seconds (default 360)")
    parser.add_argument("--json", type=Path, default=RESULTS / "engines.json", help="where to write the results")
    parser.add_argument("--default-flags-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(TORCH_THREADS)
    if args.default_flags_worker is not None:
        default_flags_worker(json.loads(args.default_flags_worker), args.json)
        return 0

    os.environ.setdefault("VQ_KEOPS_CACHE_DIR", str(NATIVE_CACHE))
    scale = args.scale * (0.1 if args.quick else 1.0)
    t_start = time.perf_counter()
    info = machine()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    print(f"# Engine benchmark, {started}")
    print(f"machine: {info['cpu']}; nproc={info['nproc']}; torch.get_num_threads()={info['torch_threads']} "
          f"(pinned with torch.set_num_threads({TORCH_THREADS})); OMP_NUM_THREADS={info['omp_num_threads']}; "
          f"OMP_WAIT_POLICY={info['omp_wait_policy']}; "
          f"torch {info['torch']}; load average {os.getloadavg()[0]:.2f}")
    native_flags = keops_cpp_flags()
    print(f"keops native flags: {native_flags}")
    print(f"keops cache: {os.environ['VQ_KEOPS_CACHE_DIR']}")
    if scale != 1.0:
        print(f"note: row counts scaled by {scale:g} from the nominal shapes")
    sys.stdout.flush()

    rows: list[dict[str, Any]] = []
    deadline = t_start + args.retry_until
    retry = {"retries": args.retries, "max_stall": args.max_stall, "deadline": deadline}
    for shape in SHAPES:
        n = scaled_rows(shape, scale)
        t0 = time.perf_counter()
        result, stalls = quietest(functools.partial(bench_shape, shape, n, args.rounds), **retry)
        rows.append({"label": shape.label(n), "metric": shape.metric, "n_rows": n, "shape": asdict(shape),
                     "result": result, "seconds": time.perf_counter() - t0, "cpu_stalled": min(stalls),
                     "cpu_stalled_attempts": stalls})
        print(f"  {shape.label(n)} {shape.metric}: torch {result['fit_s_per_iter']['torch']:.3g} s/iter, "
              f"keops {result['fit_s_per_iter']['keops']:.3g} s/iter ({time.perf_counter() - t0:.0f} s, "
              f"cpu stalled per attempt {', '.join(f'{v:.0%}' for v in stalls)})", file=sys.stderr)

    jobs = [(shape, r["n_rows"]) for shape, r in zip(SHAPES, rows) if shape.default_flags]
    (default_flags, default_results), stalls = quietest(functools.partial(run_default_flags, jobs, 300.0), **retry)
    for (shape, _), res in zip(jobs, default_results):
        row = next(r for r in rows if r["shape"] == asdict(shape))
        row["keops_default"] = res
        if res is not None:
            res["over_keops_native"] = res["s_per_iter"] / row["result"]["fit_s_per_iter"]["keops"]
            res["cpu_stalled"] = min(stalls)
            res["cpu_stalled_attempts"] = stalls

    total = time.perf_counter() - t_start
    print()
    print(markdown(rows))
    print()
    print(f"s/iter: median seconds per Lloyd iteration (n_iter={N_ITER}, {args.rounds} interleaved fits per engine). "
          f"keops/torch < 1 means KeOps is faster.")
    print(f"keops-default: KeOps with its default flags ({default_flags}).")
    for r in rows:
        d = r.get("keops_default")
        if d:
            print(f"  {r['label']}: keops-default / keops-native = {d['over_keops_native']:.1f} "
                  f"(default-flags run stalled {d['cpu_stalled']:.0%})")
    print(f"mismatch: fraction of rows (count) whose code differs from the float64 oracle, over rows not within "
          f"{TIE_RTOL:g} relative of a tie; encode uses the torch-fitted codebook for both engines.")
    if cpu_pressure_us() is not None:
        print(f"stalled: share of the shape's wall time some task waited for a CPU (/proc/pressure/cpu); near 0% "
              f"is a quiet machine. A shape measured above {args.max_stall:.0%} was re-measured up to "
              f"{args.retries} times (within the first {args.retry_until:.0f} s) and the quietest attempt kept. "
              f"Contention inflates torch (many short parallel regions) more than KeOps.")
    print(f"total runtime: {total:.0f} s; load average at end {os.getloadavg()[0]:.2f}")

    report = {
        "started": started,
        "machine": info,
        "torch_threads": TORCH_THREADS,
        "keops_native_flags": native_flags,
        "keops_default_flags": default_flags,
        "scale": scale,
        "n_iter": N_ITER,
        "fit_rounds": args.rounds,
        "retry": {"retries": args.retries, "max_stall": args.max_stall, "retry_until_s": args.retry_until},
        "tie_rtol": TIE_RTOL,
        "data": {"offset": OFFSET, "noise": NOISE, "centres": "randn(n_codes, dim)"},
        "rows": rows,
        "total_seconds": total,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
