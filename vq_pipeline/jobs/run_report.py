"""The reports a person reads, as markdown: the scheduled pipeline's run report (and the JSON summary
beside it, ``work_dir/reports/<UTC time>-<run id>.md`` and ``.json``; see :mod:`vq_pipeline.jobs.workdir`)
and the fit report (:func:`fit_markdown`, the fit flow's artifact).

Pure formatting of the summaries the jobs build, plus the atomic write.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vq_pipeline.errors import ConfigurationError, InvalidInputError
from vq_pipeline.io.fileio import atomic_write_bytes, canonical_json
from vq_pipeline.jobs.display import safe_text

#: The drift-over-time chart every run redraws beside the reports (when matplotlib is installed).
DRIFT_CHART_NAME = "drift.png"

log = logging.getLogger(__name__)


def write_report(path: str, markdown: str, summary: dict[str, Any]) -> str:
    """Write the run's report as markdown and its summary as JSON next to it."""
    report = Path(path)
    atomic_write_bytes(report, markdown.encode("utf-8", "backslashreplace"))
    atomic_write_bytes(report.with_suffix(".json"), canonical_json(summary))
    return str(report)


def draw_drift_chart(report: str | Path, summary: dict[str, Any]) -> str | None:
    """Redraw ``drift.png`` beside ``report`` from the earlier runs' summaries and this run's
    ``summary`` (:func:`vq_pipeline.jobs.plots.plot_drift`); return its path, or None when it cannot be
    drawn (matplotlib is an optional extra; a file in the reports folder that is not a run summary).
    A chart is a convenience: the run goes on without it, and says why in the log."""
    from vq_pipeline.jobs.plots import plot_drift

    folder = Path(report).parent
    earlier = sorted(p for p in folder.glob("*.json") if p != Path(report).with_suffix(".json"))
    try:
        return str(plot_drift([*earlier, summary], folder / DRIFT_CHART_NAME))
    except (ConfigurationError, InvalidInputError) as exc:
        log.warning("no drift chart: %s", exc)
        return None


#: The drift history's table artifact shows at most this many runs, the latest.
MAX_HISTORY_RUNS = 200


def drift_history(
    report: str | Path, summary: dict[str, Any], *, limit: int = MAX_HISTORY_RUNS
) -> list[dict[str, Any]]:
    """The drift over time as table rows, one per run in time order (the runs before ``report``, read
    from the ``.json`` summaries beside it, then this run's ``summary``; a file there that is not a run
    summary is left out): ``run`` (start, UTC), ``action``, ``new rows``, ``distortion`` (ratio),
    ``usage excess`` (bits above the bias, on the rows the usage rule judged), ``pending`` (rows the usage
    rule waits on after the run), ``fired`` and ``churn`` (share of rows whose code changed at a refit).
    The latest ``limit`` runs; what :func:`draw_drift_chart` draws, as numbers."""
    from vq_pipeline.jobs.plots import read_report_summaries

    folder = Path(report).parent
    summaries = []
    for path in sorted(p for p in folder.glob("*.json") if p != Path(report).with_suffix(".json")):
        try:
            summaries += read_report_summaries([path])[0]
        except InvalidInputError:
            continue
    rows = [_history_row(s) for s in [*summaries, summary]]
    return sorted(rows, key=lambda r: r["run"])[-limit:]


def _history_row(s: dict[str, Any]) -> dict[str, Any]:
    d = s.get("drift") if isinstance(s.get("drift"), dict) else {}
    pool = d.get("usage_pool") if isinstance(d.get("usage_pool"), dict) else {}
    usage = next((c for c in s.get("refit_rules") or [] if isinstance(c, dict) and c.get("rule") == "usage"), {})
    excess = pool.get("usage_divergence_excess") if usage.get("status") in ("fired", "not fired") else None
    if excess is None and usage.get("status") in ("fired", "not fired"):
        excess = d.get("usage_divergence_excess")
    pending = s.get("usage_pending") if isinstance(s.get("usage_pending"), dict) else {}
    alignment = s.get("alignment") if isinstance(s.get("alignment"), dict) else {}
    churn = alignment.get("churn")
    fired = s.get("fired") if isinstance(s.get("fired"), list) else []
    return {
        "run": safe_text(str(s.get("started_at", "?")))[:19].replace("T", " "),
        "action": safe_text(str(s.get("action", "?"))),
        "new rows": "baseline" if d.get("baseline") else _fmt(d.get("rows")),
        "distortion": _fmt(d.get("distortion_ratio"), ".3f"),
        "usage excess": _fmt(excess, ".3f"),
        "pending": _fmt(pending.get("rows")),
        "fired": ", ".join(safe_text(str(f)) for f in fired) or "—",
        "churn": _share(churn) if isinstance(churn, float | int) else "—",
    }


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, float) else str(value)


_RULE_NAMES = {"schedule": "schedule", "distortion": "distortion", "usage": "code usage"}


def _drift_lines(s: dict[str, Any]) -> list[str]:
    d = s["drift"]
    if d.get("baseline"):
        n_codes = d["n_codes"] * d.get("levels", 1)
        over = f" over {d['levels']} {d['codec']} levels" if d.get("per_level") is not None else ""
        return [
            "## Baseline",
            "",
            (
                f"{d['note'][0].upper()}{d['note'][1:]} ({_fmt(d.get('baseline_rows'))} rows, mean distance "
                f"{_fmt(d.get('baseline_mean_distance'))}, {d['codes_used']} of {n_codes} codes used{over}): they are "
                f"not drift. Drift is measured on the rows that later runs encode."
            ),
        ]
    columns = [("current codebook", d)]
    if s.get("drift_after_refit"):
        columns.append(("refitted codebook", s["drift_after_refit"]))
    lines = ["## Drift of the newly encoded rows", ""]
    lines += ["| | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    measured = {"distortion_ratio", "usage_divergence", "usage_divergence_expected", "usage_divergence_excess"}
    for key, label in [
        ("rows", "rows"),
        ("mean_distance", "mean distance"),
        ("train_mean_distance", "training mean distance"),
        ("distortion_ratio", "distortion ratio (new / training)"),
        ("codes_used", "codes used"),
        ("usage_divergence", "code-usage divergence (JS, bits)"),
        ("usage_divergence_expected", "its finite-sample bias (bits)"),
        ("usage_divergence_excess", "divergence above the bias (bits)"),
    ]:
        cells = []
        for _, c in columns:
            if c.get("baseline"):
                own = {"rows": c.get("baseline_rows"), "mean_distance": c.get("baseline_mean_distance")}
                cells.append("baseline" if key in measured else _fmt(own.get(key, c.get(key))))
            else:
                cells.append(_fmt(c.get(key)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _codec_drift_lines(columns)
    lines += _level_lines(columns)
    lines += ["", "Measured against the codebook current at the start of the run."]
    if any(c.get("baseline") for _, c in columns):
        lines += ["Against the refitted codebook: baseline: the codebook was fitted on these rows (not drift)."]
    return [*lines, *_pending_lines(s), *_shift_lines(d), *_partition_lines(d)]


def _codec_drift_lines(columns: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The drift table's rows of scalar codes (values outside the range) and binary codes (share of ones)."""
    rows = [
        ("clipped", "share", "values outside the scalar range"),
        ("clipped", "train_share", "… at training"),
        ("bit_balance", "ones_share", "share of ones (mean over dims)"),
        ("bit_balance", "train_ones_share", "… at training"),
        ("bit_balance", "max_shift", "largest change of a dim's share of ones"),
    ]
    lines = []
    for group, key, label in rows:
        if not any(isinstance(c.get(group), dict) for _, c in columns):
            continue
        cells = [_fmt((c.get(group) or {}).get(key)) if isinstance(c.get(group), dict) else "—" for _, c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _pending_lines(s: dict[str, Any]) -> list[str]:
    """What the code-usage rule pooled, judged or left pending
    (:func:`vq_pipeline.jobs.workdir.next_usage_pending`)."""
    p = s.get("usage_pending")
    usage = next((c for c in s.get("refit_rules") or [] if c["rule"] == "usage"), None)
    if not p or usage is None or usage["status"] == "off":
        return []
    pool = s["drift"].get("usage_pool") or {}
    if p["judged"]:
        pooled = pool.get("pending_rows") or 0
        where = f" ({pooled} of them pending from earlier runs, over {pool.get('runs')} runs)" if pooled else ""
        text = f"Code usage: judged on {pool.get('rows')} rows{where}; the count starts again."
    elif p["rows"]:
        text = (
            f"Code usage: {p['rows']} rows pending (from {p['runs']} run{'s' if p['runs'] != 1 else ''}, since "
            f"{p['since']}); the rule is judged once {p['needed']} rows have come."
        )
    else:
        return []
    return ["", text]


def _cell(value: Any, width: int = 24) -> str:
    """``value`` as one markdown table cell: escaped, ``|`` quoted, cut to ``width`` characters."""
    text = safe_text(str(value)).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _shift_lines(d: dict[str, Any]) -> list[str]:
    """The codes whose share grew or shrank the most (:func:`vq_pipeline.jobs.drift.code_shifts`)."""
    shifts = d.get("code_shifts") or {}
    if not shifts.get("gains") and not shifts.get("losses"):
        return []
    ids = any("ids" in e for e in [*shifts.get("gains", []), *shifts.get("losses", [])])
    multi = any("level" in e for e in [*shifts.get("gains", []), *shifts.get("losses", [])])
    head = "| code | new share | training | change |" + (" example ids |" if ids else "")
    lines = ["", "## Codes that gained or lost share", "", head, "|---|---|---|---|" + ("---|" if ids else "")]
    for e in [*shifts.get("gains", []), *shifts.get("losses", [])]:
        code = f"{e['level']}:{e['code']}" if multi else str(e["code"])
        row = f"| {code} | {_share(e['share'])} | {_share(e['train_share'])} | {100 * e['change']:+.2f} pp |"
        if ids:
            row += " " + (", ".join(_cell(i, 12) for i in e.get("ids") or []) or "—") + " |"
        lines.append(row)
    what = "level:code; shares within the level" if multi else "shares of the new rows and of the training rows"
    return [*lines, "", f"Gains first, then losses ({what}; pp: percentage points)."]


def _partition_lines(d: dict[str, Any]) -> list[str]:
    """The drift of each input partition (:func:`vq_pipeline.jobs.drift.partition_drift`)."""
    parts = d.get("partitions") or []
    if not parts:
        return []
    lines = ["", "## Drift per partition", "", "| partition | rows | distortion | usage excess |", "|---|---|---|---|"]
    for g in parts:
        excess = g.get("usage_divergence_excess")
        lines.append(
            f"| {_cell(g['partition'] or '(none)', 40)} | {g['rows']} | {_fmt(g.get('distortion_ratio'), '.3f')} "
            f"| {_fmt(excess, '.3f')} |"
        )
    return [
        *lines,
        "",
        "distortion: mean distance over the training mean; usage excess: the partition's code-usage divergence "
        "above its finite-sample bias (bits; few rows make it noisy).",
    ]


def _level_lines(columns: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Rows of the drift table for each level of a multi-level codebook: codes used and usage divergence
    (the rows above give the levels' mean divergence)."""
    rows = max((len(c.get("per_level") or []) for _, c in columns), default=0)
    lines = []
    for level in range(rows):
        for key, label in [("codes_used", "codes used"), ("usage_divergence", "code-usage divergence (JS, bits)")]:
            cells = []
            for _, c in columns:
                per = c.get("per_level") or []
                cells.append(_fmt(per[level].get(key)) if level < len(per) and not c.get("baseline") else "—")
            lines.append(f"| level {level}: {label} | " + " | ".join(cells) + " |")
    return lines


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _ids_lines(ids: dict[str, Any] | None, work_dir: str) -> list[str]:
    """The semantic ids section: what the refit policy did, the id version, items issued and moved."""
    if not ids:
        return []
    version, issuer = ids.get("id_version"), str(ids.get("codebook_fingerprint") or "")[:12]
    published = ids.get("published")
    if ids.get("applied") == "publish" and published:
        what = (
            f"published id version {version} (policy publish): every item re-encoded with codebook `{issuer}`, "
            f"{published['n_moved']} of {published['n_items']} items moved; version {published['previous']} stays "
            f"readable, old→new tables `{_in_work_dir(published['items_map'], work_dir)}` and "
            f"`{_in_work_dir(published['prefixes_map'], work_dir)}`"
        )
    elif ids.get("applied") == "keep":
        what = (
            f"kept id version {version} (policy keep): new items encoded with codebook `{issuer}`, which issued "
            f"it; the current codebook issues no ids"
        )
    else:
        what = f"issued under id version {version} (codebook `{issuer}`)"
    lines = ["", "## Semantic ids", "", f"Ids {what}.", ""]
    lines += [
        f"- items issued this run: {ids.get('issued', 0)}; kept: {ids.get('kept', 0)}"
        + (f"; adopted from existing suffixes: {ids['adopted']}" if ids.get("adopted") else ""),
        f"- codes with ids: `{_in_work_dir(str(ids.get('codes_dir')), work_dir)}`; registry "
        f"`{_in_work_dir(str(ids.get('registry')), work_dir)}`; prefix table "
        f"`{_in_work_dir(str(ids.get('prefix_table')), work_dir)}`",
    ]
    return lines


def _alignment_lines(a: dict[str, Any] | None) -> list[str]:
    """The report's code-churn section: how the new codebook's codes were numbered (:func:`align_refit`)."""
    if not a:
        return []
    lines = ["", "## Code churn", ""]
    if not a["aligned"]:
        return [*lines, f"The new codebook keeps the numbering of its fit, not the previous codebook's: {a['reason']}."]
    how = {"cooccurrence": "co-occurrence", "centroids": "closest centroids"}.get(a["method"], a["method"])
    if a["renumbered"]:
        moved = (
            f"Renumbering changed its fingerprint (which covers the centroids in order) from "
            f"`{a['unaligned_fingerprint'][:12]}` to `{a['fingerprint'][:12]}`."
        )
    else:
        moved = "No code needed another number: the fit's numbering already agreed."
    lines += [
        (
            f"The new codebook's codes were renumbered to agree with the codebook it replaces "
            f"(`{a['reference'][:12]}`), so that rows keep their code; its cells are as fitted. {moved}"
        ),
        "",
        "| | |",
        "|---|---|",
        f"| matched by | {how}, on {a['rows']} sampled training rows |",
        f"| rows that keep their code | {_share(a['kept'])} |",
        f"| churn (rows whose code changed) | {_share(a['churn'])} |",
        f"| rows that would keep their code without renumbering | {_share(a['kept_unaligned'])} |",
        f"| codes renumbered | {a['renumbered']} of {a['n_codes']} (previous codebook: {a['reference_n_codes']}) |",
    ]
    return lines


def _rule_lines(s: dict[str, Any]) -> list[str]:
    lines = ["## Refit rules", "", "| rule | result | this run |", "|---|---|---|"]
    for c in s["refit_rules"]:
        result = "**fired**" if c["fired"] else c["status"]
        lines.append(f"| {_RULE_NAMES[c['rule']]} | {result} | {c['value']} |")
    lines += ["", "Each rule refits when:", ""]
    lines += [f"- {_RULE_NAMES[c['rule']]}: {c['when']}" for c in s["refit_rules"]]
    fired = [_RULE_NAMES[c["rule"]] for c in s["refit_rules"] if c["fired"]]
    if s["drift"].get("baseline"):
        verdict = f"No rule was evaluated: this run fitted the codebook ({s['drift']['note']})."
    elif fired:
        verdict = f"Fired: {', '.join(fired)}."
    else:
        verdict = "No rule fired."
    return [*lines, "", verdict]


def _in_work_dir(path: str, work_dir: str) -> str:
    """``path`` relative to ``work_dir`` when it lies inside (a table cell stays short), else as it is."""
    try:
        return Path(path).relative_to(work_dir).as_posix()
    except ValueError:
        return path


def report_markdown(summary: dict[str, Any]) -> str:
    """The run report as markdown (pure formatting of the flow's summary)."""
    s = summary
    lines = [f"# vq-pipeline run {s['started_at']}", ""]
    lines += [f"work_dir: `{s['work_dir']}` (input_root `{s['input_root']}`)", ""]
    action = {
        "fit": "fitted a first codebook",
        "refit": "refitted, warm-started from the previous codebook",
        "refit-unchanged": "refitted, but the refit reproduced the current codebook (kept)",
        "none": "no refit",
    }[s["action"]]
    lines += [f"**Codebook:** {action}" + (f" — {s['reason']}" if s["reason"] else "") + ".", ""]
    lines += ["## Encoding", "", "| codebook | folder | encoded | skipped | rows encoded |", "|---|---|---|---|---|"]
    for e in s["encode"]:
        lines.append(
            f"| `{e['codebook_fingerprint'][:12]}` | `{_in_work_dir(e['out_dir'], s['work_dir'])}` "
            f"| {len(e['encoded'])} | {len(e['skipped'])} | {e['rows_encoded']} |"
        )
    lines += ["", "Folders are relative to the work_dir."]
    lines += ["", *_drift_lines(s), *_alignment_lines(s.get("alignment")), *scorecard_lines(s.get("scorecard"))]
    lines += _ids_lines(s.get("ids"), s["work_dir"])
    lines += ["", *_rule_lines(s)]
    lines += [
        "",
        "## Where things are",
        "",
        f"- work_dir: `{s['work_dir']}`",
        f"- current codebook: `{s['codebook']}` (fingerprint `{s['fingerprint']}`)",
        f"- codes: `{s['codes_dir']}`, also at the stable path `{s['codes_link']}`; manifest `{s['manifest']}`",
        (
            f"- this report: `{s['report']}` (summary: `{Path(s['report']).with_suffix('.json')}`; "
            f"artifact key `{s['artifact_key']}`)"
        ),
    ]
    if s.get("drift_chart"):
        lines.append(f"- drift over time (distortion, code usage, churn per run): `{s['drift_chart']}`")
    if s.get("previous_codebook"):
        lines.append(
            f"- previous codebook: `{s['previous_codebook']}`; its codes are left in `{s['previous_codes_dir']}`"
        )
    return "\n".join(lines) + "\n"


#: The fit report's history table is shown in full up to this many rows, then as its head and tail.
_MAX_HISTORY_ROWS = 60


def scorecard_lines(card: dict[str, Any] | None) -> list[str]:
    """The report's "Scorecard" section (a blank line first; none without a scorecard): the codes' error,
    recall@k, prefix coherence, effective size and collision rate on the sample, by levels ``0..l`` for
    residual codes, and the churn against the codebook the current one replaced
    (:func:`vq_pipeline.fitting.options.codebook_scorecard`)."""
    if not isinstance(card, dict):
        return []
    k = card.get("k", 10)
    which = {"holdout": "held-out rows", "training": "training rows", "new rows": "this run's new rows"}
    sample = which.get(card.get("sample"), "rows")
    lines = [
        "",
        "## Scorecard",
        "",
        f"{card.get('codec', 'flat')} codes of {card.get('n_rows')} {sample}"
        + (f" ({card['seconds']:.2f} s)" if isinstance(card.get("seconds"), float) else "")
        + ".",
        "",
        "| measure | value |",
        "|---|---|",
        f"| error | {_fmt(card.get('error'))} |",
        f"| recall@{k} (true neighbours found among the decoded rows) | {_fmt(card.get('recall_at_k'))} |",
    ]
    if "prefix_coherence" in card:
        lines.append(
            f"| prefix coherence (true neighbours with the same level-0 code) | {_fmt(card['prefix_coherence'])} |"
        )
    lines.append(f"| collision rate | {_fmt(card.get('collision_rate'))} |")
    sizes = card.get("effective_size")
    if isinstance(sizes, list):
        lines.append(f"| effective size per level | {' / '.join(_fmt(v, '.1f') for v in sizes)} |")
        if len(sizes) > 1:
            lines.append(f"| effective size of whole ids | {_fmt(card.get('effective_size_tuples'), '.1f')} |")
    for key, label in (("error_by_levels", "error"), ("recall_by_levels", f"recall@{k}")):
        if isinstance(card.get(key), list):
            lines.append(f"| {label} by levels 0..l | {' / '.join(_fmt(v) for v in card[key])} |")
    if "churn" in card:
        lines.append(f"| churn against the previous codebook (rows whose codes changed) | {_fmt(card['churn'])} |")
        per_level = card.get("churn_per_level")
        if isinstance(per_level, list) and len(per_level) > 1:
            lines.append(f"| churn per level | {' / '.join(_fmt(v) for v in per_level)} |")
    return lines


def _fit_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None or value == "" else str(value)


def _fit_level_lines(s: dict[str, Any]) -> list[str]:
    """The fit report's per-level table of a residual or product codebook (none for a flat one)."""
    if s.get("codec", "flat") in ("flat", "scalar", "binary"):  # scalar and binary: one level per dimension
        return []
    what = "error left after the level" if s["codec"] == "residual" else "error of the level's slice"
    lines = [
        "## Levels",
        "",
        f"| level | mse ({what}) | used codes | iterations | repairs |",
        "|---|---|---|---|---|",
    ]
    for i, level in enumerate(s.get("level_stats") or []):
        state = "converged" if level.get("converged") else "not converged"
        lines.append(
            f"| {i} | {_fit_cell(level.get('mse'))} | {_fit_cell(level.get('used_codes'))} of {s['n_codes']} "
            f"| {_fit_cell(level.get('iterations'))} ({state}) | {_fit_cell(level.get('n_repairs'))} |"
        )
    return [*lines, ""]


def _codec_cell(s: dict[str, Any]) -> str:
    """The fit report's codec cell: residual and product levels; scalar and binary bits per dimension."""
    if s["codec"] in ("scalar", "binary"):
        bits = s.get("bits") or 1
        return f"{s['codec']}, {bits} bit{'s' if bits != 1 else ''} per dimension, {s['levels']} dimensions"
    return f"{s['codec']}, {s['levels']} levels"


def _mean(value: Any) -> Any:
    """A number as is; the mean of a list of numbers (a statistic per dimension); else None."""
    if isinstance(value, list):
        numbers = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        return sum(numbers) / len(numbers) if numbers and len(numbers) == len(value) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def fit_markdown(summary: dict[str, Any]) -> str:
    """The fit report as markdown (pure formatting of a
    :meth:`vq_pipeline.jobs.fit_file.FitSummary.to_dict`)."""
    s = summary
    multilevel = s.get("codec", "flat") != "flat"
    per_dimension = s.get("codec") in ("scalar", "binary")
    sizes = s["cluster_sizes"]
    rows = (
        f"{s['rows']} ({s['mode']}"
        + (f", of {s['rows_total']}" if s.get("rows_total") not in (None, s["rows"]) else "")
        + ")"
    )
    lines = [
        "# Codebook fit",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{s['path']}`{' (kept: same centroids as the existing file)' if s['kept_existing'] else ''} |",
        f"| fingerprint | `{s['fingerprint']}` |",
        f"| parent (warm start) | `{s['parent_fingerprint']}` |"
        if s["parent_fingerprint"]
        else "| parent (warm start) | none |",
        f"| n_codes | {s['n_codes']}{' per dimension' if per_dimension else ' per level' if multilevel else ''} |",
        *([f"| codec | {_codec_cell(s)} |"] if multilevel else []),
        *([f"| rotation | {s['rotation']} |"] if s.get("rotation", "none") != "none" else []),
        f"| dim | {s['dim']} |",
        f"| metric | {s['metric']} |",
        f"| engine | {_fit_cell(s['engine'])} |",
        f"| init | {s['init']} |",
        f"| rows | {rows} |",
        f"| iterations | {s['iterations']} ({'converged' if s['converged'] else 'not converged'}) |",
        f"| final objective | {_fit_cell(s['inertia'])} (mean distance {_fit_cell(s['mean_distance'])}) |",
        f"| empty-cluster repairs | {s['n_repairs']} |",
        *(
            [
                f"| reconstruction error (mse) | {_fit_cell(s.get('mse'))} |",
                f"| semantic ids | {_fit_cell(s.get('n_unique'))} unique tuples, collision rate "
                f"{_fit_cell(s.get('collision_rate'))} |",
            ]
            if multilevel and not per_dimension
            else []
        ),
        *(
            [
                f"| reconstruction error (mse) | {_fit_cell(s.get('mse'))} |",
                f"| training values outside the range | {_fit_cell(s.get('clipped'))} |"
                if s["codec"] == "scalar"
                else f"| bit balance (share of ones) | {_fit_cell(_mean(s.get('bit_balance')))} |",
            ]
            if per_dimension
            else []
        ),
        f"| time | fit {_fit_cell(s['fit_seconds'])} s (init {_fit_cell(s['init_seconds'])} s); "
        f"task {_fit_cell(s['task_seconds'])} s |",
        "",
        "## Cluster sizes",
        "",
        "| min | q1 | median | q3 | max | empty codes |",
        "|---|---|---|---|---|---|",
        f"| {sizes['min']} | {_fit_cell(sizes['q1'])} | {_fit_cell(sizes['median'])} | {_fit_cell(sizes['q3'])} "
        f"| {sizes['max']} | {sizes['empty']} |",
        "",
        *_fit_level_lines(s),
        *scorecard_lines(s.get("scorecard"))[1:],
        *([""] if isinstance(s.get("scorecard"), dict) else []),
        "## Objective per iteration",
        "",
        "| iteration | objective | repairs | empty codes | imbalance |",
        "|---|---|---|---|---|",
    ]
    history = s["history"]
    half = _MAX_HISTORY_ROWS // 2
    shown = history if len(history) <= _MAX_HISTORY_ROWS else [*history[:half], None, *history[-half:]]
    for h in shown:
        if h is None:
            lines.append(f"| … | ({len(history) - 2 * half} more) | | | |")
        else:
            iteration = f"level {h['level']}, {h['iteration']}" if "level" in h else h["iteration"]
            lines.append(
                f"| {iteration} | {_fit_cell(h['objective'])} | {h['n_repairs']} | {h['n_empty']} "
                f"| {_fit_cell(h['imbalance'])} |"
            )
    return "\n".join(lines) + "\n"
