"""Multi-level codes (residual and product quantization) against FAISS on real token embeddings, in fresh processes.

Setup: the ``.venv-bench`` of ``benchmarks/README.md`` (faiss-cpu, scikit-learn, editable vq_pipeline). Command,
from the repository root::

    .venv-bench/bin/python benchmarks/codecs.py [--quick] [--repeats R] [--beams 1,2,3,5] [--methods LIST] [--json PATH]

FAISS missing (as in the project's ``.venv``): its methods are skipped with a message, ours still run.

Data: the ``wordllama`` token-embedding matrix, 32,000 x 256 float32 (``harness.wordllama`` fetches the wheel
once into ``benchmarks/.cache/wordllama/``). A seeded permutation splits it into 25,600 training rows
and 6,400 new rows (``--quick``: the first 8,000 rows of the permutation, 6,400 / 1,600, and one repeat).

Methods, one fresh process each that imports only what it measures (like ``fair.py``), K = 256 codes per level
(8 bits), every library at its defaults except where named:

* ``ours-rq4``: ``fit_codebook(x, 256, codec="residual", levels=4, seed=0, device="cpu")`` (32-bit codes); the
  one fit is encoded greedily (``encode(x)``) and with ``encode(x, beam=b)`` for every other ``--beams`` value,
  each its own row (train seconds are the one fit's);
* ``faiss-rq4``: ``faiss.ResidualQuantizer(d, 4, 8)`` at its defaults (``max_beam_size`` 5, used by train and
  encode alike; 10 k-means iterations per level); ``train``, ``compute_codes``, ``decode``;
* ``faiss-rq4-beam1``: the same with ``max_beam_size = 1`` set before ``train`` (greedy train and encode);
* ``ours-pq16`` / ``faiss-pq16``: ``codec="product", levels=16`` at the defaults (16-d slices, 128-bit codes) against
  ``faiss.ProductQuantizer(d, 16, 8)`` (25 k-means iterations per slice);
* ``ours-pq4`` / ``faiss-pq4``: the same at 4 levels (64-d slices, 32-bit codes, the residual runs' code size);
* ``ours-rq4-tb5``: ``ours-rq4`` with ``train_beam=5`` (levels 1-3 fitted on the residuals of a 5-wide beam,
  as FAISS trains), encoded the same ways;
* ``ours-rq4-tb5-tol4``: ``ours-rq4-tb5`` with ``tol=1e-4`` (the default ``tol`` before 2026-12-08: more
  iterations, at every level and in each step of the progressive init);
* ``ours-rq4-kpp`` (only when named in ``--methods``): ``ours-rq4`` with ``init="k-means++"`` (the default
  for residual codebooks is ``init="auto"``, which is ``"progressive"``).

Both libraries train on every row (FAISS samples only above 256 x K = 65,536 rows). Before the measured calls
each worker makes one untimed warm-up fit and encode on the first 1,024 rows (lazy imports, thread pools),
as ``fair.py`` does. Threads: 2 for everybody (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``; ``torch.set_num_threads``, ``faiss.omp_set_num_threads``).

Figures, per row: train seconds (one whole fit / train call), encode rows per second (one whole encode /
``compute_codes`` call on the new rows), new-row and train-row MSE (mean over rows of the sum over dimensions of
``(x - decode(encode(x)))^2``, in float64, each row's own encode variant), the worker's peak RSS (``VmHWM`` at
its end: the whole process's peak, imports and data included; ``ru_maxrss`` is kept in the JSON, but Linux may
carry it across ``exec`` from the parent), and the load it ran under (``/proc/pressure/cpu`` "some" share over
the worker's life, ``os.getloadavg()``). Ratios pair each of our rows with the FAISS row of the same code size and
search width: greedy with ``max_beam_size=1``, beams with FAISS's default (beam 5). The data's mean squared norm
and its mean squared distance to its mean are printed, so that an MSE can be read relatively.

Runs are interleaved (every method in turn per repeat, the order rotated), medians of R (3) repeats. A method
that fails (an exception, a missing keyword) is recorded with its error in its row; the harness goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import harness

REPO = Path(__file__).resolve().parent.parent
THREADS = harness.THREADS
N_CODES = 256  # 8 bits per level
SEED = 0
WARM_ROWS = 1024
QUICK_ROWS = 8000
# method -> (library, codec, levels, FAISS max_beam_size or None for its default)
METHODS: dict[str, tuple[str, str, int, int | None]] = {
    "ours-rq4": ("ours", "residual", 4, None),
    "ours-rq4-tb5": ("ours", "residual", 4, None),
    "ours-rq4-tb5-tol4": ("ours", "residual", 4, None),
    "ours-rq4-kpp": ("ours", "residual", 4, None),
    "faiss-rq4": ("faiss", "residual", 4, None),
    "faiss-rq4-beam1": ("faiss", "residual", 4, 1),
    "ours-pq16": ("ours", "product", 16, None),
    "faiss-pq16": ("faiss", "product", 16, None),
    "ours-pq4": ("ours", "product", 4, None),
    "faiss-pq4": ("faiss", "product", 4, None),
}
# fit keywords of our variants; the others use the defaults. (The product runs used exact k-means++, the default
# for product codebooks when results/codecs.json was measured, until 2026-12-08; they run at the defaults since.)
OUR_KW: dict[str, dict[str, Any]] = {
    "ours-rq4-tb5": {"train_beam": 5},
    "ours-rq4-tb5-tol4": {"train_beam": 5, "tol": 1e-4},
    "ours-rq4-kpp": {"init": "k-means++"},
}
DEFAULT_METHODS = [m for m in METHODS if m != "ours-rq4-kpp"]


# ----------------------------------------------------------------------------- the worker


def _mse(x: np.ndarray, xr: Any) -> float:
    """Mean over rows of the sum over dimensions of (x - xr)^2, float64."""
    xr = np.asarray(xr)
    if xr.shape != x.shape:
        raise ValueError(f"decode returned shape {xr.shape}; expected {x.shape}")
    total = 0.0
    for s in range(0, x.shape[0], 8192):
        total += float(np.square(x[s : s + 8192].astype(np.float64) - xr[s : s + 8192].astype(np.float64)).sum())
    return total / x.shape[0]


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _check_codes(codes: Any, n: int, levels: int, notes: list[str]) -> np.ndarray:
    """Our codes as numpy (n, levels) int64; anything else is noted as an API mismatch and converted."""
    if not isinstance(codes, np.ndarray):
        notes.append(f"encode returned {type(codes).__module__}.{type(codes).__name__}, expected numpy.ndarray")
        codes = codes.numpy() if hasattr(codes, "numpy") else np.asarray(codes)
    if codes.shape != (n, levels) or codes.dtype != np.int64:
        notes.append(f"encode returned {codes.dtype} {codes.shape}, expected int64 {(n, levels)}")
    return codes


def _ours(spec: dict[str, Any], train: np.ndarray, new: np.ndarray, rec: dict[str, Any]) -> None:
    from vq_pipeline.runtime import apply_omp_waits

    apply_omp_waits()  # before torch, as the vq command and the flows do for users
    import vq_pipeline
    import torch  # noqa: F401 - for limit_threads

    harness.limit_threads(spec["threads"])
    _, codec, levels, _ = METHODS[spec["method"]]
    fit_codebook = vq_pipeline.fit_codebook
    notes: list[str] = rec["api_notes"]

    kw0 = OUR_KW.get(spec["method"], {})

    def fit(x: np.ndarray, **kw: Any) -> Any:
        kw = {**kw0, **kw}
        return fit_codebook(x, N_CODES, codec=codec, levels=levels, seed=SEED, device="cpu", **kw)

    def encode(cb: Any, x: np.ndarray, beam: int) -> Any:
        return cb.encode(x) if beam == 1 else cb.encode(x, beam=beam)

    beams = spec["beams"] if codec == "residual" else [1]
    warm = fit(train[:WARM_ROWS], n_iter=1)
    encode(warm, new[:WARM_ROWS], 1)
    cb, rec["train_s"] = harness.timed(lambda: fit(train))
    for name in ("codec", "levels", "n_codes", "dim"):
        rec.setdefault("codebook", {})[name] = _jsonable(getattr(cb, name, "<missing>"))
    expect = {"codec": codec, "levels": levels, "n_codes": N_CODES, "dim": train.shape[1]}
    for name, want in expect.items():
        if rec["codebook"][name] != want:
            notes.append(f"cb.{name}={rec['codebook'][name]!r}, expected {want!r}")
    rec["stats"] = json.loads(json.dumps(getattr(cb, "stats", None), default=_jsonable))
    rec["settings"] = json.loads(json.dumps(getattr(cb, "settings", None), default=_jsonable))
    for beam in beams:
        variant: dict[str, Any] = {"variant": "greedy" if beam == 1 else f"beam={beam}", "beam": beam}
        rec["variants"].append(variant)
        try:
            encode(cb, new[:WARM_ROWS], beam)
            codes, variant["encode_s"] = harness.timed(lambda: encode(cb, new, beam))
            codes = _check_codes(codes, new.shape[0], levels, notes)
            xr, variant["decode_s"] = harness.timed(lambda: cb.decode(codes))
            if not isinstance(xr, np.ndarray):
                notes.append(f"decode returned {type(xr).__module__}.{type(xr).__name__}, expected numpy.ndarray")
                xr = xr.numpy() if hasattr(xr, "numpy") else np.asarray(xr)
            variant["new_mse"] = _mse(new, xr)
            train_codes = _check_codes(encode(cb, train, beam), train.shape[0], levels, [])
            variant["train_mse"] = _mse(train, np.asarray(cb.decode(train_codes)))
        except Exception as e:  # one variant's failure (say, no beam= keyword) must not hide the others
            variant["error"] = f"{type(e).__name__}: {e}"
            print(traceback.format_exc(), file=sys.stderr, flush=True)


def _faiss(spec: dict[str, Any], train: np.ndarray, new: np.ndarray, rec: dict[str, Any]) -> None:
    import faiss

    harness.limit_threads(spec["threads"])
    _, codec, levels, beam = METHODS[spec["method"]]
    d = train.shape[1]

    def make() -> Any:
        if codec == "product":
            return faiss.ProductQuantizer(d, levels, 8)
        q = faiss.ResidualQuantizer(d, levels, 8)
        if beam is not None:
            q.max_beam_size = beam  # train and encode alike
        return q

    def fit(x: np.ndarray) -> Any:
        q = make()
        q.train(x)
        return q

    warm = fit(train[:WARM_ROWS])
    warm.compute_codes(new[:WARM_ROWS])
    q, rec["train_s"] = harness.timed(lambda: fit(train))
    settings = {"niter": q.cp.niter, "seed": q.cp.seed, "max_points_per_centroid": q.cp.max_points_per_centroid}
    if codec == "residual":
        settings.update(max_beam_size=q.max_beam_size, train_type=q.train_type, use_beam_lut=q.use_beam_LUT)
    rec["settings"] = settings
    variant: dict[str, Any] = {"variant": "default" if beam is None else f"max_beam_size={beam}", "beam": beam}
    rec["variants"].append(variant)
    q.compute_codes(new[:WARM_ROWS])
    codes, variant["encode_s"] = harness.timed(lambda: q.compute_codes(new))
    xr, variant["decode_s"] = harness.timed(lambda: q.decode(codes))
    variant["new_mse"] = _mse(new, xr)
    variant["train_mse"] = _mse(train, q.decode(q.compute_codes(train)))


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One method in this (fresh) process; imports only the measured library."""
    pressure = harness.Pressure()
    folder = Path(spec["dir"])
    train, new = np.load(folder / "train.npy"), np.load(folder / "new.npy")
    rec: dict[str, Any] = {"method": spec["method"], "variants": [], "api_notes": []}
    try:
        (_ours if METHODS[spec["method"]][0] == "ours" else _faiss)(spec, train, new, rec)
    except Exception as e:  # recorded in the row, the harness goes on
        rec["error"] = f"{type(e).__name__}: {e}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    rec["peak_rss_mib"] = harness.status_mib("VmHWM")
    rec["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["cpu_stall"] = pressure.stall()
    rec["load1"] = os.getloadavg()[0]
    rec["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return rec


# ----------------------------------------------------------------------------- the parent


def data_stats(x: np.ndarray) -> dict[str, float]:
    x64 = x.astype(np.float64)
    return {
        "rows": int(x.shape[0]),
        "mean_sq_norm": float(np.square(x64).sum(1).mean()),
        "mean_sq_dist_to_mean": float(np.square(x64 - x64.mean(0)).sum(1).mean()),
    }


# A table row: (label, method, variant name, code bits, paired FAISS (method, variant) or None)
def plan_rows(methods: list[str], beams: list[int]) -> list[tuple[str, str, str, int, tuple[str, str] | None]]:
    rows: list[tuple[str, str, str, int, tuple[str, str] | None]] = []
    residual = (
        ("ours residual 4×8", "ours-rq4"),
        ("ours residual 4×8, train_beam=5", "ours-rq4-tb5"),
        ("ours residual 4×8, train_beam=5, tol=1e-4", "ours-rq4-tb5-tol4"),
        ("ours residual 4×8, init=k-means++", "ours-rq4-kpp"),
    )
    for label, method in residual:
        for b in beams:
            v = "greedy" if b == 1 else f"beam={b}"
            pair = ("faiss-rq4-beam1", "max_beam_size=1") if b == 1 else ("faiss-rq4", "default")
            rows.append((f"{label}, {v}", method, v, 32, pair))
    rows += [
        ("FAISS RQ 4×8, default (beam 5)", "faiss-rq4", "default", 32, None),
        ("FAISS RQ 4×8, max_beam_size=1", "faiss-rq4-beam1", "max_beam_size=1", 32, None),
        ("ours product 16×8", "ours-pq16", "greedy", 128, ("faiss-pq16", "default")),
        ("FAISS PQ 16×8", "faiss-pq16", "default", 128, None),
        ("ours product 4×8", "ours-pq4", "greedy", 32, ("faiss-pq4", "default")),
        ("FAISS PQ 4×8", "faiss-pq4", "default", 32, None),
    ]
    return [r for r in rows if r[1] in methods]


def summarize(
    runs: dict[str, list[dict[str, Any]]], methods: list[str], beams: list[int], n_new: int
) -> list[dict[str, Any]]:
    """One record per table row: medians over the repeats, errors, and ratios to the paired FAISS row."""

    def med(vals: list[Any]) -> float | None:
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    out: dict[tuple[str, str], dict[str, Any]] = {}
    rows = []
    for label, method, vname, bits, pair in plan_rows(methods, beams):
        recs = runs.get(method, [])
        vs = [v for r in recs for v in r.get("variants", []) if v["variant"] == vname and "error" not in v]
        ok = [r for r in recs if "error" not in r]
        errors = sorted({r["error"] for r in recs if "error" in r})
        errors += sorted(
            {v["error"] for r in recs for v in r.get("variants", []) if v["variant"] == vname and "error" in v}
        )
        row = {
            "label": label,
            "method": method,
            "variant": vname,
            "code_bits": bits,
            "paired_with": pair,
            "repeats_ok": len(vs),
            "train_s": med([r.get("train_s") for r in ok]) if vs else None,
            "encode_s": med([v["encode_s"] for v in vs]),
            "decode_s": med([v["decode_s"] for v in vs]),
            "new_mse": med([v["new_mse"] for v in vs]),
            "train_mse": med([v["train_mse"] for v in vs]),
            "new_mse_spread": (max(v["new_mse"] for v in vs) - min(v["new_mse"] for v in vs)) if vs else None,
            "peak_rss_mib": med([r.get("peak_rss_mib") for r in recs]),
            "cpu_stall": med([r.get("cpu_stall") for r in recs]),
            "load1": med([r.get("load1") for r in recs]),
            "errors": errors,
            "api_notes": sorted({n for r in recs for n in r.get("api_notes", [])}),
        }
        row["encode_rows_per_s"] = None if row["encode_s"] is None or not n_new else n_new / row["encode_s"]
        out[(method, vname)] = row
        rows.append(row)
    for row in rows:
        peer = out.get(tuple(row["paired_with"])) if row["paired_with"] else None
        for key, name in (("train_s", "train_time"), ("encode_s", "encode_time"), ("new_mse", "new_mse")):
            ok = peer is not None and row[key] is not None and peer[key]
            row[f"ratio_{name}"] = row[key] / peer[key] if ok else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | code bits | train s | encode rows/s | new-row MSE | train-row MSE | ours/FAISS train time "
        "| ours/FAISS encode time | ours/FAISS new-row MSE | peak RSS MiB | CPU stall | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = [
            harness.fmt(r[f"ratio_{k}"], ".2f") if r["paired_with"] else "—" for k in ("train_time", "encode_time")
        ]
        mse_ratio = harness.fmt(r["ratio_new_mse"], ".3f") if r["paired_with"] else "—"
        label = r["label"] + (" (failed)" if r["repeats_ok"] == 0 else "")
        lines.append(
            f"| {label} | {r['code_bits']} | {harness.fmt(r['train_s'], '.3g')} | {harness.fmt(r['encode_rows_per_s'], '.3g')} "
            f"| {harness.fmt(r['new_mse'])} | {harness.fmt(r['train_mse'])} | {ratios[0]} | {ratios[1]} | {mse_ratio} "
            f"| {harness.fmt(r['peak_rss_mib'], '.0f')} | {harness.fmt(r['cpu_stall'], '.2f')} | {harness.fmt(r['load1'], '.1f')} |"
        )
    notes = [f"{r['label']}: {e}" for r in rows for e in r["errors"]]
    notes += [f"{r['label']}: API: {n}" for r in rows for n in r["api_notes"]]
    if notes:
        lines += ["", "Errors and API notes (details in the log):", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=f"a {QUICK_ROWS}-row subset and 1 repeat: a smoke check")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick: 1)")
    # up to FAISS's default width (5): which of them reaches FAISS's default error at no more encode time
    ap.add_argument("--beams", default="1,2,3,5", help="our residual encode widths, one row each (1 = greedy)")
    ap.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all but ours-rq4-kpp)",
    )
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/codecs-<time>.json")
    args = ap.parse_args()
    if args.worker:
        return harness.serve(worker, args.worker)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods={args.methods!r}: unknown {unknown}; expected a subset of {','.join(METHODS)}")
    try:
        beams = sorted({int(b) for b in args.beams.split(",") if b})
    except ValueError:
        ap.error(f"--beams={args.beams!r}: expected comma-separated positive integers, e.g. 1,5,8")
    if not beams or beams[0] < 1:
        ap.error(f"--beams={args.beams!r}: expected comma-separated positive integers, e.g. 1,5,8")
    methods = harness.installed(methods, {m: ["faiss"] for m in METHODS if METHODS[m][0] == "faiss"})
    repeats = args.repeats or (1 if args.quick else 3)
    x = harness.wordllama()
    train, new = harness.split(x, n_rows=QUICK_ROWS if args.quick else None)
    started = harness.now()
    out = args.json or harness.results_path("codecs", args.quick, started)
    log_path = harness.log_path(out)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    machine = harness.machine_info(("vq-pipeline", "torch", "faiss-cpu", "numpy"))
    res: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "repeats": repeats,
        "beams": beams,
        "methods": methods,
        "data": {
            "source": "wordllama l2_supercat_256 token embeddings",
            "split_seed": harness.SPLIT_SEED,
            "all": data_stats(x),
            "train": data_stats(train),
            "new": data_stats(new),
        },
    }
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vq-codecs-"))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    try:
        np.save(tmp / "train.npy", train)
        np.save(tmp / "new.npy", new)
        with open(log_path, "w") as log_file:
            for r, m in harness.interleave(methods, repeats):
                spec = {"method": m, "dir": str(tmp), "beams": beams}
                print(f"--- r{r} {m}", file=log_file, flush=True)
                rec = harness.run_worker(__file__, spec, threads=THREADS, log=log_file)
                rec.setdefault("method", m)
                rec.setdefault("variants", [])
                rec["repeat"] = r
                runs[m].append(rec)
                vs = ", ".join(
                    f"{v['variant']}: enc {harness.fmt(v.get('encode_s'), '.3g')} s mse {harness.fmt(v.get('new_mse'))}"
                    + (f" ERROR {v['error']}" if "error" in v else "")
                    for v in rec.get("variants", [])
                )
                print(
                    f"r{r} {m:16s} train {harness.fmt(rec.get('train_s'), '.3g')} s; {vs}"
                    + (f"  ERROR {rec['error']}" if "error" in rec else ""),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t_start
    res["rows"] = summarize(runs, methods, beams, int(new.shape[0]))
    res["runs"] = runs
    v, dt = machine["versions"], res["data"]
    md = (
        f"## Multi-level codes vs FAISS on wordllama token embeddings ({THREADS} threads each, fresh processes)\n\n"
        f"{started:%Y-%m-%d %H:%M} UTC, {machine['cpu']}, nproc {machine['nproc']}, load at start "
        f"{machine['load_at_start']:.1f}; commit `{machine['commit']}`"
        f"{' (vq_pipeline/ modified since)' if machine['vq_pipeline_modified_since_commit'] else ''}; "
        f"{res['seconds']:.0f} s. Command: `{res['command']}`. vq-pipeline {v['vq-pipeline']}, torch {v['torch']}, "
        f"faiss-cpu {v['faiss-cpu']}, numpy {v['numpy']}, Python {machine['python']}.\n\n"
        f"Data: {dt['train']['rows']} train / {dt['new']['rows']} new rows × {x.shape[1]} (split seed "
        f"{harness.SPLIT_SEED}); mean squared norm {dt['new']['mean_sq_norm']:.4g} (new rows), "
        f"{dt['train']['mean_sq_norm']:.4g} (train); mean squared distance to the mean "
        f"{dt['new']['mean_sq_dist_to_mean']:.4g} (new), {dt['train']['mean_sq_dist_to_mean']:.4g} (train). "
        f"K = {N_CODES} per level, {repeats} interleaved repeat(s), medians. Ratios: greedy against FAISS "
        f"`max_beam_size=1`, beams against FAISS's default (beam 5), product against the PQ of equal size.\n\n"
        + table(res["rows"])
    )
    harness.write_results(out, res, md)
    print(md)
    print(f"\nJSON: {out} (tables: {out.with_suffix('.md')}); workers' output: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
