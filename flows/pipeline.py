"""Prefect flow: the scheduled job. Keep a codebook current and every partition encoded with it.

A thin shell over the library's scheduled run (:func:`vq_pipeline.jobs.scheduled.run_once`), which
holds the work_dir's lock and makes every decision: fit when there is no current codebook (or the
settings changed); encode every input file not yet encoded with the current codebook; measure drift
on the newly encoded rows; refit, warm-started from the current codebook, when a refit rule fires;
renumber a new codebook's codes to agree with the codebook it replaces; after a refit, make the new
codebook current and encode everything into its own folder (the old folder is left as is). With
semantic ids through an id registry (``settings.unique`` and ``settings.id_registry``), the ids are
issued through the work_dir's registry, and ``settings.id_policy`` says what a refit does to them.

This flow says where the steps run (:class:`FlowSteps`: the fit and encode flows as subflows, on one
Dask cluster for the whole run with ``dask``; the small steps as tasks) and publishes the report as
an artifact, keyed per work_dir (:func:`report_artifact_key`).
"""

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from vq_flows.artifacts import scoped_key
from vq_flows.encode import encode_embeddings_flow, retried_task
from vq_flows.fit import fit_codebook_flow

from vq_pipeline.jobs.fit_file import FitJob
from vq_pipeline.jobs.run_report import drift_history, report_markdown
from vq_pipeline.jobs.scheduled import EncodeJob, PipelineSteps, check_run, run_once
from vq_pipeline.settings import PipelineSettings

#: Prefix of the report artifact's key; :func:`report_artifact_key` appends a hash of the work_dir.
REPORT_ARTIFACT_KEY = "vq-pipeline-report"
#: Prefix of the drift history's table artifact key (:func:`drift_artifact_key`).
DRIFT_ARTIFACT_KEY = "vq-pipeline-drift"
#: The steps that read or write files get retries of what a retry can fix; the others none.
RETRIED_STEPS = ("read-current-codebook", "write-report")


def report_artifact_key(work_dir: str | Path) -> str:
    """The report artifact's key for ``work_dir``: ``vq-pipeline-report-`` + 10 hex digits of the
    sha256 of the absolute work_dir (:func:`vq_flows.artifacts.scoped_key`)."""
    return scoped_key(REPORT_ARTIFACT_KEY, work_dir)


def drift_artifact_key(work_dir: str | Path) -> str:
    """The drift history's table artifact key for ``work_dir``: ``vq-pipeline-drift-`` + 10 hex digits of
    the sha256 of the absolute work_dir (:func:`vq_flows.artifacts.scoped_key`)."""
    return scoped_key(DRIFT_ARTIFACT_KEY, work_dir)


class FlowSteps(PipelineSteps):
    """The scheduled run's steps in Prefect: fits and encodes as subflows (on the Dask cluster
    ``dask`` when given), the small steps as tasks named after them."""

    def __init__(self, work_dir: Path, dask: str | None) -> None:
        self.dask = dask
        self.tasks: dict[str, Any] = {}
        self.run_id = flow_run.get_id()
        self.artifact_key = report_artifact_key(work_dir)

    def fit(self, job: FitJob) -> dict[str, Any]:
        return fit_codebook_flow(
            list(job.inputs), job.out, job.n_codes, job.reading, job.settings, job.warm_start, self.dask
        )

    def encode(self, job: EncodeJob) -> dict[str, Any]:
        return encode_embeddings_flow(
            list(job.inputs),
            job.codebook,
            job.out_dir,
            job.settings,
            job.options,
            self.dask,
            registry=job.registry,
            publish_ids=job.publish_ids,
        )

    def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if name not in self.tasks:  # one Prefect task per step, made on its first run
            retried = name in RETRIED_STEPS
            self.tasks[name] = retried_task(fn, name) if retried else task(fn, name=name, cache_policy=NO_CACHE)
        return self.tasks[name](*args)


def check_flow_parameters(
    input_root: str, work_dir: str, settings: PipelineSettings | dict[str, Any], dask: str | None = None
) -> None:
    """Refuse, doing no work, what :func:`vq_pipeline_flow` with these parameters would refuse on its
    next run, in the flow's order: the settings (a dict of their fields, as a deployment stores them, is
    built into :class:`~vq_pipeline.settings.PipelineSettings`), the Dask address
    (:func:`vq_flows.dask.parse_address`), then :func:`vq_pipeline.jobs.scheduled.check_run` (paths,
    settings, the work_dir's state). ``vq serve`` calls it before it registers the deployment."""
    if isinstance(settings, dict):
        settings = PipelineSettings(**settings)
    if dask:
        from vq_flows.dask import parse_address

        parse_address(dask)
    check_run(input_root, work_dir, settings)


@flow(name="vq-pipeline")
def vq_pipeline_flow(
    input_root: str, work_dir: str, settings: PipelineSettings, dask: str | None = None
) -> dict[str, Any]:
    """Fit or refit the codebook as needed and encode every new partition under ``input_root``: one
    :func:`vq_pipeline.jobs.scheduled.run_once` (its arguments and summary) in Prefect.

    ``dask``: run the fits and encodes on a Dask cluster: ``local:N`` (started once for the whole run)
    or a scheduler address; see :mod:`vq_flows.dask`. The summary adds ``seconds``; the report is also
    published as a markdown artifact (``artifact_key``).
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    with contextlib.ExitStack() as cluster:
        if dask:
            from vq_flows.dask import dask_cluster

            dask = cluster.enter_context(dask_cluster(dask))  # local:N starts here, stops at the end
        summary = run_once(
            input_root, work_dir, settings, steps=FlowSteps(Path(work_dir).absolute(), dask), logger=logger
        )
    create_markdown_artifact(
        markdown=report_markdown(summary),
        key=summary["artifact_key"],
        description=f"vq-pipeline: {summary['action']}, {summary['work_dir']}",
    )
    create_table_artifact(  # the drift chart's numbers, one row per run (the PNG stays beside the reports)
        table=drift_history(summary["report"], summary),
        key=drift_artifact_key(summary["work_dir"]),
        description=f"vq-pipeline drift per run, {summary['work_dir']}",
    )
    summary["seconds"] = time.perf_counter() - t0
    logger.info(
        "codebook %s (%s); encoded %s files; report %s",
        summary["fingerprint"][:12],
        summary["action"],
        sum(len(e["encoded"]) for e in summary["encode"]),
        summary["report"],
    )
    return summary


__all__ = [
    "DRIFT_ARTIFACT_KEY",
    "REPORT_ARTIFACT_KEY",
    "FlowSteps",
    "check_flow_parameters",
    "drift_artifact_key",
    "report_artifact_key",
    "vq_pipeline_flow",
]
