"""The data seam of Lloyd: where the rows live (in memory, streamed tables, partitions on workers).

In the spirit of FAISS ``contrib/clustering.py``'s ``DatasetAssign``: Lloyd's loop only ever asks a
:class:`DataSource` for its size, for one E step against given centroids (:class:`EStepStats`) and
for the rows that seeding draws from. A multi-level fit asks a source for ``mapped(row_map)``: the
same rows as one level sees them (a slice of the columns, or what earlier levels leave, computed per
batch: see :mod:`vq_pipeline.compute.levels`), and :func:`e_steps` runs the E steps of several levels of one
streamed source in one pass over its tables. Three sources:

* :class:`InMemoryRows`: a tensor (any device), the E step through an engine in chunks;
* :class:`vq_pipeline.jobs.sources.StreamedTables`: table files re-read on every E step (exact
  streamed Lloyd), each batch validated, L2-normalized under cosine;
* :class:`vq_pipeline.jobs.sources.PartitionedTables`: the same tables, with the E step mapped over
  the files (one partition each, computed anywhere) and reduced by :meth:`EStepStats.merge`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from vq_pipeline.compute.assign import DEFAULT_MEMORY_BUDGET, nearest_in_chunks, plan_chunk_rows
from vq_pipeline.compute.codecs import rotate_rows
from vq_pipeline.compute.engines import Engine, get_engine
from vq_pipeline.compute.prune import Bounds, PrunedSearch
from vq_pipeline.errors import InvalidInputError

# At most this many far-point candidates are kept per E step for empty-cluster repair.
MAX_FAR_CANDIDATES = 1024
#: Seeding from tables not held in memory draws from a sample of this many rows per code.
SEED_ROWS_PER_CODE = 256


@dataclass(frozen=True)
class EStepStats:
    """What one E step accumulates: enough for the M step, the objective and empty-cluster repair.

    Attributes:
        sums: (n_codes, dim) float64, the sum of the rows assigned to each code (unit rows under cosine).
        counts: (n_codes,) int64, how many rows each code was assigned.
        objective: the sum over rows of the squared L2 distance to the nearest centroid.
        far_sqdist: (n_far,) float32, descending: the largest of those distances, ``n_far <=
            min(n_codes, MAX_FAR_CANDIDATES)``.
        far_rows: (n_far, dim) float32, the rows they belong to (where empty codes are moved).
        n_pruned: rows whose search the bounds of the pruned E step skipped (:mod:`vq_pipeline.compute.prune`).
        bound_bytes: memory the pruning state of these rows holds (0 without pruning).
        balance: a balanced E step's capped assignment (:mod:`vq_pipeline.compute.balanced`): ``balance``,
            ``cap``, ``max_code_size``, its cost, lower bound and gap; None for the nearest-code E step.

    All tensors on one device (the compute device, or the CPU on the wire).
    """

    sums: torch.Tensor
    counts: torch.Tensor
    objective: float
    far_sqdist: torch.Tensor
    far_rows: torch.Tensor
    n_pruned: int = 0
    bound_bytes: int = 0
    balance: dict[str, Any] | None = None

    def to(self, device: torch.device | str) -> EStepStats:
        return EStepStats(
            self.sums.to(device),
            self.counts.to(device),
            float(self.objective),
            self.far_sqdist.to(device),
            self.far_rows.to(device),
            self.n_pruned,
            self.bound_bytes,
            self.balance,
        )

    @classmethod
    def merge(cls, parts: Sequence[EStepStats]) -> EStepStats:
        """The statistics of the union of the parts' rows. Sums are added in the given order (pass
        the parts in a fixed order, e.g. source order, for the same result on every run); the
        farthest rows are kept over all parts, as :func:`farthest` keeps them."""
        if not parts:
            raise InvalidInputError(
                "parts=[]: expected the statistics of at least one partition. Fix: pass one per source."
            )
        sums = parts[0].sums.clone()  # (n_codes, dim) float64
        counts = parts[0].counts.clone()  # (n_codes,) int64
        objective = parts[0].objective
        for p in parts[1:]:
            sums += p.sums
            counts += p.counts
            objective += p.objective
        far_d, far_x = farthest(
            torch.cat([p.far_sqdist for p in parts]), torch.cat([p.far_rows for p in parts]), sums.shape[0]
        )
        pruned, state = sum(p.n_pruned for p in parts), sum(p.bound_bytes for p in parts)
        return cls(sums, counts, objective, far_d, far_x, pruned, state)


def farthest(sqdist: torch.Tensor, rows: torch.Tensor, n_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one far-row merge: keep the ``min(n_codes, MAX_FAR_CANDIDATES)`` largest distances.

    Args:
        sqdist: (m,) float32 candidate distances. rows: (m, dim) float32, their rows.

    Returns:
        (n_far,) float32 descending and (n_far, dim) float32.
    """
    keep = sqdist.topk(min(n_codes, MAX_FAR_CANDIDATES, sqdist.shape[0]), sorted=True).indices
    return sqdist[keep], rows[keep]


class Rows(Protocol):
    """Row-sliceable embeddings: ``rows[a:b]`` gives a (b - a, dim) float32 tensor."""

    shape: Any

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


def e_step(
    x: Rows,
    c: torch.Tensor,
    *,
    engine: Engine,
    chunk_rows: int,
    bounds: Bounds | None = None,
    part_of: tuple[PrunedSearch, int] | None = None,
) -> EStepStats:
    """Assign every row of ``x`` to its nearest centroid and accumulate sums, counts, objective.

    Args:
        x: (n_rows, dim) float32 rows (unit rows under cosine), any device.
        c: (n_codes, dim) float32 centroids on the compute device.
        bounds: the pruning state of these rows (:mod:`vq_pipeline.compute.prune`), used and updated: rows
            whose bounds prove their code skip the search. The statistics are the same either way.
        part_of: ``(search, offset)``: ``x`` is the rows from ``offset`` on of a longer pass whose
            pruned search is ``search`` (the caller finishes it, and counts its pruned rows).
    """
    search: Any = bounds.step(c, x.shape[0], engine) if bounds is not None else None
    if part_of is not None:
        whole, offset = part_of

        def search(rows: slice, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return whole(slice(rows.start + offset, rows.stop + offset), xb)

    n_codes, dim = c.shape
    n_far = min(n_codes, MAX_FAR_CANDIDATES)
    sums = torch.zeros((n_codes, dim), dtype=torch.float64, device=c.device)  # (n_codes, dim)
    counts = torch.zeros(n_codes, dtype=torch.int64, device=c.device)  # (n_codes,)
    objective = torch.zeros((), dtype=torch.float64, device=c.device)
    far_d = torch.empty(0, dtype=torch.float32, device=c.device)  # (<= n_far,)
    far_x = torch.empty((0, dim), dtype=torch.float32, device=c.device)  # (<= n_far, dim)
    for _, xb, sqdist, idx in nearest_in_chunks(x, c, k=1, engine=engine, chunk_rows=chunk_rows, search=search):
        d, code = sqdist[:, 0], idx[:, 0]  # (n,), (n,)
        sums.index_add_(0, code, xb.double())
        counts += torch.bincount(code, minlength=n_codes)
        objective += d.double().sum()
        # Once n_far rows are kept, only rows farther than the nearest of them can enter: the kept
        # distances are those of merging every chunk's top rows, at a fraction of the cost (which of
        # several rows at exactly the same distance is kept is no more defined than topk's order).
        if far_d.shape[0] == n_far:
            enter = (d > far_d[-1]).nonzero()[:, 0]  # (e,)
            if enter.shape[0] == 0:
                continue
            d, xb = d[enter], xb[enter]  # (e,), (e, dim)
        top = d.topk(min(n_far, d.shape[0]), sorted=True)  # the chunk's farthest rows
        far_d, far_x = farthest(torch.cat([far_d, top.values]), torch.cat([far_x, xb[top.indices]]), n_codes)
    if bounds is None:
        return EStepStats(sums, counts, float(objective), far_d, far_x)
    search.finish()
    return EStepStats(sums, counts, float(objective), far_d, far_x, search.n_pruned, bounds.nbytes)


class DataSource(Protocol):
    """What Lloyd's loop needs of its data: rows (unit rows under cosine), validated, finite."""

    n_rows: int
    dim: int

    def e_step(self, centroids: torch.Tensor) -> EStepStats:
        """One E step against (n_codes, dim) float32 centroids on the compute device; the stats on that device."""
        ...

    def sample(self, n: int, generator: np.random.Generator | None) -> torch.Tensor:
        """(m, dim) float32 rows that seeding draws from, in row order: the first ``min(n, n_rows)``
        rows when ``generator`` is None, else a uniform sample of ``min(n, n_rows)`` distinct rows
        drawn with it. A source that holds its rows in memory returns all of them (seeding then
        draws from every row)."""
        ...

    def mapped(self, row_map: RowMap) -> DataSource:
        """The same rows as ``row_map`` turns them (one level of a multi-level codebook)."""
        ...

    def batches(self) -> Iterator[torch.Tensor]:
        """Every row once, in order, as (n, dim) float32 batches (a final statistics pass)."""
        ...


class RowMap(Protocol):
    """(n, dim) float32 rows -> (n * expansion, out_dim) float32 rows, each row's ``expansion`` rows in
    a block (see :class:`vq_pipeline.compute.levels.RowMap`)."""

    expansion: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def out_dim(self, dim: int) -> int: ...


class ChunkPlan:
    """The engine and rows per chunk of an E step computed in this process, per device and n_codes."""

    def __init__(self, engine: str, memory_budget: int) -> None:
        self._engine, self._memory_budget = engine, memory_budget
        self._plans: dict[tuple[torch.device, int, int, int], tuple[Engine, int]] = {}

    def __call__(self, centroids: torch.Tensor, n_rows: int) -> dict[str, Any]:
        (n_codes, dim), device = centroids.shape, centroids.device
        key = (device, n_rows, n_codes, dim)
        if key not in self._plans:
            eng = get_engine(self._engine, device, dim)
            chunk = plan_chunk_rows(max(n_rows, 1), n_codes, dim, k=1, engine=eng, memory_budget=self._memory_budget)
            self._plans[key] = (eng, chunk)
        eng, chunk = self._plans[key]
        return {"engine": eng, "chunk_rows": chunk}


class InMemoryRows:
    """A (n_rows, dim) float32 tensor on any device (validated; unit rows under cosine); E steps
    through ``engine`` in chunks that fit ``memory_budget``, pruned by the triangle inequality
    (:mod:`vq_pipeline.compute.prune`, the state kept here) when ``prune``."""

    def __init__(
        self, x: torch.Tensor, *, engine: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET, prune: bool = False
    ) -> None:
        self.x = x
        self.n_rows, self.dim = x.shape
        self._plan = ChunkPlan(engine, memory_budget)
        self.prune = prune
        self._bounds = Bounds() if prune else None

    def e_step(self, centroids: torch.Tensor) -> EStepStats:
        return e_step(self.x, centroids, bounds=self._bounds, **self._plan(centroids, self.n_rows))

    def sample(self, n: int, generator: np.random.Generator | None) -> torch.Tensor:
        return self.x

    def mapped(self, row_map: RowMap) -> InMemoryRows:
        # In memory, a level's rows are computed once, not on every E step.
        parts = [row_map(self.x[a : a + 65_536]) for a in range(0, self.n_rows, 65_536)]
        x = torch.cat(parts) if parts else row_map(self.x)
        return InMemoryRows(x, engine=self._plan._engine, memory_budget=self._plan._memory_budget, prune=self.prune)

    def batches(self) -> Iterator[torch.Tensor]:
        for a in range(0, self.n_rows, 65_536):
            yield self.x[a : a + 65_536]


class MappedTables:
    """One level's view of streamed (or partitioned) tables: every batch read is turned by ``row_map``
    (never written out). The E step of partitioned tables sends ``row_map`` to the workers."""

    def __init__(self, base: Any, row_map: RowMap, *, partitioned: bool = False) -> None:
        self.base, self.row_map, self.partitioned = base, row_map, partitioned
        self.n_rows, self.dim = base.n_rows * row_map.expansion, row_map.out_dim(base.dim)
        self._plan = base._plan
        self._bounds = Bounds() if base.prune and not partitioned else None

    def e_step(self, centroids: torch.Tensor) -> EStepStats:
        if self.partitioned:
            return self.base.e_step(centroids, self.row_map)  # type: ignore[call-arg]
        plan, k = self._plan(centroids, self.n_rows), self.row_map.expansion
        # Chunks of whole blocks: each reads on from the last (the tables are read once per pass).
        plan = {**plan, "chunk_rows": max(k, plan["chunk_rows"] - plan["chunk_rows"] % k)}
        return e_step(_MappedRows(self.base._rows(), self.row_map, self.dim), centroids, bounds=self._bounds, **plan)

    def sample(self, n: int, generator: np.random.Generator | None) -> torch.Tensor:
        return self.row_map(self.base.sample(n, generator))

    def mapped(self, row_map: RowMap) -> DataSource:
        raise InvalidInputError("a level's rows cannot be mapped again; map the base source.")

    def batches(self) -> Iterator[torch.Tensor]:
        return (self.row_map(x) for x in self.base.batches())


class _MappedRows:
    """Row slices of ``rows`` turned by ``row_map`` (row ``i`` of the result comes from row
    ``i // expansion`` of ``rows``)."""

    def __init__(self, rows: Rows, row_map: RowMap, dim: int) -> None:
        self._rows, self._map, self._k = rows, row_map, row_map.expansion
        self.shape = (rows.shape[0] * self._k, dim)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b, k = rows.start, min(rows.stop, self.shape[0]), self._k
        first, last = a // k, -(-b // k)  # the source rows that rows [a, b) come from
        return self._map(self._rows[first:last])[a - first * k : b - first * k]


def e_steps(levels: Sequence[tuple[DataSource, torch.Tensor]]) -> list[EStepStats]:
    """One E step of each (source, centroids) pair. The levels of one streamed table source (not
    partitioned) share one pass over its tables: every batch is read once and turned by each level's
    map; other sources run their own E step."""
    out: list[EStepStats | None] = [None] * len(levels)
    shared: dict[int, list[int]] = {}
    for i, (src, _) in enumerate(levels):
        if isinstance(src, MappedTables) and not src.partitioned:
            shared.setdefault(id(src.base), []).append(i)
        else:
            out[i] = src.e_step(levels[i][1])
    for group in shared.values():
        if len(group) == 1:
            out[group[0]] = levels[group[0]][0].e_step(levels[group[0]][1])
            continue
        srcs = [levels[i][0] for i in group]
        acc: list[EStepStats | None] = [None] * len(group)
        # Each level's pruned search spans the whole pass; every batch is a part of it.
        searches = [
            src._bounds.step(levels[i][1], src.n_rows, src._plan(levels[i][1], src.n_rows)["engine"])  # type: ignore[attr-defined]
            if src._bounds is not None  # type: ignore[attr-defined]
            else None
            for src, i in zip(srcs, group)
        ]
        offset = 0
        for xb in srcs[0].base.batches():  # type: ignore[attr-defined]
            rotated: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # one x @ R per rotation and batch
            for j, i in enumerate(group):
                src, c, s = srcs[j], levels[i][1], searches[j]
                row_map = src.row_map  # type: ignore[attr-defined]
                if row_map.rotation is None:
                    rows = row_map(xb)
                else:
                    key = (row_map.rotation.data_ptr(), tuple(row_map.rotation.shape))
                    if key not in rotated:
                        rotated[key] = rotate_rows(xb, row_map.rotation)
                    rows = row_map.of_rotated(rotated[key])
                part_of = (s, offset * src.row_map.expansion) if s is not None else None  # type: ignore[attr-defined]
                part = e_step(rows, c, part_of=part_of, **src._plan(c, xb.shape[0]))  # type: ignore[attr-defined]
                acc[j] = part if acc[j] is None else EStepStats.merge([acc[j], part])
            offset += xb.shape[0]
        for j, i in enumerate(group):
            s = searches[j]
            if acc[j] is None:
                out[i] = srcs[j].e_step(levels[i][1])
            elif s is not None:
                s.finish()
                out[i] = dataclasses.replace(acc[j], n_pruned=s.n_pruned, bound_bytes=s.bounds.nbytes)
            else:
                out[i] = acc[j]
    return out  # type: ignore[return-value]
