"""Fit a codebook from tables: discover the sources, validate their batches, then fit in memory, on
a seeded sample, or streamed (exact Lloyd that re-reads the tables every iteration).

Table I/O comes from :mod:`vq_pipeline.io.tables`, the data sources from :mod:`vq_pipeline.compute.data`, the fit
from :mod:`vq_pipeline.fitting.kmeans`: discovery -> data source -> fit.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.data import SEED_ROWS_PER_CODE, DataSource, InMemoryRows
from vq_pipeline.compute.levels import check_product_dim
from vq_pipeline.compute.lloyd import ProgressCallback
from vq_pipeline.errors import DimensionMismatchError, InvalidInputError
from vq_pipeline.fitting.checkpoint import FitCheckpoint
from vq_pipeline.fitting.kmeans import fit_source
from vq_pipeline.compute.scorecard import DEFAULT_SAMPLE_ROWS, sample_rows
from vq_pipeline.fitting.options import (
    SCORECARD_STREAM,
    FitOptions,
    codebook_scorecard,
    fit_options,
    split_holdout,
    with_holdout_stats,
)
from vq_pipeline.io import tables
from vq_pipeline.io.discovery import Source
from vq_pipeline.jobs.mappers import Mapper
from vq_pipeline.jobs.partitioned import Exchange, mapped_e_step
from vq_pipeline.jobs.sources import PartitionedTables, StreamedTables, StreamSpec, validated_batches, validated_sample
from vq_pipeline.settings import FitSettings, TableSettings
from vq_pipeline.validate import check_int, normalize_rows


def fit_from_tables(
    inputs: Sequence[str | os.PathLike[str]],
    n_codes: int | None,
    reading: TableSettings,
    settings: FitSettings | None = None,
    *,
    mapper: Mapper | None = None,
    scratch: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Codebook:
    """Fit a codebook of ``n_codes`` codes on the embedding column of tables: the one fit behind
    ``vq fit``, the fit flow and Dask. ``n_codes`` may be None for scalar and binary codebooks (see
    :func:`vq_pipeline.fitting.options.fit_options`), which are fitted in a few passes over the rows
    (in memory, streamed or partitioned alike: :mod:`vq_pipeline.fitting.quantizers`).

    Args:
        inputs: table files, globs or folders (local or object storage).
        reading: which rows and how (:class:`~vq_pipeline.settings.TableSettings`: the column, a
            sample, the memory budget for rows, batches, storage options).
        settings: how to fit (:class:`~vq_pipeline.settings.FitSettings`; default: the defaults).
        mapper: None: fit in this process. A mapper (:mod:`vq_pipeline.jobs.mappers`): exact Lloyd as
            map-reduce over the files, each iteration one E step per file through the mapper (threads,
            Prefect tasks, Dask workers), the files' statistics reduced here in file order; centroids
            and statistics travel as files in a folder inside ``scratch``, which the workers must see.
        progress: called with seeding and iteration events.
        checkpoint: a file that keeps the fit's state after every update; a killed fit rerun with the
            same file, data and settings resumes there and gives the same codebook.

    Training rows: a seeded uniform sample of ``reading.sample`` rows when given; otherwise all rows,
    held in memory when they fit ``reading.data_budget`` bytes, else streamed: exact Lloyd that
    re-reads the tables every iteration and accumulates sums and counts (then k-means||, k-means++ and
    'random' draw from a seeded sample of ``min(n_rows, 256 * n_codes)`` rows, and 'first' from the
    first rows). A mapper fits every row (a sample is meant to fit one machine). The partitioned fit
    equals the streamed one from the same init up to float64 summation order. The codebook records
    the sources, the column, the rows used, the sample seed and a fingerprint of the tables.

    ``settings.holdout``: that share of the rows in memory (the sample's, or all rows in table order)
    is kept out of the fit, chosen as :func:`vq_pipeline.fitting.options.holdout_rows` says, and their
    mean distance to their codes is recorded in ``stats["holdout"]``; refused (before any row is read)
    for streamed or partitioned fits.

    ``stats["scorecard"]``: the codes' scorecard on the held-out rows when there are any, else on a seeded
    sample of at most 1,024 training rows (drawn through the data source: read from the tables when they are
    streamed or partitioned); see :func:`vq_pipeline.fitting.kmeans.fit_source`.
    """
    t_start = time.perf_counter()
    settings = FitSettings() if settings is None else settings
    if mapper is not None and scratch is None:
        raise InvalidInputError(
            "mapper given without scratch; expected a folder the workers can see for the partitioned fit's "
            "exchange files. Fix: pass scratch= (e.g. the folder of the codebook file)."
        )
    ckpt = FitCheckpoint.for_inputs(checkpoint, inputs)  # refused before any work
    sources, counts, dim, provenance = fit_inputs(
        inputs, column=reading.column, n_codes=n_codes, storage_options=reading.storage_options
    )
    if settings.codec == "product":
        check_product_dim(dim, settings.levels)  # before any row is read
    fit = functools.partial(fit_source, progress=progress, t_start=t_start, checkpoint=ckpt, **provenance)
    partitioned = mapper is not None and reading.sample is None
    if settings.holdout and (partitioned or streamed(counts, dim, reading)):
        how = (
            "through a mapper"
            if partitioned
            else f"streamed (their {sum(counts) * dim * 4:,} bytes exceed data_budget={reading.data_budget:,})"
        )
        raise InvalidInputError(
            f"holdout={settings.holdout} but the {sum(counts):,} training rows are fitted {how}; expected the rows in "
            f"memory, where the held-out rows are chosen. Fix: pass sample= (vq fit --sample N) to fit a sample in "
            f"memory, raise data_budget, or pass holdout=0."
        )
    if partitioned:
        opts = fit_options(n_codes, settings, dim=dim, n_rows=sum(counts))
        spec = stream_spec(reading, opts, device=settings.device)
        with Exchange(scratch) as exchange:
            map_e_step = mapped_e_step(mapper, exchange, spec, prune=opts.prune)
            source = PartitionedTables(sources, counts, map_e_step, spec, dim=dim)
            mode = {"mode": "partitioned", "rows_total": sum(counts), "partitions": len(sources)}
            return fit(source, opts, extra_stats={**mode, **init_sample_stats(opts, sum(counts))})
    source, opts, mode, held = _local_source(sources, counts, dim, n_codes, reading, settings)
    return with_holdout_stats(fit(source, opts, extra_stats=mode, held=held), held, opts)


def tables_scorecard(
    codebook: str,
    inputs: Sequence[str | os.PathLike[str]],
    keys: Sequence[str],
    column: str,
    seed: int,
    reference: str | None = None,
    storage_options: Any = None,
) -> dict[str, Any] | None:
    """The scorecard of the codebook file ``codebook`` on a seeded uniform sample of at most
    :data:`~vq_pipeline.compute.scorecard.DEFAULT_SAMPLE_ROWS` rows of the table files under ``inputs``
    whose key is in ``keys`` (a scheduled run's new files; :func:`vq_pipeline.fitting.options.codebook_scorecard`),
    drawn by :func:`~vq_pipeline.compute.scorecard.sample_rows` with ``[seed, SCORECARD_STREAM]``; with
    ``reference`` (the codebook file it replaced) the churn of their codes. None when those files hold
    fewer than 2 rows. ``sample`` is "new rows"; ``seconds`` the time it took, reading included."""
    t0 = time.perf_counter()
    wanted = set(keys)
    sources = [s for s in tables.discover(inputs, storage_options=storage_options) if s.key in wanted]
    counts = [tables.inspect_source(s, column=column, storage_options=storage_options).n_rows for s in sources]
    if sum(counts) < 2:
        return None
    current = Codebook.load(codebook)
    positions = sample_rows(sum(counts), DEFAULT_SAMPLE_ROWS, [seed, SCORECARD_STREAM])
    x = validated_sample(
        sources, counts, positions, column=column, metric=current.metric, storage_options=storage_options
    )
    previous = None if reference is None else Codebook.load(reference)
    card = codebook_scorecard(current, x, reference=previous)
    return {"sample": "new rows", "files": len(sources), **card, "seconds": time.perf_counter() - t0}


def streamed(counts: Sequence[int], dim: int, reading: TableSettings) -> bool:
    """Whether a fit of every row in this process streams them (they take more than ``reading.data_budget``)."""
    return reading.sample is None and sum(counts) * dim * 4 > reading.data_budget


def _local_source(
    sources: Sequence[Source],
    counts: Sequence[int],
    dim: int,
    n_codes: int,
    reading: TableSettings,
    settings: FitSettings,
) -> tuple[DataSource, FitOptions, dict[str, Any], torch.Tensor | None]:
    """The rows of a fit in this process (a sample or all rows in memory, else streamed), its
    resolved options, what the codebook records about the rows, and the rows held out of the fit
    (``settings.holdout`` of the rows in memory; None without)."""
    n_total, column, storage_options, metric = sum(counts), reading.column, reading.storage_options, settings.metric
    if reading.sample is not None:
        sample = check_int(
            "sample", reading.sample, minimum=1, maximum=n_total, hint=f"the tables hold {n_total} rows."
        )
        positions = np.sort(np.random.default_rng(settings.seed).choice(n_total, size=sample, replace=False))
        x = validated_sample(sources, counts, positions, column=column, metric=metric, storage_options=storage_options)
        mode: dict[str, Any] = {"mode": "sample", "sample": sample, "sample_seed": settings.seed, "rows_total": n_total}
    elif not streamed(counts, dim, reading):
        x = torch.cat(list(validated_batches(sources, column, reading.batch_rows, dim, metric, storage_options)))
        mode = {"mode": "in-memory", "rows_total": n_total}
    else:
        x = None
        mode = {"mode": "streamed", "rows_total": n_total}
    opts = fit_options(n_codes, settings, dim=dim, n_rows=x.shape[0] if x is not None else n_total)
    if x is not None:
        if opts.metric == "cosine":
            x = normalize_rows(x)  # zero rows were refused per file, with their row numbers
        x, held = split_holdout(x, opts)  # positions among the rows in memory (the sample's, or all in order)
        source = InMemoryRows(x, engine=opts.engine, memory_budget=opts.memory_budget, prune=opts.prune)
        return source, opts, mode, held
    source = StreamedTables(sources, counts, stream_spec(reading, opts), dim=dim, prune=opts.prune)
    return source, opts, {**mode, **init_sample_stats(opts, n_total)}, None


def stream_spec(reading: TableSettings, opts: FitOptions, device: Any = None) -> StreamSpec:
    """How a fit's streamed tables are read and searched (``device``: where workers compute)."""
    return StreamSpec(
        reading.column,
        opts.metric,
        opts.engine,
        device,
        reading.batch_rows,
        opts.memory_budget,
        reading.storage_options,
    )


def init_sample_stats(opts: FitOptions, n_rows: int) -> dict[str, Any]:
    """What a fit from tables not held in memory records about its seeding sample: its size, when
    the init draws one (k-means||, k-means++, 'random'; see :func:`vq_pipeline.fitting.kmeans.fit_source`).
    Scalar and binary codebooks draw none (their samples, when any, are recorded by their fits)."""
    if opts.init_name in ("first", "tensor") or opts.per_dimension:
        return {}
    return {"init_sample": min(n_rows, SEED_ROWS_PER_CODE * opts.n_codes)}


def fit_inputs(
    inputs: Sequence[str | os.PathLike[str]], *, column: str, n_codes: Any, storage_options: Any
) -> tuple[list[Source], list[int], int, dict[str, Any]]:
    """(sources, row counts, dim, provenance) of a fit's tables; refuses tables without rows."""
    sources = tables.discover(inputs, storage_options=storage_options)
    infos = [tables.inspect_source(s, column=column, storage_options=storage_options) for s in sources]
    counts = [info.n_rows for info in infos]
    if sum(counts) == 0:
        raise InvalidInputError(
            f"the tables {[s.uri for s in sources]} hold no rows; expected at least "
            f"{'1 row' if n_codes is None else f'n_codes={n_codes} rows'}. "
            f"Fix: point at tables with data."
        )
    dim = _common_dim(sources, infos, column, storage_options)
    fingerprint = hashlib.sha256(f"vq-tables-v1|{column}|".encode())
    for s in sources:
        fingerprint.update(os.fsencode(f"{s.key}={tables.fingerprint(s, storage_options=storage_options)}|"))
    provenance = dict(data_fingerprint=fingerprint.hexdigest(), sources=[s.uri for s in sources], column=column)
    return list(sources), counts, dim, provenance


def _common_dim(sources: Sequence[Source], infos: Sequence[tables.TableInfo], column: str, storage_options: Any) -> int:
    dims = {}
    for s, info in zip(sources, infos):
        dim = info.dim
        if dim is None and info.n_rows:  # a List column: its first batch tells
            dim = next(tables.iter_batches(s, column=column, batch_rows=1, storage_options=storage_options)).x.shape[1]
        if dim is not None:
            dims[s.uri] = dim
    if len(set(dims.values())) > 1:
        raise DimensionMismatchError(
            f"the tables disagree on the embedding dim of column={column!r}: {dims}; expected one dim. "
            f"Fix: fit each embedding model's tables separately."
        )
    return next(iter(dims.values()))
