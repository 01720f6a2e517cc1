"""Prefect flow: the scheduled job. Keep a codebook current and every partition encoded with it.

The work_dir's layout, file formats and refit rules belong to :mod:`vq_pipeline.workdir`; this
module orders the steps as Prefect tasks and subflows and publishes the report as an artifact, keyed
per work_dir (:func:`report_artifact_key`).

Each run, holding the work_dir's lock: fit when there is no current codebook (or the requested
metric / n_codes changed); encode every input file not yet encoded with the current codebook;
measure drift on the newly encoded rows; refit, warm-started from the current codebook, when a
refit rule fires; renumber a new codebook's codes to agree with the codebook it replaces
(:func:`vq_pipeline.workdir.align_refit`); after a refit, make the new codebook current and encode
everything into its own folder (the old folder is left as is).
"""

import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from vq_flows.artifacts import scoped_key
from vq_flows.encode import encode_embeddings_flow, retry_transient
from vq_flows.fit import fit_codebook_flow
from vq_pipeline import Codebook, workdir
from vq_pipeline.errors import InvalidInputError, PipelineStateError  # noqa: F401 - re-exported
from vq_pipeline.pipeline import drift_report
from vq_pipeline.run_plan import (
    alignment_unavailable,
    check_run,
    codebook_template,
    current_checks,
    encode_arguments,
    fired_reason,
    first_action,
    refit_decision,
    run_summary,
    with_alignment,
    with_codec,
)
from vq_pipeline.run_report import draw_drift_chart
from vq_pipeline.settings import FitSettings
from vq_pipeline.workdir import (  # noqa: F401 - the work_dir's names, re-exported for callers
    CODES_LINK,
    CURRENT_NAME,
    DEFAULT_DRIFT_THRESHOLD,
    DEFAULT_REFIT_EVERY_HOURS,
    DEFAULT_USAGE_THRESHOLD,
    TOP_K,
    WITH_DISTANCE,
    check_thresholds,
    codebook_path,
    codes_dir,
    link_current_codes,
    refit_checks,
    refit_reason,
    report_markdown,
    usage_min_rows,
)

#: Prefix of the report artifact's key; :func:`report_artifact_key` appends a hash of the work_dir.
REPORT_ARTIFACT_KEY = "vq-pipeline-report"


def report_artifact_key(work_dir: str | Path) -> str:
    """The report artifact's key for ``work_dir``: ``vq-pipeline-report-`` + 10 hex digits of the
    sha256 of the absolute work_dir (:func:`vq_flows.artifacts.scoped_key`)."""
    return scoped_key(REPORT_ARTIFACT_KEY, work_dir)


@task(
    name="read-current-codebook",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def read_current_task(work_dir: str) -> dict[str, Any] | None:
    """The current codebook's pointer and identity (:func:`vq_pipeline.workdir.read_current`), with its
    codec and levels (:func:`vq_pipeline.run_plan.with_codec`)."""
    current = workdir.read_current(work_dir)
    return None if current is None else with_codec(current)


@task(name="set-current-codebook", cache_policy=NO_CACHE)
def set_current_task(
    work_dir: str,
    path: str,
    fingerprint: str,
    reason: str,
    now: str,
    since: str | None = None,
) -> dict[str, Any]:
    """Make a codebook current (:func:`vq_pipeline.workdir.set_current`)."""
    return workdir.set_current(work_dir, path, fingerprint, reason, now, since)


@task(name="drift-report", cache_policy=NO_CACHE)
def drift_task(codebook: str, receipts: dict[str, dict[str, Any]], baseline: bool = False) -> dict[str, Any]:
    """Distortion and code usage of newly encoded rows against the codebook's training baseline
    (``baseline``: the rows are the codebook's own training rows, so nothing is measured)."""
    return drift_report(Codebook.load(codebook), [receipts[k] for k in sorted(receipts)], baseline=baseline)


@task(name="align-codes", cache_policy=NO_CACHE)
def align_task(
    work_dir: str, fit: dict[str, Any], reference: str, inputs: list[str], column: str, seed: int, engine: str
) -> dict[str, Any]:
    """Renumber a new codebook's codes to agree with the codebook it replaces
    (:func:`vq_pipeline.workdir.align_refit`); returns where the aligned codebook is and the churn."""
    fresh = not fit["kept_existing"]  # this run wrote the file: the aligned codebook replaces it
    return workdir.align_refit(
        work_dir, fit["path"], reference, inputs=inputs, column=column, fresh=fresh, seed=seed, engine=engine
    )


@task(name="write-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def write_report_task(path: str, markdown: str, summary: dict[str, Any]) -> str:
    """Write the run's report and its JSON summary (:func:`vq_pipeline.workdir.write_report`)."""
    return workdir.write_report(path, markdown, summary)


@flow(name="vq-pipeline")
def vq_pipeline_flow(
    input_root: str,
    work_dir: str,
    column: str,
    n_codes: int,
    metric: str = FitSettings.metric,
    id_column: str | None = None,
    refit_every_hours: float | None = DEFAULT_REFIT_EVERY_HOURS,
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    usage_threshold: float | None = DEFAULT_USAGE_THRESHOLD,
    sample: int | None = None,
    seed: int = FitSettings.seed,
    engine: str = FitSettings.engine,
    code_dtype: str | None = None,
    dask: str | None = None,
    codec: str = FitSettings.codec,
    levels: int = FitSettings.levels,
) -> dict[str, Any]:
    """Fit or refit the codebook as needed and encode every new partition under ``input_root``.

    Args:
        input_root: folder of embedding tables (hive partitions welcome); every table file below it
            is an input. work_dir: where codebooks, codes and reports go (not inside input_root).
        column, id_column: the embedding and id columns. n_codes, metric, sample, seed, engine: fit
            settings (defaults: :class:`vq_pipeline.FitSettings`; metric "l2", as everywhere).
        refit_every_hours: refit when the codebook is older (None: never on schedule).
        drift_threshold: refit when new rows' mean distance exceeds the training one by this fraction.
        usage_threshold: refit when new rows' code-usage Jensen-Shannon divergence from the training
            usage exceeds its finite-sample bias by more than this many bits (evaluated from
            ``max(100, 5 * n_codes)`` new rows on; None: never). Catches topic shifts that move rows
            between codes without raising their distance.
        code_dtype: the ``code`` column's integer type, e.g. "uint32" or "int64" (default: the
            smallest unsigned type for ``n_codes``); pin it so that a table schema survives a refit
            with another ``n_codes``. Codes folders written with another value are refused.
        dask: run the fits and encodes on a Dask cluster: ``local:N`` (started once for the whole
            run) or a scheduler address; see :mod:`vq_flows.dask`.
        codec, levels: "flat" (default), or "residual"/"product" codebooks of ``levels`` levels of
            ``n_codes`` codes each; a change refits. Their refits start from their own seeding, and
            their codes are not renumbered after the codebook they replace (the report says so).

    Returns:
        ``codebook``, ``fingerprint``, ``codes_dir``, ``codes_link`` (the stable ``codes/current``
        path), ``manifest``, ``report``, ``artifact_key``, ``action`` (fit, refit, refit-unchanged,
        none), ``reason``, ``encode`` (one summary per encode run), ``drift`` (and
        ``drift_after_refit``; ``baseline`` true when the rows are the codebook's own training rows),
        ``refit_rules`` (:func:`refit_checks`), ``fired`` (the rules that fired),
        ``previous_codebook`` after a refit, ``alignment`` when a codebook replaced another (how its
        codes were renumbered and the churn: :func:`vq_pipeline.workdir.align_refit`), ``seconds``,
        ``flow_run_id``.
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    work, root = Path(work_dir).absolute(), Path(input_root).absolute()
    rules = dict(refit_every_hours=refit_every_hours, drift_threshold=drift_threshold, usage_threshold=usage_threshold)
    check_run(
        input_root,
        work_dir,
        metric=metric,
        seed=seed,
        engine=engine,
        drift_threshold=drift_threshold,
        usage_threshold=usage_threshold,
        codec=codec,
        levels=levels,
    )  # bad arguments are refused before any work
    started = dt.datetime.now(dt.UTC)
    now = started.isoformat(timespec="seconds")
    fit_settings = dict(
        inputs=[str(root)],
        column=column,
        n_codes=n_codes,
        metric=metric,
        sample=sample,
        seed=seed,
        engine=engine,
        codec=codec,
        levels=levels,
    )
    template = codebook_template(work)
    cluster = contextlib.ExitStack()
    if dask:
        from vq_flows.dask import dask_cluster

        # One cluster for every fit and encode of the run (local:N starts here, stops at the end).
        fit_settings["dask"] = dask = cluster.enter_context(dask_cluster(dask))
    encode_args = dict(column=column, id_column=id_column, code_dtype=code_dtype, engine=engine, dask=dask)

    def align(fit: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
        skipped = alignment_unavailable(fit, reference)
        if skipped is not None:  # levels are renumbered within one codec only
            logger.info("codes not renumbered: %s", skipped["reason"])
            return skipped
        return align_task(str(work), fit, reference["path"], [str(root)], column, seed, engine)

    with cluster, workdir.lock(work):
        current = read_current_task(str(work))
        if current is not None:
            link_current_codes(work, current["fingerprint"])  # a work_dir from before the link, or a crash
        action, reason = first_action(current, metric=metric, n_codes=n_codes, codec=codec, levels=levels)
        previous, alignment, drift_after = None, None, None
        if action == "fit":
            previous, fit = current, fit_codebook_flow(out=template, **fit_settings)
            if previous is not None:  # keep the replaced codebook's code numbers where the cells allow
                alignment = align(fit, previous)
                fit = with_alignment(fit, alignment)
            set_current_task(str(work), fit["path"], fit["fingerprint"], reason, now)
            current = read_current_task(str(work))
        encoded = [encode_embeddings_flow(**encode_arguments(work, root, current, **encode_args))]
        # The codebook this run fitted was fitted on the rows it just encoded: a baseline, not drift.
        drift = drift_task(current["path"], encoded[0]["new_receipts"], baseline=action == "fit")
        checks = current_checks(current, now=started, drift=drift, **rules)
        if action == "none" and (reason := fired_reason(checks)):
            logger.info("refitting: %s", reason)
            fit = fit_codebook_flow(out=template, warm_start=current["path"], **fit_settings)
            alignment = align(fit, current)
            action, pointer = refit_decision(current, with_alignment(fit, alignment), reason)
            set_current_task(str(work), now=now, **pointer)
            if action == "refit":
                previous, current = current, read_current_task(str(work))
                encoded.append(encode_embeddings_flow(**encode_arguments(work, root, current, **encode_args)))
                # The refit was fitted on every row, these included: its baseline.
                drift_after = drift_task(current["path"], encoded[-1]["new_receipts"], baseline=True)

        report = workdir.report_path(work, started, flow_run.get_id())
        summary = run_summary(
            started_at=now,
            work_dir=work,
            input_root=root,
            current=current,
            encoded=encoded,
            report=report,
            artifact_key=report_artifact_key(work),
            action=action,
            reason=reason,
            drift=drift,
            drift_after_refit=drift_after,
            alignment=alignment,
            checks=checks,
            previous=previous,
            params=dict(fit_settings, id_column=id_column, **rules),
            flow_run_id=flow_run.get_id(),
        )
        summary["drift_chart"] = draw_drift_chart(report, summary)
        markdown = report_markdown(summary)
        write_report_task(str(report), markdown, summary)
    create_markdown_artifact(
        markdown=markdown,
        key=summary["artifact_key"],
        description=f"vq-pipeline: {action}, {work}",
    )
    summary["seconds"] = time.perf_counter() - t0
    logger.info(
        "codebook %s (%s); encoded %s files; report %s",
        current["fingerprint"][:12],
        action,
        sum(len(e["encoded"]) for e in encoded),
        report,
    )
    return summary
