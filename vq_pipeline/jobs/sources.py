"""Table sources for Lloyd: the rows of table files, re-read on every E step (exact streamed Lloyd),
and the same tables with the E step mapped over the files (one partition each, computed anywhere).

Each batch is validated (finite, the expected width) and L2-normalized under cosine; the E step and
its pruning come from :mod:`vq_pipeline.compute.data`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vq_pipeline.compute.data import ChunkPlan, EStepStats, MappedTables, RowMap, e_step
from vq_pipeline.compute.assign import DEFAULT_MEMORY_BUDGET
from vq_pipeline.compute.prune import Bounds
from vq_pipeline.errors import DimensionMismatchError, InvalidInputError
from vq_pipeline.io import tables
from vq_pipeline.io.tables import Source
from vq_pipeline.settings import DEFAULT_BATCH_ROWS
from vq_pipeline.validate import as_embeddings, check_nonzero_rows, normalize_rows


@dataclass(frozen=True)
class StreamSpec:
    """How the rows of streamed tables are read and searched: the same for every file of a fit, and
    what a worker needs to compute its partition's E step."""

    column: str
    metric: str
    engine: str = "auto"
    #: Where a worker computes (None: CUDA if its machine has it, else CPU); a fit in this process
    #: computes on the fit's device.
    device: str | None = None
    batch_rows: int = DEFAULT_BATCH_ROWS
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    storage_options: dict[str, Any] | None = None


class StreamedTables:
    """The rows of table files (one embedding column), read again on every E step (exact streamed
    Lloyd) through ``engine`` in chunks that fit ``memory_budget``."""

    def __init__(
        self,
        sources: Sequence[Source],
        counts: Sequence[int],
        spec: StreamSpec,
        *,
        dim: int,
        prune: bool = False,
        bounds: Bounds | None = None,
    ) -> None:
        self._plan = ChunkPlan(spec.engine, spec.memory_budget)
        self.sources, self.counts, self.column, self.metric = list(sources), list(counts), spec.column, spec.metric
        self.batch_rows, self.storage_options = spec.batch_rows, spec.storage_options
        self.n_rows, self.dim = sum(self.counts), dim
        self._last_sample: tuple[Any, torch.Tensor] | None = None
        # The pruning state of the rows, in the order every pass reads them (8 bytes a row).
        self.prune = prune
        self.bounds = (bounds or Bounds()) if prune else None

    def e_step(self, centroids: torch.Tensor) -> EStepStats:
        return e_step(self._rows(), centroids, bounds=self.bounds, **self._plan(centroids, self.n_rows))

    def _rows(self) -> _StreamedRows:
        return _StreamedRows(
            self.sources,
            self.counts,
            dim=self.dim,
            column=self.column,
            batch_rows=self.batch_rows,
            metric=self.metric,
            storage_options=self.storage_options,
        )

    def mapped(self, row_map: RowMap) -> MappedTables:
        return MappedTables(self, row_map)

    def batches(self) -> Iterator[torch.Tensor]:
        return self._rows().batches()

    def sample(self, n: int, generator: np.random.Generator | None) -> torch.Tensor:
        # The levels of a multi-level fit draw the same sample: it is read once.
        key = (n, None if generator is None else repr(generator.bit_generator.state))
        if self._last_sample is None or self._last_sample[0] != key:
            self._last_sample = (key, self._read_sample(n, generator))
        return self._last_sample[1]

    def _read_sample(self, n: int, generator: np.random.Generator | None) -> torch.Tensor:
        if generator is None:
            return self._rows()[0:n].clone()
        positions = np.sort(generator.choice(self.n_rows, size=min(self.n_rows, n), replace=False))
        x = validated_sample(
            self.sources,
            self.counts,
            positions,
            column=self.column,
            metric=self.metric,
            storage_options=self.storage_options,
        )
        return normalize_rows(x) if self.metric == "cosine" else x


#: Called as ``map_e_step(centroids, sources)`` -> one partition's :class:`EStepStats` per source, in order.
MapEStep = Callable[[torch.Tensor, Sequence[Source]], Sequence[EStepStats]]


class PartitionedTables(StreamedTables):
    """Streamed tables whose E step runs elsewhere: ``map_e_step`` computes each file's statistics
    (CPU (n_codes, dim) float32 centroids in), this process merges them in source order. Seeding
    rows are still read here."""

    def __init__(
        self, sources: Sequence[Source], counts: Sequence[int], map_e_step: MapEStep, spec: StreamSpec, *, dim: int
    ) -> None:
        super().__init__(sources, counts, spec, dim=dim)
        self.map_e_step = map_e_step

    def mapped(self, row_map: RowMap) -> MappedTables:
        return MappedTables(self, row_map, partitioned=True)

    def e_step(self, centroids: torch.Tensor, row_map: RowMap | None = None) -> EStepStats:
        c = centroids.to("cpu", torch.float32)
        parts = list(self.map_e_step(c, self.sources) if row_map is None else self.map_e_step(c, self.sources, row_map))
        if len(parts) != len(self.sources):
            raise InvalidInputError(
                f"map_e_step returned {len(parts)} results for {len(self.sources)} sources; expected one per "
                f"source, in source order. Fix: return one partition's statistics for each source it is given."
            )
        return EStepStats.merge(parts).to(centroids.device)


def validated(
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


def validated_batches(
    sources: Sequence[Source], column: str, batch_rows: int, dim: int, metric: str, storage_options: Any
) -> Iterator[torch.Tensor]:
    """Every row of every source as validated (n, dim) float32 batches, in order."""
    for s in sources:
        for batch in tables.iter_batches(s, column=column, batch_rows=batch_rows, storage_options=storage_options):
            yield validated(batch.x, s, column, dim, metric, row_offset=batch.offset)


def validated_sample(
    sources: Sequence[Source],
    counts: Sequence[int],
    positions: np.ndarray,
    *,
    column: str,
    metric: str,
    storage_options: Any,
) -> torch.Tensor:
    """The rows at global ``positions``, validated; only those rows are checked."""
    parts = tables.sample_rows(sources, counts, positions, column=column, storage_options=storage_options)
    dim = parts[0][2].shape[1]
    return torch.cat([validated(x, s, column, dim, metric, row_numbers=local) for s, local, x in parts])


class _StreamedRows:
    """The concatenated sources as row slices, for one pass (exact streamed Lloyd).

    Serves consecutive slices ``[a, b)`` (a pass restarts when ``a`` goes back), holding at most one
    slice plus one batch in memory; each batch is validated, and L2-normalized under cosine.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        counts: Sequence[int],
        *,
        dim: int,
        column: str,
        batch_rows: int,
        metric: str,
        storage_options: Any,
    ) -> None:
        self.shape = (sum(counts), dim)
        self._sources, self._column, self._batch_rows = sources, column, batch_rows
        self._metric, self._storage_options = metric, storage_options
        self._it: Iterator[torch.Tensor] | None = None
        self._buf = torch.empty((0, dim))  # rows [self._start, self._start + len(self._buf))
        self._start = 0

    def _batches(self) -> Iterator[torch.Tensor]:
        for s in self._sources:
            for batch in tables.iter_batches(
                s, column=self._column, batch_rows=self._batch_rows, storage_options=self._storage_options
            ):
                x = validated(batch.x, s, self._column, self.shape[1], self._metric, row_offset=batch.offset)
                yield normalize_rows(x) if self._metric == "cosine" else x

    def batches(self) -> Iterator[torch.Tensor]:
        """Every row once, as validated batches (unit rows under cosine)."""
        return self._batches()

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b = rows.start, min(rows.stop, self.shape[0])
        if self._it is None or a < self._start:
            self._it, self._buf, self._start = self._batches(), self._buf[:0], 0
        self._buf, self._start = self._buf[a - self._start :], a
        while self._start + self._buf.shape[0] < b:
            self._buf = torch.cat([self._buf, next(self._it)])
        return self._buf[: b - a]
