"""Prefect flow: encode embedding tables into code tables, one task per input file, resumably.

The flow process holds :func:`vq_pipeline.pipeline.encode_lock` on the output folder for the whole
run; the tasks run in its threads. :func:`plan_encode` (a task) says which files still need codes;
one ``encode-file`` task per such file calls :func:`encode_source`, which writes the output
atomically and then its receipt, so a Prefect retry, or a rerun after a crash, redoes at most the
files whose receipt is missing and never duplicates rows. With ``unique`` (multi-level codebooks),
the ``write-manifest`` task first gives every row of the folder its semantic-id suffix
(:func:`vq_pipeline.encode_folder.assign_suffixes`). The manifest (``<out_dir>.vq/manifest.json``)
is written last.
Tasks exchange paths, fingerprints and receipts (small dicts), never tensors or frames.
"""

import contextlib
import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from vq_flows.artifacts import scoped_key
from vq_pipeline import Codebook, VQError
from vq_pipeline.encode_folder import assign_suffixes, check_codec_settings, encode_failure
from vq_pipeline.encode_state import encode_summary, summary_rows
from vq_pipeline.errors import EncodeFailedError  # noqa: F401 - re-exported
from vq_pipeline.pipeline import (
    EncodeOptions,
    EncodeSettings,
    encode_lock,
    encode_source,
    folder_inventory,
    manifest_path,
    plan_encode,
    prune_stale,
    remove_temporaries,
    write_manifest,
)
from vq_pipeline.tables import Source

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
    from distributed import KilledWorker
    from distributed.comm import CommClosedError

    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - no readable exception (a crashed run): a retry may get through
            return True
    if isinstance(exc, VQError):
        return False
    return isinstance(exc, (OSError, TimeoutError, KilledWorker, CommClosedError))


def _settings(settings: dict[str, Any]) -> EncodeSettings:
    return EncodeSettings(**{**settings, "keep": tuple(settings.get("keep") or ())})


def _load(codebook: str, fingerprint: str | None = None) -> Codebook:
    """Load the codebook and make sure it is still the one the run was planned with."""
    cb = Codebook.load(codebook)
    if fingerprint is not None and cb.fingerprint != fingerprint:
        raise VQError(
            f"codebook={codebook!r} changed during the run (fingerprint {cb.fingerprint[:12]}…, planned with "
            f"{fingerprint[:12]}…); expected the file to stay put while encoding. Fix: rerun the flow."
        )
    return cb


@task(name="plan-encode", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def plan_task(
    inputs: list[str], codebook: str, out_dir: str, settings: dict[str, Any], overwrite: bool = False
) -> dict[str, Any]:
    """Split the inputs into files to encode and files already done, as plain data."""
    cb = _load(codebook)
    todo, done, records = plan_encode(inputs, cb, out_dir, _settings(settings), overwrite=overwrite)
    return {
        "codebook_fingerprint": cb.fingerprint,
        "codec": cb.codec,
        "levels": cb.levels,
        "todo": [{"uri": s.uri, "key": s.key} for s in todo],
        "done": [{"uri": s.uri, "key": s.key} for s in done],
        "records": records,
    }


@task(
    name="encode-file",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    task_run_name="encode-{key}",
)
def encode_file_task(
    uri: str,
    key: str,
    codebook: str,
    fingerprint: str,
    out_dir: str,
    settings: dict[str, Any],
    engine: str = EncodeOptions.engine,
    device: str | None = EncodeOptions.device,
) -> dict[str, Any]:
    """Encode one input file and return its receipt. Safe to retry: the output and the receipt are
    each written atomically, and a re-encoded output is byte-identical."""
    cb = _load(codebook, fingerprint)
    return encode_source(
        Source(uri=uri, key=key), cb, out_dir, _settings(settings), EncodeOptions(engine=engine, device=device)
    )


@task(
    name="write-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient
)
def manifest_task(
    out_dir: str,
    codebook: str,
    fingerprint: str,
    settings: dict[str, Any],
    records: dict[str, dict[str, Any]],
    prune: bool = False,
) -> dict[str, Any]:
    """Write the folder's manifest (every output in the folder) after removing the stale outputs when
    ``prune`` and, with ``unique`` settings, giving every row its semantic-id suffix; returns
    ``manifest``, the ``stale``, ``pruned`` and ``unrecorded`` keys, ``records`` (the receipts, updated
    where a suffix rewrote an output) and ``semantic_ids`` (the suffix step's statistics, or None)."""
    inventory = folder_inventory(out_dir, records)
    pruned = prune_stale(out_dir, inventory) if prune else []
    records = dict(records)
    semantic_ids = None
    encode_settings = _settings(settings)
    if encode_settings.unique:
        semantic_ids, rewritten = assign_suffixes(out_dir, encode_settings, records, inventory)
        get_run_logger().info("semantic-id suffixes: %d outputs rewritten", len(rewritten))
    path = write_manifest(
        out_dir,
        _load(codebook, fingerprint),
        encode_settings,
        records,
        inventory=inventory,
        semantic_ids=semantic_ids,
    )
    return {
        "manifest": str(path),
        "stale": sorted(inventory.stale),
        "pruned": pruned,
        "unrecorded": list(inventory.unrecorded),
        "records": records,
        "semantic_ids": semantic_ids,
    }


def _submit(todo: list[dict[str, str]], dask: str | None, stack: contextlib.ExitStack, **params: Any) -> list[Any]:
    """One ``encode-file`` task per file of ``todo``: on the Dask cluster ``dask`` (its task runner
    entered on ``stack``), else on the flow's thread pool. ``params``: the task's other arguments."""
    if todo and dask:
        from vq_flows.dask import dask_task_runner

        runner = stack.enter_context(dask_task_runner(dask))
        get_run_logger().info("encoding %d files on the Dask cluster %s", len(todo), runner.client.scheduler.address)
        return [runner.submit(encode_file_task, parameters=dict(uri=s["uri"], key=s["key"], **params)) for s in todo]
    if todo:
        settings = params.pop("settings")
        return list(
            encode_file_task.map(
                [s["uri"] for s in todo],
                [s["key"] for s in todo],
                params.pop("codebook"),
                params.pop("fingerprint"),
                params.pop("out_dir"),
                unmapped(settings),
                **params,
            )
        )
    return []


def _gather(
    futures: list[Any], todo: list[dict[str, str]], progress_id: Any, n_done: int, n_files: int
) -> tuple[dict[str, dict[str, Any]], dict[str, BaseException]]:
    """The receipts of the finished ``encode-file`` tasks and the errors of the failed ones, by key,
    moving the progress artifact on as each task finishes."""
    new: dict[str, dict[str, Any]] = {}
    failed: dict[str, BaseException] = {}
    key_of = {id(f): s["key"] for f, s in zip(futures, todo)}
    for finished, future in enumerate(as_completed(futures), start=1):
        key = key_of[id(future)]
        try:
            new[key] = future.result()
        except BaseException as exc:  # noqa: BLE001 - collected, reported and raised by the flow
            failed[key] = exc
            get_run_logger().error("encoding %s failed: %s", key, exc)
        update_progress_artifact(progress_id, 100.0 * (n_done + finished) / n_files)
    return new, failed


@flow(name="encode-embeddings", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))
def encode_embeddings_flow(
    inputs: list[str],
    codebook: str,
    out_dir: str,
    column: str,
    id_column: str | None = EncodeSettings.id_column,
    top_k: int = EncodeSettings.top_k,
    with_distance: bool = EncodeSettings.with_distance,
    keep: Sequence[str] = EncodeSettings.keep,
    code_dtype: str | None = EncodeSettings.code_dtype,
    beam: int = EncodeSettings.beam,
    unique: bool = EncodeSettings.unique,
    overwrite: bool = False,
    prune: bool = False,
    engine: str = EncodeOptions.engine,
    device: str | None = EncodeOptions.device,
    dask: str | None = None,
) -> dict[str, Any]:
    """Encode every input table into ``out_dir`` with the codebook file ``codebook``, exactly once.

    Files whose codes are already in ``out_dir`` (same input, codebook and settings, intact output)
    are skipped; the others get one ``encode-file`` task each (2 retries on non-data errors).
    ``dask``: run the ``encode-file`` tasks on a Dask cluster, ``local:N`` or a scheduler address
    (see :mod:`vq_flows.dask`); planning, the lock and the manifest stay in the flow's process. The
    outputs, receipts and manifest are the same bytes as a local run's. ``beam`` (residual codebooks)
    and ``unique`` (multi-level codebooks: a ``suffix`` making each row's codes unique in the folder)
    are :func:`vq_pipeline.encode_folder.encode_tables`'s.

    Returns:
        ``out_dir``, ``manifest``, ``codebook``, ``codebook_fingerprint``, ``encoded`` and
        ``skipped`` keys, ``rows_encoded``, ``rows_total``, ``files`` (per file: key, rows, status,
        mean_distance), ``new_receipts`` (receipts of the files encoded by this run: rows, distance
        sum and code counts, for drift reports), ``seconds`` and ``flow_run_id``; for a multi-level
        codebook also ``codec``, ``levels`` and ``semantic_ids`` (``unique``: the collision rate before
        suffixes, ``max_suffix``, ``rows_with_suffix``; else None).

    Raises:
        EncodeFailedError: some files failed; every other file is encoded and receipted (a rerun
            picks up only the failed ones), and no manifest is written.
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    settings = EncodeSettings(
        column=column,
        id_column=id_column,
        top_k=top_k,
        with_distance=with_distance,
        keep=tuple(keep),
        code_dtype=code_dtype,
        beam=beam,
        unique=unique,
    )
    check_codec_settings(_load(codebook), settings)  # settings the codec cannot honour are refused before any work
    settings = settings.to_dict()
    EncodeOptions(engine=engine, device=device)  # bad settings are refused before any work
    out = Path(out_dir)
    with encode_lock(out, inputs=inputs):
        plan = plan_task(list(inputs), codebook, str(out), settings, overwrite=overwrite)
        fingerprint, todo, records = plan["codebook_fingerprint"], plan["todo"], dict(plan["records"])
        n_done, n_files = len(plan["done"]), len(todo) + len(plan["done"])
        logger.info("%d files: %d to encode, %d already encoded", n_files, len(todo), n_done)
        progress_id = create_progress_artifact(
            progress=100.0 * n_done / n_files,
            key=scoped_key(PROGRESS_ARTIFACT_KEY, out),
            description=f"files encoded into {out} ({len(todo)} to do)",
        )
        with contextlib.ExitStack() as stack:
            futures = _submit(
                todo,
                dask,
                stack,
                codebook=codebook,
                fingerprint=fingerprint,
                out_dir=str(out),
                settings=settings,
                engine=engine,
                device=device,
            )
            new, failed = _gather(futures, todo, progress_id, n_done, n_files)
        if failed:
            raise encode_failure(failed, len(todo)) from next(iter(failed.values()))
        remove_temporaries(out)  # a worker killed mid-write leaves one; its task was rerun elsewhere
        records.update(new)
        folder = manifest_task(str(out), codebook, fingerprint, settings, records, prune)
        manifest = folder["manifest"]
        records = folder["records"]  # a suffix rewrote outputs: their receipts record the new bytes
        new = {k: records[k] for k in new}

    files = summary_rows(records, new)
    levels = None
    description = f"{len(new)} encoded, {len(records) - len(new)} skipped → {manifest_path(out)}"
    if plan["codec"] != "flat":
        levels = {"codec": plan["codec"], "levels": plan["levels"], "semantic_ids": folder["semantic_ids"]}
        description += f"; {plan['codec']} codes, {plan['levels']} levels"
        if folder["semantic_ids"] is not None:
            ids = folder["semantic_ids"]
            description += (
                f"; collision rate before suffixes {100 * ids['collision_rate']:.2f}%, max suffix {ids['max_suffix']}"
            )
    create_table_artifact(table=files, key=scoped_key(SUMMARY_ARTIFACT_KEY, out), description=description)
    summary = encode_summary(
        out,
        manifest=manifest,
        codebook=codebook,
        fingerprint=fingerprint,
        records=records,
        new=new,
        folder=folder,
        files=files,
        seconds=time.perf_counter() - t0,
        run_id=flow_run.get_id(),
        levels=levels,
    )
    logger.info(
        "encoded %d files (%d rows), skipped %d; manifest %s",
        len(new),
        summary["rows_encoded"],
        len(summary["skipped"]),
        manifest,
    )
    return summary
