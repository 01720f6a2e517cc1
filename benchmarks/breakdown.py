"""Where the time of one ``fit_codebook`` call and one ``Codebook.encode`` call goes (CPU, l2).

Command, from the repository root (the project venv is enough; ``.venv-bench`` works too)::

    .venv/bin/python benchmarks/breakdown.py [--quick] [--n-iter 10] [--json PATH]

For each shape (200k x 128, K=1024 and 1M x 32, K=100; ``--quick``: tiny ones), on the data of
``fair.py`` (``harness.mixture_files``: the same seeded mixture, first K rows as initial centroids, 2N new rows encoded
with the mixture's centres as codebook), in this one process with 2 torch threads:

1. a warm-up fit (one iteration on 4K rows) and encode, so that lazy imports and thread pools are not
   counted;
2. one plain ``fit_codebook(x, K, init=<first K rows>, n_iter, tol=0, device='cpu')`` and one plain
   ``encode``, timed: the reference wall times (no profiler);
3. the same two calls under ``cProfile``. The table splits the profiled call by the cumulative times of
   named internal functions of ``vq_pipeline`` (and of the torch/numpy built-ins they call, by caller),
   so that the rows add up to the whole call; "everything else" is what no row names (loop bookkeeping,
   small calls, the profiler's own overhead). Each E step is also timed on its own (a wrapper around
   ``InMemoryRows.e_step``), which separates the final evaluation pass, the E step on the returned
   centroids that gives their counts and inertia.

Names that a change to the library removed show up as "(not found)" with 0 s: their time then moves to
the row above them or to "everything else", and this script needs updating.

Writes the printed tables as markdown and every number as JSON (default
``benchmarks/results/breakdown-<UTC time>.json`` / ``.md``; ``--quick``: ``benchmarks/.cache/results/``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vq_pipeline.runtime import apply_omp_waits

apply_omp_waits()  # before torch, as the vq command and the flows do for users

import numpy as np  # noqa: E402
import torch  # noqa: E402

import harness  # noqa: E402
from vq_pipeline.compute.assign import encode as assign_encode, nearest_in_chunks, plan_chunk_rows
from vq_pipeline.codebook import Codebook, tensor_fingerprint
from vq_pipeline.compute.data import InMemoryRows, e_step as data_e_step, farthest
from vq_pipeline.compute.engines import get_engine
from vq_pipeline.compute.engines.torch import (
    TorchEngine,
    _best_two_rows,
    _exact_nearest,
    _pair_sqdist,
    _proven_best_rows,
)
from vq_pipeline.fitting.options import fit_options
from vq_pipeline.fitting.flat import _initial_centroids, _seeding_rows
from vq_pipeline.fitting.kmeans import fit_codebook, fit_source
from vq_pipeline.compute.lloyd import m_step
from vq_pipeline.settings import FitSettings
from vq_pipeline.validate import as_embeddings, check_int, check_nonzero_rows, normalize_rows, resolve_device

THREADS = 2
SHAPES = [(200_000, 128, 1024), (1_000_000, 32, 100)]
QUICK_SHAPES = [(20_000, 32, 64)]

Key = tuple[str, int, str]


# ----------------------------------------------------------------------------- reading a profile


class Profile:
    """Cumulative times of functions, and of calls along one caller -> callee edge, from ``pstats``."""

    def __init__(self, prof: cProfile.Profile) -> None:
        self.stats: dict[Key, tuple] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        self.missing: list[str] = []

    def key(self, target: Any) -> list[Key]:
        """The profile keys of a Python function (by its code object) or of built-ins matching a regex."""
        if isinstance(target, str):  # a built-in: '~' keys whose name matches, e.g. r"method 'double' "
            return [k for k in self.stats if k[0] == "~" and re.search(target, k[2])]
        fn = getattr(target, "__func__", target)
        code = getattr(fn, "__code__", None)
        if code is None:
            return []
        k = (code.co_filename, code.co_firstlineno, code.co_name)
        return [k] if k in self.stats else []

    def ct(self, target: Any, label: str = "") -> float:
        """Cumulative seconds of ``target`` over all its calls."""
        keys = self.key(target)
        if not keys:
            self.missing.append(label or str(target))
        return sum(self.stats[k][3] for k in keys)

    def calls(self, target: Any) -> int:
        return sum(self.stats[k][1] for k in self.key(target))

    def edge(self, callee: Any, callers: list[Any]) -> float:
        """Cumulative seconds of ``callee`` when called directly from any of ``callers``."""
        total = 0.0
        caller_keys = [k for c in callers for k in self.key(c)]
        for k in self.key(callee):
            for ck, v in self.stats[k][4].items():
                if ck in caller_keys:
                    total += v[3]
        return total


def _fn(module: Any, path: str) -> Any:
    """``module.a.b`` by dotted path, or None when a change to the library removed it."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


DOUBLE = r"^<method 'double' of "
MM = r"^<built-in method torch\.mm>"


# ----------------------------------------------------------------------------- the two calls


def fit_breakdown(p: Profile, whole: float, e_walls: list[float]) -> list[tuple[str, float]]:
    """Rows (label, seconds) that add up to ``whole``, the profiled fit_codebook call."""
    fc = fit_codebook
    fs = fit_source
    e_step = InMemoryRows.e_step
    e_inner = [
        data_e_step,
        _exact_nearest,
        _fn(TorchEngine, "_exact_terms"),
        _fn(TorchEngine, "_centred"),
        _pair_sqdist,
    ]
    validation = p.edge(as_embeddings, [fc])
    options = p.edge(FitSettings.__init__, [fc]) + p.edge(fit_options, [fc])
    fingerprint = p.ct(tensor_fingerprint, "tensor_fingerprint")
    cosine = p.edge(check_nonzero_rows, [fc]) + p.edge(normalize_rows, [fc])
    seeding = (
        p.ct(_seeding_rows, "_seeding_rows") + p.ct(_initial_centroids, "_initial_centroids") + p.edge(get_engine, [fs])
    )
    e_all = p.ct(e_step, "InMemoryRows.e_step")
    e_double = p.edge(DOUBLE, [f for f in e_inner if f is not None])
    n_e = max(len(e_walls), 1)
    final_share = e_walls[-1] / sum(e_walls) if e_walls else 0.0
    e_final = e_all * final_share
    m = p.ct(m_step, "m_step")
    book = p.edge(Codebook.__init__, [fs])
    rows = [
        ("validation (as_embeddings: checks, float32 copy, finiteness scan)", validation),
        ("settings and options (FitSettings, fit_options, init check)", options),
        ("fingerprint (sha256 of the rows)", fingerprint),
        ("cosine: zero-row check and normalized copy", cosine),
        ("engine, seeding / initial centroids", seeding),
        (
            f"E steps 1..{n_e - 1} (those followed by an update), without their float64 conversions",
            e_all - e_final - e_double * (n_e - 1) / n_e,
        ),
        (
            "final evaluation pass (E step on the returned centroids), without its float64 conversions",
            e_final - e_double / n_e,
        ),
        ("float64 conversions inside the E steps (.double(): rows for the sums, distances, re-ranking)", e_double),
        (f"M steps ({p.calls(m_step)} calls)", m),
        ("Codebook construction (checks, private copies, versions)", book),
    ]
    rows.append(
        (
            "everything else (loop bookkeeping, per-iteration stats, state copies, profiler)",
            whole - sum(v for _, v in rows),
        )
    )
    return rows


def estep_breakdown(p: Profile) -> list[tuple[str, float]]:
    """Inside all E steps together: rows that add up to the E steps' cumulative time."""
    e_step = InMemoryRows.e_step
    de = data_e_step
    eng = TorchEngine
    nic = nearest_in_chunks
    total = p.ct(e_step)
    nearest = p.edge(eng.nearest, [nic])
    gemm_path = p.edge(_fn(TorchEngine, "_nearest_by_gemm"), [eng.nearest])
    ranking = p.edge(_fn(TorchEngine, "_ranking"), [_fn(TorchEngine, "_nearest_by_gemm")])
    mm = p.edge(MM, [_fn(TorchEngine, "_ranking")])
    best2 = p.edge(_best_two_rows, [_fn(TorchEngine, "_nearest_by_gemm")]) + p.edge(
        _proven_best_rows, [_fn(TorchEngine, "_nearest_by_gemm")]
    )
    rerank = p.edge(_exact_nearest, [_fn(TorchEngine, "_nearest_by_gemm")])
    exact_terms = p.edge(_fn(TorchEngine, "_exact_terms"), [_fn(TorchEngine, "_nearest_by_gemm")])
    chunk = p.ct(nic) - nearest  # slicing and moving each chunk (the generator's own work)
    index_add = p.edge(r"^<method 'index_add_' of ", [de])
    double = p.edge(DOUBLE, [de])
    far = p.edge(r"^<method 'topk' of ", [de]) + p.edge(farthest, [de]) + p.edge(r"^<built-in method torch\.cat>", [de])
    counts = p.edge(r"^<built-in method torch\.bincount>", [de]) + p.edge(r"^<method 'sum' of ", [de])
    rows = [
        ("chunk slicing and copy (nearest_in_chunks)", chunk),
        ("centring x - shift (in _ranking)", ranking - mm),
        ("GEMM (torch.mm in _ranking)", mm),
        ("best code and its proof per row (_proven_best_rows; _best_two_rows from 2^22 codes)", best2),
        (
            "rounding bound and proof test (rest of _nearest_by_gemm)",
            gemm_path - ranking - best2 - rerank - exact_terms,
        ),
        ("float64 re-ranking of unproven rows (_exact_nearest, _exact_terms)", rerank + exact_terms),
        ("direct distance of the chosen code, sum((x - c)^2) (rest of TorchEngine.nearest)", nearest - gemm_path),
        ("float64 copy of each chunk and of its distances (.double() in e_step)", double),
        ("sums: index_add_ (float64)", index_add),
        ("counts and objective (bincount, sum)", counts),
        ("far rows for empty-cluster repair (topk, cat, farthest)", far),
    ]
    rows.append(("rest of the E step", total - sum(v for _, v in rows)))
    return rows


def encode_breakdown(p: Profile, whole: float) -> list[tuple[str, float]]:
    enc = assign_encode
    eng = TorchEngine
    nic = nearest_in_chunks
    nearest = p.edge(eng.nearest, [nic])
    gemm_path = p.edge(_fn(TorchEngine, "_nearest_by_gemm"), [eng.nearest])
    ranking = p.edge(_fn(TorchEngine, "_ranking"), [_fn(TorchEngine, "_nearest_by_gemm")])
    mm = p.edge(MM, [_fn(TorchEngine, "_ranking")])
    best2 = p.edge(_best_two_rows, [_fn(TorchEngine, "_nearest_by_gemm")]) + p.edge(
        _proven_best_rows, [_fn(TorchEngine, "_nearest_by_gemm")]
    )
    rerank = p.edge(_exact_nearest, [_fn(TorchEngine, "_nearest_by_gemm")])
    exact_terms = p.edge(_fn(TorchEngine, "_exact_terms"), [_fn(TorchEngine, "_nearest_by_gemm")])
    rows = [
        ("validation (as_embeddings: checks, float32 copy, finiteness scan)", p.edge(as_embeddings, [enc])),
        (
            "argument checks, device, engine, chunk plan",
            p.edge(check_int, [enc])
            + p.edge(resolve_device, [enc])
            + p.edge(get_engine, [enc])
            + p.edge(plan_chunk_rows, [enc])
            + p.edge(check_nonzero_rows, [enc]),
        ),
        ("chunk slicing and copy (nearest_in_chunks)", p.ct(nic) - nearest),
        ("centring x - shift (in _ranking)", ranking - mm),
        ("GEMM (torch.mm in _ranking)", mm),
        ("best code and its proof per row (_proven_best_rows; _best_two_rows from 2^22 codes)", best2),
        (
            "rounding bound and proof test (rest of _nearest_by_gemm)",
            gemm_path - ranking - best2 - rerank - exact_terms,
        ),
        ("float64 re-ranking of unproven rows (_exact_nearest, _exact_terms)", rerank + exact_terms),
        ("distances asked for (rest of TorchEngine.nearest)", nearest - gemm_path),
        (
            "writing the codes (codes[rows] = idx.cpu())",
            p.edge(r"^<method '__setitem__' of ", [enc]) + p.edge(r"^<method 'cpu' of ", [enc]),
        ),
    ]
    rows.append(("everything else (Codebook.encode wrapper, output, profiler)", whole - sum(v for _, v in rows)))
    return rows


def table(
    title: str, rows: list[tuple[str, float]], whole: float, plain: float | None, total: str = "whole call"
) -> str:
    lines = [f"#### {title}", "", "| part | seconds | share |", "|---|---:|---:|"]
    for label, s in rows:
        lines.append(f"| {label} | {s:.3f} | {100 * s / whole:.1f}% |")
    lines.append(f"| **{total} (profiled)** | **{whole:.3f}** | 100% |")
    if plain is not None:
        lines.append(f"| whole call without the profiler | {plain:.3f} | {100 * plain / whole:.0f}% |")
    return "\n".join(lines)


def measure_shape(n: int, dim: int, k: int, n_iter: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vq-breakdown-") as tmp:
        folder = Path(tmp)
        harness.mixture_files(n, dim, k, folder)
        x = np.load(folder / "x.npy")
        x2 = np.load(folder / "x2.npy")
        init = torch.from_numpy(np.load(folder / "init.npy"))
        centres = torch.from_numpy(np.load(folder / "codebook.npy"))
    book = Codebook(centroids=centres, counts=torch.zeros(k, dtype=torch.int64), metric="l2")

    def fit() -> Any:
        return fit_codebook(x, k, init=init, n_iter=n_iter, tol=0.0, device="cpu")

    def encode() -> Any:
        return book.encode(x2, device="cpu")

    fit_codebook(x[: 4 * k], k, init=init, n_iter=1, tol=0.0, device="cpu")  # warm-up
    book.encode(x2[: 4 * k], device="cpu")

    # Each E step's own wall time: a wrapper around the in-memory source's E step.
    original = InMemoryRows.e_step
    walls: list[float] = []

    def timed(self: Any, centroids: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        out = original(self, centroids)
        walls.append(time.perf_counter() - t0)
        return out

    out: dict[str, Any] = {"n": n, "dim": dim, "k": k, "n_iter": n_iter}
    psi0, t0 = harness.psi_total_us(), time.perf_counter()
    cb = fit()
    out["fit_plain_s"] = time.perf_counter() - t0
    out["fit_iterations"] = int(cb.stats["iterations"])
    t1 = time.perf_counter()
    encode()
    out["encode_plain_s"] = time.perf_counter() - t1
    psi1 = harness.psi_total_us()
    out["plain_cpu_stall"] = None if psi0 is None or psi1 is None else (psi1 - psi0) / 1e6 / (time.perf_counter() - t0)

    InMemoryRows.e_step = timed
    try:
        prof = cProfile.Profile()
        psi0 = harness.psi_total_us()
        t0 = time.perf_counter()
        prof.enable()
        fit()
        prof.disable()
        out["fit_profiled_s"] = time.perf_counter() - t0
    finally:
        InMemoryRows.e_step = original
    pf = Profile(prof)
    whole = pf.ct(fit_codebook, "fit_codebook")
    out["e_step_walls_s"] = walls
    out["fit_rows"] = fit_breakdown(pf, whole, walls)
    out["fit_whole_s"] = whole
    out["estep_rows"] = estep_breakdown(pf)
    out["estep_total_s"] = pf.ct(InMemoryRows.e_step)
    out["estep_calls"] = pf.calls(InMemoryRows.e_step)
    # float64 conversions anywhere in the call, for reference (part of the rows above)
    out["fit_double_all_s"] = pf.ct(DOUBLE)
    out["fit_missing"] = sorted(set(pf.missing))

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    encode()
    prof.disable()
    out["encode_profiled_s"] = time.perf_counter() - t0
    pe = Profile(prof)
    whole_e = pe.ct(assign_encode, "assign_encode")
    out["encode_rows"] = encode_breakdown(pe, whole_e)
    out["encode_whole_s"] = whole_e
    out["encode_missing"] = sorted(set(pe.missing))
    psi1 = harness.psi_total_us()
    out["profiled_cpu_stall"] = (
        None
        if psi0 is None or psi1 is None
        else (psi1 - psi0) / 1e6 / (time.perf_counter() - t0 + out["fit_profiled_s"])
    )
    out["load1"] = os.getloadavg()[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape: a smoke check")
    ap.add_argument("--n-iter", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/breakdown-<time>.json")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    machine = harness.machine_info()
    started = harness.now()
    out = args.json or harness.results_path("breakdown", args.quick, started)
    res: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shapes": [],
    }
    for n, dim, k in QUICK_SHAPES if args.quick else SHAPES:
        print(f"== {n} x {dim}, K={k}", file=sys.stderr, flush=True)
        res["shapes"].append(measure_shape(n, dim, k, args.n_iter))
    md: list[str] = []
    md.append(
        f"## Where the time of one fit and one encode goes (CPU, l2, torch engine) — {machine['cpu']}, "
        f"nproc {machine['nproc']}, {THREADS} torch threads"
    )
    md.append(
        f"\n{started:%Y-%m-%d %H:%M} UTC, commit `{machine['commit']}`"
        f"{' (vq_pipeline/ modified since)' if machine['vq_pipeline_modified_since_commit'] else ''}, "
        f"torch {machine['versions']['torch']}, Python {platform.python_version()}. Command: `{res['command']}`. "
        f"fit_codebook(x, K, init=<first K rows>, n_iter={args.n_iter}, tol=0) and encode of 2N new rows, "
        f"after a warm-up; cProfile cumulative times.\n"
    )
    for s in res["shapes"]:
        label = f"{s['n']:,} × {s['dim']}, K={s['k']}"
        load = (
            f"CPU stall {harness.fmt(s['plain_cpu_stall'], '.2f')} (plain) / {harness.fmt(s['profiled_cpu_stall'], '.2f')} "
            f"(profiled), load {s['load1']:.1f}"
        )
        md.append(f"### {label} — {load}\n")
        md.append(
            table(
                f"fit_codebook, {s['fit_iterations']} iterations ({len(s['e_step_walls_s'])} E steps)",
                s["fit_rows"],
                s["fit_whole_s"],
                s["fit_plain_s"],
            )
        )
        walls = s["e_step_walls_s"]
        md.append(
            f"\nEach E step (s): {', '.join(f'{w:.3f}' for w in walls)}; median {statistics.median(walls):.3f}. "
            f"float64 conversions anywhere in the call: {s['fit_double_all_s']:.3f} s.\n"
        )
        md.append(
            table(
                f"inside the {s['estep_calls']} E steps together",
                s["estep_rows"],
                s["estep_total_s"],
                None,
                "all E steps",
            )
        )
        md.append("")
        md.append(
            table(f"Codebook.encode of {2 * s['n']:,} rows", s["encode_rows"], s["encode_whole_s"], s["encode_plain_s"])
        )
        missing = sorted(set(s["fit_missing"]) | set(s["encode_missing"]))
        if missing:
            md.append(f"\nNot found in this version of the library: {', '.join(missing)}")
        md.append("")
    text = "\n".join(md)
    harness.write_results(out, res, text)
    print(text)
    print(f"JSON: {out} (tables: {out.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
