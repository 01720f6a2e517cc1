"""Table I/O with polars: embedding tables in, code tables out. Path in, tensor out; no math.

This is the only module that imports polars. Embeddings are stored as ``Array(Float32, dim)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .errors import InvalidInputError


def write_embeddings(path: str | os.PathLike[str], ids: np.ndarray, x: np.ndarray, *, column: str = "embedding") -> Path:
    """Write a parquet table with an ``id`` column and an ``Array(Float32, dim)`` embedding column.

    Args:
        ids: (n_rows,) integer ids. x: (n_rows, dim) float32 embeddings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pl.DataFrame({"id": ids, column: np.ascontiguousarray(x, dtype=np.float32)}).write_parquet(tmp)
    os.replace(tmp, path)
    return path


def read_embeddings(path: str | os.PathLike[str], *, column: str = "embedding", id_column: str = "id") -> tuple[np.ndarray, torch.Tensor]:
    """Read a whole (small) embedding table into memory.

    Returns:
        ids: (n_rows,) numpy array. x: (n_rows, dim) float32 CPU tensor.
    """
    df = pl.read_parquet(path, columns=[id_column, column])
    series = df[column]
    if not isinstance(series.dtype, pl.Array):
        raise InvalidInputError(
            f"column {column!r} of {str(path)!r} has dtype={series.dtype}; expected Array(Float32, dim). "
            f"Fix: cast it with pl.col({column!r}).cast(pl.Array(pl.Float32, dim))."
        )
    # A copy: polars hands out read-only buffers, and this small in-memory reader owns its result.
    return df[id_column].to_numpy(), torch.from_numpy(np.array(series.to_numpy(), dtype=np.float32))


def write_codes(path: str | os.PathLike[str], ids: np.ndarray, codes: torch.Tensor, distances: torch.Tensor | None = None) -> Path:
    """Write ``id, code[, distance]`` parquet, atomically.

    Args:
        ids: (n_rows,) ids. codes: (n_rows,) int64 tensor. distances: optional (n_rows,) float32.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, object] = {"id": ids, "code": codes.numpy()}
    if distances is not None:
        columns["distance"] = distances.numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    pl.DataFrame(columns).write_parquet(tmp)
    os.replace(tmp, path)
    return path
