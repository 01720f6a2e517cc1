"""The distributed fit's wire protocol: one partition's E-step statistics against centroids in a
file, written to a file; their reduce in source order; and the E step of a fit mapped over them (:func:`mapped_e_step`).

Only paths and a few numbers cross a scheduler: workers read their partitions themselves.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import shutil
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vq_pipeline.compute.data import EStepStats, MappedTables
from vq_pipeline.compute.levels import RowMap
from vq_pipeline.compute.prune import Bounds
from vq_pipeline.io import tables
from vq_pipeline.io.discovery import Source
from vq_pipeline.io.fileio import atomic_write_bytes
from vq_pipeline.jobs.mappers import Mapper
from vq_pipeline.jobs.sources import MapEStep, StreamedTables, StreamSpec
from vq_pipeline.settings import METRICS
from vq_pipeline.validate import check_choice, resolve_device

#
# Exact Lloyd as map-reduce over partitions (one input file each): a worker computes one partition's
# E-step statistics against the current centroids (:func:`partition_e_step`), the driver adds them
# up in source order (:func:`reduce_partition_stats`) and runs the M step, the convergence test and
# the repairs of :func:`vq_pipeline.compute.lloyd.lloyd` unchanged (a fit from tables with a mapper). The sums are
# float64, so the codebook equals a single-machine streamed fit from the same init up to float64
# summation order: centroids agree to float32 rounding (see the README for the tested tolerance).

__all__ = [
    "MapEStep",
    "PartitionWork",
    "mapped_e_step",
    "load_bounds",
    "load_partition_stats",
    "partition_e_step",
    "partition_stats_file",
    "reduce_partition_stats",
    "save_centroids",
    "save_partition_stats",
]


def partition_e_step(
    source: Source,
    centroids: torch.Tensor,
    spec: StreamSpec,
    *,
    row_map: RowMap | None = None,
    bounds: Bounds | None = None,
) -> EStepStats:
    """One partition's E-step statistics against ``centroids``, reading the partition itself.

    Args:
        source: the partition (one table file).
        centroids: (n_codes, dim) float32, any device; unit rows under cosine.
        spec: the column, metric, engine and device (None: CUDA if this machine has it, else CPU),
            batches and memory budget.
        row_map: one level of a multi-level fit: the statistics of the rows as this map turns them
            (a slice of the columns, or what the earlier residual levels leave).
        bounds: the partition's pruning state (:mod:`vq_pipeline.compute.prune`), used and updated: rows
            whose code it proves skip the search. The statistics are the same with or without.

    Returns:
        An :class:`~vq_pipeline.compute.data.EStepStats` on the CPU: ``sums`` (n_codes, dim) float64 of the
        rows assigned to each code (unit rows under cosine), ``counts`` (n_codes,) int64,
        ``objective`` (the float sum of squared L2 distances to the nearest centroid), and the
        partition's farthest rows (``far_sqdist`` (n_far,) float32 descending, ``far_rows``
        (n_far, dim) float32) for repairs.
    """
    check_choice("metric", spec.metric, METRICS)
    dev = resolve_device(spec.device)
    c = centroids.to(dev, torch.float32).contiguous()  # (n_codes, dim)
    n_rows = tables.inspect_source(source, column=spec.column, storage_options=spec.storage_options).n_rows
    dim = row_map.in_dim if row_map is not None else c.shape[1]
    rows: Any = StreamedTables([source], [n_rows], spec, dim=dim, prune=bounds is not None, bounds=bounds)
    if row_map is not None:
        rows = _MappedPartition(rows, row_map)
    return rows.e_step(c).to("cpu")


class _MappedPartition(MappedTables):
    """One level of one partition: the partition's own pruning state serves the level's rows."""

    def __init__(self, base: StreamedTables, row_map: RowMap) -> None:
        super().__init__(base, row_map)
        self._bounds = base.bounds


def reduce_partition_stats(parts: Sequence[EStepStats]) -> EStepStats:
    """Add up partitions' E-step statistics in the given order (pass them in source order: the
    result is then the same on every run), keeping the farthest rows over all partitions
    (:meth:`EStepStats.merge`)."""
    return EStepStats.merge(parts)


def save_partition_stats(path: str | os.PathLike[str], p: EStepStats) -> Path:
    """Write one partition's statistics as an ``.npz`` file, atomically (plain arrays, no pickles)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        sums=p.sums.numpy(),
        counts=p.counts.numpy(),
        objective=np.float64(p.objective),
        far_sqdist=p.far_sqdist.numpy(),
        far_rows=p.far_rows.numpy(),
        n_pruned=np.int64(p.n_pruned),
        bound_bytes=np.int64(p.bound_bytes),
    )
    return atomic_write_bytes(Path(path), buf.getvalue())


def load_partition_stats(path: str | os.PathLike[str]) -> EStepStats:
    """Read a file written by :func:`save_partition_stats` (pickles refused)."""
    with np.load(path, allow_pickle=False) as z:
        return EStepStats(
            torch.from_numpy(z["sums"].copy()),
            torch.from_numpy(z["counts"].copy()),
            float(z["objective"]),
            torch.from_numpy(z["far_sqdist"].copy()),
            torch.from_numpy(z["far_rows"].copy()),
            int(z["n_pruned"]) if "n_pruned" in z.files else 0,
            int(z["bound_bytes"]) if "bound_bytes" in z.files else 0,
        )


def save_centroids(path: str | os.PathLike[str], centroids: torch.Tensor) -> Path:
    """Write (n_codes, dim) float32 centroids as an ``.npy`` file, atomically, for workers to read."""
    buf = io.BytesIO()
    np.save(buf, centroids.detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
    return atomic_write_bytes(Path(path), buf.getvalue())


class Exchange:
    """The files a partitioned fit exchanges with its workers (its wire protocol), in one scratch
    folder ``.vq-fit-<12 hex>`` inside ``scratch``, which the workers must see too.

    Each iteration ``i`` publishes the centroids as ``centroids-<i>.npy`` (:meth:`publish`); the
    worker of partition ``j`` writes its statistics to ``stats-<i>-<j>.npz`` (:meth:`stats_file`,
    :func:`partition_stats_file`); :meth:`collect` reads them in partition order and removes the
    iteration's files. Leaving the ``with`` block removes the folder.
    """

    def __init__(self, scratch: str | os.PathLike[str]) -> None:
        self.folder = Path(scratch) / f".vq-fit-{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def publish(self, iteration: int, centroids: torch.Tensor) -> Path:
        return save_centroids(self.folder / f"centroids-{iteration:05d}.npy", centroids)

    def publish_map(self, iteration: int, row_map: RowMap | None) -> str | None:
        """The level's row map as ``map-<i>.npz`` (None for a flat fit), for workers to read."""
        if row_map is None:
            return None
        buf = io.BytesIO()
        np.savez(buf, **row_map.to_arrays())
        return str(atomic_write_bytes(self.folder / f"map-{iteration:05d}.npz", buf.getvalue()))

    def stats_file(self, iteration: int, partition: int) -> Path:
        return self.folder / f"stats-{iteration:05d}-{partition:06d}.npz"

    def bounds_file(self, partition: int, row_map: RowMap | None = None) -> Path:
        """Where partition ``partition`` keeps its pruning state between iterations (one file per level
        of a multi-level fit, named by a digest of the level's map); the worker reads and rewrites it."""
        level = "flat"
        if row_map is not None:
            digest = hashlib.sha256()
            for k, v in sorted(row_map.to_arrays().items()):
                digest.update(k.encode() + np.ascontiguousarray(v).tobytes())
            level = digest.hexdigest()[:16]
        return self.folder / f"bounds-{level}-{partition:06d}.npz"

    def collect(
        self, centroids_file: Path, stats_files: Sequence[str | os.PathLike[str]], map_file: str | None = None
    ) -> list[EStepStats]:
        """The partitions' statistics, in the order given; the iteration's files are removed."""
        parts = [load_partition_stats(f) for f in stats_files]
        for f in (*stats_files, centroids_file, *([map_file] if map_file else [])):
            Path(f).unlink(missing_ok=True)
        return parts


@dataclass(frozen=True)
class PartitionWork:
    """One partition's E step of one iteration, as plain data (what a mapper ships to a worker): the
    files of the centroids (and of a level's row map), where to write the statistics, and the
    partition's pruning state file (None: no pruning)."""

    source: Source
    centroids: str
    stats: str
    spec: StreamSpec
    row_map: str | None = None
    bounds: str | None = None


def partition_stats_file(work: PartitionWork) -> dict[str, Any]:
    """:func:`partition_e_step` from and to files (what a worker runs): read the centroids written by
    :func:`save_centroids` (and a multi-level fit's row map, written by :meth:`Exchange.publish_map`),
    write the statistics with :func:`save_partition_stats`, return a small summary (``stats`` path,
    ``rows``, ``objective``, ``pruned`` rows).

    ``work.bounds``: the partition's pruning state (:meth:`Exchange.bounds_file`), read when it
    exists and rewritten after the statistics, atomically. The state records the centroids it holds
    for, so a retried task, or one that finds no file or a stale one, is never wrong: at worst it
    searches every row."""
    c = torch.from_numpy(np.load(work.centroids, allow_pickle=False))  # (n_codes, dim) float32
    row_map = bounds = None
    if work.row_map is not None:
        with np.load(work.row_map, allow_pickle=False) as z:
            row_map = RowMap.from_arrays(dict(z))
    if work.bounds is not None:
        bounds = load_bounds(work.bounds)
    p = partition_e_step(work.source, c, work.spec, row_map=row_map, bounds=bounds)
    save_partition_stats(work.stats, p)
    if bounds is not None:
        buf = io.BytesIO()
        np.savez(buf, **bounds.to_arrays())
        atomic_write_bytes(Path(work.bounds), buf.getvalue())
    return {"stats": str(work.stats), "rows": int(p.counts.sum()), "objective": p.objective, "pruned": p.n_pruned}


def mapped_e_step(mapper: Mapper, exchange: Exchange, spec: StreamSpec, *, prune: bool) -> MapEStep:
    """The E step of partitioned tables through ``mapper``: every call publishes the centroids (and a
    level's row map) in ``exchange``, maps :func:`partition_stats_file` over the partitions, and reads
    their statistics back in partition order (the reduction is then deterministic). A partition that
    still fails (after whatever retries the mapper makes) fails the fit."""
    calls = itertools.count()

    def map_e_step(c: torch.Tensor, sources: Sequence[Source], row_map: RowMap | None = None) -> list[EStepStats]:
        i = next(calls)
        cfile = exchange.publish(i, c)
        mfile = exchange.publish_map(i, row_map)
        work = [
            PartitionWork(
                s,
                str(cfile),
                str(exchange.stats_file(i, j)),
                spec,
                mfile,
                str(exchange.bounds_file(j, row_map)) if prune else None,
            )
            for j, s in enumerate(sources)
        ]
        done: dict[int, dict[str, Any]] = {}
        for j, outcome in mapper(partition_stats_file, work):
            if isinstance(outcome, BaseException):
                raise outcome
            done[j] = outcome
        return exchange.collect(cfile, [done[j]["stats"] for j in range(len(work))], mfile)

    return map_e_step


def load_bounds(path: str | os.PathLike[str]) -> Bounds:
    """A partition's pruning state from ``path``; none (a full search) when the file is missing or
    not a state this package wrote."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Bounds.from_arrays({k: z[k] for k in z.files})
    except (OSError, ValueError, zipfile.BadZipFile):
        return Bounds()
