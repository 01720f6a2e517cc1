"""The distributed fit's wire protocol: one partition's E-step statistics against centroids in a
file, written to a file; their reduce in source order; and exact Lloyd over them (:func:`fit_partitioned`).

Only paths and a few numbers cross a scheduler: workers read their partitions themselves.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import shutil
import time
import uuid
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import tables
from .assign import DEFAULT_MEMORY_BUDGET
from .codebook import Codebook, atomic_write_bytes
from .data import EStepStats, MapEStep, MappedTables, PartitionedTables, StreamedTables
from .prune import Bounds
from .checkpoint import FitCheckpoint
from .kmeans import ProgressCallback, fit_options, fit_source
from .settings import DEFAULT_BATCH_ROWS, FitSettings
from .tables import Source
from .fit_tables import _fit_inputs, init_sample_stats
from .levels import RowMap
from .levels import check_product_dim
from .validate import METRICS, check_choice, check_int, resolve_device


#
# Exact Lloyd as map-reduce over partitions (one input file each): a worker computes one partition's
# E-step statistics against the current centroids (:func:`partition_e_step`), the driver adds them
# up in source order (:func:`reduce_partition_stats`) and runs the M step, the convergence test and
# the repairs of :func:`vq_pipeline.kmeans.lloyd` unchanged (:func:`fit_partitioned`). The sums are
# float64, so the codebook equals a single-machine streamed fit from the same init up to float64
# summation order: centroids agree to float32 rounding (see the README for the tested tolerance).

__all__ = [
    "MapEStep",
    "fit_partitioned",
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
    *,
    column: str,
    metric: str,
    engine: str = "auto",
    device: str | torch.device | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    storage_options: dict[str, Any] | None = None,
    row_map: RowMap | None = None,
    bounds: Bounds | None = None,
) -> EStepStats:
    """One partition's E-step statistics against ``centroids``, reading the partition itself.

    Args:
        source: the partition (one table file).
        centroids: (n_codes, dim) float32, any device; unit rows under cosine.
        device: where to compute (None: CUDA if this machine has it, else CPU).
        row_map: one level of a multi-level fit: the statistics of the rows as this map turns them
            (a slice of the columns, or what the earlier residual levels leave).
        bounds: the partition's pruning state (:mod:`vq_pipeline.prune`), used and updated: rows
            whose code it proves skip the search. The statistics are the same with or without.

    Returns:
        An :class:`~vq_pipeline.data.EStepStats` on the CPU: ``sums`` (n_codes, dim) float64 of the
        rows assigned to each code (unit rows under cosine), ``counts`` (n_codes,) int64,
        ``objective`` (the float sum of squared L2 distances to the nearest centroid), and the
        partition's farthest rows (``far_sqdist`` (n_far,) float32 descending, ``far_rows``
        (n_far, dim) float32) for repairs.
    """
    metric = check_choice("metric", metric, METRICS)
    dev = resolve_device(device)
    c = centroids.to(dev, torch.float32).contiguous()  # (n_codes, dim)
    n_rows = tables.inspect_source(source, column=column, storage_options=storage_options).n_rows
    rows: Any = StreamedTables(
        [source],
        [n_rows],
        dim=row_map.in_dim if row_map is not None else c.shape[1],
        column=column,
        metric=metric,
        batch_rows=batch_rows,
        storage_options=storage_options,
        engine=engine,
        memory_budget=memory_budget,
        prune=bounds is not None,
        bounds=bounds,
    )
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
    folder ``.vq-fit-<12 hex>`` beside ``out``, which the workers must see too.

    Each iteration ``i`` publishes the centroids as ``centroids-<i>.npy`` (:meth:`publish`); the
    worker of partition ``j`` writes its statistics to ``stats-<i>-<j>.npz`` (:meth:`stats_file`,
    :func:`partition_stats_file`); :meth:`collect` reads them in partition order and removes the
    iteration's files. Leaving the ``with`` block removes the folder.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.folder = Path(out).parent / f".vq-fit-{uuid.uuid4().hex[:12]}"

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


def partition_stats_file(
    source: Source,
    centroids_file: str | os.PathLike[str],
    stats_file: str | os.PathLike[str],
    map_file: str | os.PathLike[str] | None = None,
    bounds_file: str | os.PathLike[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`partition_e_step` from and to files (what a worker runs): read the centroids written by
    :func:`save_centroids` (and a multi-level fit's row map from ``map_file``, written by
    :meth:`Exchange.publish_map`), write the statistics with :func:`save_partition_stats`, return a
    small summary (``stats`` path, ``rows``, ``objective``, ``pruned`` rows). ``options``: those of
    :func:`partition_e_step`.

    ``bounds_file``: the partition's pruning state (:meth:`Exchange.bounds_file`), read when it
    exists and rewritten after the statistics, atomically. The state records the centroids it holds
    for, so a retried task, or one that finds no file or a stale one, is never wrong: at worst it
    searches every row."""
    c = torch.from_numpy(np.load(centroids_file, allow_pickle=False))  # (n_codes, dim) float32
    if map_file is not None:
        with np.load(map_file, allow_pickle=False) as z:
            options["row_map"] = RowMap.from_arrays(dict(z))
    if bounds_file is not None:
        options["bounds"] = load_bounds(bounds_file)
    p = partition_e_step(source, c, **options)
    save_partition_stats(stats_file, p)
    if bounds_file is not None:
        buf = io.BytesIO()
        np.savez(buf, **options["bounds"].to_arrays())
        atomic_write_bytes(Path(bounds_file), buf.getvalue())
    return {"stats": str(stats_file), "rows": int(p.counts.sum()), "objective": p.objective, "pruned": p.n_pruned}


def load_bounds(path: str | os.PathLike[str]) -> Bounds:
    """A partition's pruning state from ``path``; none (a full search) when the file is missing or
    not a state this package wrote."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Bounds.from_arrays({k: z[k] for k in z.files})
    except (OSError, ValueError, zipfile.BadZipFile):
        return Bounds()


def fit_partitioned(
    inputs: Sequence[str | os.PathLike[str]],
    map_e_step: MapEStep,
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
    memory_budget: int = FitSettings.memory_budget,
    codec: str = FitSettings.codec,
    levels: int = FitSettings.levels,
    train_beam: int = FitSettings.train_beam,
    prune: bool = FitSettings.prune,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Codebook:
    """Exact Lloyd over the tables' files as map-reduce; the same codebook as a streamed
    :func:`fit_from_tables` from the same init, up to float64 summation order.

    Every iteration calls ``map_e_step(centroids, sources)``, which must return
    :func:`partition_e_step` of each source against ``centroids`` (computed anywhere: threads, Dask
    workers), in source order (a multi-level ``codec`` calls ``map_e_step(centroids, sources, row_map)``,
    one level's E step at a time, and ``row_map`` must be passed on to :func:`partition_e_step`); this
    process reduces them and runs the M step, repairs and the stopping rule of
    :func:`vq_pipeline.kmeans.lloyd`. Init: the named seeding (k-means|| by default, or exact greedy
    k-means++, 'random') on a seeded uniform sample of ``min(n_rows, 256 * n_codes)`` rows read here,
    as a streamed fit does ('first': the first rows; or a tensor / Codebook to warm-start from).
    Other arguments: see :func:`fit_from_tables`; ``device`` is where this process seeds and updates
    the centroids.
    """
    t_start = time.perf_counter()
    settings = FitSettings.from_keywords(locals())  # refused before any work
    batch_rows = check_int("batch_rows", batch_rows, minimum=1)
    ckpt = FitCheckpoint.for_inputs(checkpoint, inputs)  # refused before any work
    sources, counts, dim, provenance = _fit_inputs(
        inputs, column=column, n_codes=n_codes, storage_options=storage_options
    )
    if settings.codec == "product":
        check_product_dim(dim, settings.levels)  # before any row is read
    n_total = sum(counts)
    opts = fit_options(n_codes, settings, dim=dim, n_rows=n_total)
    mode: dict[str, Any] = {
        "mode": "partitioned",
        "rows_total": n_total,
        "partitions": len(sources),
        **init_sample_stats(opts, n_total),
    }
    source = PartitionedTables(
        sources,
        counts,
        map_e_step,
        dim=dim,
        column=column,
        metric=opts.metric,
        batch_rows=batch_rows,
        storage_options=storage_options,
        engine=opts.engine,
        memory_budget=opts.memory_budget,
    )
    return fit_source(source, opts, extra_stats=mode, progress=progress, t_start=t_start, checkpoint=ckpt, **provenance)
