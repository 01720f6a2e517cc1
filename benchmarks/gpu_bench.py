"""The KeOps K-means tutorial's table, side by side with vq-pipeline, on one NVIDIA GPU.

Run by ``benchmarks/gpu_check.sh`` (which sets up the environment); directly::

    OUT=/some/dir python benchmarks/gpu_bench.py [--quick] [--dry-run]

Shapes (the tutorial's): 10k x 2 with K=50 and 1M x 100 with K=1000; metrics 'l2' and 'cosine';
10 Lloyd iterations from the same initial centroids (the first K rows, L2-normalized for cosine).
Rows:

* ``keops-tutorial``: the tutorial's own loop (``D_ij = ((x_i - c_j)**2).sum(-1)``, ``argmin``,
  ``scatter_add_``, divide by counts; cosine: ``(x_i | c_j).argmax`` and re-normalized centroids);
* ``ours keops`` / ``ours torch``: ``fit_codebook(x, K, init=<tensor>, n_iter=10, tol=0,
  engine=..., device='cuda')`` (its last pass is an extra E step that scores the final centroids),
  at the defaults (``prune=False``) and with ``prune=True`` (the rows it skipped per iteration are recorded);
* ``ours torch, TF32``: the torch engine's fit and encode with ``allow_tf32`` on: the GEMM rounds its
  factors to TF32, the engine's proof bound widens to match, and the rows it cannot prove are ranked
  again in float64 (the codes stay exact; the oracle column checks it);
* ``cuBLAS floor``: one fp32 GEMM ``|c|^2 - 2 x.c`` over all rows (TF32 off), ``argmin``
  (cosine: ``argmax`` of ``x.c``), ``index_add_`` + ``bincount`` update: the practical floor;
* ``cuBLAS floor, TF32``: the same with TF32 GEMMs (not exact; for reference only).

Timing: one warm-up run per row (KeOps compiles there), then ``--repeats`` (default 3) timed runs with
CUDA events around the whole 10-iteration run; ms per iteration = median run / iterations. For our
fits, the median of ``timings['iteration_seconds']`` is reported too. Also per row: encode
throughput (the row's own assignment step on all N rows, CUDA events, median of 3), peak GPU memory
(``torch.cuda.max_memory_allocated``, torch's allocator only), and mismatches against a float64
oracle on the GPU (tie-aware: decisive rows, second-best minus best > 1e-5 x second-best).

Writes ``$OUT/gpu_bench.json`` and ``$OUT/gpu_bench.md`` and prints the markdown table. Exits with
status 2 and the message "no CUDA GPU" on a machine without one.

``--dry-run`` (used by ``GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh``): the same rows and files
on the CPU with tiny shapes (2k x 2 K=16, 5k x 16 K=32), 2 iterations, 1 timed run, wall-clock timing;
peak GPU memory is null. It checks that the script runs, not how fast anything is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VQ_KEOPS_CACHE_DIR", str(REPO / ".cache" / "keops-gpu"))
try:
    import vq_pipeline  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))
    import vq_pipeline  # noqa: F401

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

SHAPES = [(10_000, 2, 50), (1_000_000, 100, 1000)]
DRY_SHAPES = [(2_000, 2, 16), (5_000, 16, 32)]
N_ITER = 10
DRY_N_ITER = 2
DEVICE = "cuda"  # "cpu" with --dry-run
TIE_RTOL = 1e-5
TUTORIAL_MS = {("l2", 1_000_000): 56.8, ("cosine", 1_000_000): 30.2}  # the tutorial's published GPU numbers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cuda_time(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of ``repeats`` runs of ``fn`` (CUDA events), after one warm-up run; and the last result."""
    out = fn()  # warm-up (KeOps compiles here)
    if DEVICE == "cpu":  # dry run: wall clock
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return times, out
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000.0)
    return times, out


# ------------------------------------------------------------------------------------- methods


def tutorial_fit(x: torch.Tensor, init: torch.Tensor, metric: str) -> torch.Tensor:
    from vq_pipeline.compute.engines.keops import _lazy_tensor

    LazyTensor = _lazy_tensor()
    N, D = x.shape
    K = init.shape[0]
    c = init.clone()
    x_i = LazyTensor(x.view(N, 1, D))
    for _ in range(N_ITER):
        c_j = LazyTensor(c.view(1, K, D))
        if metric == "cosine":
            cl = (x_i | c_j).argmax(dim=1).long().view(-1)
        else:
            cl = ((x_i - c_j) ** 2).sum(-1).argmin(dim=1).long().view(-1)
        c.zero_()
        c.scatter_add_(0, cl[:, None].repeat(1, D), x)
        if metric == "cosine":
            c[:] = torch.nn.functional.normalize(c, dim=1, p=2)
        else:
            Ncl = torch.bincount(cl, minlength=K).type_as(c).view(K, 1)
            c /= Ncl
    return c


def tutorial_assign(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    from vq_pipeline.compute.engines.keops import _lazy_tensor

    LazyTensor = _lazy_tensor()
    x_i, c_j = LazyTensor(x[:, None, :]), LazyTensor(c[None, :, :])
    if metric == "cosine":
        return (x_i | c_j).argmax(dim=1).long().view(-1)
    return ((x_i - c_j) ** 2).sum(-1).argmin(dim=1).long().view(-1)


def floor_assign(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return (x @ c.T).argmax(dim=1)
    return torch.addmm((c * c).sum(1), x, c.T, alpha=-2.0).argmin(dim=1)


def floor_fit(x: torch.Tensor, init: torch.Tensor, metric: str) -> torch.Tensor:
    K, D = init.shape
    c = init.clone()
    for _ in range(N_ITER):
        cl = floor_assign(x, c, metric)
        s = torch.zeros_like(c).index_add_(0, cl, x)
        if metric == "cosine":
            c = torch.nn.functional.normalize(s, dim=1)
        else:
            n = torch.bincount(cl, minlength=K).to(x.dtype)[:, None]
            c = torch.where(n > 0, s / n.clamp_min(1), c)
    return c


def ours_fit(engine: str, x: torch.Tensor, init: torch.Tensor, metric: str, store: dict, prune: bool = False) -> torch.Tensor:
    from vq_pipeline import fit_codebook

    k = init.shape[0]
    cb = fit_codebook(
        x, k, metric=metric, init=init.clone(), n_iter=N_ITER, tol=0.0, engine=engine, device=DEVICE, prune=prune
    )
    store.setdefault("iteration_seconds", []).extend(cb.timings["iteration_seconds"])
    store["iteration_pruned"] = cb.timings.get("iteration_pruned")
    store["codebook"] = cb
    return cb.centroids


def oracle_top2(x: torch.Tensor, c: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c64 = c.double().to(DEVICE)
    shift = c64.mean(0)
    cs = c64 - shift
    cn = cs.square().sum(1)
    out = ([], [], [])
    for s in range(0, x.shape[0], 65536):
        xb = x[s : s + 65536].double()
        if metric == "cosine":
            d = 1.0 - xb @ c64.T
        else:
            xs = xb - shift
            d = (xs.square().sum(1, keepdim=True) - 2.0 * xs @ cs.T + cn).clamp_min_(0)
        v, i = d.topk(2, dim=1, largest=False)
        out[0].append(i[:, 0]), out[1].append(v[:, 0]), out[2].append(v[:, 1])
    return tuple(torch.cat(t) for t in out)  # type: ignore[return-value]


def mismatches(codes: torch.Tensor, orc: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, int]:
    best, d1, d2 = orc
    codes = codes.to(best.device).long().view(-1)
    decisive = (d2 - d1) > TIE_RTOL * d2.abs() + 1e-12
    return {"wrong": int(((codes != best) & decisive).sum()), "decisive": int(decisive.sum()), "differing_incl_ties": int((codes != best).sum())}


# ------------------------------------------------------------------------------------- driver


def _mem_reset() -> int:
    if DEVICE == "cpu":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _mem_peak_mib(base: int) -> float | None:
    return None if DEVICE == "cpu" else (torch.cuda.max_memory_allocated() - base) / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vq_pipeline.compute.engines import auto_engine_name, keops as keops_mod

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    keops_ok = keops_mod.available()
    res: dict[str, Any] = {
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu (dry run)" if DEVICE == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "keops_available": keops_ok, "keops_reason": None if keops_ok else keops_mod.unavailable_reason(),
        "n_iter": N_ITER, "repeats": args.repeats, "dry_run": DEVICE == "cpu", "rows": [],
    }
    shapes = [(n // 10 if args.quick and n > 10_000 else n, d, k) for n, d, k in SHAPES]
    if DEVICE == "cpu":
        shapes = DRY_SHAPES
    for n, dim, k in shapes:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x_l2 = torch.randn(n, dim, device=DEVICE, generator=g)  # (n, dim): the tutorial's data, randn(N, D)
        for metric in ("l2", "cosine"):
            x = torch.nn.functional.normalize(x_l2, dim=1) if metric == "cosine" else x_l2
            init = x[:k].clone()
            orc = oracle_top2(x, init, metric)  # assignment step checked on the initial centroids
            auto = auto_engine_name(torch.device(DEVICE), dim)
            methods: list[tuple[str, Callable[[], Any], Callable[[], torch.Tensor]]] = []
            stores: dict[str, dict] = {f"ours {e}{p}": {} for e in ("keops", "torch") for p in ("", ", prune=True")}
            engines = (["keops"] if keops_ok else []) + ["torch"]
            if keops_ok:
                methods.append(("keops-tutorial", lambda: tutorial_fit(x, init, metric), lambda: tutorial_assign(x, init, metric)))
            for eng in engines:
                for suffix, prune in (("", False), (", prune=True", True)):
                    name = f"ours {eng}{suffix}"
                    methods.append((name, lambda e=eng, s=stores[name], p=prune: ours_fit(e, x, init, metric, s, p),
                                    lambda e=eng, s=stores[name]: s["codebook"].encode(x, engine=e, device=DEVICE)))
            # TF32 products: the engine widens its proof bound for their rounding (product_gamma) and
            # ranks the rows it cannot prove again in float64, so the codes stay exact; does it pay?
            tf32 = stores["ours torch, TF32"] = {}
            methods.append(("ours torch, TF32", lambda s=tf32: _tf32(lambda: ours_fit("torch", x, init, metric, s, False)),
                            lambda s=tf32: _tf32(lambda: s["codebook"].encode(x, engine="torch", device=DEVICE))))
            methods.append(("cuBLAS floor", lambda: floor_fit(x, init, metric), lambda: floor_assign(x, init, metric)))
            methods.append(("cuBLAS floor, TF32", lambda: _tf32(lambda: floor_fit(x, init, metric)), lambda: _tf32(lambda: floor_assign(x, init, metric))))
            for name, fit, assign in methods:
                row: dict[str, Any] = {"shape": f"{n:,} × {dim}, K={k}", "n": n, "dim": dim, "k": k, "metric": metric, "method": name, "auto": auto}
                try:
                    base = _mem_reset()
                    t0 = time.perf_counter()
                    times, _ = cuda_time(fit, args.repeats)
                    row["warmup_plus_runs_s"] = time.perf_counter() - t0
                    row["ms_per_iter"] = 1000 * statistics.median(times) / N_ITER
                    row["run_seconds"] = times
                    if name.startswith("ours"):
                        its = stores[name]["iteration_seconds"]
                        row["ms_per_iter_median_iteration"] = 1000 * statistics.median(its)
                        row["iteration_pruned"] = stores[name]["iteration_pruned"]
                    row["peak_gpu_mib"] = _mem_peak_mib(base)
                    if name.startswith("ours"):  # encode uses the fitted codebook: check it on its own centroids
                        cb = stores[name]["codebook"]
                        enc_times, codes = cuda_time(assign, 3)
                        row["encode_mismatch"] = mismatches(codes, oracle_top2(x, cb.centroids.to(DEVICE), metric))
                    else:
                        enc_times, codes = cuda_time(assign, 3)
                        row["encode_mismatch"] = mismatches(codes, orc)
                    row["encode_rows_per_s"] = n / statistics.median(enc_times)
                except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    log(traceback.format_exc())
                res["rows"].append(row)
                log(f"  {row['shape']} {metric:6s} {name:20s} " + (f"{row['ms_per_iter']:.2f} ms/iter" if "ms_per_iter" in row else row.get("error", "")))
            del x
        del x_l2
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return res


@contextlib.contextmanager
def _tf32_on():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _tf32(fn: Callable[[], Any]) -> Any:
    with _tf32_on():
        return fn()


def table(res: dict[str, Any]) -> str:
    dry = "DRY RUN (CPU, tiny shapes; times mean nothing) · " if res.get("dry_run") else ""
    lines = [f"{dry}GPU: {res['device']} · torch {res['torch']} (CUDA {res['cuda']}) · KeOps available: {res['keops_available']} · {res['started']}",
             f"{res['n_iter']} iterations, same init (first K rows), {'wall clock' if res.get('dry_run') else 'CUDA events'}, 1 warm-up + median of {res['repeats']} runs", "",
             "| shape | metric | method | ms / iteration | ours: median iteration ms | tutorial's published ms | encode rows/s | peak GPU MiB | oracle mismatches (decisive) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pub = TUTORIAL_MS.get((r["metric"], r["n"])) if r["method"] == "keops-tutorial" else None
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['metric']} | {r['method']} | error: {r['error'][:80]} | | | | | |")
            continue
        mm = r.get("encode_mismatch", {})
        lines.append(
            f"| {r['shape']} | {r['metric']} | {r['method']}{' (auto)' if r['method'] == 'ours ' + r['auto'] else ''} | {r['ms_per_iter']:.2f} | "
            f"{r.get('ms_per_iter_median_iteration', float('nan')):.2f} | {pub if pub else ''} | {r.get('encode_rows_per_s', float('nan')):.3g} | "
            f"{'-' if r['peak_gpu_mib'] is None else format(r['peak_gpu_mib'], '.0f')} | {mm.get('wrong', '?')}/{mm.get('decisive', '?')} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="KeOps tutorial table vs vq-pipeline on one CUDA GPU")
    ap.add_argument("--quick", action="store_true", help="1M rows -> 100k (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 iterations: checks the script only")
    args = ap.parse_args()
    global DEVICE, N_ITER
    if args.dry_run:
        DEVICE, N_ITER, args.repeats = "cpu", DRY_N_ITER, 1
    elif not torch.cuda.is_available():
        print("no CUDA GPU: torch.cuda.is_available() is False; nothing to measure", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    md = table(res)
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=1))
    (out / "gpu_bench.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
