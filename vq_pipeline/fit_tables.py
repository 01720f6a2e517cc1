"""Fit a codebook from tables: discover the sources, validate their batches, then fit in memory, on
a seeded sample, or streamed (exact Lloyd that re-reads the tables every iteration).

Table I/O comes from :mod:`vq_pipeline.tables`, the fit from :mod:`vq_pipeline.kmeans`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from . import tables
from .assign import DEFAULT_MEMORY_BUDGET
from .codebook import Codebook
from .errors import DimensionMismatchError, InvalidInputError
from .kmeans import FitCheckpoint, FitOptions, ProgressCallback, fit_options, fit_rows
from .settings import DEFAULT_BATCH_ROWS
from .tables import Source
from .validate import DEFAULT_METRIC, METRICS, as_embeddings, check_choice, check_int, check_nonzero_rows, normalize_rows

#: Fit on all rows in memory when they take at most this many bytes; stream them otherwise.
DEFAULT_DATA_BUDGET = 2 * 2**30



def fit_from_tables(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    column: str,
    n_codes: int,
    metric: str = DEFAULT_METRIC,
    n_iter: int = 50,
    tol: float = 1e-4,
    init: str | torch.Tensor | Codebook = "k-means++",
    seed: int = 0,
    n_init: int = 1,
    engine: str = "auto",
    device: str | torch.device | None = None,
    sample: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    data_budget: int = DEFAULT_DATA_BUDGET,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Codebook:
    """Fit a codebook on the embedding column of tables.

    Training rows: a seeded uniform sample of ``sample`` rows when given; otherwise all rows, held
    in memory when they fit ``data_budget`` bytes, else streamed: exact Lloyd that re-reads the
    tables every iteration and accumulates sums and counts (then k-means++ and 'random' draw from a
    seeded sample of ``min(n_rows, 256 * n_codes)`` rows, and 'first' from the first rows).
    The codebook records the sources, the column, the rows used, the sample seed and a fingerprint
    of the tables. ``checkpoint``: a file that keeps the fit's state after every update; a killed
    fit rerun with the same file, data and settings resumes there and gives the same codebook.
    Other arguments: see :func:`vq_pipeline.fit_codebook`.
    """
    t_start = time.perf_counter()
    metric = check_choice("metric", metric, METRICS)
    batch_rows = check_int("batch_rows", batch_rows, minimum=1)
    data_budget = check_int("data_budget", data_budget, minimum=0)
    sources, counts, dim, provenance = _fit_inputs(inputs, column=column, n_codes=n_codes, storage_options=storage_options)
    n_total = sum(counts)

    if sample is not None:
        sample = check_int("sample", sample, minimum=1, maximum=n_total, hint=f"the tables hold {n_total} rows.")
        positions = np.sort(np.random.default_rng(seed).choice(n_total, size=sample, replace=False))
        x = _validated_sample(sources, counts, positions, column=column, metric=metric, storage_options=storage_options)
        mode = {"mode": "sample", "sample": sample, "sample_seed": seed, "rows_total": n_total}
    elif n_total * dim * 4 <= data_budget:
        x = torch.cat([b for b in _validated_batches(sources, column, batch_rows, dim, metric, storage_options)])
        mode = {"mode": "in-memory", "rows_total": n_total}
    else:
        x = None
        mode = {"mode": "streamed", "rows_total": n_total}

    n_rows = x.shape[0] if x is not None else n_total
    ckpt = FitCheckpoint(checkpoint) if checkpoint is not None else None
    opts = fit_options(
        n_codes, dim=dim, n_rows=n_rows, metric=metric, n_iter=n_iter, tol=tol, init=init, seed=seed,
        n_init=n_init, engine=engine, device=device, memory_budget=memory_budget,
    )
    if x is not None:
        if opts.metric == "cosine":
            x = normalize_rows(x)  # zero rows were refused per file, with their row numbers
        return fit_rows(x, x, opts, extra_stats=mode, progress=progress, t_start=t_start, checkpoint=ckpt, **provenance)

    rows = _StreamedRows(sources, counts, dim=dim, column=column, batch_rows=batch_rows, metric=opts.metric, storage_options=storage_options)
    init_rows = _streamed_init_rows(rows, sources, counts, opts, seed=seed, column=column, mode=mode, storage_options=storage_options)
    return fit_rows(rows, init_rows, opts, extra_stats=mode, progress=progress, t_start=t_start, checkpoint=ckpt, **provenance)


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


def _streamed_init_rows(
    rows: _StreamedRows, sources: Sequence[Source], counts: Sequence[int], opts: FitOptions, *, seed: int, column: str,
    mode: dict[str, Any], storage_options: Any,
) -> torch.Tensor:
    """The rows an init draws from when the tables are not held in memory: the head for 'first',
    else a seeded uniform sample of ``min(n_rows, 256 * n_codes)`` rows (unit rows under cosine)."""
    if opts.init == "first":
        return rows[0 : opts.n_codes].clone()
    n_total = sum(counts)
    n_init_rows = min(n_total, 256 * opts.n_codes)
    positions = np.sort(np.random.default_rng(seed).choice(n_total, size=n_init_rows, replace=False))
    init_rows = _validated_sample(sources, counts, positions, column=column, metric=opts.metric, storage_options=storage_options)
    if opts.metric == "cosine":
        init_rows = normalize_rows(init_rows)
    mode["init_sample"] = n_init_rows
    return init_rows


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


def _validated_batches(
    sources: Sequence[Source], column: str, batch_rows: int, dim: int, metric: str, storage_options: Any
) -> Iterator[torch.Tensor]:
    """Every row of every source as validated (n, dim) float32 batches, in order."""
    for s in sources:
        for batch in tables.iter_batches(s, column=column, batch_rows=batch_rows, storage_options=storage_options):
            yield _validated(batch.x, s, column, dim, metric, row_offset=batch.offset)


def _validated(
    x: torch.Tensor, source: Source, column: str, dim: int, metric: str, *, row_offset: int = 0, row_numbers: Any = None
) -> torch.Tensor:
    """Validate one batch of ``source``; errors name the file and the rows' numbers in it."""
    if x.shape[1] != dim:
        raise DimensionMismatchError(
            f"column={column!r} of {source.uri!r} has dim={x.shape[1]}; expected {dim} like the other tables."
        )
    try:
        x = as_embeddings(x, name=column, row_offset=row_offset, row_numbers=row_numbers)
        if metric == "cosine":
            check_nonzero_rows(x, name=column, row_offset=row_offset, row_numbers=row_numbers)
        return x
    except InvalidInputError as exc:
        raise type(exc)(f"{source.uri}: {exc}") from None


def _validated_sample(
    sources: Sequence[Source], counts: Sequence[int], positions: np.ndarray, *, column: str, metric: str, storage_options: Any
) -> torch.Tensor:
    """The rows at global ``positions``, validated; only those rows are checked."""
    parts = tables.sample_rows(sources, counts, positions, column=column, storage_options=storage_options)
    dim = parts[0][2].shape[1]
    return torch.cat([_validated(x, s, column, dim, metric, row_numbers=local) for s, local, x in parts])


class _StreamedRows:
    """The concatenated sources as row slices, read again on every pass (exact streamed Lloyd).

    Serves consecutive slices ``[a, b)`` (a pass restarts when ``a`` goes back), holding at most one
    slice plus one batch in memory; each batch is validated, and L2-normalized under cosine.
    """

    def __init__(
        self, sources: Sequence[Source], counts: Sequence[int], *, dim: int, column: str, batch_rows: int, metric: str, storage_options: Any
    ) -> None:
        self.shape = (sum(counts), dim)
        self._sources, self._column, self._batch_rows = sources, column, batch_rows
        self._metric, self._storage_options = metric, storage_options
        self._it: Iterator[torch.Tensor] | None = None
        self._buf = torch.empty((0, dim))  # rows [self._start, self._start + len(self._buf))
        self._start = 0

    def _batches(self) -> Iterator[torch.Tensor]:
        for s in self._sources:
            for batch in tables.iter_batches(s, column=self._column, batch_rows=self._batch_rows, storage_options=self._storage_options):
                x = _validated(batch.x, s, self._column, self.shape[1], self._metric, row_offset=batch.offset)
                yield normalize_rows(x) if self._metric == "cosine" else x

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b = rows.start, min(rows.stop, self.shape[0])
        if self._it is None or a < self._start:
            self._it, self._buf, self._start = self._batches(), self._buf[:0], 0
        self._buf, self._start = self._buf[a - self._start :], a
        while self._start + self._buf.shape[0] < b:
            self._buf = torch.cat([self._buf, next(self._it)])
        return self._buf[: b - a]
