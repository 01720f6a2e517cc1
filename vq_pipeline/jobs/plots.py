"""Pictures as PNG files: a codebook's cluster sizes and objective, a scheduled pipeline's drift per run.

Optional: needs matplotlib (``pip install 'vq-pipeline[plot]'``), imported on first use and drawn on
the Agg canvas (no display, no pyplot state), so that importing this module costs nothing. A picture
is written like every other output (:func:`vq_pipeline.io.fileio.atomic_write`): a temporary file,
then a rename, so a failed drawing leaves no partial PNG; and its path obeys the library's output
rule (:func:`vq_pipeline.io.paths.check_output_file`): never an input, never a file vq did not write.

Whatever is read from a codebook or a report file is shown as data, never interpreted: numbers are
used only when they are numbers, text goes through :func:`vq_pipeline.jobs.display.safe_text` and is not
parsed as matplotlib math.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vq_pipeline.errors import ConfigurationError, InvalidInputError
from vq_pipeline.io.fileio import atomic_write
from vq_pipeline.io.paths import check_output_file, is_local
from vq_pipeline.jobs.display import is_number, safe_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vq_pipeline.codebook import Codebook
    from vq_pipeline.io.codebook_file import CodebookInfo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Above this many codes the cluster sizes are drawn as a line, not one bar per code.
MAX_BARS = 256
#: At most this many levels of a multi-level codebook are drawn, each a line (the first ones; the
#: panels say how many there are): what drawing costs does not grow with a file's level count.
MAX_PLOTTED_LEVELS = 16
#: At most this many points per line (cluster sizes by rank, objective per iteration): longer
#: series are drawn through evenly spread points, their first and last included.
MAX_POINTS = 2048
#: At most this many run labels on the drift chart's time axis.
MAX_RUN_LABELS = 12
#: A report summary file larger than this is not a summary (they are a few kB).
MAX_REPORT_BYTES = 16 * 2**20
_REFIT, _FIT, _UNCHANGED = "tab:red", "tab:gray", "tab:orange"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A run's refit limit: a dashed line, with a tick at each run so that a limit of one run shows too.
_LIMIT: dict[str, Any] = {"linestyle": "--", "color": "black", "marker": "_", "markersize": 16}


def _figure(**kwargs: Any) -> Figure:
    """A new matplotlib Figure on the Agg canvas, or a clear error when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigurationError(
            f"matplotlib is not importable ({exc}); expected it for pictures (plot_codebook, plot_drift, "
            f"vq inspect --plot). Fix: pip install 'vq-pipeline[plot]'."
        ) from None
    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def is_png_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts with the PNG signature (a picture vq may replace)."""
    if not os.path.isfile(path):  # checked first: opening a FIFO would wait for a writer
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False


def check_picture_path(name: str, path: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> Path:
    """Refuse, before any drawing, a picture path that is not a local ``.png`` file name, is one of
    ``inputs`` or lies inside an input folder, or is an existing file that is not a PNG; return it resolved."""
    raw = os.fspath(path)
    if not is_local(raw):
        raise InvalidInputError(
            f"{name}={raw!r} is a URI; expected a local file for the picture. Fix: pass a local path such as "
            f"'picture.png' and copy it where it belongs."
        )
    if Path(raw).suffix.lower() != ".png":
        fixed = Path(raw).with_suffix(".png").name if Path(raw).name else "picture.png"
        raise InvalidInputError(
            f"{name}={raw!r} does not end with .png; expected a .png file (pictures are written as PNG). "
            f"Fix: pass {name} {fixed}."
        )
    return check_output_file(name, raw, inputs, ours=is_png_file, what="PNG picture", suffix=".png")


def _save(fig: Figure, target: Path) -> Path:
    """Render ``fig`` as PNG into ``target`` atomically (nothing under that name unless complete)."""
    atomic_write(target, lambda f: fig.savefig(f, format="png", dpi=100))
    return target


def _text(ax: Axes, x: float, y: float, text: str, **kwargs: Any) -> None:
    """Text taken (partly) from a file: escaped, and never parsed as matplotlib math (``$...$``)."""
    ax.text(x, y, safe_text(text), parse_math=False, **kwargs)


# ----------------------------------------------------------------------------- the codebook


def plot_codebook(codebook: Codebook | CodebookInfo | str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Draw ``codebook`` into the PNG file ``path``: its cluster sizes and its objective per iteration.

    Args:
        codebook: a Codebook, a CodebookInfo, or the path of a codebook file (read with numpy only,
            as ``vq inspect`` reads it; the file is then an input that ``path`` may not replace).
        path: the ``.png`` file to write (atomically).

    Left, the training rows per code, largest first (one bar per code up to :data:`MAX_BARS` codes,
    a line above; one line per level for a residual or product codebook), with the largest code, the
    mean and the empty codes marked. Right (multi-level: one line per level), the objective
    before each Lloyd update from ``stats["history"]`` (what :mod:`vq_pipeline.fitting.kmeans` records: the
    best restart's iterations; each restart's final objective from ``stats["restart_inertias"]`` is
    marked beside it), with the iterations that repaired empty codes marked. A codebook without a
    history (an older release) says so in the panel instead. The title gives the fingerprint,
    n_codes, dim and metric. Only the first :data:`MAX_PLOTTED_LEVELS` levels are drawn (the panels say
    so), each line through at most :data:`MAX_POINTS` points: see :func:`codebook_figure`.

    Returns:
        The resolved path written.

    Raises:
        InvalidInputError: ``path`` is not a ``.png`` name, is the codebook file, or is an existing
            file that is not a PNG. CodebookFileError: ``codebook`` is a path that is not a valid codebook.
        ConfigurationError: matplotlib is not installed.
    """
    inputs = [codebook] if isinstance(codebook, str | os.PathLike) else []
    target = check_picture_path("path", path, inputs)  # before reading or drawing anything
    if isinstance(codebook, str | os.PathLike):
        from vq_pipeline.io.codebook_file import load_info

        codebook = load_info(codebook)
    return _save(codebook_figure(codebook), target)


def codebook_figure(codebook: Codebook | CodebookInfo) -> Figure:
    """The matplotlib Figure that :func:`plot_codebook` saves (Agg canvas, not shown anywhere).

    What drawing it costs is bounded whatever the codebook: at most :data:`MAX_PLOTTED_LEVELS` levels
    are drawn, each line through at most :data:`MAX_POINTS` points; the rest is a sort of each drawn
    level's counts and sums over the counts.
    """
    stats = codebook.stats if isinstance(codebook.stats, dict) else {}
    counts = np.asarray(codebook.counts, dtype=np.int64)  # (n_codes,) or (levels, n_codes)
    fig = _figure(figsize=(12, 4.8))
    sizes_ax, objective_ax = fig.subplots(1, 2)
    _cluster_sizes(sizes_ax, counts)
    codec = getattr(codebook, "codec", "flat")
    if codec == "flat":
        _objective(objective_ax, stats)
    else:
        _level_objectives(objective_ax, stats)
    rows = stats.get("n_rows")
    trained = f", trained on {rows:,} rows" if isinstance(rows, int) and not isinstance(rows, bool) else ""
    codes = f"{codebook.n_codes:,} codes"
    if codec != "flat":
        codes = f"{safe_text(str(codec))}, {codebook.levels} levels x {codes}"
    fig.suptitle(
        safe_text(
            f"codebook {codebook.fingerprint[:12]}: {codes}, dim {codebook.dim}, metric {codebook.metric}{trained}"
        ),
        parse_math=False,
    )
    return fig


def _thin(n: int) -> np.ndarray:
    """(at most MAX_POINTS,) int64: indices of evenly spread points of ``n``, the first and last included."""
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_POINTS).round().astype(np.int64))


def _shown_levels(n_levels: int) -> str:
    """What a panel's title adds when it draws only the first MAX_PLOTTED_LEVELS levels."""
    return f"; levels 0-{MAX_PLOTTED_LEVELS - 1} of {n_levels:,} drawn" if n_levels > MAX_PLOTTED_LEVELS else ""


def _level_objectives(ax: Axes, stats: dict[str, Any]) -> None:
    """A multi-level codebook's objective per Lloyd iteration, one line per level (each level is its own
    K-means: residual levels fit what the levels before them left, product levels their own slice);
    the first MAX_PLOTTED_LEVELS levels, MAX_POINTS iterations each at most."""
    from matplotlib.ticker import MaxNLocator

    raw = stats.get("levels")
    per_level = [level if isinstance(level, dict) else {} for level in raw] if isinstance(raw, list) else []
    n_levels, per_level = len(per_level), per_level[:MAX_PLOTTED_LEVELS]
    ax.set_xlabel("Lloyd iteration (of each level)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("objective (sum of distances)")
    drawn, lowest, highest = 0, math.inf, 0.0
    for i, level in enumerate(per_level):
        history = level.get("history") if isinstance(level.get("history"), list) else []
        points = [
            (float(h["iteration"]), float(h["objective"]))
            for h in history
            if isinstance(h, dict)
            and is_number(h.get("iteration"))
            and is_number(h.get("objective"))
            and math.isfinite(h["objective"])
        ]
        if not points:
            continue
        xy = np.array(points, dtype=np.float64)[_thin(len(points))]  # (n_points, 2): iteration, objective
        state = {True: "converged", False: "not converged"}.get(level.get("converged"), "convergence unknown")
        ax.plot(xy[:, 0], xy[:, 1], marker="o", markersize=3, label=f"level {i} ({state})")
        drawn += 1
        lowest, highest = min(lowest, float(xy[:, 1].min())), max(highest, float(xy[:, 1].max()))
    if not drawn:
        _text(
            ax,
            0.5,
            0.5,
            "no objective per iteration:\nstats['levels'] holds no history",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_title("objective per iteration, per level")
        return
    if lowest > 0 and highest / lowest > 20:
        ax.set_yscale("log")
    ax.set_title(f"objective per iteration, per level ({drawn} of {n_levels:,} levels)")
    ax.legend(loc="upper right")


def _cluster_sizes(ax: Axes, counts: np.ndarray) -> None:
    """The training rows per code, largest first: bars, or one line per level (the first
    MAX_PLOTTED_LEVELS levels, through MAX_POINTS ranks at most)."""
    levels = counts.reshape(-1, counts.shape[-1])  # (levels, n_codes)
    n_codes = levels.shape[1]
    ranks = np.arange(1, n_codes + 1)  # (n_codes,)
    drawn = _thin(n_codes)  # (n_drawn,) the ranks each line goes through
    for level, level_counts in enumerate(levels[:MAX_PLOTTED_LEVELS]):
        order = np.argsort(-level_counts, kind="stable")  # (n_codes,) largest first, ties by code
        sizes = level_counts[order]  # (n_codes,)
        label = f"level {level}" if len(levels) > 1 else "training rows"
        if len(levels) == 1 and n_codes <= MAX_BARS:
            ax.bar(ranks, sizes, width=0.85, color="tab:blue", label=label)
        else:
            ax.step(ranks[drawn], sizes[drawn], where="mid", label=label)
        n_empty = int((sizes == 0).sum())
        if n_empty:  # the empty codes sort last
            ax.axvspan(n_codes - n_empty + 0.5, n_codes + 0.5, color="tab:red", alpha=0.2)
            ax.text(n_codes + 0.5, 0, f"{n_empty:,} empty", color="tab:red", ha="right", va="bottom")
        top = int(order[0])
        share = sizes[0] / sizes.sum() if sizes.sum() else 0.0
        ax.annotate(
            f"{f'level {level} ' if len(levels) > 1 else ''}largest: code {top} ({int(sizes[0]):,} rows, {share:.1%})",
            xy=(1, sizes[0]),
            xytext=(0.25, 0.93 - 0.07 * level),
            textcoords="axes fraction",
            arrowprops={"arrowstyle": "->", "color": "tab:purple"},
            color="tab:purple",
        )
    mean = levels.sum() / levels.size
    ax.axhline(mean, color="black", linestyle=":", linewidth=1, label=f"mean {mean:,.1f}")
    n_empty = int((levels == 0).sum())
    empty = f"{n_empty:,} empty code{'' if n_empty == 1 else 's'}"
    ax.set_title(f"cluster sizes, largest first ({empty}{_shown_levels(len(levels))})")
    ax.set_xlabel("codes, ranked by size")
    ax.set_ylabel("training rows")
    ax.set_xlim(0.5, n_codes + 0.5)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")


def _objective(ax: Axes, stats: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    raw = stats.get("history")
    history = raw if isinstance(raw, list) else []
    points = [
        (h["iteration"], float(h["objective"]), h.get("n_repairs"))
        for h in history
        if isinstance(h, dict)
        and is_number(h.get("iteration"))
        and is_number(h.get("objective"))
        and math.isfinite(h["objective"])
    ]
    ax.set_xlabel("Lloyd iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("objective (sum of distances)")
    if not points:
        what = "has no entries" if isinstance(raw, list) else "is missing" if raw is None else "is not a list"
        inertia = stats.get("inertia")
        final = f"\nfinal objective {inertia:.6g}" if is_number(inertia) else ""
        _text(
            ax,
            0.5,
            0.5,
            f"no objective per iteration:\nstats['history'] {what}\n(a codebook fitted by an older release){final}",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_title("objective per iteration")
        return
    skipped = len(history) - len(points)
    points = [points[i] for i in _thin(len(points))]
    iterations = np.array([p[0] for p in points], dtype=np.float64)  # (n_points,)
    objective = np.array([p[1] for p in points], dtype=np.float64)  # (n_points,)
    ax.plot(iterations, objective, marker="o", markersize=3, color="tab:blue", label="objective")
    repaired = np.array([is_number(p[2]) and p[2] > 0 for p in points])  # (n_points,)
    if repaired.any():
        ax.scatter(
            iterations[repaired],
            objective[repaired],
            marker="x",
            color="tab:red",
            zorder=3,
            label="empty codes repaired",
        )
    raw_restarts = stats.get("restart_inertias")
    restarts = (
        [float(v) for v in raw_restarts if is_number(v) and math.isfinite(v)] if isinstance(raw_restarts, list) else []
    )
    if len(restarts) > 1:
        shown = [restarts[i] for i in _thin(len(restarts))]
        ax.scatter(
            np.full(len(shown), iterations[-1]),
            shown,
            marker="_",
            s=200,
            color="tab:orange",
            zorder=3,
            label=f"final objective of each of {len(restarts)} restarts (history: the best)",
        )
    if objective.min() > 0 and objective.max() / objective.min() > 20:
        ax.set_yscale("log")
    converged = stats.get("converged")
    state = ("converged" if converged else "not converged") if isinstance(converged, bool) else "convergence unknown"
    title = f"objective per iteration ({state})"
    if skipped:
        title += f"; {skipped} unreadable entr{'y' if skipped == 1 else 'ies'} left out"
    ax.set_title(title)
    ax.legend(loc="upper right")


# ----------------------------------------------------------------------------- drift per run


def read_report_summaries(
    reports: str | os.PathLike[str] | Iterable[dict[str, Any] | str | os.PathLike[str]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """The run summaries ``reports`` names, and the files they were read from.

    ``reports`` is a folder (its ``*.json`` files: the pipeline's ``reports/``), one summary file,
    or an iterable of summary dicts and summary file paths (what
    :func:`vq_pipeline.jobs.run_report.write_report` writes next to each report).
    """
    if isinstance(reports, str | os.PathLike):
        folder = Path(reports)
        items: list[Any] = sorted(folder.glob("*.json")) if folder.is_dir() else [folder]
    else:
        items = list(reports)
    summaries, files = [], []
    for item in items:
        if isinstance(item, dict):
            summaries.append(item)
            continue
        if not isinstance(item, str | os.PathLike):
            raise InvalidInputError(
                f"reports item={safe_text(repr(item))[:80]}; expected a summary dict or the path of a report's .json "
                f"summary. Fix: pass the reports folder, or the summaries."
            )
        summaries.append(_read_summary(Path(item)))
        files.append(os.fspath(item))
    if not summaries:
        raise InvalidInputError(
            f"reports={safe_text(str(reports))!r} holds no run summary; expected at least one (the .json files that "
            f"each pipeline run writes under work_dir/reports/). Fix: pass that folder after a run."
        )
    return summaries, files


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise InvalidInputError(
                f"report={str(path)!r} has {size:,} bytes; expected a run summary of at most {MAX_REPORT_BYTES:,}. "
                f"Fix: pass the .json summaries that the pipeline writes."
            )
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise InvalidInputError(
            f"report={str(path)!r} cannot be read ({exc.strerror or exc}); expected a run summary (.json). "
            f"Fix: pass an existing summary file."
        ) from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise InvalidInputError(
            f"report={str(path)!r} is not JSON ({exc}); expected a run summary written by the pipeline. "
            f"Fix: remove or move the file."
        ) from None
    if not isinstance(value, dict) or not isinstance(value.get("drift"), dict):
        raise InvalidInputError(
            f"report={str(path)!r} is not a run summary (a JSON object with a 'drift' object); expected what "
            f"vq_pipeline.jobs.run_report.write_report writes. Fix: remove or move the file."
        )
    return value


def _number(value: Any) -> float:
    return float(value) if is_number(value) and math.isfinite(value) else math.nan


def _churn(summary: dict[str, Any]) -> float:
    """Share of rows whose code changed at this run's refit, where the summary records it: ``churn``,
    or ``1 - kept`` of an ``alignment`` record (at the top level or in ``drift``); nan when absent."""
    drift = summary.get("drift") if isinstance(summary.get("drift"), dict) else {}
    for holder in (summary, drift, summary.get("alignment"), drift.get("alignment")):
        if not isinstance(holder, dict):
            continue
        if is_number(holder.get("churn")):
            return _number(holder["churn"])
        if holder is not summary and holder is not drift and is_number(holder.get("kept")):
            return 1.0 - _number(holder["kept"])
    return math.nan


def _started(summary: dict[str, Any]) -> dt.datetime | None:
    """The run's start time (UTC when the text names no zone), or None when it does not parse."""
    value = summary.get("started_at")
    try:
        when = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return when.replace(tzinfo=dt.UTC) if when is not None and when.tzinfo is None else when


def drift_series(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The per-run numbers :func:`plot_drift` draws, in time order (runs whose ``started_at`` does not
    parse keep their place after the others): lists of ``started_at`` (UTC, ``YYYY-MM-DDTHH:MM:SS``, or
    the text as found, escaped), ``action``, ``baseline`` (the run fitted the codebook on the rows it
    measured), and floats, nan where a run did not measure them: ``distortion_ratio``,
    ``distortion_limit`` (1 + drift_threshold), ``usage_divergence``, ``usage_bias``, ``usage_limit``
    (bias + usage_threshold), ``churn`` (rows whose code changed at the run's refit) and
    ``churn_unaligned`` (what it would have been without renumbering: ``1 - alignment.kept_unaligned``)."""
    times = [_started(s) for s in summaries]
    order = sorted(range(len(summaries)), key=lambda i: (times[i] is None, times[i] or _EPOCH, i))
    series: dict[str, list[Any]] = {
        k: []
        for k in (
            "started_at",
            "action",
            "baseline",
            "distortion_ratio",
            "distortion_limit",
            "usage_divergence",
            "usage_bias",
            "usage_limit",
            "churn",
            "churn_unaligned",
        )
    }
    for i in order:
        s = summaries[i]
        drift = s.get("drift") if isinstance(s.get("drift"), dict) else {}
        params = s.get("params") if isinstance(s.get("params"), dict) else {}
        bias = _number(drift.get("usage_divergence_expected"))
        when = times[i]
        shown = when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") if when else str(s.get("started_at", "?"))
        series["started_at"].append(safe_text(shown))
        series["action"].append(s.get("action") if isinstance(s.get("action"), str) else "?")
        series["baseline"].append(drift.get("baseline") is True)
        series["distortion_ratio"].append(_number(drift.get("distortion_ratio")))
        series["distortion_limit"].append(1 + _number(params.get("drift_threshold")))
        series["usage_divergence"].append(_number(drift.get("usage_divergence")))
        series["usage_bias"].append(bias)
        series["usage_limit"].append(bias + _number(params.get("usage_threshold")))
        series["churn"].append(_churn(s))
        alignment = s.get("alignment") if isinstance(s.get("alignment"), dict) else {}
        series["churn_unaligned"].append(1.0 - _number(alignment.get("kept_unaligned")))
    return series


def plot_drift(
    reports: str | os.PathLike[str] | Iterable[dict[str, Any] | str | os.PathLike[str]],
    path: str | os.PathLike[str],
) -> Path:
    """Draw the drift of a scheduled pipeline's runs into the PNG file ``path``, one point per run.

    Args:
        reports: the run summaries (see :func:`read_report_summaries`): the ``work_dir/reports``
            folder, summary files, or the summary dicts the flow returns.
        path: the ``.png`` file to write (atomically); it may lie in the reports folder, but is never
            one of the summary files.

    Panels, sharing the runs' time axis: the distortion ratio (new rows' mean distance over the
    training one) with its refit limit ``1 + drift_threshold``; the code-usage Jensen-Shannon
    divergence with its finite-sample bias and its refit limit (bias + ``usage_threshold``); and,
    when any summary records it (``churn``, or ``kept`` of an ``alignment`` record), the share of
    rows whose code changed at a refit, and what it would have been without renumbering
    (``alignment.kept_unaligned``). Runs that fitted or refitted the codebook are marked by a
    vertical line; the run that fitted the first codebook measured a baseline, not drift.

    Returns:
        The resolved path written.

    Raises:
        InvalidInputError: no summary, a file that is not a run summary, or a bad ``path``.
        ConfigurationError: matplotlib is not installed.
    """
    summaries, files = read_report_summaries(reports)
    target = check_picture_path("path", path, files)
    s = drift_series(summaries)
    n_runs = len(s["action"])
    runs = np.arange(1, n_runs + 1)  # (n_runs,)
    has_churn = any(not math.isnan(v) for v in s["churn"])
    fig = _figure(figsize=(max(8.0, min(20.0, 0.5 * n_runs + 6)), 8.5 if has_churn else 6.5))
    axes = fig.subplots(3 if has_churn else 2, 1, sharex=True)

    ratio_ax, usage_ax = axes[0], axes[1]
    ratio_ax.plot(runs, s["distortion_ratio"], marker="o", color="tab:blue", label="distortion ratio (new / training)")
    ratio_ax.plot(runs, s["distortion_limit"], label="refit above 1 + drift_threshold", **_LIMIT)
    ratio_ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ratio_ax.set_ylabel("distortion ratio")
    for run, baseline in zip(runs, s["baseline"], strict=True):
        if baseline:
            ratio_ax.annotate("baseline", xy=(run, 1.0), ha="center", va="bottom", color=_FIT, fontsize=8)

    usage_ax.plot(runs, s["usage_divergence"], marker="o", color="tab:green", label="code-usage JS divergence")
    usage_ax.plot(runs, s["usage_bias"], linestyle=":", color="gray", label="its finite-sample bias")
    usage_ax.plot(runs, s["usage_limit"], label="refit above bias + usage_threshold", **_LIMIT)
    usage_ax.set_ylabel("bits")

    if has_churn:
        axes[2].plot(runs, s["churn"], marker="o", linestyle="none", color="tab:purple", label="churn at the refit")
        if any(not math.isnan(v) for v in s["churn_unaligned"]):
            axes[2].plot(
                runs,
                s["churn_unaligned"],
                marker="o",
                fillstyle="none",
                linestyle="none",
                color="tab:purple",
                label="churn had its codes not been renumbered",
            )
        axes[2].set_ylabel("share of rows whose code changed")
        axes[2].set_ylim(-0.02, 1.02)

    marks = {
        "refit": (_REFIT, "-", "refit"),
        "fit": (_FIT, "-", "fit"),
        "refit-unchanged": (_UNCHANGED, "--", "refit, unchanged"),
    }
    for ax in axes:
        labelled: set[str] = set()
        for run, action in zip(runs, s["action"], strict=True):
            if action in marks:
                color, style, label = marks[action]
                ax.axvline(run, color=color, linestyle=style, alpha=0.7, label=None if label in labelled else label)
                labelled.add(label)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)

    step = max(1, math.ceil(n_runs / MAX_RUN_LABELS))
    shown = runs[::step]
    axes[-1].set_xticks(shown)
    labels = [s["started_at"][i - 1].replace("T", "\n", 1) for i in shown]  # date over time
    axes[-1].set_xticklabels(labels, fontsize=8, parse_math=False)
    axes[-1].set_xlabel("run (started at, UTC)")
    axes[-1].set_xlim(0.5, n_runs + 0.5)
    refits = sum(a == "refit" for a in s["action"])
    fig.suptitle(
        f"vq-pipeline drift over {n_runs} run{'s' if n_runs != 1 else ''} ({refits} refit{'s' if refits != 1 else ''})"
    )
    return _save(fig, target)


__all__ = [
    "check_picture_path",
    "codebook_figure",
    "drift_series",
    "is_png_file",
    "plot_codebook",
    "plot_drift",
    "read_report_summaries",
]
