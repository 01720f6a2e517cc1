"""Table I/O with polars: find embedding tables, stream them as tensors, write code tables.

This is the only module that imports polars. Path in, tensor out: no math here.

* Sources: parquet and Arrow IPC files (``.parquet``, ``.arrow``, ``.ipc``, ``.feather``), given as
  files, globs, folders (searched recursively; hive-partitioned ``key=value/`` folders included), on
  local disk or object storage (``s3://``, ``gs://``, ``az://`` with polars' ``storage_options``).
* Embeddings: an ``Array(Float32|Float64|Int*, dim)`` column, or a ``List`` of those with one length.
* Batches are slices of a lazy scan, read one at a time; an ``Array(Float32)`` batch with no nulls
  reaches torch without a copy (DLPack), and such tensors are never written into.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch

from .errors import InvalidInputError
from .fileio import atomic_write
from .settings import CODE_DTYPE_NAMES

TABLE_SUFFIXES = (".parquet", ".arrow", ".ipc", ".feather")
_REMOTE_PREFIXES = (
    "s3://",
    "s3a://",
    "gs://",
    "gcs://",
    "az://",
    "abfs://",
    "abfss://",
    "http://",
    "https://",
    "hf://",
)
_NUMERIC_INNER = (
    pl.Float32,
    pl.Float64,
    pl.Float16,
    pl.Int8,
    pl.Int16,
    pl.Int32,
    pl.Int64,
    pl.UInt8,
    pl.UInt16,
    pl.UInt32,
    pl.UInt64,
)


@dataclass(frozen=True)
class Source:
    """One input table file.

    Attributes:
        uri: local path or object-storage URI of the file.
        key: its path relative to the root it was found under (``date=2026-11-01/part-0.parquet``);
            names its output, so partitions keep their layout.
    """

    uri: str
    key: str

    @property
    def is_remote(self) -> bool:
        return self.uri.startswith(_REMOTE_PREFIXES)

    @property
    def format(self) -> str:
        return "parquet" if self.uri.endswith(".parquet") else "ipc"


@dataclass(frozen=True)
class Batch:
    """A streamed slice of one source.

    Attributes:
        offset: row position of the batch's first row within its source.
        x: (n, dim) float32 CPU tensor (float64 for float64 columns, converted after validation); may
            share memory with polars: never write into it.
        ids: the id column's values (a polars Series), or None when ids are row positions.
        keep: pass-through columns (a polars DataFrame), or None.
    """

    offset: int
    x: torch.Tensor
    ids: Any
    keep: Any

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _is_remote(path: str) -> bool:
    return str(path).startswith(_REMOTE_PREFIXES)


def discover(paths: Sequence[str | os.PathLike[str]], *, storage_options: dict[str, Any] | None = None) -> list[Source]:
    """Expand files, globs and folders into a sorted list of table files.

    Raises:
        InvalidInputError: no paths, a path that does not exist, a folder or glob with no table
            files, or two files that would write the same output name.
    """
    if not paths:
        raise InvalidInputError("paths=[] is empty; expected at least one table file, glob or folder.")
    sources: list[Source] = []
    for raw in paths:
        path = str(raw)
        if _is_remote(path):
            sources.extend(_discover_remote(path, storage_options))
            continue
        if any(ch in path for ch in "*?["):
            prefix = path.split("*")[0].split("?")[0].split("[")[0]
            # The folder part before the first wildcard: "data/*.parquet" and "data/part-*" both root at "data".
            root = Path(prefix) if prefix.endswith("/") else Path(prefix).parent
            files = [Path(p) for p in _glob.glob(path, recursive=True) if Path(p).is_file()]
        elif Path(path).is_dir():
            root = Path(path)
            files = [p for p in root.rglob("*") if p.is_file()]
        elif Path(path).is_file():
            root, files = Path(path).parent, [Path(path)]
        else:
            raise InvalidInputError(
                f"path={path!r} does not exist; expected a table file, a glob or a folder. Fix: check the path."
            )
        files = sorted(p for p in files if p.suffix in TABLE_SUFFIXES and not _hidden(p.relative_to(root)))
        if not files:
            raise InvalidInputError(
                f"path={path!r} holds no table files; expected files ending in {', '.join(TABLE_SUFFIXES)}. "
                f"Fix: point at the folder or files that hold the embeddings."
            )
        sources.extend(Source(str(p), p.relative_to(root).as_posix()) for p in files)
    seen: dict[str, str] = {}
    for s in sources:
        if s.key in seen and seen[s.key] != s.uri:
            raise InvalidInputError(
                f"{s.uri!r} and {seen[s.key]!r} would both write output {s.key!r}; expected distinct names. "
                f"Fix: encode them in separate runs, or give their common parent folder instead."
            )
        seen[s.key] = s.uri
    return sorted({s.uri: s for s in sources}.values(), key=lambda s: s.key)


def _hidden(rel: Path) -> bool:
    return any(part.startswith((".", "_")) for part in rel.parts)


def _discover_remote(path: str, storage_options: dict[str, Any] | None) -> list[Source]:
    if path.endswith(TABLE_SUFFIXES) and not any(ch in path for ch in "*?["):
        return [Source(path, path.rsplit("/", 1)[-1])]
    pattern = path if any(ch in path for ch in "*?[") else path.rstrip("/") + "/**/*.parquet"
    root = pattern.split("*")[0].rsplit("/", 1)[0]
    files = (
        pl.scan_parquet(pattern, storage_options=storage_options, hive_partitioning=False, include_file_paths="__file")
        .select("__file")
        .unique()
        .collect()["__file"]
        .to_list()
    )
    if not files:
        raise InvalidInputError(f"path={path!r} holds no parquet files. Fix: check the prefix or glob.")
    return [Source(f, f[len(root) + 1 :] if f.startswith(root + "/") else f.rsplit("/", 1)[-1]) for f in sorted(files)]


def scan(source: Source, *, storage_options: dict[str, Any] | None = None) -> pl.LazyFrame:
    """A lazy scan of one source (hive columns are not added: the key already names the partition)."""
    try:
        if source.format == "parquet":
            return pl.scan_parquet(source.uri, storage_options=storage_options, hive_partitioning=False, glob=False)
        return pl.scan_ipc(source.uri, storage_options=storage_options, hive_partitioning=False, glob=False)
    except Exception as exc:  # noqa: BLE001 - polars raises several error types for unreadable files
        raise _unreadable(source, exc) from None


def _unreadable(source: Source, exc: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"table {source.uri!r} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
        f"expected a valid {source.format} file. Fix: rewrite or remove the file (is it truncated?)."
    )


@dataclass(frozen=True)
class TableInfo:
    n_rows: int
    dim: int | None  # None for a List column: known after reading a row
    id_dtype: Any


def inspect_source(
    source: Source,
    *,
    column: str,
    id_column: str | None = None,
    keep: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
) -> TableInfo:
    """Check a source's schema and count its rows, reading only metadata.

    Raises:
        InvalidInputError: unreadable file, missing columns, or an embedding column that is not a
            numeric Array or List.
    """
    lf = scan(source, storage_options=storage_options)
    try:
        schema = lf.collect_schema()
        n_rows = int(lf.select(pl.len()).collect().item())
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(source, exc) from None
    for name, what in [
        (column, "column"),
        *((id_column, "id_column") for _ in [0] if id_column),
        *((k, "keep") for k in keep),
    ]:
        if name not in schema:
            raise InvalidInputError(
                f"{what}={name!r} is not a column of {source.uri!r}; expected one of {list(schema.names())}. "
                f"Fix: pass --{what.replace('_', '-')} with one of those names."
            )
    dtype = schema[column]
    if isinstance(dtype, pl.Array) and dtype.inner in _NUMERIC_INNER and len(dtype.shape) == 1:
        dim: int | None = int(dtype.size)
    elif isinstance(dtype, pl.List) and dtype.inner in _NUMERIC_INNER:
        dim = None
    else:
        raise InvalidInputError(
            f"column={column!r} of {source.uri!r} has dtype={dtype}; expected Array(Float32, dim) or a List of "
            f"numbers of one length. Fix: store embeddings as pl.Array(pl.Float32, dim)."
        )
    if dim == 0:
        raise InvalidInputError(
            f"column={column!r} of {source.uri!r} holds zero-length vectors (dim=0); expected vectors of "
            f"dim >= 1. Fix: point --column at the embedding column, or rewrite the table with its vectors."
        )
    return TableInfo(n_rows=n_rows, dim=dim, id_dtype=schema[id_column] if id_column else pl.UInt64)


def iter_batches(
    source: Source,
    *,
    column: str,
    batch_rows: int,
    id_column: str | None = None,
    keep: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
) -> Iterator[Batch]:
    """Stream one source in batches of about ``batch_rows`` rows.

    Raises:
        InvalidInputError: null embeddings or ids, null elements, ragged or zero-length vectors, a
            dim that changes within the table, or a file that fails while being read.
    """
    columns = [column, *([id_column] if id_column else []), *keep]
    lf = scan(source, storage_options=storage_options).select(columns)
    offset, dim = 0, None
    try:
        n_rows = int(lf.select(pl.len()).collect().item())
        # One slice query per batch: polars reads only the row groups the slice touches. Measured on a
        # 4M x 128 parquet file, this peaked at 227 MiB of RSS against 512 MiB for collect_batches(),
        # which reads ahead (benchmarks/RESULTS.md), at the same speed.
        while offset < n_rows:
            df = lf.slice(offset, batch_rows).collect()
            if df.height == 0:
                break
            x, dim = _to_tensor(df[column], source=source, column=column, offset=offset, dim=dim)
            ids = None
            if id_column:
                ids = df[id_column]
                if ids.null_count():
                    row = offset + int(ids.is_null().arg_true()[0])
                    raise InvalidInputError(
                        f"id_column={id_column!r} is null at row {row} of {source.uri!r}; expected an id on every row. "
                        f"Fix: fill or drop rows without ids, or omit --id-column to use row positions."
                    )
            yield Batch(offset=offset, x=x, ids=ids, keep=df.select(keep) if keep else None)
            offset += df.height
    except InvalidInputError:
        raise
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(source, exc) from None


def _to_tensor(s: pl.Series, *, source: Source, column: str, offset: int, dim: int | None) -> tuple[torch.Tensor, int]:
    """(n, dim) float32 tensor of one batch's embedding column, zero-copy when polars allows it."""
    where = f"column={column!r} of {source.uri!r}"
    if s.null_count():
        row = offset + int(s.is_null().arg_true()[0])
        raise InvalidInputError(
            f"{where} is null at row {row}; expected an embedding on "
            "every row. Fix: drop or fill rows without embeddings."
        )
    if isinstance(s.dtype, pl.List):
        lengths = s.list.len()
        want = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
        if want == 0 and len(lengths):
            raise InvalidInputError(
                f"{where} has a zero-length vector at row {offset}; expected vectors of dim >= 1. "
                f"Fix: drop empty vectors, or point --column at the embedding column."
            )
        bad = (lengths != want).arg_true()
        if len(bad):
            row = int(bad[0])
            raise InvalidInputError(
                f"{where} has a vector of length {int(lengths[row])} at row {offset + row}; expected every vector to "
                f"have length {want} (ragged or empty vectors). Fix: drop or repair that row."
            )
        s = s.cast(pl.Array(s.dtype.inner, want))
    n_dim = int(s.dtype.size)
    if dim is not None and n_dim != dim:
        raise InvalidInputError(
            f"{where} changes dim from {dim} to {n_dim} at row {offset}; expected one dim per table."
        )
    flat = s.explode() if len(s) else s
    if flat.null_count():
        row = offset + int(flat.is_null().arg_true()[0]) // n_dim
        raise InvalidInputError(
            f"{where} has a null element inside the vector at row {row}; "
            "expected numbers only. Fix: drop or repair that row."
        )
    # float64 stays float64 here: validation must see a 1e39 as too large, not as the Inf a cast makes.
    if s.dtype.inner not in (pl.Float32, pl.Float64):
        s = s.cast(pl.Array(pl.Float32, n_dim))
    s = s.rechunk()
    arr = s.to_numpy()  # (n, dim) float32 (or float64), a read-only view of polars' buffer when possible
    return torch.from_dlpack(arr) if arr.size else torch.empty((0, n_dim)), n_dim


def row_positions(batch: Batch) -> pl.Series:
    """The row positions of a batch, used as ids when the table has no id column."""
    return pl.Series("row", np.arange(batch.offset, batch.offset + len(batch), dtype=np.uint64))


def duplicate_ids(
    sources: Sequence[Source], id_column: str, *, storage_options: dict[str, Any] | None = None, limit: int = 5
) -> list[Any]:
    """Up to ``limit`` ids that occur more than once across ``sources`` (reads only the id column)."""
    frames = [scan(s, storage_options=storage_options).select(pl.col(id_column)) for s in sources]
    dup = pl.concat(frames).group_by(id_column).len().filter(pl.col("len") > 1).head(limit)
    return dup.collect(engine="streaming")[id_column].to_list()


def sample_rows(
    sources: Sequence[Source],
    n_rows_per_source: Sequence[int],
    positions: np.ndarray,
    *,
    column: str,
    storage_options: dict[str, Any] | None = None,
) -> list[tuple[Source, np.ndarray, torch.Tensor]]:
    """Read the rows at global ``positions`` (sorted, over the concatenated sources).

    Returns:
        per source with selected rows: (source, local positions, (k, dim) float32 tensor).
    """
    out = []
    start = 0
    for source, n in zip(sources, n_rows_per_source):
        local = positions[(positions >= start) & (positions < start + n)] - start
        start += n
        if len(local) == 0:
            continue
        df = (
            scan(source, storage_options=storage_options)
            .select(column)
            .with_row_index("__row")
            .filter(pl.col("__row").is_in(pl.Series(local.astype(np.uint32 if n < 2**32 else np.uint64)).implode()))
            .collect(engine="streaming")
        )
        x, _ = _to_tensor(df[column], source=source, column=column, offset=0, dim=None)
        out.append((source, local, x.clone()))
    return out


def fingerprint(source: Source, *, storage_options: dict[str, Any] | None = None) -> str:
    """A content fingerprint of one source.

    Local files: sha256 of the whole file, so touching a file (or copying it elsewhere) keeps its
    fingerprint and any change of content changes it. Remote files: sha256 of the URI, the row
    count and the schema (no listing API is used). See :func:`file_stat` for a cheap check of
    whether a local file may have changed since it was fingerprinted.
    """
    if source.is_remote:
        lf = scan(source, storage_options=storage_options)
        h = hashlib.sha256(b"vq-source-v1|")
        h.update(f"{source.uri}|{lf.select(pl.len()).collect().item()}|{lf.collect_schema()}".encode())
        return h.hexdigest()
    return "sha256:" + file_sha256(source.uri)


def file_stat(source: Source) -> str | None:
    """``size|mtime_ns|inode`` of a local source (None for remote ones): while it is unchanged, so is
    the file's :func:`fingerprint` (short of a deliberate in-place edit that restores the mtime)."""
    if source.is_remote:
        return None
    st = os.stat(source.uri)
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


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


def concat_frames(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames, rechunk=False) if frames else pl.DataFrame()


def write_parquet_atomic(frame: pl.DataFrame, path: str | os.PathLike[str]) -> str:
    """Write ``frame`` to ``path`` atomically (:func:`vq_pipeline.fileio.atomic_write`).

    Returns the sha256 of the written bytes.
    """
    return file_sha256(atomic_write(path, lambda f: frame.write_parquet(f, statistics=True)))


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


def read_table(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read a whole (small) table, e.g. one output of an encode run."""
    return pl.read_parquet(path)
