"""Fit a codebook from tables: discover the sources, validate their batches, then fit in memory, on
a seeded sample, or streamed (exact Lloyd that re-reads the tables every iteration).

Table I/O comes from :mod:`vq_pipeline.tables`, the data sources from :mod:`vq_pipeline.data`, the fit
from :mod:`vq_pipeline.kmeans`: discovery -> data source -> fit.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import tables
from .codebook import Codebook
from .data import SEED_ROWS_PER_CODE, DataSource, InMemoryRows, StreamedTables, validated_batches, validated_sample
from .errors import DimensionMismatchError, InvalidInputError
from .checkpoint import FitCheckpoint
from .kmeans import FitOptions, ProgressCallback, fit_options, fit_source
from .settings import DEFAULT_BATCH_ROWS, FitSettings
from .tables import Source
from .levels import check_product_dim
from .validate import check_int, normalize_rows

#: Fit on all rows in memory when they take at most this many bytes; stream them otherwise.
DEFAULT_DATA_BUDGET = 2 * 2**30


def fit_from_tables(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    column: str,
    n_codes: int,
    metric: str = FitSettings.metric,
    n_iter: int = FitSettings.n_iter,
    tol: float = FitSettings.tol,
    init: str | torch.Tensor | Codebook = FitSettings.init,
    seed: int = FitSettings.seed,
    n_init: int = FitSettings.n_init,
    engine: str = FitSettings.engine,
    device: str | torch.device | None = FitSettings.device,
    sample: int | None = None,
    memory_budget: int = FitSettings.memory_budget,
    codec: str = FitSettings.codec,
    levels: int = FitSettings.levels,
    train_beam: int = FitSettings.train_beam,
    prune: bool = FitSettings.prune,
    data_budget: int = DEFAULT_DATA_BUDGET,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Codebook:
    """Fit a codebook on the embedding column of tables.

    Training rows: a seeded uniform sample of ``sample`` rows when given; otherwise all rows, held
    in memory when they fit ``data_budget`` bytes, else streamed: exact Lloyd that re-reads the
    tables every iteration and accumulates sums and counts (then k-means||, k-means++ and 'random'
    draw from a seeded sample of ``min(n_rows, 256 * n_codes)`` rows, and 'first' from the first rows).
    The codebook records the sources, the column, the rows used, the sample seed and a fingerprint
    of the tables. ``checkpoint``: a file that keeps the fit's state after every update; a killed
    fit rerun with the same file, data and settings resumes there and gives the same codebook.
    Other arguments: see :func:`vq_pipeline.fit_codebook`.
    """
    t_start = time.perf_counter()
    settings = FitSettings.from_keywords(locals())  # refused before any work
    batch_rows = check_int("batch_rows", batch_rows, minimum=1)
    data_budget = check_int("data_budget", data_budget, minimum=0)
    ckpt = FitCheckpoint.for_inputs(checkpoint, inputs)  # refused before any work
    sources, counts, dim, provenance = _fit_inputs(
        inputs, column=column, n_codes=n_codes, storage_options=storage_options
    )
    if settings.codec == "product":
        check_product_dim(dim, settings.levels)  # before any row is read
    n_total = sum(counts)

    if sample is not None:
        sample = check_int("sample", sample, minimum=1, maximum=n_total, hint=f"the tables hold {n_total} rows.")
        positions = np.sort(np.random.default_rng(seed).choice(n_total, size=sample, replace=False))
        x = validated_sample(sources, counts, positions, column=column, metric=metric, storage_options=storage_options)
        mode = {"mode": "sample", "sample": sample, "sample_seed": seed, "rows_total": n_total}
    elif n_total * dim * 4 <= data_budget:
        x = torch.cat([b for b in validated_batches(sources, column, batch_rows, dim, metric, storage_options)])
        mode = {"mode": "in-memory", "rows_total": n_total}
    else:
        x = None
        mode = {"mode": "streamed", "rows_total": n_total}

    n_rows = x.shape[0] if x is not None else n_total
    opts = fit_options(n_codes, settings, dim=dim, n_rows=n_rows)
    if x is not None:
        if opts.metric == "cosine":
            x = normalize_rows(x)  # zero rows were refused per file, with their row numbers
        source: DataSource = InMemoryRows(x, engine=opts.engine, memory_budget=opts.memory_budget, prune=opts.prune)
    else:
        source = StreamedTables(
            sources,
            counts,
            dim=dim,
            column=column,
            metric=opts.metric,
            batch_rows=batch_rows,
            storage_options=storage_options,
            engine=opts.engine,
            memory_budget=opts.memory_budget,
            prune=opts.prune,
        )
        mode.update(init_sample_stats(opts, n_total))
    return fit_source(source, opts, extra_stats=mode, progress=progress, t_start=t_start, checkpoint=ckpt, **provenance)


def init_sample_stats(opts: FitOptions, n_rows: int) -> dict[str, Any]:
    """What a fit from tables not held in memory records about its seeding sample: its size, when
    the init draws one (k-means||, k-means++, 'random'; see :func:`vq_pipeline.kmeans.fit_source`)."""
    if opts.init_name in ("first", "tensor"):
        return {}
    return {"init_sample": min(n_rows, SEED_ROWS_PER_CODE * opts.n_codes)}


def _fit_inputs(
    inputs: Sequence[str | os.PathLike[str]], *, column: str, n_codes: Any, storage_options: Any
) -> tuple[list[Source], list[int], int, dict[str, Any]]:
    """(sources, row counts, dim, provenance) of a fit's tables; refuses tables without rows."""
    sources = tables.discover(inputs, storage_options=storage_options)
    infos = [tables.inspect_source(s, column=column, storage_options=storage_options) for s in sources]
    counts = [info.n_rows for info in infos]
    if sum(counts) == 0:
        raise InvalidInputError(
            f"the tables {[s.uri for s in sources]} hold no rows; expected at least n_codes={n_codes} rows. "
            f"Fix: point at tables with data."
        )
    dim = _common_dim(sources, infos, column, storage_options)
    fingerprint = hashlib.sha256(f"vq-tables-v1|{column}|".encode())
    for s in sources:
        fingerprint.update(f"{s.key}={tables.fingerprint(s, storage_options=storage_options)}|".encode())
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
