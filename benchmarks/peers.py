"""Use ``benchmarks/fair.py`` (fresh process per library) for numbers: here FAISS ran 3.7x slower than alone.

vq-pipeline against its peers on the CPU: FAISS, scikit-learn and the KeOps tutorial's own code.

Setup (once; see ``benchmarks/README.md``)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install torch==2.13.0 -e '.[bench]'

Command, from the repository root::

    .venv-bench/bin/python benchmarks/peers.py [--quick] [--json PATH] [--repeats R]

What is measured, for every shape (seeded float32 gaussian blobs offset by +3, as in
``benchmarks/engines.py``) and metric, with every method starting from the same centroids (the first
K rows, L2-normalized for cosine) and running the same number of Lloyd iterations (3, ``--n-iter``):

* fit, seconds per Lloyd iteration (median):
  - ours ``torch`` / ``keops``: ``fit_codebook(x, K, init=<tensor>, n_iter, tol=0, engine=...)``,
    median of ``codebook.timings['iteration_seconds']``; ``auto`` is whichever engine
    ``vq_pipeline.engines.auto_engine_name`` resolves to for the shape (its row repeats that number);
  - FAISS: ``faiss.Kmeans(d, K, niter, max_points_per_centroid=1e9, spherical=<cosine>)``,
    ``train(x, init_centroids=...)``, median of the per-iteration increments of
    ``iteration_stats[i]['time']``;
  - scikit-learn: ``KMeans(K, init=<array>, n_init=1, max_iter, tol=0, algorithm='lloyd')``, wall time
    of ``fit`` / ``n_iter_`` (includes its input checks and final labelling: a slight handicap);
    cosine: n/a (scikit-learn has no cosine k-means);
  - KeOps tutorial: its own LazyTensor loop (``D_ij = ((x_i - c_j)**2).sum(-1)``, ``argmin``,
    ``scatter_add_``, divide by counts; cosine: ``(x_i | c_j).argmax`` with re-normalized centroids),
    each iteration timed, median. It uses the same pykeops import as our engine, i.e. the vectorizing
    flags vq-pipeline sets (KeOps' own default flags are 10-30x slower, see ``engines.json``).
* encode, rows per second, on one common codebook (the centroids of our torch fit): ours
  ``Codebook.encode(x, engine=...)``; FAISS ``IndexFlatL2.search(x, 1)`` (cosine: normalize a copy,
  ``IndexFlatIP``); scikit-learn ``KMeans.predict`` with ``cluster_centers_`` set to the codebook;
  the tutorial's ``D_ij.argmin(dim=1)`` (cosine: ``argmax`` of ``x_i | c_j``). A call shorter than
  ``ENCODE_MIN_S`` is repeated (up to ``ENCODE_MAX_CALLS`` calls) and the median call counts, because a
  single 50 ms call is at the mercy of the machine's noise.
* exactness: fraction of encoded rows whose code differs from a float64 oracle's argmin, counted only
  over decisive rows (oracle 2nd-best minus best > ``TIE_RTOL`` x 2nd-best); raw differences also kept.
  And ``centroid_maxdiff``: max |centroid - ours torch centroid| after the same iterations.
* peak memory: extra peak RSS of each method's call (``VmHWM`` reset through ``/proc/self/clear_refs``,
  minus the RSS before the call), MiB.
* load: each measurement records the share of its wall time some task waited for a CPU
  (``/proc/pressure/cpu`` "some" total) and ``os.getloadavg()``: the machine may be shared, so judge
  the numbers by it; methods are interleaved per shape and repeated (medians).

KeOps methods whose iteration would take more than ``KEOPS_TARGET_ITER_S`` at full N (a one-iteration
probe decides; KeOps cosine in the tutorial's ``|`` form and KeOps at D >= 384 are slow on CPU) run on
the first ``n_measured`` rows instead, and their time is scaled by ``N / n_measured`` (cost is linear in
N: see the scaling block). Such cells are marked ``*``.

Scaling: ours (torch and keops) fit s/iter and encode rows/s at N, 2N, 4N for 100k x 64, K=256.

Everybody gets 2 threads: ``torch.set_num_threads(2)``, ``faiss.omp_set_num_threads(2)``,
``threadpoolctl.threadpool_limits(2)`` for scikit-learn, ``OMP_NUM_THREADS=2`` for KeOps.
Prints markdown tables; writes JSON (default ``benchmarks/results/peers.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse
import contextlib
import datetime as _dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VQ_KEOPS_CACHE_DIR", str(REPO / ".cache" / "keops"))
try:  # vq_pipeline before torch: it chooses the OpenMP waits as it does for users
    import vq_pipeline  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))
    import vq_pipeline  # noqa: F401

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vq_pipeline import fit_codebook  # noqa: E402
from vq_pipeline.engines import auto_engine_name, keops as keops_mod  # noqa: E402

try:
    import faiss  # noqa: E402
except ImportError:  # pragma: no cover - reported as n/a
    faiss = None
try:
    import sklearn  # noqa: E402
    from sklearn.cluster import KMeans  # noqa: E402
except ImportError:  # pragma: no cover
    sklearn = None
try:
    from threadpoolctl import threadpool_limits  # noqa: E402
except ImportError:  # pragma: no cover
    threadpool_limits = None

THREADS = 2
TIE_RTOL = 1e-5
OFFSET, NOISE = 3.0, 0.5
KEOPS_TARGET_ITER_S = 1.0
ENCODE_MIN_S, ENCODE_MAX_CALLS = 0.5, 7  # an encode call is repeated until 0.5 s have passed (at most 7 calls)
RESULTS = REPO / "benchmarks" / "results"

# (n, dim, K): the shapes, then sentence-embedding (384) and OpenAI-size (1536) widths.
SHAPES = [(100_000, 64, 256), (200_000, 128, 1024), (1_000_000, 32, 100), (50_000, 384, 256), (20_000, 1536, 256)]
SCALING_SHAPE = (100_000, 64, 256)
OURS = ("torch", "keops")
PEERS = ("faiss", "sklearn", "keops-tutorial")


# ----------------------------------------------------------------------------- measuring helpers


def _status_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def _psi_total_us() -> int | None:
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


try:
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


class Probe:
    """Wall time, CPU-pressure share, load average and extra peak RSS of one measured call."""

    def __enter__(self) -> "Probe":
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # hand freed heap back, so the RSS baseline is not inflated by old garbage
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.rss_ok = True
        except OSError:
            self.rss_ok = False
        self.rss0 = _status_kib("VmRSS")
        self.psi0 = _psi_total_us()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        psi1 = _psi_total_us()
        self.stall = None if self.psi0 is None or psi1 is None else (psi1 - self.psi0) / 1e6 / max(self.wall, 1e-9)
        self.peak_mib = (_status_kib("VmHWM") - self.rss0) / 1024 if self.rss_ok else None
        self.load1 = os.getloadavg()[0]

    def record(self) -> dict[str, Any]:
        return {"wall_s": self.wall, "cpu_stall": self.stall, "load1": self.load1, "extra_peak_rss_mib": self.peak_mib}


def make_blobs(n: int, dim: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g)
    labels = torch.randint(k, (n,), generator=g)
    return (centres[labels] + NOISE * torch.randn(n, dim, generator=g) + OFFSET).contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def oracle_top2(x: torch.Tensor, c: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 best index, best and second-best distance (squared L2 / 1 - cos) of every row."""
    c64 = c.double()
    if metric == "cosine":
        c64 = c64 / c64.norm(dim=1, keepdim=True)
    shift = c64.mean(0)
    cs = c64 - shift
    cn = cs.square().sum(1)
    best_i, d1, d2 = [], [], []
    for s in range(0, x.shape[0], 16384):
        xb = x[s : s + 16384].double()
        if metric == "cosine":
            xb = xb / xb.norm(dim=1, keepdim=True)
            d = 1.0 - xb @ c64.T
        else:
            xs = xb - shift
            d = (xs.square().sum(1, keepdim=True) - 2.0 * xs @ cs.T + cn).clamp_min_(0)  # exact enough in fp64
        v, i = d.topk(2, dim=1, largest=False)
        best_i.append(i[:, 0]), d1.append(v[:, 0]), d2.append(v[:, 1])
    return torch.cat(best_i), torch.cat(d1), torch.cat(d2)


def mismatch(codes: torch.Tensor, orc: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    n = codes.shape[0]
    best, d1, d2 = (t[:n] for t in orc)
    decisive = (d2 - d1) > TIE_RTOL * d2.abs() + 1e-12
    wrong = (codes.long() != best) & decisive
    return {
        "fraction": float(wrong.sum()) / max(int(decisive.sum()), 1),
        "rows_wrong": int(wrong.sum()),
        "rows_decisive": int(decisive.sum()),
        "rows_differing_incl_ties": int((codes.long() != best).sum()),
    }


# ----------------------------------------------------------------------------- the methods


def fit_ours(engine: str, x: torch.Tensor, init: torch.Tensor, metric: str, n_iter: int) -> tuple[float, torch.Tensor, Any]:
    cb = fit_codebook(x, init.shape[0], metric=metric, init=init.clone(), n_iter=n_iter, tol=0.0, engine=engine, device="cpu")
    return statistics.median(cb.timings["iteration_seconds"]), cb.centroids, cb


def fit_faiss(x: torch.Tensor, init: torch.Tensor, metric: str, n_iter: int) -> tuple[float, torch.Tensor, Any]:
    xn = x.numpy()
    km = faiss.Kmeans(x.shape[1], init.shape[0], niter=n_iter, max_points_per_centroid=10**9, spherical=metric == "cosine", verbose=False, seed=1)
    km.train(xn, init_centroids=np.ascontiguousarray(init.numpy()))
    times = [s["time"] for s in km.iteration_stats]  # cumulative seconds
    steps = np.diff([0.0] + times)
    return float(np.median(steps)), torch.from_numpy(km.centroids.copy()), km


def fit_sklearn(x: torch.Tensor, init: torch.Tensor, metric: str, n_iter: int) -> tuple[float, torch.Tensor, Any]:
    km = KMeans(init.shape[0], init=init.numpy().astype(np.float32), n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd")
    ctx = threadpool_limits(THREADS) if threadpool_limits else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        km.fit(x.numpy())
    wall = time.perf_counter() - t0
    return wall / max(km.n_iter_, 1), torch.from_numpy(km.cluster_centers_.astype(np.float32)), km


def _lazy() -> Any:
    return keops_mod._lazy_tensor()  # the pykeops import vq_pipeline configured (native flags, cache)


def fit_tutorial(x: torch.Tensor, init: torch.Tensor, metric: str, n_iter: int) -> tuple[float, torch.Tensor, Any]:
    """The KeOps K-means tutorial's loop, as published (first-K init replaced by the shared init)."""
    LazyTensor = _lazy()
    N, D = x.shape
    K = init.shape[0]
    c = init.clone()
    x_i = LazyTensor(x.view(N, 1, D))
    times = []
    with contextlib.redirect_stdout(sys.stderr):
        for _ in range(n_iter):
            t0 = time.perf_counter()
            c_j = LazyTensor(c.view(1, K, D))
            if metric == "cosine":
                S_ij = x_i | c_j
                cl = S_ij.argmax(dim=1).long().view(-1)
            else:
                D_ij = ((x_i - c_j) ** 2).sum(-1)
                cl = D_ij.argmin(dim=1).long().view(-1)
            c.zero_()
            c.scatter_add_(0, cl[:, None].repeat(1, D), x)
            if metric == "cosine":
                c[:] = torch.nn.functional.normalize(c, dim=1, p=2)
            else:
                Ncl = torch.bincount(cl, minlength=K).type_as(c).view(K, 1)
                c /= Ncl
            times.append(time.perf_counter() - t0)
    return statistics.median(times), c, None


def encode_ours(engine: str, cb: Any, x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    return cb.encode(x, engine=engine, device="cpu")


def encode_faiss(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        xn = np.array(x.numpy(), copy=True)
        faiss.normalize_L2(xn)
        index = faiss.IndexFlatIP(c.shape[1])
    else:
        xn = x.numpy()
        index = faiss.IndexFlatL2(c.shape[1])
    index.add(np.ascontiguousarray(c.numpy()))
    _, i = index.search(xn, 1)
    return torch.from_numpy(i[:, 0])


def encode_sklearn(km: Any, x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    km.cluster_centers_ = c.numpy().astype(np.float32)
    ctx = threadpool_limits(THREADS) if threadpool_limits else contextlib.nullcontext()
    with ctx:
        return torch.from_numpy(km.predict(x.numpy()).astype(np.int64))


def encode_tutorial(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    LazyTensor = _lazy()
    N, D = x.shape
    x_i = LazyTensor(x.view(N, 1, D))
    c_j = LazyTensor(c.contiguous().view(1, c.shape[0], D))
    with contextlib.redirect_stdout(sys.stderr):
        if metric == "cosine":
            return (x_i | c_j).argmax(dim=1).long().view(-1)
        return ((x_i - c_j) ** 2).sum(-1).argmin(dim=1).long().view(-1)


# ----------------------------------------------------------------------------- one shape


def run_shape(n: int, dim: int, k: int, metric: str, n_iter: int, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    x = make_blobs(n, dim, k, seed=7919 * n + 104729 * dim + k)
    if metric == "cosine":
        x = normalize(x)  # every method gets unit rows (ours would normalize anyway)
    init = x[:k].clone()
    methods = ["torch"] + (["keops"] if keops_mod.available() else [])
    methods += (["faiss"] if faiss else []) + (["sklearn"] if sklearn and metric == "l2" else [])
    methods += ["keops-tutorial"] if keops_mod.available() else []

    def fitter(m: str, xs: torch.Tensor) -> Callable[[], tuple[float, torch.Tensor, Any]]:
        if m in OURS:
            return lambda: fit_ours(m, xs, init, metric, n_iter)
        return {"faiss": lambda: fit_faiss(xs, init, metric, n_iter), "sklearn": lambda: fit_sklearn(xs, init, metric, n_iter),
                "keops-tutorial": lambda: fit_tutorial(xs, init, metric, n_iter)}[m]

    # Warm-up: KeOps compiles each formula once per dim; a 1-iteration probe on a small slice also
    # tells how many rows KeOps methods can afford (see KEOPS_TARGET_ITER_S).
    rows_for: dict[str, int] = {m: n for m in methods}
    probe_n = min(n, max(2 * k, 1000))
    for m in methods:
        if m in ("keops", "keops-tutorial"):
            xs = x[:probe_n]
            t0 = time.perf_counter()
            if m == "keops":
                fit_ours("keops", xs, init, metric, 1)
            else:
                fit_tutorial(xs, init, metric, 1)
            first = time.perf_counter() - t0
            per_iter = (fit_ours("keops", xs, init, metric, 1)[0] if m == "keops" else fit_tutorial(xs, init, metric, 2)[0])
            est = per_iter * n / probe_n
            if est > KEOPS_TARGET_ITER_S:
                rows_for[m] = max(2 * k, min(n, int(n * KEOPS_TARGET_ITER_S / est) // 100 * 100))
            log(f"    warm-up {m}: first call {first:.1f}s, est {est:.3f}s/iter at N -> {rows_for[m]} rows")

    fit_s: dict[str, list[float]] = {m: [] for m in methods}
    enc_rps: dict[str, list[float]] = {m: [] for m in methods}
    probes: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    cents: dict[str, torch.Tensor] = {}
    objs: dict[str, Any] = {}
    codes: dict[str, torch.Tensor] = {}
    common_c: torch.Tensor | None = None
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]  # rotate: nobody always goes first
        for m in order:
            if r > 0 and rows_for[m] != n:
                continue  # extrapolated (slow) methods: one repeat is enough to show how far behind they are
            xs = x[: rows_for[m]]
            with Probe() as p:
                s, c, obj = fitter(m, xs)()
            rec = p.record()
            scale = n / rows_for[m]
            fit_s[m].append(s * scale)
            if m == "torch" and common_c is None:
                common_c, objs["torch"] = c, obj
            if rows_for[m] == n:
                cents[m] = c
            if obj is not None:
                objs[m] = obj
            # encode with the common codebook (ours torch fit's centroids)
            cc = common_c if common_c is not None else c
            if m in OURS:
                cb = objs["torch"]  # the common codebook (ours torch fit)
                enc = lambda: encode_ours(m, cb, xs, cc, metric)  # noqa: E731
            elif m == "faiss":
                enc = lambda: encode_faiss(xs, cc, metric)  # noqa: E731
            elif m == "sklearn":
                enc = lambda: encode_sklearn(objs["sklearn"], xs, cc, metric)  # noqa: E731
            else:
                enc = lambda: encode_tutorial(xs, cc, metric)  # noqa: E731
            with Probe() as pe:
                codes[m] = enc()
            walls = [pe.wall]  # short encodes are repeated (see ENCODE_MIN_S); their median counts
            while sum(walls) < ENCODE_MIN_S and len(walls) < ENCODE_MAX_CALLS:
                t0 = time.perf_counter()
                enc()
                walls.append(time.perf_counter() - t0)
            enc_rps[m].append(xs.shape[0] / statistics.median(walls))
            probes[m].append({"fit": rec, "encode": {**pe.record(), "calls": len(walls)}})
            log(f"    r{r} {m:15s} fit {s * scale:8.4f}s/iter  encode {enc_rps[m][-1]:10.3g} rows/s  "
                f"stall {rec['cpu_stall'] if rec['cpu_stall'] is not None else float('nan'):.2f}")
    # ours torch codebook: encoded by everybody; we need its centroids for the oracle
    orc = oracle_top2(x, common_c, metric)
    out: dict[str, Any] = {"n": n, "dim": dim, "k": k, "metric": metric, "n_iter": n_iter, "repeats": repeats,
                           "auto_engine": auto_engine_name(torch.device("cpu"), dim), "methods": {}}
    for m in methods:
        cmax = float((cents[m] - cents["torch"]).abs().max()) if m in cents and "torch" in cents else None
        out["methods"][m] = {
            "rows_measured": rows_for[m],
            "extrapolated": rows_for[m] != n,
            "fit_s_per_iter": statistics.median(fit_s[m]),
            "fit_s_per_iter_all": fit_s[m],
            "encode_rows_per_s": statistics.median(enc_rps[m]),
            "encode_rows_per_s_all": enc_rps[m],
            "encode_mismatch": mismatch(codes[m], orc),
            "centroid_maxdiff_vs_torch": cmax,
            "probes": probes[m],
            "fit_extra_peak_rss_mib": max((q["fit"]["extra_peak_rss_mib"] or 0) for q in probes[m]),
            "encode_extra_peak_rss_mib": max((q["encode"]["extra_peak_rss_mib"] or 0) for q in probes[m]),
            "cpu_stall_median": statistics.median([q["fit"]["cpu_stall"] or 0 for q in probes[m]]),
            "load1_median": statistics.median([q["fit"]["load1"] for q in probes[m]]),
        }
    ms = out["methods"]
    peers = [m for m in PEERS if m in ms]
    if peers:
        bp_fit = min(peers, key=lambda m: ms[m]["fit_s_per_iter"])
        bp_enc = max(peers, key=lambda m: ms[m]["encode_rows_per_s"])
        ours = [m for m in OURS if m in ms]
        best_fit = min(ours, key=lambda m: ms[m]["fit_s_per_iter"])
        best_enc = max(ours, key=lambda m: ms[m]["encode_rows_per_s"])
        auto = out["auto_engine"] if out["auto_engine"] in ms else "torch"
        out["summary"] = {
            "best_peer_fit": bp_fit, "best_peer_encode": bp_enc, "best_ours_fit": best_fit, "best_ours_encode": best_enc,
            "fit_ratio_best": ms[best_fit]["fit_s_per_iter"] / ms[bp_fit]["fit_s_per_iter"],
            "fit_ratio_auto": ms[auto]["fit_s_per_iter"] / ms[bp_fit]["fit_s_per_iter"],
            "encode_ratio_best": ms[bp_enc]["encode_rows_per_s"] / ms[best_enc]["encode_rows_per_s"],
            "encode_ratio_auto": ms[bp_enc]["encode_rows_per_s"] / ms[auto]["encode_rows_per_s"],
        }
    return out


def run_scaling(n: int, dim: int, k: int, n_iter: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    x4 = make_blobs(4 * n, dim, k, seed=12345)
    init = x4[:k].clone()
    for mult in (1, 2, 4):
        x = x4[: mult * n]
        for eng in [e for e in OURS if e == "torch" or keops_mod.available()]:
            with Probe() as p:
                s, _, cb = fit_ours(eng, x, init, "l2", n_iter)
            t0 = time.perf_counter()
            cb.encode(x, engine=eng, device="cpu")
            enc = x.shape[0] / (time.perf_counter() - t0)
            rows.append({"n": x.shape[0], "engine": eng, "fit_s_per_iter": s, "encode_rows_per_s": enc, **p.record()})
            log(f"    scaling {eng:6s} N={x.shape[0]:>8d}: {s:.4f} s/iter, {enc:.3g} rows/s")
    return rows


# ----------------------------------------------------------------------------- report


def _fmt_s(v: float) -> str:
    return f"{v:.3g}" if v >= 0.001 else f"{v:.2e}"


def tables(res: dict[str, Any]) -> str:
    lines = ["### Fit: seconds per Lloyd iteration (median; `*` = measured on fewer rows, scaled to N)", "",
             "| shape | metric | ours torch | ours keops | auto → | FAISS | sklearn | KeOps tutorial | ours best / best peer | auto / best peer | CPU stall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        ms = row["methods"]

        def cell(m: str, key: str = "fit_s_per_iter") -> str:
            if m not in ms:
                return "n/a"
            v = ms[m][key]
            txt = _fmt_s(v) if key == "fit_s_per_iter" else f"{v:.3g}"
            return txt + ("*" if ms[m]["extrapolated"] else "")

        sm = row.get("summary", {})
        stall = statistics.median([ms[m]["cpu_stall_median"] for m in ms])
        lines.append(f"| {row['label']} | {row['metric']} | {cell('torch')} | {cell('keops')} | {row['auto_engine']} | {cell('faiss')} | "
                     f"{cell('sklearn')} | {cell('keops-tutorial')} | {sm.get('fit_ratio_best', float('nan')):.2f} ({sm.get('best_ours_fit')} vs {sm.get('best_peer_fit')}) | "
                     f"{sm.get('fit_ratio_auto', float('nan')):.2f} | {stall:.2f} |")
    lines += ["", "### Encode: rows per second (median; ratio = best peer's rate / ours, ≤ 1 means we are at least as fast)", "",
              "| shape | metric | ours torch | ours keops | FAISS | sklearn | KeOps tutorial | ours best / best peer | auto / best peer |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        ms = row["methods"]

        def ecell(m: str) -> str:
            return "n/a" if m not in ms else f"{ms[m]['encode_rows_per_s']:.3g}" + ("*" if ms[m]["extrapolated"] else "")

        sm = row.get("summary", {})
        lines.append(f"| {row['label']} | {row['metric']} | {ecell('torch')} | {ecell('keops')} | {ecell('faiss')} | {ecell('sklearn')} | "
                     f"{ecell('keops-tutorial')} | {sm.get('encode_ratio_best', float('nan')):.2f} ({sm.get('best_ours_encode')} vs {sm.get('best_peer_encode')}) | "
                     f"{sm.get('encode_ratio_auto', float('nan')):.2f} |")
    lines += ["", "### Exactness (encode, decisive rows mismatching the float64 oracle) and extra peak RSS (MiB, fit / encode)", "",
              "| shape | metric | " + " | ".join(OURS + PEERS) + " |", "|---|---|" + "---|" * (len(OURS) + len(PEERS))]
    for row in res["rows"]:
        ms = row["methods"]
        cells = []
        for m in OURS + PEERS:
            if m not in ms:
                cells.append("n/a")
                continue
            mm = ms[m]["encode_mismatch"]
            cells.append(f"{mm['rows_wrong']}/{mm['rows_decisive']}; {ms[m]['fit_extra_peak_rss_mib']:.0f} / {ms[m]['encode_extra_peak_rss_mib']:.0f}")
        lines.append(f"| {row['label']} | {row['metric']} | " + " | ".join(cells) + " |")
    if res.get("scaling"):
        lines += ["", "### Scaling (ours, l2): fit s/iter and encode rows/s at N, 2N, 4N", "",
                  "| engine | N | fit s/iter | per-row ratio to N | encode rows/s |", "|---|---|---|---|---|"]
        base = {}
        for r in res["scaling"]:
            base.setdefault(r["engine"], r)
            b = base[r["engine"]]
            rel = (r["fit_s_per_iter"] / r["n"]) / (b["fit_s_per_iter"] / b["n"])
            lines.append(f"| {r['engine']} | {r['n']} | {_fmt_s(r['fit_s_per_iter'])} | {rel:.2f} | {r['encode_rows_per_s']:.3g} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N scaled by 0.1 and 1 repeat (smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--n-iter", type=int, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS / "peers.json")
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    n_iter = args.n_iter or 3
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(THREADS)
    if faiss:
        faiss.omp_set_num_threads(THREADS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    machine = {
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor()),
        "nproc": os.cpu_count(), "threads": THREADS, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", None), "sklearn": getattr(sklearn, "__version__", None),
        "python": platform.python_version(), "keops_available": keops_mod.available(),
    }
    res: dict[str, Any] = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
                           "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
                           "n_iter": n_iter, "repeats": repeats, "tie_rtol": TIE_RTOL, "rows": []}
    for n0, dim, k in SHAPES:
        n = max(4 * k, int(n0 * scale))
        for metric in ("l2", "cosine"):
            label = f"{n // 1000}k × {dim}, K={k}" if n % 1000 == 0 else f"{n} × {dim}, K={k}"
            log(f"== {label} {metric}")
            row = run_shape(n, dim, k, metric, n_iter, repeats, log)
            row["label"] = label
            res["rows"].append(row)
    sn, sd, sk = SCALING_SHAPE
    log("== scaling")
    res["scaling"] = run_scaling(max(4 * sk, int(sn * scale)), sd, sk, n_iter, log)
    res["seconds"] = time.perf_counter() - t_start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(f"## vq-pipeline vs peers, CPU — {machine['cpu']}, nproc {machine['nproc']}, {THREADS} threads each, "
          f"OMP_WAIT_POLICY={machine['omp_wait_policy']}, {res['started']}")
    print(f"torch {machine['torch']}, faiss {machine['faiss']}, scikit-learn {machine['sklearn']}; {n_iter} iterations, "
          f"{repeats} interleaved repeat(s); same data and initial centroids for all; total {res['seconds']:.0f} s\n")
    print(tables(res))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
