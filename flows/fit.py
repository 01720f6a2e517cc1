"""Prefect flow: fit a codebook on embedding tables and save it.

A thin shell over the library's fit job (:func:`vq_pipeline.jobs.fit_file.fit_to_file`: check the
output, fit, save, summarize). The flow only says where the work runs: one ``fit-codebook`` task in
this process, or, with ``dask``, exact Lloyd as map-reduce with one ``partition-stats`` task per input
file and iteration on the cluster (:class:`vq_flows.mappers.TaskMapper`); and presents the result: a
markdown artifact (settings, objective per iteration, cluster sizes, repairs, time) and a small summary
dict. Fitting gets no retries: a failure there is a data or settings problem, and a rerun would only
repeat it; a partition's task retries what a retry can fix.
"""

import contextlib
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from vq_flows.encode import retried_task  # noqa: I001 - flows after the library
from vq_flows.mappers import TaskMapper

from vq_pipeline.compute.lloyd import log_progress
from vq_pipeline.jobs.fit_file import FitJob, fit_to_file
from vq_pipeline.jobs.run_report import fit_markdown
from vq_pipeline.jobs.partitioned import partition_stats_file
from vq_pipeline.settings import FitSettings, TableSettings

FIT_ARTIFACT_KEY = "vq-fit-codebook"


# Results stay in memory (NO_CACHE): a cached result would skip writing the file.
@task(name="fit-codebook", cache_policy=NO_CACHE)
def fit_task(job: FitJob) -> dict[str, Any]:
    """The fit job in this process (:func:`vq_pipeline.jobs.fit_file.fit_to_file`); its summary as plain
    data (no tensors). ``job.out`` may hold ``{fingerprint}`` or ``{fp12}``, filled in once the centroids
    are known; such a file that already holds the same codebook is kept as is."""
    logger = get_run_logger()  # seeding, the first iteration, one every 10 s and the end at INFO; DEBUG has each
    return fit_to_file(job, progress=log_progress(logger), log=logger).to_dict()


#: One partition's E-step statistics of one iteration, from and to files in the fit's scratch folder
#: (:func:`vq_pipeline.jobs.partitioned.partition_stats_file`). Safe to retry: files are written
#: atomically, and a pruning state records the centroids it holds for.
partition_stats_task = retried_task(partition_stats_file, "partition-stats", task_run_name="stats-{work.source.key}")


@flow(name="fit-codebook")
def fit_codebook_flow(
    inputs: list[str],
    out: str,
    n_codes: int,
    reading: TableSettings,
    settings: FitSettings | None = None,
    warm_start: str | None = None,
    dask: str | None = None,
) -> dict[str, Any]:
    """Fit a K-means codebook of ``n_codes`` codes on the ``reading.column`` embeddings of ``inputs``
    and save it to ``out`` (``{fingerprint}``/``{fp12}`` placeholders allowed).

    Args:
        reading: which rows and how (:class:`~vq_pipeline.settings.TableSettings`).
        settings: how to fit (:class:`~vq_pipeline.settings.FitSettings`; default: the defaults).
        warm_start: a codebook file to start from; its fingerprint is recorded as the new codebook's
            parent (flat codebooks only: a residual or product fit starts from its own seeding).
        dask: fit on a Dask cluster (``local:N`` or a scheduler address, see :mod:`vq_flows.dask`):
            exact Lloyd as map-reduce, one ``partition-stats`` task per input file and iteration; this
            process reduces, updates and saves. With ``reading.sample`` the fit runs here (a sample is
            meant to fit one machine).

    Returns:
        :class:`~vq_pipeline.jobs.fit_file.FitSummary` as a dict, without the per-iteration ``history``
        (which is in the artifact), and ``flow_run_id``.
    """
    job = FitJob(tuple(inputs), out, n_codes, reading, settings or FitSettings(), warm_start)
    logger = get_run_logger()
    if dask:
        with contextlib.ExitStack() as stack:
            mapper = TaskMapper(partition_stats_task, dask=dask, stack=stack)
            summary = fit_to_file(job, mapper=mapper, progress=log_progress(logger), log=logger).to_dict()
    else:
        summary = fit_task(job)
    create_markdown_artifact(
        markdown=fit_markdown(summary),
        key=FIT_ARTIFACT_KEY,
        description=f"codebook {summary['fingerprint'][:12]}: {summary['n_codes']} codes × {summary['dim']}",
    )
    logger.debug(  # the fit's last INFO line said how it ended; the artifact and the result name the file
        "codebook %s: %d iterations, %d repairs, %s",
        summary["fingerprint"][:12],
        summary["iterations"],
        summary["n_repairs"],
        summary["path"],
    )
    return {**{k: v for k, v in summary.items() if k != "history"}, "flow_run_id": flow_run.get_id()}


__all__ = ["FIT_ARTIFACT_KEY", "fit_codebook_flow", "fit_task", "log_progress", "partition_stats_task"]
