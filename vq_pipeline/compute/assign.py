"""Chunked nearest-code search, with chunk sizes planned from a memory budget.

Every pass over rows in this package (encoding, the K-means E step, k-means++) goes through
:func:`nearest_in_chunks`, which moves one bounded chunk at a time to the compute device, asks the
engine for the ``k`` nearest centroids, and retries a chunk at half the size when the device runs out
of memory (a KeOps CUDA out-of-memory error arrives as a plain ``RuntimeError``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

from vq_pipeline.compute.engines import Engine, get_engine
from vq_pipeline.errors import DimensionMismatchError, InvalidInputError
from vq_pipeline.runtime import share_cpus
from vq_pipeline.settings import DEFAULT_MEMORY_BUDGET
from vq_pipeline.validate import as_embeddings, check_int, check_nonzero_rows, normalize_rows, resolve_device

log = logging.getLogger(__name__)

#: Default temporary memory one pass may use, in bytes. Override with ``memory_budget=``.


def plan_chunk_rows(n_rows: int, n_codes: int, dim: int, *, k: int, engine: Engine, memory_budget: int) -> int:
    """Rows per chunk: the engine's preferred size, or fewer so one chunk's temporaries fit ``memory_budget``.

    Raises:
        InvalidInputError: the budget cannot hold even one row.
    """
    per_row = engine.bytes_per_row(n_codes, dim, k) + 4 * dim  # engine temporaries + the chunk itself
    rows = memory_budget // per_row
    if rows < 1:
        raise InvalidInputError(
            f"memory_budget={memory_budget} bytes cannot hold one row; expected at least {per_row} bytes "
            f"for n_codes={n_codes}, dim={dim}, k={k} with engine={engine.name!r}. Fix: raise memory_budget."
        )
    return int(min(rows, engine.preferred_chunk_rows(n_codes, dim), max(n_rows, 1)))


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def nearest_in_chunks(
    x: torch.Tensor,
    c: torch.Tensor,
    *,
    k: int,
    engine: Engine,
    chunk_rows: int,
    distances: bool = True,
    search: Callable[[slice, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Yield ``(rows, x_chunk, sqdist, idx)`` for consecutive chunks of ``x``.

    Inside the package, distances come before indices as :meth:`Engine.nearest` returns them (FAISS's
    ``(D, I)`` order); the public results of :func:`encode` are ``(codes, distances)``.

    Args:
        x: (n_rows, dim) float32 on any device; finite (validated by the caller).
        c: (n_codes, dim) float32 on the compute device.
        k: neighbours per row, ``1 <= k <= n_codes``.
        chunk_rows: rows per chunk to start with; halved (down to 1) on out-of-memory.
        distances: passed to :meth:`Engine.nearest`; when False, ``sqdist`` may be ``None``.
        search: called as ``search(rows, x_chunk)`` instead of the engine (``k == 1``): the pruned
            E step (:class:`vq_pipeline.compute.prune.PrunedSearch`).

    Yields:
        rows: the slice of ``x`` covered. x_chunk: (n, dim) float32 on the compute device.
        sqdist: (n, k) float32 squared L2 distances, ascending. idx: (n, k) int64. Both on the
        compute device.
    """
    device = c.device
    start, n_rows = 0, x.shape[0]
    while start < n_rows:
        share_cpus()  # as many threads as other processes leave CPUs idle
        rows = slice(start, min(start + chunk_rows, n_rows))
        try:
            xb = x[rows].to(device, non_blocking=True).contiguous()  # (n, dim)
            if search is not None:
                sqdist, idx = search(rows, xb)  # (n, 1), (n, 1)
            else:
                sqdist, idx = engine.nearest(xb, c, k, distances=distances)  # (n, k) or None, (n, k)
        except (RuntimeError, MemoryError) as exc:
            if not (_is_out_of_memory(exc) or isinstance(exc, MemoryError)) or chunk_rows == 1:
                raise
            chunk_rows = max(1, chunk_rows // 2)
            log.warning("out of memory on a chunk of %d rows; retrying with %d", rows.stop - rows.start, chunk_rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        yield rows, xb, sqdist, idx
        start = rows.stop


def encode(
    centroids: torch.Tensor,
    metric: str,
    x: torch.Tensor,
    *,
    top_k: int = 1,
    return_distances: bool = False,
    engine: str = "auto",
    device: str | torch.device | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    name: str = "x",
    row_offset: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes of every row of ``x``; the work behind :meth:`Codebook.encode`.

    Args:
        centroids: (n_codes, dim) float32 CPU tensor, validated (unit rows for cosine).
        metric: 'l2' or 'cosine'.
        x: (n_rows, dim) embeddings, anything :func:`~vq_pipeline.validate.as_embeddings` accepts
            (torch tensor, numpy array, polars Series); validated here.
        name, row_offset: how error messages name ``x`` and number its rows (for table batches).

    Returns:
        codes: int64 CPU tensor, (n_rows,) when ``top_k == 1`` else (n_rows, top_k), nearest first.
        With ``return_distances``, the pair ``(codes, distances)`` (codes first, the reverse of FAISS's
        ``(D, I)``; the same order as :meth:`Codebook.encode`), distances a float32 CPU tensor of the
        same shape: squared L2 for 'l2', ``1 - cos`` for 'cosine' (smaller is better in both). Always
        tensors: :meth:`Codebook.encode` gives them back in the caller's array type.
    """
    x = as_embeddings(x, name=name, row_offset=row_offset)
    n_codes, dim = centroids.shape
    if x.shape[1] != dim:
        raise DimensionMismatchError(
            f"{name}.shape[1]={x.shape[1]} but the codebook has dim={dim}; expected embeddings of width {dim}. "
            f"Fix: encode with the codebook fitted on this embedding model, or refit."
        )
    top_k = check_int("top_k", top_k, minimum=1, maximum=n_codes, hint=f"the codebook has {n_codes} codes.")
    budget = check_int("memory_budget", memory_budget, minimum=1)
    dev = resolve_device(device, x)
    eng = get_engine(engine, dev, dim)
    if metric == "cosine":
        check_nonzero_rows(x, name=name, row_offset=row_offset)
    c = centroids.to(dev, torch.float32).contiguous()  # (n_codes, dim)
    codes = torch.empty((x.shape[0], top_k), dtype=torch.int64)  # (n_rows, top_k)
    dists = torch.empty((x.shape[0], top_k), dtype=torch.float32) if return_distances else None
    chunk = plan_chunk_rows(x.shape[0], n_codes, dim, k=top_k, engine=eng, memory_budget=budget)
    source = x
    if metric == "cosine":
        # argmax of cos(x, c) over unit centroids == argmin of |x/|x| - c|^2: same codes, L2 speed.
        source = _NormalizedRows(x)
    for rows, _, sqdist, idx in nearest_in_chunks(
        source, c, k=top_k, engine=eng, chunk_rows=chunk, distances=dists is not None
    ):
        codes[rows] = idx.cpu()
        if dists is not None:
            dists[rows] = to_metric_distance(sqdist, metric).cpu()
    if top_k == 1:
        codes = codes[:, 0]
        dists = dists[:, 0] if dists is not None else None
    return (codes, dists) if dists is not None else codes


def to_metric_distance(sqdist: torch.Tensor, metric: str) -> torch.Tensor:
    """Convert squared L2 distances (between unit vectors for cosine) to the metric's distance."""
    if metric == "cosine":
        return (sqdist * 0.5).clamp_(0.0, 2.0)  # |a - b|^2 = 2 - 2cos for unit a, b
    return sqdist


class _NormalizedRows:
    """Row-sliceable view of ``x`` that L2-normalizes each slice on access (no full copy)."""

    def __init__(self, x: torch.Tensor) -> None:
        self._x = x
        self.shape = x.shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return normalize_rows(self._x[rows])
