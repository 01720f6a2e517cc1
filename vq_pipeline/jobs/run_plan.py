"""What one run of the scheduled pipeline does, as plain data: the checks before any work, whether
it fits, refits or leaves the codebook, and what it reports of its encodes. No Prefect here; the flow
(or another orchestrator) runs the steps, :mod:`vq_pipeline.jobs.workdir` owns the folder they write.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from vq_pipeline.jobs.workdir import refit_checks
from vq_pipeline.settings import EncodeSettings, FitSettings, PipelineSettings

#: The keys of an encode run's summary that the pipeline's summary keeps, one dict per encode run.
ENCODE_BRIEF_KEYS = (
    "codebook_fingerprint",
    "out_dir",
    "manifest",
    "encoded",
    "skipped",
    "rows_encoded",
    "rows_total",
    "flow_run_id",
)


def with_codec(current: dict[str, Any]) -> dict[str, Any]:
    """The codebook pointer ``current`` (:func:`vq_pipeline.jobs.workdir.read_current`) with the ``codec``
    and ``levels`` of its file, read from the file's metadata when the pointer lacks them."""
    if "codec" in current and "levels" in current:
        return current
    from vq_pipeline.io.codebook_file import load_info

    info = load_info(current["path"])
    return {**current, "codec": info.codec, "levels": info.levels}


def codec_of(current: dict[str, Any]) -> tuple[str, int]:
    """(codec, levels) of a codebook pointer; one without them (see :func:`with_codec`) is flat."""
    return current.get("codec", "flat"), int(current.get("levels", 1))


def first_action(
    current: dict[str, Any] | None,
    *,
    metric: str,
    n_codes: int,
    codec: str = FitSettings.codec,
    levels: int = FitSettings.levels,
) -> tuple[str, str | None]:
    """What the run does before it encodes: ``("fit", reason)`` when there is no current codebook or
    the requested metric, n_codes, codec or levels differ from the current one's (its ``codec`` and
    ``levels``: :func:`with_codec`), else ``("none", None)`` (a refit rule may still fire once the new
    rows are encoded: :func:`refit_decision`)."""
    if current is None:
        return "fit", "no current codebook"
    old_codec, old_levels = codec_of(current)
    if (current["metric"], current["n_codes"], old_codec, old_levels) != (metric, n_codes, codec, levels):
        changed = f"metric {current['metric']} → {metric}, n_codes {current['n_codes']} → {n_codes}"
        if (old_codec, old_levels) != (codec, levels):
            changed += f", codec {old_codec} × {old_levels} levels → {codec} × {levels} levels"
        return "fit", f"settings changed ({changed})"
    return "none", None


#: The reason :func:`alignment_unavailable` gives (shown in the run's report).
MULTILEVEL_ALIGNMENT = "alignment: not available across a codec change"


def alignment_unavailable(fit: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any] | None:
    """The alignment record of a fit that cannot be renumbered after ``reference`` because their codec
    or number of levels differ (``aligned`` False, the fit's own ``path`` and ``fingerprint``, the shape
    of :func:`vq_pipeline.jobs.workdir.align_refit`'s record), or None when they agree and alignment runs
    (level by level for residual and product codebooks).

    Args:
        fit: the fit flow's summary (``path``, ``fingerprint``, ``n_codes``, ``codec``, ``levels``).
        reference: the codebook it replaces (:func:`vq_pipeline.jobs.workdir.read_current`, :func:`with_codec`).
    """
    new, old = (fit.get("codec", "flat"), int(fit.get("levels", 1))), codec_of(reference)
    if new == old:
        return None
    return {
        "aligned": False,
        "reason": f"{MULTILEVEL_ALIGNMENT} (codec {old[0]} × {old[1]} → {new[0]} × {new[1]})",
        "path": fit["path"],
        "fingerprint": fit["fingerprint"],
        "reference": reference["fingerprint"],
        "reference_path": reference["path"],
        "n_codes": fit["n_codes"],
        "reference_n_codes": reference["n_codes"],
    }


def current_checks(
    current: dict[str, Any], *, now: dt.datetime, drift: dict[str, Any] | None, **rules: Any
) -> list[dict[str, Any]]:
    """:func:`vq_pipeline.jobs.workdir.refit_checks` for the codebook ``current`` (its ``created_at`` and
    ``last_fit_at``); ``rules``: ``refit_every_hours``, ``drift_threshold``, ``usage_threshold``."""
    return refit_checks(
        created_at=current["created_at"], last_fit_at=current.get("last_fit_at"), now=now, drift=drift, **rules
    )


def fired_reason(checks: list[dict[str, Any]]) -> str | None:
    """The reasons of the rules that fired, joined with ``; ``, or None when none fired."""
    return "; ".join(c["reason"] for c in checks if c["fired"]) or None


def with_alignment(fit: dict[str, Any], alignment: dict[str, Any]) -> dict[str, Any]:
    """The fit's dict with the aligned codebook's ``path`` and ``fingerprint``
    (:func:`vq_pipeline.jobs.workdir.align_refit`)."""
    return {**fit, "path": alignment["path"], "fingerprint": alignment["fingerprint"]}


def refit_decision(current: dict[str, Any], refit: dict[str, Any], reason: str) -> tuple[str, dict[str, Any]]:
    """The action of a refit (``refit``: a new codebook; ``refit-unchanged``: the aligned refit has
    the current codebook's fingerprint) and the arguments of
    :func:`vq_pipeline.jobs.workdir.set_current` (less ``work_dir`` and ``now``) that record it: a
    ``refit-unchanged`` keeps the current codebook, its reason and its ``since``, and only moves
    ``last_fit_at`` on (so the schedule does not fire again at once)."""
    if refit["fingerprint"] == current["fingerprint"]:
        pointer = dict(
            path=current["path"],
            fingerprint=current["fingerprint"],
            reason=current.get("reason") or reason,
            since=current.get("since"),
        )
        return "refit-unchanged", pointer
    return "refit", dict(path=refit["path"], fingerprint=refit["fingerprint"], reason=reason)


def encode_settings_change(recorded: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The encode settings that differ between a codes folder's records and a run: name -> (recorded,
    wanted), both as :meth:`~vq_pipeline.settings.EncodeSettings.to_dict` gives them (a setting at its
    default is left out there, and compares as its default here); empty when they agree."""
    defaults = {**dataclasses.asdict(EncodeSettings("")), "keep": []}
    old, new = {**defaults, **recorded}, {**defaults, **wanted}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def codes_settings_error(codes_dir: str, state_dir: str, change: dict[str, tuple[Any, Any]]) -> str:
    """The message that refuses a scheduled run whose encode settings differ (``change``:
    :func:`encode_settings_change`) from those the codes folder ``codes_dir`` (its bookkeeping in
    ``state_dir``) was written with. The fixes are ones a pipeline's user can apply: the pipeline
    never overwrites a codes folder."""
    changed = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in change.items())
    settable = [k for k in change if k in PipelineSettings.__dataclass_fields__]
    back = ", ".join(f"{k}={change[k][0]!r}" for k in settable) if settable else "the settings it was written with"
    return (
        f"codes_dir={codes_dir!r} holds codes written with other encode settings ({changed}); expected one kind of "
        f"codes per folder (the scheduled pipeline never overwrites a codes folder). Fix: run with {back} again; or, "
        f"to encode every table anew with the new settings, delete {codes_dir} and {state_dir} (the next run writes "
        f"them again), or pass a new work_dir."
    )


def encode_brief(encode: dict[str, Any]) -> dict[str, Any]:
    """The :data:`ENCODE_BRIEF_KEYS` of an encode flow's summary."""
    return {k: encode.get(k) for k in ENCODE_BRIEF_KEYS}


__all__ = [
    "ENCODE_BRIEF_KEYS",
    "MULTILEVEL_ALIGNMENT",
    "alignment_unavailable",
    "codec_of",
    "codes_settings_error",
    "current_checks",
    "encode_brief",
    "encode_settings_change",
    "fired_reason",
    "first_action",
    "refit_decision",
    "with_alignment",
    "with_codec",
]
