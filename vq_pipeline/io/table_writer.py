"""Write tables with polars: code tables (the ``code`` column's type, a batch's frame, atomic parquet writes).

A flat codebook's table has ``code`` (and ``codes``/``distances`` for top-k); a multi-level codebook's
(codec residual or product) has ``codes``, an ``Array(integer, levels)`` of one code per level, and,
when semantic-id suffixes are asked for, ``suffix`` (UInt32, null until the folder's finishing step
fills it; :func:`vq_pipeline.jobs.encode_folder.assign_suffixes`). A scalar or binary codebook's table
(:func:`packed_codes_frame`) has ``codes`` in their packed file form: ``Array(UInt8, dim)`` for 8-bit
scalar codes, ``Array(UInt8, ceil(dim / 2))`` for 4-bit ones (two per byte), and for binary codes a
fixed-size binary column of ``ceil(dim / 8)`` bytes per row (polars reads it back as ``Binary``).

Tensor in, file out: no math here. For the demo and the tests, also embedding tables
(:func:`write_embeddings`). :mod:`vq_pipeline.io.tables` reads tables and re-exports these names.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.io.fileio import atomic_write
from vq_pipeline.settings import CODE_DTYPE_NAMES

#: Columns every code table has (besides its id column, ``row`` when ids are row positions): a kept
#: column may not take one of these names.
OUTPUT_COLUMNS = ("code", "codes", "distance", "distances")
#: The semantic-id suffix column of a multi-level code table written with ``unique``.
SUFFIX_COLUMN = "suffix"
SUFFIX_DTYPE = pl.UInt32

#: The footer key of a scalar or binary code table naming its codec (and :data:`BITS_KEY` its bits per
#: dimension): readers that take codes for semantic ids refuse such tables.
CODEC_KEY = "vq-pipeline.codec"
BITS_KEY = "vq-pipeline.bits"
#: Integer types a user may pin the ``code`` column to (so a warehouse schema survives a refit).
CODE_DTYPES = {name: getattr(pl, name.replace("uint", "UInt").replace("int", "Int")) for name in CODE_DTYPE_NAMES}


def code_dtype(n_codes: int, pinned: str | None = None) -> pl.DataType:
    """The ``code`` column's type: ``pinned`` (a :data:`CODE_DTYPES` name) when given, else the
    smallest unsigned integer type holding codes ``0..n_codes-1``."""
    if pinned is not None:
        dtype = CODE_DTYPES.get(pinned)
        if dtype is None:
            raise InvalidInputError(
                f"code_dtype={pinned!r} is not a supported code type; expected one of {', '.join(CODE_DTYPES)}. "
                f"Fix: pick one of those (uint32 or int64 suit most warehouse schemas)."
            )
        top = int(np.iinfo(pinned).max) + 1  # the names are numpy's too
        if n_codes > top:
            raise InvalidInputError(
                f"code_dtype={pinned!r} holds codes up to {top - 1} but "
                f"the codebook has n_codes={n_codes}; expected a type "
                f"wide enough for code {n_codes - 1}. Fix: pin a wider type such as 'uint32' or 'int64'."
            )
        return dtype
    for dtype, top in ((pl.UInt8, 2**8), (pl.UInt16, 2**16), (pl.UInt32, 2**32)):
        if n_codes <= top:
            return dtype
    return pl.UInt64


def codes_frame(
    ids: Any,
    codes: torch.Tensor,
    *,
    n_codes: int,
    id_column: str = "id",
    distances: torch.Tensor | None = None,
    keep: Any = None,
    pinned_dtype: str | None = None,
) -> pl.DataFrame:
    """Build the output table of one batch or file.

    Args:
        ids: a polars Series of ids (or row positions).
        codes: (n,) or (n, k) int64 tensor, nearest first.
        distances: optional float32 tensor of the same shape.
        keep: optional DataFrame of pass-through columns.
        pinned_dtype: the codes' integer type (see :func:`code_dtype`; default: the smallest fit).

    Columns: ``id_column``, ``code`` (nearest), ``codes`` (Array of k, when k > 1), ``distance``
    (nearest), ``distances`` (Array of k, when k > 1), then the kept columns.
    """
    dtype = code_dtype(n_codes, pinned_dtype)
    c = codes.numpy()
    cols: list[pl.Series] = [ids.rename(id_column), pl.Series("code", c if c.ndim == 1 else c[:, 0]).cast(dtype)]
    if c.ndim == 2:
        cols.append(pl.Series("codes", c).cast(pl.Array(dtype, c.shape[1])))
    if distances is not None:
        d = distances.numpy()
        cols.append(pl.Series("distance", d if d.ndim == 1 else d[:, 0]))
        if d.ndim == 2:
            cols.append(pl.Series("distances", d))
    frame = pl.DataFrame(cols)
    return frame.hstack(keep) if keep is not None else frame


def level_codes_frame(
    ids: Any,
    codes: torch.Tensor,
    *,
    n_codes: int,
    id_column: str = "id",
    distances: torch.Tensor | None = None,
    keep: Any = None,
    pinned_dtype: str | None = None,
    suffix: bool = False,
) -> pl.DataFrame:
    """Build the output table of one batch or file of a multi-level codebook.

    Args:
        ids: a polars Series of ids (or row positions).
        codes: (n, levels) int64 CPU tensor, one code per level.
        distances: optional (n,) float32 CPU tensor (distance to the reconstruction).
        keep: optional DataFrame of pass-through columns.
        pinned_dtype: the codes' integer type (see :func:`code_dtype`; default: the smallest fit).
        suffix: add a ``suffix`` column (UInt32), all null: the finishing step fills it.

    Columns: ``id_column``, ``codes`` (Array of levels), ``suffix``, ``distance``, then the kept columns.
    """
    dtype = code_dtype(n_codes, pinned_dtype)
    c = codes.numpy()  # (n, levels)
    cols: list[pl.Series] = [ids.rename(id_column), pl.Series("codes", c).cast(pl.Array(dtype, c.shape[1]))]
    if suffix:
        cols.append(pl.Series(SUFFIX_COLUMN, [None] * c.shape[0], dtype=SUFFIX_DTYPE))
    if distances is not None:
        cols.append(pl.Series("distance", distances.numpy()))
    frame = pl.DataFrame(cols)
    return frame.hstack(keep) if keep is not None else frame


def packed_codes_frame(
    ids: Any,
    packed: np.ndarray,
    *,
    codec: str,
    id_column: str = "id",
    distances: torch.Tensor | None = None,
    keep: Any = None,
) -> pl.DataFrame:
    """Build the output table of one batch or file of a scalar or binary codebook.

    Args:
        ids: a polars Series of ids (or row positions).
        packed: (n, width) uint8 array, the codes' file form (``Codebook.pack``): width ``dim`` for 8-bit
            scalar codes, ``ceil(dim / 2)`` for 4-bit ones, ``ceil(dim / 8)`` for binary codes.
        codec: 'scalar' or 'binary'.
        distances: optional (n,) float32 CPU tensor (distance to the reconstruction).
        keep: optional DataFrame of pass-through columns.

    Columns: ``id_column``, ``codes`` (``Array(UInt8, width)``; binary: ``Binary`` of ``width`` bytes, written
    as ``fixed_size_binary(width)`` by :func:`write_parquet_atomic` with ``fixed_size``), ``distance``, then
    the kept columns.
    """
    packed = np.ascontiguousarray(packed, dtype=np.uint8)  # (n, width)
    n, width = packed.shape
    if codec == "binary":
        import pyarrow as pa  # lazily: the command line starts without it

        arrow = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(packed.tobytes())])
        codes = pl.Series("codes", pl.from_arrow(arrow), dtype=pl.Binary)
    else:
        codes = pl.Series("codes", packed).cast(pl.Array(pl.UInt8, width))
    cols: list[pl.Series] = [ids.rename(id_column), codes]
    if distances is not None:
        cols.append(pl.Series("distance", distances.numpy()))
    frame = pl.DataFrame(cols)
    return frame.hstack(keep) if keep is not None else frame


def packed_codes(frame: pl.DataFrame, *, column: str = "codes") -> np.ndarray:
    """The (n, width) uint8 packed codes of a :func:`packed_codes_frame` table's ``column``, as written:
    ``Array(UInt8, width)`` or ``Binary`` of one width."""
    series = frame.get_column(column)
    if series.dtype == pl.Binary:
        values = series.to_list()
        width = len(values[0]) if values else 0
        return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), width)
    return series.to_numpy().astype(np.uint8, copy=False).reshape(len(series), -1)


def with_suffix(frame: pl.DataFrame, suffix: pl.Series) -> pl.DataFrame:
    """``frame`` (a multi-level code table with a ``suffix`` column) with that column replaced by
    ``suffix`` ((n,) UInt32, in row order), as one chunk so that its parquet bytes depend only on its values."""
    return frame.with_columns(suffix.cast(SUFFIX_DTYPE).alias(SUFFIX_COLUMN)).rechunk()


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    """The bytes :func:`write_parquet_atomic` writes for ``frame``."""
    buf = io.BytesIO()
    frame.write_parquet(buf, statistics=True)
    return buf.getvalue()


def concat_frames(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames, rechunk=False) if frames else pl.DataFrame()


def write_parquet_atomic(
    frame: pl.DataFrame,
    path: str | os.PathLike[str],
    *,
    before_replace: Callable[[str], object] | None = None,
    fixed_size: dict[str, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write ``frame`` to ``path`` atomically (:func:`vq_pipeline.io.fileio.atomic_write`).

    ``before_replace(sha256)``: called with the new bytes' sha256 once they are on disk under a temporary
    name, before they become ``path``. ``fixed_size``: ``Binary`` columns written as parquet fixed-length
    byte arrays (``{name: bytes per value}``, through pyarrow, zstd-compressed as polars writes); every
    value must have that length. ``metadata``: key-value pairs stored in the file's footer
    (:data:`CODEC_KEY`: what codes a scalar or binary code table holds).

    Returns the sha256 of the written bytes.
    """
    digest: list[str] = []

    def record(tmp: Path) -> None:
        digest.append(file_sha256(tmp))
        if before_replace is not None:
            before_replace(digest[0])

    if fixed_size:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = frame.to_arrow()
        for name, width in fixed_size.items():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, table.column(i).cast(pa.binary(width)))
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"), before_replace=record)
    else:
        atomic_write(path, lambda f: frame.write_parquet(f, statistics=True, metadata=metadata), before_replace=record)
    return digest[0]


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------- small helpers for the demo and tests


def write_embeddings(
    path: str | os.PathLike[str], ids: np.ndarray, x: np.ndarray, *, column: str = "embedding"
) -> Path:
    """Write a parquet table with an ``id`` column and an ``Array(Float32, dim)`` embedding column.

    Args:
        ids: (n_rows,) ids. x: (n_rows, dim) embeddings, converted to float32.
    """
    frame = pl.DataFrame({"id": ids, column: np.ascontiguousarray(x, dtype=np.float32)})
    write_parquet_atomic(frame, path)
    return Path(path)


__all__ = [
    "BITS_KEY",
    "CODEC_KEY",
    "CODE_DTYPES",
    "OUTPUT_COLUMNS",
    "SUFFIX_COLUMN",
    "SUFFIX_DTYPE",
    "code_dtype",
    "codes_frame",
    "concat_frames",
    "file_sha256",
    "level_codes_frame",
    "packed_codes",
    "packed_codes_frame",
    "parquet_bytes",
    "with_suffix",
    "write_embeddings",
    "write_parquet_atomic",
]
