"""Use cases: fit a codebook from tables, and encode tables into code tables, resumably.

The one place that joins table I/O (:mod:`vq_pipeline.tables`) with compute. No Prefect here:
``flows/`` wraps these functions.

Encoding writes ``out_dir`` as a plain parquet dataset (nothing but ``.parquet`` files, so
``pl.scan_parquet(out_dir)``, pyarrow datasets and duckdb read it as is), and keeps its
bookkeeping beside it in ``<out_dir>.vq/`` (:func:`state_dir`):

* one parquet file per input file, at the input's path relative to its root (so hive partitions
  keep their layout), written atomically (temporary name in the same folder, fsync, rename);
* a receipt per output in ``<out_dir>.vq/receipts/`` once its output is in place: input, input
  fingerprint (sha256 of its content), codebook fingerprint, settings, row count, sha256 of the
  output, distance sum and code counts;
* ``<out_dir>.vq/manifest.json`` last, gathering every receipt of the run;
* ``<out_dir>.vq/lock``, held while a run writes.

A rerun skips every input whose receipt matches its content, the codebook and the settings and
whose output still has the recorded checksum, so a crashed run resumes where it stopped, a finished
run is a no-op, and a file that was only touched or copied is not encoded again. Encoding is
deterministic, so a re-encoded output is byte-identical.
A folder that holds another codebook's (or other settings') codes is refused unless ``overwrite``.
One exclusive lock per ``out_dir`` keeps two runs from writing into it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from . import tables
from .assign import DEFAULT_MEMORY_BUDGET, encode as encode_tensor, plan_chunk_rows
from .codebook import Codebook, atomic_write_bytes
from .errors import DimensionMismatchError, EncodeLockedError, InvalidInputError
from .engines import get_engine
from .kmeans import _MAX_FAR_CANDIDATES, FitCheckpoint, FitOptions, ProgressCallback, _Pass, e_step, fit_options, fit_rows
from .settings import DEFAULT_BATCH_ROWS
from .tables import Source
from .validate import DEFAULT_METRIC, METRICS, as_embeddings, check_choice, check_int, check_nonzero_rows, normalize_rows, resolve_device

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vq-pipeline.encode-manifest"
#: Suffix of the bookkeeping folder beside an output folder: ``codes/`` keeps it in ``codes.vq/``.
STATE_SUFFIX = ".vq"
LOCK_NAME = "lock"
#: Fit on all rows in memory when they take at most this many bytes; stream them otherwise.
DEFAULT_DATA_BUDGET = 2 * 2**30

#: Called as progress(key, rows_done, rows_total) while a file is encoded.
RowProgress = Callable[[str, int, int], None]
#: Called once as on_plan(rows_to_encode_by_key, skipped_keys) before any file is encoded.
PlanCallback = Callable[[dict[str, int], list[str]], None]


# ----------------------------------------------------------------------------- fitting


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


# ----------------------------------------------------------------------------- distributed fit
#
# Exact Lloyd as map-reduce over partitions (one input file each): a worker computes one partition's
# E-step statistics against the current centroids (:func:`partition_e_step`), the driver adds them
# up in source order (:func:`reduce_partition_stats`) and runs the M step, the convergence test and
# the repairs of :func:`vq_pipeline.kmeans.lloyd` unchanged (:func:`fit_partitioned`). The sums are
# float64, so the codebook equals a single-machine streamed fit from the same init up to float64
# summation order: centroids agree to float32 rounding (see the README for the tested tolerance).

#: Called as ``map_e_step(centroids, sources)`` -> one :func:`partition_e_step` result per source, in order.
MapEStep = Callable[[torch.Tensor, Sequence[Source]], Sequence[_Pass]]


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
) -> _Pass:
    """One partition's E-step statistics against ``centroids``, reading the partition itself.

    Args:
        source: the partition (one table file).
        centroids: (n_codes, dim) float32, any device; unit rows under cosine.
        device: where to compute (None: CUDA if this machine has it, else CPU).

    Returns:
        A ``kmeans._Pass`` on the CPU: ``sums`` (n_codes, dim) float64 of the rows assigned to each
        code (unit rows under cosine), ``counts`` (n_codes,) int64, ``objective`` (the float sum of
        squared L2 distances to the nearest centroid), and the partition's farthest rows
        (``far_sqdist`` (n_far,) float32 descending, ``far_rows`` (n_far, dim) float32) for repairs.
    """
    metric = check_choice("metric", metric, METRICS)
    n_codes, dim = centroids.shape
    dev = resolve_device(device)
    c = centroids.to(dev, torch.float32).contiguous()  # (n_codes, dim)
    n_rows = tables.inspect_source(source, column=column, storage_options=storage_options).n_rows
    rows = _StreamedRows([source], [n_rows], dim=dim, column=column, batch_rows=batch_rows, metric=metric, storage_options=storage_options)
    eng = get_engine(engine, dev, dim)
    chunk = plan_chunk_rows(max(n_rows, 1), n_codes, dim, k=1, engine=eng, memory_budget=memory_budget)
    if n_rows == 0:
        p = _Pass(
            torch.zeros((n_codes, dim), dtype=torch.float64), torch.zeros(n_codes, dtype=torch.int64), 0.0,
            torch.empty(0, dtype=torch.float32), torch.empty((0, dim), dtype=torch.float32),
        )
    else:
        p = e_step(rows, c, engine=eng, chunk_rows=chunk)
    return _Pass(p.sums.cpu(), p.counts.cpu(), float(p.objective), p.far_sqdist.cpu(), p.far_rows.cpu())


def reduce_partition_stats(parts: Sequence[_Pass]) -> _Pass:
    """Add up partitions' E-step statistics in the given order (pass them in source order: the
    result is then the same on every run), keeping the farthest rows over all partitions."""
    if not parts:
        raise InvalidInputError("parts=[]: expected the statistics of at least one partition. Fix: pass one per source.")
    sums = parts[0].sums.clone()  # (n_codes, dim) float64
    counts = parts[0].counts.clone()  # (n_codes,) int64
    objective = parts[0].objective
    for p in parts[1:]:
        sums += p.sums
        counts += p.counts
        objective += p.objective
    n_far = min(sums.shape[0], _MAX_FAR_CANDIDATES)
    far_d = torch.cat([p.far_sqdist for p in parts])  # (sum n_far,)
    far_x = torch.cat([p.far_rows for p in parts])  # (sum n_far, dim)
    keep = far_d.topk(min(n_far, far_d.shape[0]), sorted=True).indices
    return _Pass(sums, counts, objective, far_d[keep], far_x[keep])


def save_partition_stats(path: str | os.PathLike[str], p: _Pass) -> Path:
    """Write one partition's statistics as an ``.npz`` file, atomically (plain arrays, no pickles)."""
    buf = io.BytesIO()
    np.savez(
        buf, sums=p.sums.numpy(), counts=p.counts.numpy(), objective=np.float64(p.objective),
        far_sqdist=p.far_sqdist.numpy(), far_rows=p.far_rows.numpy(),
    )
    return atomic_write_bytes(Path(path), buf.getvalue())


def load_partition_stats(path: str | os.PathLike[str]) -> _Pass:
    """Read a file written by :func:`save_partition_stats` (pickles refused)."""
    with np.load(path, allow_pickle=False) as z:
        return _Pass(
            torch.from_numpy(z["sums"].copy()), torch.from_numpy(z["counts"].copy()), float(z["objective"]),
            torch.from_numpy(z["far_sqdist"].copy()), torch.from_numpy(z["far_rows"].copy()),
        )


def save_centroids(path: str | os.PathLike[str], centroids: torch.Tensor) -> Path:
    """Write (n_codes, dim) float32 centroids as an ``.npy`` file, atomically, for workers to read."""
    buf = io.BytesIO()
    np.save(buf, centroids.detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
    return atomic_write_bytes(Path(path), buf.getvalue())


def partition_stats_file(
    source: Source, centroids_file: str | os.PathLike[str], stats_file: str | os.PathLike[str], **options: Any
) -> dict[str, Any]:
    """:func:`partition_e_step` from and to files (what a worker runs): read the centroids written by
    :func:`save_centroids`, write the statistics with :func:`save_partition_stats`, return a small
    summary (``stats`` path, ``rows``, ``objective``). ``options``: those of :func:`partition_e_step`."""
    c = torch.from_numpy(np.load(centroids_file, allow_pickle=False))  # (n_codes, dim) float32
    p = partition_e_step(source, c, **options)
    save_partition_stats(stats_file, p)
    return {"stats": str(stats_file), "rows": int(p.counts.sum()), "objective": p.objective}


class _Shape:
    """Stands in for the rows when the E step runs elsewhere: Lloyd then only reads their shape."""

    def __init__(self, n_rows: int, dim: int) -> None:
        self.shape = (n_rows, dim)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        raise AssertionError("the rows of a partitioned fit are read by the workers, not here")


def fit_partitioned(
    inputs: Sequence[str | os.PathLike[str]],
    map_e_step: MapEStep,
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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Codebook:
    """Exact Lloyd over the tables' files as map-reduce; the same codebook as a streamed
    :func:`fit_from_tables` from the same init, up to float64 summation order.

    Every iteration calls ``map_e_step(centroids, sources)``, which must return
    :func:`partition_e_step` of each source against ``centroids`` (computed anywhere: threads, Dask
    workers), in source order; this process reduces them and runs the M step, repairs and the
    stopping rule of :func:`vq_pipeline.kmeans.lloyd`. Init (k-means++ at scale): greedy k-means++
    on a seeded uniform sample of ``min(n_rows, 256 * n_codes)`` rows read here, as a streamed fit
    does ('first': the first rows; or a tensor / Codebook to warm-start from). Other arguments: see
    :func:`fit_from_tables`; ``device`` is where this process seeds and updates the centroids.
    """
    t_start = time.perf_counter()
    metric = check_choice("metric", metric, METRICS)
    batch_rows = check_int("batch_rows", batch_rows, minimum=1)
    sources, counts, dim, provenance = _fit_inputs(inputs, column=column, n_codes=n_codes, storage_options=storage_options)
    n_total = sum(counts)
    opts = fit_options(
        n_codes, dim=dim, n_rows=n_total, metric=metric, n_iter=n_iter, tol=tol, init=init, seed=seed,
        n_init=n_init, engine=engine, device=device, memory_budget=memory_budget,
    )
    mode: dict[str, Any] = {"mode": "partitioned", "rows_total": n_total, "partitions": len(sources)}
    rows = _StreamedRows(sources, counts, dim=dim, column=column, batch_rows=batch_rows, metric=opts.metric, storage_options=storage_options)
    init_rows = (
        rows[0:0] if isinstance(opts.init, torch.Tensor)
        else _streamed_init_rows(rows, sources, counts, opts, seed=seed, column=column, mode=mode, storage_options=storage_options)
    )

    def e_step_fn(c: torch.Tensor) -> _Pass:
        parts = list(map_e_step(c.to("cpu", torch.float32), sources))
        if len(parts) != len(sources):
            raise InvalidInputError(
                f"map_e_step returned {len(parts)} results for {len(sources)} sources; expected one per source, in "
                f"source order. Fix: return one partition's statistics for each source it is given."
            )
        p = reduce_partition_stats(parts)
        return _Pass(p.sums.to(c.device), p.counts.to(c.device), p.objective, p.far_sqdist.to(c.device), p.far_rows.to(c.device))

    ckpt = FitCheckpoint(checkpoint) if checkpoint is not None else None
    return fit_rows(
        _Shape(n_total, dim), init_rows, opts, extra_stats=mode, progress=progress, t_start=t_start, checkpoint=ckpt,
        e_step_fn=e_step_fn, **provenance,
    )


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodeSettings:
    """What an encode run writes; a folder's outputs all share one codebook and one of these."""

    column: str
    id_column: str | None = None
    top_k: int = 1
    with_distance: bool = False
    keep: tuple[str, ...] = ()
    #: The ``code`` column's integer type (a ``tables.CODE_DTYPES`` name); None: the smallest that fits.
    code_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "keep": list(self.keep)}
        if self.code_dtype is None:  # folders written before the option existed keep matching
            del d["code_dtype"]
        return d


@dataclass(frozen=True)
class EncodeOptions:
    """How an encode run computes (does not change the codes away from near-ties)."""

    engine: str = "auto"
    device: str | None = None
    batch_rows: int = DEFAULT_BATCH_ROWS
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    storage_options: dict[str, Any] | None = None


@dataclass
class EncodeResult:
    """Summary of an encode run."""

    out_dir: str
    manifest: str
    codebook_fingerprint: str
    encoded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows_encoded: int = 0
    rows_total: int = 0
    seconds: float = 0.0
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("records")
        return d


def output_path(out_dir: str | os.PathLike[str], source: Source) -> Path:
    """Where ``source``'s codes go: its key under ``out_dir``, as parquet."""
    return Path(out_dir) / Path(source.key).with_suffix(".parquet")


def state_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The bookkeeping folder of the output folder ``out_dir``: ``<out_dir>.vq`` beside it (receipts,
    manifest, lock), so that ``out_dir`` itself holds nothing but parquet files."""
    out = Path(out_dir)
    if not out.name or out.name == "..":
        out = Path(os.path.abspath(out))
    if not out.name:
        raise InvalidInputError(
            f"out_dir={str(out_dir)!r} is a filesystem root; expected a folder of its own for the codes. "
            f"Fix: pass a subfolder such as {str(out / 'codes')!r}."
        )
    return out.with_name(out.name + STATE_SUFFIX)


def manifest_path(out_dir: str | os.PathLike[str]) -> Path:
    """Where the manifest of the output folder ``out_dir`` is written (last, after every output)."""
    return state_dir(out_dir) / MANIFEST_NAME


def _receipt_path(out_dir: Path, key: str) -> Path:
    return state_dir(out_dir) / "receipts" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _migrate_state(out: Path) -> None:
    """Move the bookkeeping of a folder written by 0.1 (``_manifest.json`` and ``.vq/`` inside it)
    to :func:`state_dir`, so that its outputs are still recognized and the folder reads as a dataset."""
    old = out / ".vq"
    receipts = state_dir(out) / "receipts"
    if (old / "receipts").is_dir():
        receipts.mkdir(parents=True, exist_ok=True)
        for p in sorted((old / "receipts").glob("*.json")):
            if not (receipts / p.name).exists():
                os.replace(p, receipts / p.name)
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (old / "receipts").rmdir()
    (out / "_manifest.json").unlink(missing_ok=True)  # rewritten in the state folder at the end of the run
    with contextlib.suppress(OSError):
        (old / "lock").unlink(missing_ok=True)
        old.rmdir()


@contextlib.contextmanager
def folder_lock(lock_file: str | os.PathLike[str], *, folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock ``lock_file`` for ``folder``, or fail at once if another run holds it.

    The lock file notes its holder (pid and host), which the error message of a second run quotes.
    """
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise EncodeLockedError(
                f"folder={str(folder)!r} is locked by another run ({holder}); expected one run per "
                f"folder at a time. Fix: wait for it to finish, or write to another folder."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def encode_lock(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock on the output folder ``out_dir`` (``<out_dir>.vq/lock``).

    Folders that the lock itself created are removed again if the run fails before writing to them.
    """
    out = Path(out_dir)
    state = state_dir(out)
    created = [p for p in (out, state) if not p.exists()]
    lock = state / LOCK_NAME
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(lock, folder=out_dir):
        try:
            yield
        except BaseException:
            untouched = not any(p.is_file() for p in out.rglob("*")) and [p for p in state.rglob("*") if p.is_file()] == [lock]
            if created and untouched:
                lock.unlink()
                for folder in created:
                    shutil.rmtree(folder, ignore_errors=True)
            raise


def plan_encode(
    inputs: Sequence[str | os.PathLike[str]],
    codebook: Codebook,
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[Source], list[Source], dict[str, dict[str, Any]]]:
    """Check inputs and the output folder; split sources into (todo, done). Call under :func:`encode_lock`.

    Validates every input's schema and dim, refuses duplicate ids across the run, refuses a folder
    holding another codebook's or other settings' codes unless ``overwrite`` (which then removes
    them), and deletes temporary files a crashed run left behind.

    Returns:
        (todo sources, done sources, records of the done ones keyed by source key).
    """
    out = Path(out_dir)
    check_int("top_k", settings.top_k, minimum=1, maximum=codebook.n_codes, hint=f"the codebook has {codebook.n_codes} codes.")
    tables.code_dtype(codebook.n_codes, settings.code_dtype)  # refuses an unknown or too narrow type up front
    sources = tables.discover(inputs, storage_options=storage_options)
    for s in sources:
        info = tables.inspect_source(s, column=settings.column, id_column=settings.id_column, keep=settings.keep, storage_options=storage_options)
        if info.n_rows == 0:
            raise InvalidInputError(f"table {s.uri!r} has no rows; expected at least one. Fix: remove the empty file.")
        if info.dim is not None and info.dim != codebook.dim:
            raise DimensionMismatchError(
                f"column={settings.column!r} of {s.uri!r} has dim={info.dim} but the codebook has dim={codebook.dim}; "
                f"expected embeddings of width {codebook.dim}. Fix: encode with the codebook of this embedding model."
            )
    if settings.id_column:
        dups = tables.duplicate_ids(sources, settings.id_column, storage_options=storage_options)
        if dups:
            raise InvalidInputError(
                f"id_column={settings.id_column!r} has duplicate ids across the inputs, e.g. {dups}; expected unique ids "
                f"in one encode run. Fix: deduplicate the tables, or encode them in separate runs."
            )
    _migrate_state(out)
    _check_folder(out, codebook, settings, overwrite=overwrite)
    remove_temporaries(out)
    todo, done, records = [], [], {}
    for s in sources:
        record = _completed_record(out, s, codebook, settings, storage_options)
        if record is None:
            todo.append(s)
        else:
            done.append(s)
            records[s.key] = record
    return todo, done, records


def remove_temporaries(out_dir: str | os.PathLike[str]) -> None:
    """Delete the temporary files that interrupted writes left in ``out_dir`` (a crashed run, a killed
    worker). Call under :func:`encode_lock`, when no write into the folder is in flight."""
    for folder in (Path(out_dir), state_dir(out_dir)):
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _folder_records(out: Path) -> list[dict[str, Any]]:
    """Every receipt in ``out`` plus the manifest's header, to learn what the folder holds."""
    found = []
    manifest = manifest_path(out)
    if manifest.is_file():
        found.append(_read_json(manifest))
    receipts = state_dir(out) / "receipts"
    if receipts.is_dir():
        found.extend(_read_json(p) for p in sorted(receipts.glob("*.json")))
    return found


def _check_folder(out: Path, codebook: Codebook, settings: EncodeSettings, *, overwrite: bool) -> None:
    foreign = [
        r for r in _folder_records(out)
        if r.get("codebook_fingerprint") != codebook.fingerprint or r.get("settings") != settings.to_dict()
    ]
    if not foreign:
        return
    if not overwrite:
        other = foreign[0]
        what = (
            f"codebook {str(other.get('codebook_fingerprint'))[:12]}…"
            if other.get("codebook_fingerprint") != codebook.fingerprint
            else f"settings {json.dumps(other.get('settings'), sort_keys=True)}"
        )
        raise InvalidInputError(
            f"out_dir={str(out)!r} holds codes written with {what}; this run uses codebook "
            f"{codebook.fingerprint[:12]}… with settings {json.dumps(settings.to_dict(), sort_keys=True)}. Expected a folder holding only this "
            f"codebook's codes. Fix: pass --overwrite (overwrite=True) to replace them, or write to another folder."
        )
    for record in _folder_records(out):
        for entry in (record.get("outputs") or {record.get("key"): record}).values():
            if entry and entry.get("output"):
                (out / entry["output"]).unlink(missing_ok=True)
    manifest_path(out).unlink(missing_ok=True)
    for p in (state_dir(out) / "receipts").glob("*.json"):
        p.unlink()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _completed_record(out: Path, source: Source, codebook: Codebook, settings: EncodeSettings, storage_options: Any) -> dict[str, Any] | None:
    receipt = _read_json(_receipt_path(out, source.key))
    if not receipt or receipt.get("codebook_fingerprint") != codebook.fingerprint or receipt.get("settings") != settings.to_dict():
        return None
    stat = tables.file_stat(source)
    # Unchanged size, mtime and inode: the content hashed for the receipt is still there. Otherwise
    # hash the content again; a file that was only touched or copied keeps its receipt.
    if stat is None or stat != receipt.get("input_stat"):
        if receipt.get("input_fingerprint") != tables.fingerprint(source, storage_options=storage_options):
            return None
    output = out / receipt["output"]
    if not output.is_file() or tables.file_sha256(output) != receipt.get("sha256"):
        return None
    if stat != receipt.get("input_stat"):
        atomic_write_bytes(_receipt_path(out, source.key), _dumps({**receipt, "input_stat": stat}))
        receipt = {**receipt, "input_stat": stat}
    return receipt


def encode_source(
    source: Source,
    codebook: Codebook,
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    options: EncodeOptions = EncodeOptions(),
    *,
    progress: RowProgress | None = None,
) -> dict[str, Any]:
    """Encode one input file into its output file, then write its receipt; return the receipt.

    Safe to run concurrently for different sources of one folder (each writes its own files).
    """
    out = Path(out_dir)
    stat = tables.file_stat(source)
    fingerprint = tables.fingerprint(source, storage_options=options.storage_options)
    info = tables.inspect_source(source, column=settings.column, id_column=settings.id_column, keep=settings.keep, storage_options=options.storage_options)
    frames = []
    code_counts = torch.zeros(codebook.n_codes, dtype=torch.int64)  # (n_codes,)
    distance_sum = 0.0
    done = 0
    for batch in tables.iter_batches(
        source, column=settings.column, batch_rows=options.batch_rows, id_column=settings.id_column,
        keep=settings.keep, storage_options=options.storage_options,
    ):
        try:
            codes, distances = encode_tensor(
                codebook.centroids, codebook.metric, batch.x, top_k=settings.top_k, return_distances=True,
                engine=options.engine, device=options.device, memory_budget=options.memory_budget,
                name=settings.column, row_offset=batch.offset,
            )
        except InvalidInputError as exc:
            raise type(exc)(f"{source.uri}: {exc}") from None
        nearest = codes if codes.ndim == 1 else codes[:, 0]  # (n,)
        code_counts += torch.bincount(nearest, minlength=codebook.n_codes)
        distance_sum += float((distances if distances.ndim == 1 else distances[:, 0]).double().sum())
        ids = batch.ids if batch.ids is not None else tables.row_positions(batch)
        frames.append(
            tables.codes_frame(
                ids, codes, n_codes=codebook.n_codes, id_column=settings.id_column or "row",
                distances=distances if settings.with_distance else None, keep=batch.keep,
                pinned_dtype=settings.code_dtype,
            )
        )
        done += len(batch)
        if progress is not None:
            progress(source.key, done, info.n_rows)
    if done == 0:
        raise InvalidInputError(f"table {source.uri!r} has no rows; expected at least one. Fix: remove the empty file.")
    path = output_path(out, source)
    digest = tables.write_parquet_atomic(tables.concat_frames(frames), path)
    receipt = {
        "key": source.key,
        "input": source.uri,
        "input_fingerprint": fingerprint,
        "input_stat": stat,
        "output": path.relative_to(out).as_posix(),
        "rows": done,
        "sha256": digest,
        "codebook_fingerprint": codebook.fingerprint,
        "settings": settings.to_dict(),
        "distance_sum": distance_sum,
        "code_counts": code_counts.tolist(),
    }
    atomic_write_bytes(_receipt_path(out, source.key), _dumps(receipt))
    return receipt


def write_manifest(out_dir: str | os.PathLike[str], codebook: Codebook, settings: EncodeSettings, records: dict[str, dict[str, Any]]) -> Path:
    """Write the manifest (:func:`manifest_path`; atomically, after the outputs it lists): what the folder holds."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": "1.0",
        "codebook_fingerprint": codebook.fingerprint,
        "settings": settings.to_dict(),
        "rows": sum(r["rows"] for r in records.values()),
        # input_stat is a cache hint of this machine (mtime, inode), not part of what the folder holds.
        "outputs": {
            key: {k: v for k, v in records[key].items() if k not in ("codebook_fingerprint", "settings", "input_stat")}
            for key in sorted(records)
        },
    }
    return atomic_write_bytes(manifest_path(out_dir), _dumps(manifest))


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def encode_tables(
    inputs: Sequence[str | os.PathLike[str]],
    codebook: Codebook | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    column: str,
    id_column: str | None = None,
    top_k: int = 1,
    with_distance: bool = False,
    keep: Sequence[str] = (),
    code_dtype: str | None = None,
    overwrite: bool = False,
    engine: str = "auto",
    device: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    storage_options: dict[str, Any] | None = None,
    progress: RowProgress | None = None,
    on_plan: PlanCallback | None = None,
) -> EncodeResult:
    """Encode every input table into ``out_dir``, resumably and exactly once (see the module doc).

    Args:
        inputs: table files, globs or folders (local or object storage).
        codebook: a Codebook or the path of its file.
        column: the embedding column. id_column: the id column (default: row positions, written
            as ``row``). top_k: codes per row. with_distance: also write distances.
        keep: columns copied through to the outputs. overwrite: replace another codebook's codes.
        code_dtype: the ``code`` column's type, e.g. ``"uint32"`` or ``"int64"`` (default: the smallest
            unsigned type that holds ``n_codes``, which can change with a refit's ``n_codes``).
        progress: called as ``progress(key, rows_done, rows_in_file)`` after every batch.
        on_plan: called once, before encoding, as ``on_plan({key: rows} of the files to encode,
            [keys of the files skipped as already complete])``.
    """
    t0 = time.perf_counter()
    if not isinstance(codebook, Codebook):
        codebook = Codebook.load(codebook)
    settings = EncodeSettings(
        column=column, id_column=id_column, top_k=top_k, with_distance=with_distance, keep=tuple(keep), code_dtype=code_dtype,
    )
    options = EncodeOptions(engine=engine, device=device, batch_rows=check_int("batch_rows", batch_rows, minimum=1), memory_budget=memory_budget, storage_options=storage_options)
    out = Path(out_dir)
    with encode_lock(out):
        todo, done, records = plan_encode(inputs, codebook, out, settings, overwrite=overwrite, storage_options=storage_options)
        result = EncodeResult(out_dir=str(out), manifest=str(manifest_path(out)), codebook_fingerprint=codebook.fingerprint)
        result.skipped = [s.key for s in done]
        if on_plan is not None:
            on_plan(
                {s.key: tables.inspect_source(s, column=column, storage_options=storage_options).n_rows for s in todo},
                list(result.skipped),
            )
        for s in todo:
            records[s.key] = encode_source(s, codebook, out, settings, options, progress=progress)
            result.encoded.append(s.key)
            result.rows_encoded += records[s.key]["rows"]
        write_manifest(out, codebook, settings, records)
    result.records = records
    result.rows_total = sum(r["rows"] for r in records.values())
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- drift


def drift_report(codebook: Codebook, records: Sequence[dict[str, Any]], *, baseline: bool = False) -> dict[str, Any]:
    """Quantization distortion and code usage of newly encoded outputs against the training baseline.

    Args:
        records: receipts of encoded outputs (they carry distance sums and code counts).
        baseline: the records are the rows the codebook was just fitted on (the run that fitted it
            encoded them). Their distortion (1.0) and divergence (0.0) against themselves measure
            nothing, so none is reported: ``rows`` is 0, ``baseline_rows`` and
            ``baseline_mean_distance`` describe them, and ``note`` says "baseline: the codebook was
            fitted on these rows".

    Returns:
        ``rows`` (rows measured); ``mean_distance`` on the new data and ``train_mean_distance`` at
        fit time; ``distortion_ratio`` (new / train; 1.0 means no drift); ``codes_used``;
        ``usage_divergence``: the Jensen-Shannon divergence (bits, 0..1) between the new and the
        training code distributions; ``usage_divergence_expected``: its expected value for rows
        drawn from the training distribution itself, the finite-sample bias
        ``(k - 1) / (8 ln 2) * (1 / rows + 1 / train_rows)`` with ``k`` the codes used in training
        (second order: close from about 5 rows per code, too low below); ``usage_divergence_excess``:
        the divergence above that bias; ``train_rows``, ``n_codes``, ``baseline`` and ``note``.
    """
    rows = sum(r["rows"] for r in records)
    q = codebook.counts.double().numpy()
    train_rows = int(codebook.stats.get("n_rows") or q.sum())
    train_mean = float(codebook.stats.get("inertia", 0.0)) / max(train_rows, 1)
    report: dict[str, Any] = {
        "rows": rows, "mean_distance": None, "train_mean_distance": train_mean, "distortion_ratio": None,
        "codes_used": 0, "usage_divergence": None, "usage_divergence_expected": None, "usage_divergence_excess": None,
        "train_rows": train_rows, "n_codes": codebook.n_codes, "baseline": baseline, "note": None,
    }
    if baseline:
        note = "baseline: the codebook was fitted on these rows"
        report.update(rows=0, baseline_rows=rows, baseline_mean_distance=None, note=note)
    if rows == 0:
        return report
    mean = sum(r["distance_sum"] for r in records) / rows
    counts = np.sum([np.asarray(r["code_counts"], dtype=np.float64) for r in records], axis=0)  # (n_codes,)
    report["codes_used"] = int((counts > 0).sum())
    if baseline:
        return {**report, "baseline_mean_distance": mean}
    p = counts / counts.sum()  # (n_codes,)
    q_rows = q.sum()
    q = q / q_rows if q_rows > 0 else np.full_like(q, 1.0 / len(q))  # (n_codes,)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    divergence = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    # JS ~ chi^2 / (8 n ln 2) for small differences: a sample of the training distribution itself
    # scores (k - 1) / (8 ln 2) * (1/rows + 1/train_rows) bits on average, more when rows are few.
    expected = (max(int((q > 0).sum()), 1) - 1) / (8 * np.log(2)) * (1 / rows + 1 / max(float(q_rows), 1.0))
    return {
        **report,
        "mean_distance": mean,
        "distortion_ratio": mean / train_mean if train_mean > 0 else (1.0 if mean == 0 else float("inf")),
        "usage_divergence": divergence,
        "usage_divergence_expected": float(expected),
        "usage_divergence_excess": divergence - float(expected),
    }


__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_DATA_BUDGET",
    "EncodeLockedError",
    "EncodeOptions",
    "EncodeResult",
    "EncodeSettings",
    "MANIFEST_NAME",
    "drift_report",
    "encode_lock",
    "encode_source",
    "encode_tables",
    "fit_from_tables",
    "folder_lock",
    "fit_partitioned",
    "load_partition_stats",
    "partition_e_step",
    "partition_stats_file",
    "save_centroids",
    "reduce_partition_stats",
    "save_partition_stats",
    "manifest_path",
    "output_path",
    "state_dir",
    "plan_encode",
    "remove_temporaries",
    "write_manifest",
]
