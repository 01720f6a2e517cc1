"""The scheduled run, as one library function: :func:`run_once`.

One run of the scheduled pipeline over a work directory: read the current codebook, fit one when
there is none or the settings changed (renumbered to agree with the codebook it replaces), encode
every table under the input root into the current codebook's codes folder (exactly once), measure
drift, refit when a rule fires (and encode again when the refit is a new codebook), write the report.
Every decision is here (with the plain-data rules of :mod:`vq_pipeline.jobs.run_plan`), so a cron
script, Airflow or a notebook gets what the Prefect flow gets. Where each step runs is the caller's
:class:`PipelineSteps`: the default runs everything in this process; the flow runs the fit and encode
jobs as subflows and the small steps as tasks, each with its retries and its place in the UI.

:func:`check_run` refuses, doing no work, what a run would refuse whatever tables arrive (paths,
settings, the work_dir's state), so that a deployment refuses it when it is made, not on its first tick.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vq_pipeline.codebook import Codebook
from vq_pipeline.errors import InvalidInputError, PipelineStateError
from vq_pipeline.io.paths import check_output_folder, is_local, resolved
from vq_pipeline.io.table_writer import code_dtype
from vq_pipeline.jobs import workdir
from vq_pipeline.jobs.drift import drift_report, example_ids, partition_drift, pooled_counts
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.encode_state import folder_records, state_dir
from vq_pipeline.jobs.fit_file import FitJob, fit_to_file
from vq_pipeline.jobs.fit_tables import tables_scorecard
from vq_pipeline.jobs.run_plan import (
    alignment_unavailable,
    codec_of,
    codes_settings_error,
    current_checks,
    encode_brief,
    encode_settings_change,
    fired_reason,
    first_action,
    refit_decision,
    with_alignment,
)
from vq_pipeline.jobs.run_report import draw_drift_chart, report_markdown, write_report
from vq_pipeline.settings import PER_DIMENSION_CODECS, EncodeOptions, EncodeSettings, PipelineSettings

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeJob:
    """One encode of the scheduled run: the inputs, the codebook file, the codes folder and settings."""

    inputs: tuple[str, ...]
    codebook: str
    out_dir: str
    settings: EncodeSettings
    options: EncodeOptions
    #: With ``settings.id_registry``: the work_dir's id registry, and whether this encode publishes a new
    #: id version (:func:`vq_pipeline.jobs.encode_folder.encode_tables`' ``registry`` and ``publish_ids``).
    registry: str | None = None
    publish_ids: bool = False


class PipelineSteps:
    """Where the scheduled run's steps run: here, in this process, one after the other.

    An orchestrator subclasses it: :meth:`fit` and :meth:`encode` run the fit and encode jobs (the
    Prefect flow runs them as subflows, with their own mappers), :meth:`step` runs a small step (read
    or set the current codebook, drift, alignment, the report), and ``run_id`` / ``artifact_key`` name
    the run and its report artifact in the summary (None here).
    """

    run_id: str | None = None
    artifact_key: str | None = None

    def fit(self, job: FitJob) -> dict[str, Any]:
        return fit_to_file(job, log=log).to_dict()

    def encode(self, job: EncodeJob) -> dict[str, Any]:
        return encode_tables(
            job.inputs,
            job.codebook,
            job.out_dir,
            job.settings,
            job.options,
            registry=job.registry,
            publish_ids=job.publish_ids,
        ).to_dict()

    def step(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)


def read_current(work_dir: str) -> dict[str, Any] | None:
    """The current codebook's pointer, with its codec, levels and fit settings
    (:func:`vq_pipeline.jobs.workdir.read_current`)."""
    return workdir.read_current(work_dir)


def planned_action(current: dict[str, Any] | None, settings: PipelineSettings) -> tuple[str, str | None]:
    """:func:`vq_pipeline.jobs.run_plan.first_action` for ``settings``: a scalar or binary codebook's levels
    are its dimensions (the tables' width, not a setting), and a change of ``rotation`` or ``balance``
    refits too. ``current``: :func:`read_current`'s answer."""
    s = settings
    levels = s.levels
    if s.codec in PER_DIMENSION_CODECS and current is not None and codec_of(current)[0] == s.codec:
        levels = codec_of(current)[1]
    action, reason = first_action(current, metric=s.metric, n_codes=s.n_codes, codec=s.codec, levels=levels)
    if action == "none" and current is not None:
        fit = current["fit_settings"]
        for name, default in (("rotation", "none"), ("balance", None)):
            old, new = fit.get(name, default), getattr(s, name)
            if old != new:
                return "fit", f"settings changed ({name} {old} → {new})"
    return action, reason


def check_paths(input_root: str | Path, work_dir: str | Path) -> None:
    """Refuse a ``work_dir`` that is, holds or lies inside ``input_root``
    (:func:`vq_pipeline.io.paths.check_output_folder`), also while ``input_root`` does not exist yet: a
    run would create it, and the next one would read its outputs as inputs."""
    check_output_folder("work_dir", work_dir, [input_root])
    root, work = str(input_root), str(work_dir)
    if not is_local(root) or not is_local(work) or os.path.lexists(root):
        return
    if resolved(work) == resolved(root) or resolved(root) in resolved(work).parents:
        raise InvalidInputError(
            f"work_dir={work!r} lies in input_root={root!r} (which does not exist yet): the next run would read the "
            f"outputs as inputs; expected a work_dir outside the input folder. Fix: pass a work_dir outside "
            f"{str(resolved(root))!r}, such as {resolved(root).parent / (resolved(root).name + '-vq')}."
        )


def check_settings(settings: PipelineSettings) -> None:
    """Refuse settings that every run would refuse whatever the tables hold (beyond what
    :class:`~vq_pipeline.settings.PipelineSettings` checks on its own): a ``code_dtype`` too narrow for
    ``n_codes`` (refused after the fit otherwise), a ``sample`` of fewer rows than ``n_codes``; for scalar
    and binary codes, an ``n_codes`` other than ``2**bits`` (2 for binary) and any ``code_dtype``."""
    if not isinstance(settings, PipelineSettings):
        raise InvalidInputError(
            f"settings={type(settings).__name__}; expected a PipelineSettings. "
            f"Fix: pass PipelineSettings(column=..., n_codes=...)."
        )
    if settings.codec in PER_DIMENSION_CODECS:
        fixed = 2**settings.bits if settings.codec == "scalar" else 2
        if settings.n_codes != fixed:
            what = f"2**bits = {fixed} codes (bits={settings.bits})" if settings.codec == "scalar" else "2 codes"
            raise InvalidInputError(
                f"n_codes={settings.n_codes} with codec={settings.codec!r}; a {settings.codec} codebook has {what} "
                f"per dimension, expected n_codes={fixed}. Fix: pass n_codes={fixed} (--codes {fixed})"
                + (", or the bits that give your n_codes (8: 256, 4: 16)." if settings.codec == "scalar" else ".")
            )
        if settings.code_dtype is not None:
            raise InvalidInputError(
                f"code_dtype={settings.code_dtype!r} with codec={settings.codec!r}; {settings.codec} codes are "
                f"written packed as bytes, expected code_dtype=None. Fix: drop code_dtype (--code-dtype)."
            )
        return
    if settings.unique and settings.codec not in ("residual", "product"):
        raise InvalidInputError(
            f"unique=True with codec={settings.codec!r}; expected a multi-level codec (residual or product), whose "
            f"tuples of codes are semantic ids. Fix: pass codec='residual' (--codec residual --levels L), or drop "
            f"unique."
        )
    code_dtype(settings.n_codes, settings.code_dtype)
    if settings.sample is not None and settings.sample < settings.n_codes:
        raise InvalidInputError(
            f"sample={settings.sample} with n_codes={settings.n_codes}: every fit would read at most "
            f"{settings.sample} rows, fewer than its codes; expected sample >= n_codes. Fix: pass sample >= "
            f"{settings.n_codes}, or no sample (every row), or fewer codes."
        )


def check_codes_folder(out: str | Path, settings: PipelineSettings) -> None:
    """Refuse to encode into the codes folder ``out`` when it holds codes written with other encode
    settings (another ``code_dtype``, ``id_column`` …): the message gives fixes that apply to the
    scheduled pipeline (:func:`vq_pipeline.jobs.run_plan.codes_settings_error`), which never overwrites."""
    if not os.path.isdir(state_dir(out)):
        return
    manifest, receipts = folder_records(Path(out))
    wanted = settings.encode_settings().to_dict()
    for record in ([manifest] if manifest is not None else []) + [r for _, r in receipts]:
        change = encode_settings_change(record.get("settings") or {}, wanted)
        if change:
            raise InvalidInputError(codes_settings_error(str(out), str(state_dir(out)), change))


def check_run(input_root: str | Path, work_dir: str | Path, settings: PipelineSettings) -> None:
    """Refuse now, doing no work, what :func:`run_once` with these arguments would refuse on its next
    run whatever new tables arrive: the paths (:func:`check_paths`), the settings (:func:`check_settings`),
    and the work_dir's state: an unreadable current-codebook pointer, and, when the run would keep the
    current codebook, a codes folder written with other encode settings (:func:`check_codes_folder`).
    A deployment calls it before it registers; :func:`run_once` runs the same checks.

    Raises:
        InvalidInputError: the paths or the settings. PipelineStateError, CodebookFileError: the work_dir's
            current codebook.
    """
    check_paths(input_root, work_dir)
    check_settings(settings)
    current = read_current(str(Path(work_dir).absolute()))
    if current is None:
        return
    action, _ = planned_action(current, settings)
    if action == "none":
        check_codes_folder(workdir.codes_dir(Path(work_dir).absolute(), current["fingerprint"]), settings)
        read_usage_pending(str(Path(work_dir).absolute()), current)


def drift_of(
    codebook: str,
    receipts: dict[str, dict[str, Any]],
    baseline: bool,
    out_dir: str | None = None,
    id_column: str | None = None,
    pending: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Distortion and code usage of newly encoded rows against the codebook's training baseline
    (``baseline``: the rows are the codebook's own training rows, so nothing is measured), with the
    usage pooled with the counts ``pending`` from earlier runs (``usage_pool``), the drift per input
    partition (``partitions``: :func:`vq_pipeline.jobs.drift.partition_drift`) and, when the codes in
    ``out_dir`` have an ``id_column``, a few ids of new rows per code that gained or lost share
    (``code_shifts``' ``ids``: :func:`vq_pipeline.jobs.drift.example_ids`)."""
    cb = Codebook.load(codebook)
    records = [receipts[k] for k in sorted(receipts)]
    report = drift_report(cb, records, baseline=baseline, pending=pending)
    if baseline:
        return report
    report["partitions"] = partition_drift(cb, records)
    if out_dir is not None and id_column and report["rows"]:
        report["code_shifts"] = example_ids(out_dir, records, report["code_shifts"], id_column=id_column)
    return report


def usage_pending_of(
    work_dir: str,
    current: dict[str, Any],
    receipts: dict[str, dict[str, Any]],
    pending: dict[str, Any] | None,
    checks: list[dict[str, Any]],
    baseline: bool,
    now: str,
) -> dict[str, Any]:
    """Keep, replace or clear the work_dir's pending code counts once the rules ran on this run's new
    rows (``receipts``) pooled with ``pending`` (:func:`vq_pipeline.jobs.workdir.next_usage_pending`).

    Returns:
        What the report says of them: ``rows`` pending after this run (0: none), ``needed``
        (:func:`vq_pipeline.jobs.workdir.usage_min_rows`), ``runs`` they came from, ``since`` (when the
        pool began) and ``judged`` (the usage rule judged the pool this run).
    """
    cb = Codebook.load(current["path"])
    pool = pooled_counts(cb, [receipts[k] for k in sorted(receipts)], pending)
    after = workdir.next_usage_pending(pending, pool, checks, baseline=baseline)
    since = (pending or {}).get("since") or now
    if after is None:
        workdir.clear_usage_pending(work_dir)
    elif after is not pending:
        workdir.write_usage_pending(work_dir, current["fingerprint"], after, since)
    usage = next((c for c in checks if c["rule"] == "usage"), {})
    return {
        "rows": after["rows"] if after else 0,
        "needed": workdir.usage_min_rows(cb.n_codes),
        "runs": after["runs"] if after else 0,
        "since": since if after else None,
        "judged": usage.get("status") in ("fired", "not fired"),
    }


def read_usage_pending(work_dir: str, current: dict[str, Any]) -> dict[str, Any] | None:
    """The pending code counts of the current codebook (:func:`vq_pipeline.jobs.workdir.read_usage_pending`)."""
    cb = Codebook.load(current["path"])
    return workdir.read_usage_pending(work_dir, current["fingerprint"], levels=cb.levels, n_codes=cb.n_codes)


def align_fit(
    work_dir: str, fit: dict[str, Any], reference: str, inputs: list[str], settings: PipelineSettings
) -> dict[str, Any]:
    """Renumber a new codebook's codes to agree with the codebook it replaces
    (:func:`vq_pipeline.jobs.workdir.align_refit`); where the aligned codebook is, and the churn."""
    fresh = not fit["kept_existing"]  # this run wrote the file: the aligned codebook replaces it
    return workdir.align_refit(
        work_dir,
        fit["path"],
        reference,
        inputs=inputs,
        column=settings.column,
        fresh=fresh,
        seed=settings.seed,
        engine=settings.engine,
    )


@dataclass
class _Run:
    """One run's state as it goes: the work directory, the settings, the steps and what happened."""

    work: Path
    root: Path
    settings: PipelineSettings
    steps: PipelineSteps
    started: dt.datetime
    logger: Any
    encoded: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    previous: dict[str, Any] | None = None
    alignment: dict[str, Any] | None = None
    drift_before: dict[str, Any] | None = None
    drift_after: dict[str, Any] | None = None
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    usage_pending: dict[str, Any] | None = None
    scorecard: dict[str, Any] | None = None
    #: With an id registry: the encodes that issued (or published) semantic ids this run, and what the
    #: refit policy did (:func:`ids_summary`).
    id_encodes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    id_policy_applied: str | None = None

    def summary(self, current: dict[str, Any], action: str, reason: str | None) -> dict[str, Any]:
        """The run's summary as plain data (the report's JSON and the flow's result, less ``drift_chart``):
        the current codebook and its codes (the last encode run's), what the run did and why, the
        drift, the refit rules, the code-usage rows pending and the replaced codebook."""
        previous = self.previous
        return {
            "started_at": self.now,
            "work_dir": str(self.work),
            "input_root": str(self.root),
            "codebook": current["path"],
            "fingerprint": current["fingerprint"],
            "parent_fingerprint": current["parent_fingerprint"],
            "codes_dir": self.encoded[-1]["out_dir"],
            "codes_link": str(self.work / workdir.CODES_LINK),
            "manifest": self.encoded[-1]["manifest"],
            "report": str(workdir.report_path(self.work, self.started, self.steps.run_id)),
            "artifact_key": self.steps.artifact_key,
            "action": action,
            "reason": reason,
            "encode": [encode_brief(e) for e in self.encoded],
            "drift": self.drift_before,
            "drift_after_refit": self.drift_after,
            "usage_pending": self.usage_pending,
            "alignment": self.alignment,
            "scorecard": self.scorecard,
            "ids": ids_summary(self.work, self.settings, self.id_encodes, self.id_policy_applied),
            "refit_rules": self.checks,
            "fired": [c["rule"] for c in self.checks if c["fired"]],
            "previous_codebook": previous["path"] if previous else None,
            "previous_codes_dir": str(workdir.codes_dir(self.work, previous["fingerprint"])) if previous else None,
            "params": {"inputs": [str(self.root)], **dataclasses.asdict(self.settings)},
            "flow_run_id": self.steps.run_id,
        }

    @property
    def now(self) -> str:
        return self.started.isoformat(timespec="seconds")

    def fit(self, warm_start: str | None) -> dict[str, Any]:
        s = self.settings
        template = workdir.codebook_template(self.work)
        return self.steps.fit(FitJob((str(self.root),), template, s.n_codes, s.reading(), s.fit_settings(), warm_start))

    def encode(self, current: dict[str, Any]) -> dict[str, Any]:
        """Encode every table with the ``current`` codebook; with an id registry, the ids too (see :meth:`ids`)."""
        mode, issuer = self.ids_mode(current)
        encoded = self.encode_with(current["path"], current["fingerprint"], mode)
        if mode in ("issue", "publish"):
            self.id_encodes.append(encoded)
            self.id_policy_applied = "publish" if mode == "publish" else self.id_policy_applied
        elif mode == "keep":  # new items go on being encoded with the codebook that issued the id version
            if not any(e["codebook_fingerprint"] == issuer for e in self.id_encodes):
                self.id_encodes.append(self.encode_with(str(self.id_codebook(issuer)), issuer, "issue"))
            self.id_policy_applied = "keep"
        return encoded

    def encode_with(self, codebook: str, fingerprint: str, mode: str) -> dict[str, Any]:
        """One encode job into the codes folder of ``fingerprint``; ``mode``: "issue" or "publish" ids
        through the work_dir's registry, anything else: the settings' suffixes without the registry."""
        out = workdir.codes_dir(self.work, fingerprint)
        s = self.settings
        check_codes_folder(out, s)  # a fix the pipeline's user can apply, not encode_tables' --overwrite
        settings, registry = s.encode_settings(), None
        if settings.id_registry and mode in ("issue", "publish"):
            registry = str(workdir.ids_dir(self.work) / "registry")
        elif settings.id_registry:  # the ids are another codebook's: this folder's suffixes are no ids
            settings = dataclasses.replace(settings, id_registry=False)
        job = EncodeJob(
            (str(self.root),), codebook, str(out), settings, s.encode_options(), registry, mode == "publish"
        )
        return self.steps.encode(job)

    def ids_mode(self, current: dict[str, Any]) -> tuple[str, str | None]:
        """How the encode with ``current`` treats semantic ids: "off" (no registry), "issue" (``current``
        issues them: it issued the current id version, or there is none yet), "publish" (policy publish:
        ``current`` publishes a new id version) or "keep" (policy keep: another codebook issues them);
        and the fingerprint of the codebook that issued the current id version (None: none yet)."""
        s = self.settings
        if not (s.unique and s.id_registry):
            return "off", None
        issuer = self.steps.step("read-id-registry", id_issuer, str(self.work), s.id_column)
        if issuer is None or issuer == current["fingerprint"]:
            return "issue", issuer
        return s.id_policy, issuer

    def id_codebook(self, fingerprint: str) -> Path:
        """The work_dir's file of the codebook that issued the current id version (policy keep)."""
        path = workdir.codebook_path(self.work, fingerprint)
        if not path.is_file():
            raise PipelineStateError(
                f"codebook={str(path)!r} is missing; it issued the current id version of the registry in "
                f"{str(workdir.ids_dir(self.work))!r}, and id_policy='keep' encodes new items with it. Expected the "
                f"work_dir to keep it. Fix: restore the file from a backup, or pass id_policy='publish' to publish "
                f"a new id version from the current codebook."
            )
        return path

    def read_current(self) -> dict[str, Any] | None:
        return self.steps.step("read-current-codebook", read_current, str(self.work))

    def set_current(self, path: str, fingerprint: str, reason: str, since: str | None = None) -> None:
        self.steps.step(
            "set-current-codebook", workdir.set_current, str(self.work), path, fingerprint, reason, self.now, since
        )

    def drift(
        self, current: dict[str, Any], encoded: dict[str, Any], *, baseline: bool, pending: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        receipts, out_dir = encoded["new_receipts"], encoded["out_dir"]
        args = (current["path"], receipts, baseline, out_dir, self.settings.id_column, pending)
        return self.steps.step("drift-report", drift_of, *args)

    def pending_usage(self, current: dict[str, Any], *, baseline: bool) -> dict[str, Any] | None:
        """The current codebook's pending code counts (none after a fit: its rows are a baseline)."""
        return None if baseline else self.steps.step("read-usage-pending", read_usage_pending, str(self.work), current)

    def update_pending(self, current: dict[str, Any], pending: dict[str, Any] | None, *, baseline: bool) -> None:
        args = (str(self.work), current, self.encoded[0]["new_receipts"], pending, self.checks, baseline, self.now)
        self.usage_pending = self.steps.step("usage-pending", usage_pending_of, *args)

    def align(self, fit: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
        skipped = alignment_unavailable(fit, reference)
        if skipped is not None:  # levels are renumbered within one codec only
            self.logger.info("codes not renumbered: %s", skipped["reason"])
            return skipped
        args = (str(self.work), fit, reference["path"], [str(self.root)], self.settings)
        return self.steps.step("align-codes", align_fit, *args)


def id_issuer(work_dir: str, id_column: str | None) -> str | None:
    """The fingerprint of the codebook that issued the current id version of the work_dir's id
    registry (``ids/registry``), or None when it holds none yet. Reads only."""
    from vq_pipeline.jobs.registry import Registry

    folder = workdir.ids_dir(work_dir) / "registry"
    if not folder.is_dir():
        return None
    with Registry.open(folder, id_column=id_column or "", write=False) as reg:
        return None if reg.current_version is None else reg.fingerprint()


def ids_summary(
    work: Path, settings: PipelineSettings, encodes: list[dict[str, Any]], applied: str | None
) -> dict[str, Any] | None:
    """What a run did to semantic ids (None without an id registry): ``policy`` (the setting),
    ``applied`` ("publish": this run published a new id version; "keep": a refit kept the id version,
    its codebook went on issuing; None: neither), ``id_version``, ``codebook_fingerprint`` (that issued
    it), ``codes_dir`` (the codes that carry the ids), ``registry``, ``prefix_table``, ``issued`` and
    ``kept`` (items), ``adopted``, and ``published`` (the new version's record: items moved, maps)."""
    if not (settings.unique and settings.id_registry):
        return None
    found = [(e, (e.get("semantic_ids") or {}).get("id_registry") or {}) for e in encodes]
    last, info = found[-1] if found else ({}, {})
    published = next((i["published"] for _, i in found if i.get("published")), None)
    return {
        "policy": settings.id_policy,
        "applied": applied,
        "id_version": info.get("id_version"),
        "codebook_fingerprint": last.get("codebook_fingerprint"),
        "codes_dir": last.get("out_dir"),
        "registry": str(workdir.ids_dir(work) / "registry"),
        "prefix_table": info.get("prefix_table"),
        "issued": sum(i.get("issued", 0) for _, i in found),
        "kept": info.get("kept", 0),
        "adopted": sum(i.get("adopted", 0) for _, i in found),
        "published": published,
    }


def run_once(
    input_root: str | Path,
    work_dir: str | Path,
    settings: PipelineSettings,
    *,
    steps: PipelineSteps | None = None,
    logger: Any = None,
) -> dict[str, Any]:
    """One run of the scheduled pipeline: fit or refit the codebook as needed and encode every table
    under ``input_root`` (see the module doc). One run per ``work_dir`` at a time (a lock).

    Args:
        input_root: folder of embedding tables (hive partitions welcome); every table file below it
            is an input. work_dir: where codebooks, codes and reports go (not inside input_root).
        settings: the codebook, the encode and the refit rules (:class:`~vq_pipeline.settings.PipelineSettings`).
        steps: where the steps run (default: here, :class:`PipelineSteps`). logger: where decisions are logged.

    Returns:
        The run's summary, also written as the report's JSON: ``codebook``, ``fingerprint``,
        ``codes_dir``, ``codes_link`` (the stable ``codes/current`` path), ``manifest``, ``report``,
        ``artifact_key``, ``action`` (fit, refit, refit-unchanged, none), ``reason``, ``encode`` (one
        brief per encode run), ``drift`` (and ``drift_after_refit``; ``baseline`` true when the rows are
        the codebook's own training rows), ``refit_rules``, ``fired``, ``previous_codebook`` after a refit,
        ``alignment`` when a codebook replaced another (how its codes were renumbered, and the churn),
        ``usage_pending`` (the code-usage rows the usage rule still waits for: :func:`usage_pending_of`),
        ``scorecard`` (the current codebook's on a seeded sample of the run's new rows, with the churn against
        the codebook a refit replaced; None without new rows: :func:`vq_pipeline.jobs.fit_tables.tables_scorecard`),
        ``drift_chart``, ``params`` and ``flow_run_id`` (``steps.run_id``). ``drift`` also names the
        codes that gained or lost share, the drift per input partition and the pooled code usage
        (:func:`drift_of`).
    """
    work, root = Path(work_dir).absolute(), Path(input_root).absolute()
    check_paths(input_root, work_dir)  # refused before any work (with the state: check_run)
    check_settings(settings)
    run = _Run(work, root, settings, steps or PipelineSteps(), dt.datetime.now(dt.UTC), logger or log)
    with workdir.lock(work):
        summary = _run_locked(run)
        summary["drift_chart"] = draw_drift_chart(summary["report"], summary)
        run.steps.step("write-report", write_report, summary["report"], report_markdown(summary), summary)
    return summary


def _run_locked(run: _Run) -> dict[str, Any]:
    """The run's steps, under the work directory's lock; its summary."""
    s = run.settings
    current = run.read_current()
    if current is not None:
        workdir.link_current_codes(run.work, current["fingerprint"])  # a work_dir from before the link, or a crash
    action, reason = planned_action(current, s)
    if action == "fit":
        run.previous, fit = current, run.fit(None)
        if run.previous is not None:  # keep the replaced codebook's code numbers where the cells allow
            run.alignment = run.align(fit, run.previous)
            fit = with_alignment(fit, run.alignment)
        run.set_current(fit["path"], fit["fingerprint"], reason)
        current = run.read_current()
    run.encoded.append(run.encode(current))
    # The codebook this run fitted was fitted on the rows it just encoded: a baseline, not drift.
    pending = run.pending_usage(current, baseline=action == "fit")
    run.drift_before = run.drift(current, run.encoded[0], baseline=action == "fit", pending=pending)
    run.checks = current_checks(current, now=run.started, drift=run.drift_before, **s.rules())
    # Code-usage counts too few to judge wait for the next runs' (reset after a judgement or a new codebook).
    run.update_pending(current, pending, baseline=action == "fit")
    if action == "none" and (reason := fired_reason(run.checks)):
        run.logger.info("refitting: %s", reason)
        fit = run.fit(current["path"])
        run.alignment = run.align(fit, current)
        action, pointer = refit_decision(current, with_alignment(fit, run.alignment), reason)
        run.set_current(pointer["path"], pointer["fingerprint"], pointer["reason"], pointer.get("since"))
        if action == "refit":
            run.steps.step("clear-usage-pending", workdir.clear_usage_pending, str(run.work))
            run.usage_pending = {**(run.usage_pending or {}), "rows": 0, "runs": 0, "since": None}
            run.previous, current = current, run.read_current()
            run.encoded.append(run.encode(current))
            # The refit was fitted on every row, these included: its baseline.
            run.drift_after = run.drift(current, run.encoded[-1], baseline=True)
    # The current codebook's scorecard on the run's new rows; churn against the codebook it replaced. Computed
    # here, not as a step of its own: a second or so of work, and the run's log stays one screen.
    reference = run.previous["path"] if run.previous is not None else None
    keys = sorted(run.encoded[0]["new_receipts"])
    run.scorecard = tables_scorecard(current["path"], [str(run.root)], keys, s.column, s.seed, reference)
    return run.summary(current, action, reason)


__all__ = [
    "EncodeJob",
    "PipelineSteps",
    "align_fit",
    "check_codes_folder",
    "check_paths",
    "check_run",
    "check_settings",
    "drift_of",
    "id_issuer",
    "ids_summary",
    "read_current",
    "read_usage_pending",
    "run_once",
    "usage_pending_of",
]
