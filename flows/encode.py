"""Prefect flow: encode embedding tables into code tables, one task per input file, resumably.

A thin shell over the library's encode job (:func:`vq_pipeline.jobs.encode_folder.encode_tables`):
the job holds the output folder's lock, plans, writes the manifest and every decision; this flow
only says where each file's work runs (one ``encode-file`` task per file, on the flow's threads or
on a Dask cluster: :class:`vq_flows.mappers.TaskMapper`) and presents the run (a progress artifact,
a table artifact, logs). Each file's output is written atomically and then its receipt, so a
Prefect retry, or a rerun after a crash, redoes at most the files whose receipt is missing and never
duplicates rows. Tasks exchange paths, fingerprints and receipts (small dicts), never tensors or frames.
"""

import contextlib
import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from vq_flows.artifacts import scoped_key
from vq_flows.mappers import TaskMapper

from vq_pipeline import VQError
from vq_pipeline.jobs.encode_folder import EncodeEvents, EncodeResult, encode_file, encode_tables
from vq_pipeline.settings import EncodeOptions, EncodeSettings

#: Prefixes of the encode artifacts' keys, scoped per output folder (:func:`vq_flows.artifacts.scoped_key`).
PROGRESS_ARTIFACT_KEY = "vq-encode-progress"
SUMMARY_ARTIFACT_KEY = "vq-encode-summary"
# Files encoded at once (threads of the flow process). torch already spreads one file over the
# cores, so more threads mostly overlap file reads and writes; each task's temporaries are bounded
# by the library's memory budget (256 MiB by default). VQ_ENCODE_WORKERS overrides it.
MAX_WORKERS = max(1, int(os.environ.get("VQ_ENCODE_WORKERS") or min(2, os.cpu_count() or 1)))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: I/O errors (a network filesystem, object storage) and a lost
    Dask worker. Never a vq-pipeline error (bad input, state or configuration: the next try meets
    the same data, files and settings) and never a bug (it would fail the same way)."""
    try:
        from distributed import KilledWorker
        from distributed.comm import CommClosedError

        lost_worker: tuple[type[BaseException], ...] = (KilledWorker, CommClosedError)
    except ImportError:  # no dask extra: no worker to lose
        lost_worker = ()
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - no readable exception (a crashed run): a retry may get through
            return True
    if isinstance(exc, VQError):
        return False
    return isinstance(exc, (OSError, TimeoutError, *lost_worker))


def retried_task(fn: Any, name: str, **options: Any) -> Any:
    """``fn`` as a Prefect task named ``name`` with 2 retries, only of what a retry can fix
    (:func:`retry_transient`), and no result cache (a cached result would skip the work)."""
    return task(
        name=name,
        cache_policy=NO_CACHE,
        retries=2,
        retry_delay_seconds=5,
        retry_condition_fn=retry_transient,
        **options,
    )(fn)


#: One input file's encode (:func:`vq_pipeline.jobs.encode_folder.encode_file`) as a task. Safe to
#: retry: the output and the receipt are each written atomically, and a re-encoded output is byte-identical.
encode_file_task = retried_task(encode_file, "encode-file", task_run_name="encode-{work.source.key}")


def _progress_events(out_dir: str) -> EncodeEvents:
    """A progress artifact created at the plan and moved on as each file finishes; failures logged."""
    logger, state = get_run_logger(), {}

    def plan(todo: dict[str, int], skipped: list[str]) -> None:
        state.update(done=len(skipped), total=len(todo) + len(skipped))
        logger.info("%d files: %d to encode, %d already encoded", state["total"], len(todo), len(skipped))
        state["id"] = create_progress_artifact(
            progress=100.0 * state["done"] / max(state["total"], 1),
            key=scoped_key(PROGRESS_ARTIFACT_KEY, out_dir),
            description=f"files encoded into {out_dir} ({len(todo)} to do)",
        )

    def file_done(key: str, outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            logger.error("encoding %s failed: %s", key, outcome)
        state["done"] += 1
        update_progress_artifact(state["id"], 100.0 * state["done"] / max(state["total"], 1))

    return EncodeEvents(plan=plan, file_done=file_done)


def _summary_table(result: EncodeResult) -> None:
    description = f"{len(result.encoded)} encoded, {len(result.skipped)} skipped → {result.manifest}"
    if result.codec in ("scalar", "binary"):
        description += f"; {result.codec} codes, one per dimension ({result.levels}), packed"
    elif result.codec != "flat":
        description += f"; {result.codec} codes, {result.levels} levels"
        ids = result.semantic_ids
        if ids is not None:
            description += (
                f"; collision rate before suffixes {100 * ids['collision_rate']:.2f}%, max suffix {ids['max_suffix']}"
            )
            if ids.get("id_registry"):
                reg = ids["id_registry"]
                description += f"; id version {reg['id_version']}: {reg['issued']} ids issued, {reg['kept']} kept"
    create_table_artifact(
        table=result.files(), key=scoped_key(SUMMARY_ARTIFACT_KEY, result.out_dir), description=description
    )


@flow(name="encode-embeddings", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))
def encode_embeddings_flow(
    inputs: list[str],
    codebook: str,
    out_dir: str,
    settings: EncodeSettings,
    options: EncodeOptions | None = None,
    dask: str | None = None,
    registry: str | None = None,
    publish_ids: bool = False,
) -> dict[str, Any]:
    """Encode every input table into ``out_dir`` with the codebook file ``codebook``, exactly once:
    :func:`vq_pipeline.jobs.encode_folder.encode_tables` (its ``settings``, ``options`` and errors) with
    one ``encode-file`` task per file still to do (2 retries on non-data errors).

    ``dask``: run the ``encode-file`` tasks on a Dask cluster, ``local:N`` or a scheduler address (see
    :mod:`vq_flows.dask`); planning, the lock and the manifest stay in the flow's process. The
    outputs, receipts and manifest are the same bytes as a local run's.

    ``registry`` and ``publish_ids`` (with ``settings.id_registry``): the id registry's folder and whether
    this run publishes a new id version (:func:`~vq_pipeline.jobs.encode_folder.encode_tables`).

    Returns:
        :meth:`EncodeResult.to_dict` (``out_dir``, ``manifest``, ``codebook``, ``codebook_fingerprint``,
        ``encoded``, ``skipped``, row counts, ``files``, ``new_receipts``, the stale, pruned and
        unrecorded keys, ``seconds``; a multi-level codebook's ``codec``, ``levels``, ``semantic_ids``)
        and ``flow_run_id``.

    Raises:
        EncodeFailedError: some files failed; every other file is encoded and receipted (a rerun
            picks up only the failed ones), and no manifest is written.
    """
    with contextlib.ExitStack() as stack:
        mapper = TaskMapper(encode_file_task, dask=dask, stack=stack)
        result = encode_tables(
            inputs,
            codebook,
            out_dir,
            settings,
            options,
            mapper=mapper,
            events=_progress_events(out_dir),
            registry=registry,
            publish_ids=publish_ids,
        )
    _summary_table(result)
    get_run_logger().info(
        "encoded %d files (%d rows), skipped %d; manifest %s",
        len(result.encoded),
        result.rows_encoded,
        len(result.skipped),
        result.manifest,
    )
    return {**result.to_dict(), "flow_run_id": flow_run.get_id()}


__all__ = ["MAX_WORKERS", "encode_embeddings_flow", "encode_file_task", "retried_task", "retry_transient"]
