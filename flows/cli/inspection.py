"""``vq inspect``: describe a codebook file (:func:`describe`, also used by the tests of hostile files).

Loads only the codebook file module (no torch, no polars); numpy for the counts.
"""

import argparse
from typing import TYPE_CHECKING, Any

from vq_flows.cli.progress import Console, dumps

from vq_pipeline.jobs.display import safe_text

if TYPE_CHECKING:
    from vq_pipeline.codebook import Codebook
    from vq_pipeline.io.codebook_file import CodebookInfo

#: Sources listed by ``vq inspect`` before eliding the rest (a hive table can have thousands).
MAX_SOURCES_SHOWN = 5


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    """``vq inspect``: describe a codebook file, validated as ``Codebook.load`` does, without loading torch."""
    from vq_pipeline.io.codebook_file import load_info

    plot = getattr(args, "plot", None)  # a Namespace built by a caller may lack the option
    if plot is not None:
        from vq_pipeline.jobs.plots import check_picture_path, plot_codebook

        check_picture_path("--plot", plot, [args.codebook])  # before reading: the message names the flag
    codebook = load_info(args.codebook)
    if plot is not None:
        plot = str(plot_codebook(codebook, plot))  # drawn before anything is printed: an error leaves stdout empty
    if args.json:
        summary = codebook.summary() if plot is None else {**codebook.summary(), "plot": plot}
        console.result(dumps(summary))  # JSON escapes every control character
    else:
        console.result(describe(codebook, title=args.codebook))
        if plot is not None:
            console.result(f"picture -> {safe_text(plot)}")
        if codebook.codec == "residual":  # a note on stderr: stdout stays the description
            console.progress(beam_hint(codebook.settings))
    return 0


def describe(codebook: "Codebook | CodebookInfo", *, title: str = "codebook") -> str:
    """A multi-line, human-readable description of a codebook.

    Uses ``.get`` throughout: codebooks fitted in memory or by older releases lack some stats.
    Reads the counts through numpy, so it needs nothing of torch but the ``counts`` it is given.
    Every string taken from the codebook (or the title, a file name) goes through ``safe_text``
    and every number through ``show``, so a hostile file can neither drive the terminal, nor forge
    a line of the report, nor make it fail: each line is the title or starts with a label.
    """
    import numpy as np

    s = codebook.stats if isinstance(codebook.stats, dict) else {}
    counts = np.asarray(codebook.counts, dtype=np.int64)  # (n_codes,)
    multilevel = codebook.codec != "flat"
    per_dimension = codebook.codec in ("scalar", "binary")
    rows = _identity_rows(codebook) + _training_rows(s)
    rows.append(("empty codes", str(int((counts == 0).sum()))))
    if per_dimension:
        rows.extend(_quantizer_rows(codebook.codec, s))
    elif multilevel:
        rows.extend(_multilevel_rows(s, codebook.n_codes))
    rows.extend(scorecard_rows(s.get("scorecard"), codebook.n_codes))
    median = f"{float(np.median(counts)):,.1f}".removesuffix(".0")  # x.5 only for an even n_codes
    rows.append(
        (
            "cluster sizes",
            f"min {int(counts.min()):,}, median {median}, max {int(counts.max()):,} (total {int(counts.sum()):,}"
            + (f" over {codebook.levels} {'dimensions' if per_dimension else 'levels'})" if multilevel else ")"),
        )
    )
    rows.extend(_provenance_rows(codebook))
    width = max(len(name) for name, _ in rows) + 2
    lines = [safe_text(str(title))]
    for name, value in rows:
        first, *rest = value.split("\n")  # the sources (one per line) and the per-level table
        lines.append(f"  {name:<{width}}{first}")
        lines.extend(f"  {'':<{width}}{more}" for more in rest)
    return "\n".join(lines)


def _identity_rows(codebook: "Codebook | CodebookInfo") -> list[tuple[str, str]]:
    """``describe``'s first rows: fingerprint, metric, codec (multi-level), codes and the fit's settings."""
    from vq_pipeline.jobs.display import show

    fit = codebook.settings
    if isinstance(fit, dict):
        fit_text = " ".join(f"{show(k)}={show(v)}" for k, v in fit.items() if k not in ("n_codes", "metric"))
    else:
        fit_text = show(fit)
    rows: list[tuple[str, str]] = [
        ("fingerprint", codebook.fingerprint),
        ("metric", show(codebook.metric)),
        ("codes", f"{codebook.n_codes:,} x dim {codebook.dim}"),
        ("fit", fit_text or "unknown"),
    ]
    if codebook.codec in ("scalar", "binary"):
        bits = int(codebook.n_codes).bit_length() - 1  # n_codes is 2**bits
        width = -(-codebook.dim * bits // 8)
        how = f", range {show(fit.get('scalar_range', 'minmax'))}" if isinstance(fit, dict) else ""
        rows[2] = ("codes", f"{codebook.n_codes:,} values per dimension x dim {codebook.dim}, {width:,} bytes per row")
        rows.insert(
            2,
            (
                "codec",
                f"{show(codebook.codec)}, {bits} bit{'s' if bits > 1 else ''} per dimension"
                + (how if codebook.codec == "scalar" else ""),
            ),
        )
    elif codebook.codec != "flat":
        rows[2] = ("codes", f"{codebook.n_codes:,} per level x {codebook.levels} levels, dim {codebook.dim}")
        rows.insert(2, ("codec", f"{show(codebook.codec)}, {codebook.levels} levels"))
    rotation = _rotation_text(codebook) if codebook.codec != "flat" else "none"
    if rotation != "none":  # files without one describe themselves as before
        rows.insert(3, ("rotation", rotation))
    return rows


def _rotation_text(codebook: "Codebook | CodebookInfo") -> str:
    """The rotation rows go through before they are coded: its kind (from the fit settings) and iterations."""
    from vq_pipeline.jobs.display import show

    fit = codebook.settings if isinstance(codebook.settings, dict) else {}
    kind = fit.get("rotation", "none")
    held = getattr(codebook, "rotation", None) is not None
    if kind in (None, "none") and not held:
        return "none"
    text = show(kind) if kind not in (None, "none") else "yes"
    if kind in ("opq", "itq"):
        text += f" ({show(fit.get('rotation_iters', 20))} iterations)"
    return text + f", {codebook.dim} x {codebook.dim} orthogonal matrix"


def _quantizer_rows(codec: str, stats: dict[str, Any]) -> list[tuple[str, str]]:
    """``describe``'s rows for a scalar or binary codebook: the reconstruction error, the error per dimension
    (least, median, largest), and the training values outside the scalar range or the bits' balance."""
    from vq_pipeline.jobs.display import is_number, show

    rows = [("error (mse)", show(stats.get("mse", "unknown"), ".6g"))]
    per_dim = stats.get("level_mse")
    if isinstance(per_dim, list) and per_dim and all(is_number(v) for v in per_dim):
        ordered = sorted(float(v) for v in per_dim)
        rows.append(
            (
                "error per dim",
                f"min {ordered[0]:.4g}, median {ordered[len(ordered) // 2]:.4g}, max {ordered[-1]:.4g}",
            )
        )
    if codec == "scalar":
        clipped = stats.get("clipped")
        text = f"{clipped:.3%} of training values outside the range" if is_number(clipped) else "unknown"
        rows.append(("clipped", text))
    else:
        rows.append(("bit balance", _balance_text(stats.get("bit_balance"))))
    return rows


def _balance_text(balance: Any) -> str:
    """The bits' balance (share of ones): one number, or per dimension (mean, least, largest)."""
    from vq_pipeline.jobs.display import is_number

    if is_number(balance):
        return f"{balance:.3f} share of ones"
    if isinstance(balance, list) and balance and all(is_number(v) for v in balance):
        values = [float(v) for v in balance]
        return (
            f"share of ones per dimension: mean {sum(values) / len(values):.3f}, min {min(values):.3f}, "
            f"max {max(values):.3f}"
        )
    return "unknown"


def _training_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """``describe``'s rows of the training stats ``s``: rows used, inertia, the held-out rows' error (a fit
    with a holdout), iterations, repairs."""
    from vq_pipeline.jobs.display import is_number, show

    rows: list[tuple[str, str]] = []
    n_rows = s.get("n_rows")
    if n_rows is not None:
        how = s.get("mode")
        total = s.get("rows_total")
        if how == "sample" and total is not None:
            detail = f" (seeded sample of {show(total, ',')}, seed {show(s.get('sample_seed'))})"
        elif how:
            detail = f" ({show(how)})"
        else:
            detail = ""
        rows.append(("training rows", f"{show(n_rows, ',')}{detail}"))
    inertia = s.get("inertia")
    if inertia is not None:
        try:
            mean = f" (mean {inertia / n_rows:.4g} per row)" if is_number(inertia) and is_number(n_rows) else ""
        except (ArithmeticError, ValueError):  # no rows, or numbers too large for a float
            mean = ""
        rows.append(("inertia", f"{show(inertia, '.6g')}{mean}"))
    holdout = s.get("holdout")
    if holdout is not None:
        h = holdout if isinstance(holdout, dict) else {}
        rows.append(
            (
                "held-out error",
                f"mean {show(h.get('mean_distance', 'unknown'), '.4g')} per row over {show(h.get('rows', '?'), ',')} "
                f"held-out rows (holdout {show(h.get('fraction', '?'), '.3g')}, seed {show(h.get('seed', '?'))})",
            )
        )
    if "iterations" in s:
        converged = "converged" if s.get("converged") is True else "not converged"
        rows.append(("iterations", f"{show(s['iterations'])}, {converged}"))
    rows.append(("repairs", show(s.get("n_repairs", "unknown"))))
    return rows


#: Levels listed one by one in a scorecard's lines (a scalar or binary codebook has one per dimension).
MAX_LEVELS_SHOWN = 8


def scorecard_rows(card: Any, n_codes: int) -> list[tuple[str, str]]:
    """The rows of a scorecard (a codebook's ``stats["scorecard"]``, or a run report's): the sample, error,
    recall@k, prefix coherence, collision rate; effective size per level; error and recall by levels
    ``0..l`` (residual); churn against the published codebook. None for a codebook without one (older files)."""
    from vq_pipeline.jobs.display import show

    if card is None:
        return []
    c = card if isinstance(card, dict) else {}
    which = {"holdout": "held-out", "training": "training"}.get(c.get("sample"), "sample")
    k = show(c.get("k", "?"))
    rows = [
        (
            "scorecard",
            f"{show(c.get('n_rows', '?'), ',')} {which} rows: error {show(c.get('error', 'unknown'), '.4g')}, "
            f"recall@{k} {show(c.get('recall_at_k', 'unknown'), '.4f')}"
            + (f", prefix coherence {show(c['prefix_coherence'], '.4f')}" if "prefix_coherence" in c else "")
            + f", collision rate {show(c.get('collision_rate', 'unknown'), '.4g')}",
        )
    ]
    sizes = c.get("effective_size")
    if isinstance(sizes, list):
        shown = " / ".join(show(v, ",.1f") for v in sizes[:MAX_LEVELS_SHOWN]) + (
            " / ..." if len(sizes) > MAX_LEVELS_SHOWN else ""
        )
        per = "per level " if len(sizes) > 1 else ""
        tuples = f", tuples {show(c.get('effective_size_tuples', '?'), ',.1f')}" if len(sizes) > 1 else ""
        rows.append(("effective size", f"{per}{shown} of {n_codes:,} codes{tuples}"))
    errors, recalls = c.get("error_by_levels"), c.get("recall_by_levels")
    if isinstance(errors, list) and isinstance(recalls, list):
        rows.append(
            (
                "by levels 0..l",
                f"error {' / '.join(show(v, '.4g') for v in errors[:MAX_LEVELS_SHOWN])}, "
                f"recall@{k} {' / '.join(show(v, '.4f') for v in recalls[:MAX_LEVELS_SHOWN])}",
            )
        )
    if "churn" in c:
        per_level = c.get("churn_per_level")
        detail = (
            f" (per level {' / '.join(show(v, '.4f') for v in per_level)})"
            if isinstance(per_level, list) and 1 < len(per_level) <= MAX_LEVELS_SHOWN
            else ""
        )
        rows.append(
            ("churn", f"{show(c['churn'], '.4f')} of the rows change codes against the published codebook{detail}")
        )
    return rows


def _provenance_rows(codebook: "Codebook | CodebookInfo") -> list[tuple[str, str]]:
    """``describe``'s last rows: sources (the first MAX_SOURCES_SHOWN), column, fingerprints, versions, times."""
    from vq_pipeline.jobs.display import show

    sources = [show(source) for source in codebook.sources]
    shown = sources[:MAX_SOURCES_SHOWN] + (
        [f"... and {len(sources) - MAX_SOURCES_SHOWN:,} more"] if len(sources) > MAX_SOURCES_SHOWN else []
    )
    versions = codebook.versions
    versions_text = (
        ", ".join(f"{show(k)} {show(v)}" for k, v in versions.items()) if isinstance(versions, dict) else show(versions)
    )
    rows = [
        ("sources", "\n".join(shown) if shown else "(in memory)"),
        ("column", show(codebook.column) or "(in memory)"),
        ("data fingerprint", show(codebook.data_fingerprint) or "unknown"),
        ("parent", show(codebook.parent_fingerprint) or "none"),
        ("versions", versions_text or "unknown"),
        ("created_at", show(codebook.created_at) or "unknown"),
    ]
    timings = codebook.timings if isinstance(codebook.timings, dict) else {}
    if "fit_seconds" in timings:
        rows.append(("fit time", f"{show(timings['fit_seconds'], '.2f')} s"))
    return rows


def _multilevel_rows(stats: dict[str, Any], n_codes: int) -> list[tuple[str, str]]:
    """``describe``'s rows for a residual or product codebook: the reconstruction error, the semantic ids'
    collisions, and one line per level (its error, used codes, iterations, convergence)."""
    from vq_pipeline.jobs.display import show

    rows = [("error (mse)", show(stats.get("mse", "unknown"), ".6g"))]
    if "collision_rate" in stats:
        rows.append(
            (
                "semantic ids",
                f"{show(stats.get('n_unique'), ',')} unique tuples, collision rate "
                f"{show(stats.get('collision_rate'), '.4g')}, largest group {show(stats.get('largest_group'), ',')}, "
                f"max suffix {show(stats.get('max_suffix'), ',')}",
            )
        )
    per_level = stats.get("levels")
    if not isinstance(per_level, list) or not per_level:
        return [*rows, ("per level", "unknown")]
    table = [("level", "error (mse)", "used codes", "iterations", "converged")]
    for i, level in enumerate(per_level):
        level = level if isinstance(level, dict) else {}
        converged = level.get("converged")
        table.append(
            (
                str(i),
                show(level.get("mse", "unknown"), ".6g"),
                f"{show(level.get('used_codes', '?'), ',')}/{n_codes:,}",
                show(level.get("iterations", "unknown")),
                "yes" if converged is True else "no" if converged is False else "unknown",
            )
        )
    widths = [max(len(cells[c]) for cells in table) for c in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip() for cells in table]
    return [*rows, ("per level", "\n".join(lines))]


#: How residual codes reach FAISS-default quality, from ``benchmarks/codecs.py`` (docs/benchmarks.md).
FAISS_QUALITY = (
    "FAISS-default quality: --beam 2 on a codebook fitted with --train-beam 5 --tol 1e-4 (wordllama, 4 levels x "
    "8 bits: beam=2 gives error 158.7 on new rows, FAISS's ResidualQuantizer at its defaults 159.6, greedy 163.8; "
    "fitted with --train-beam 5 at the default tol, --beam 5 gives 159.4; docs/benchmarks.md)"
)


def beam_hint(fit_settings: object) -> str:
    """The note ``vq inspect`` writes on stderr for a residual codebook (``fit_settings``: its fit's settings):
    codes are encoded greedily by default, and how to get FAISS-default quality."""
    from vq_pipeline.jobs.display import show

    train_beam = fit_settings.get("train_beam", 1) if isinstance(fit_settings, dict) else 1
    if isinstance(train_beam, int) and not isinstance(train_beam, bool) and train_beam > 1:
        return (
            f"residual codes are encoded greedily by default (--beam 1); this codebook was fitted with "
            f"train_beam={show(train_beam)}: encode with --beam 2 or wider. {FAISS_QUALITY}"
        )
    return f"residual codes are encoded greedily by default (--beam 1). {FAISS_QUALITY}"
