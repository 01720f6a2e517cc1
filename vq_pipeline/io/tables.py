"""Read embedding tables with polars: check their schema, stream them in batches as tensors, sample rows.

Path in, tensor out: no math here. Finding the tables is :mod:`vq_pipeline.io.discovery`'s job, writing
code tables :mod:`vq_pipeline.io.table_writer`'s; their public names are importable from here too.

* Embeddings: an ``Array(Float32|Float64|Int*, dim)`` column, or a ``List`` of those with one length.
* Batches are read one at a time, in memory and time that follow the batch whatever the file's row
  groups: a batch inside a larger row group of a local parquet file is read page by page (polars
  alone would read and decode the whole row group again for every batch), other batches as slices
  of a lazy scan. Files whose pages cannot be located (encrypted, or v1 pages of list columns
  compressed with zstd, lz4 or brotli and written without a page index) are read by slices only.
  An ``Array(Float32)`` batch with no nulls reaches torch without a copy (DLPack), and such tensors
  are never written into.
* Every failure to read a file, polars' Rust panics included, becomes an :class:`InvalidInputError`
  naming the file (and the rows, when known).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from vq_pipeline.errors import InvalidInputError, VQError
from vq_pipeline.io.fileio import polars_path
from vq_pipeline.io.discovery import Source, first_line, discover
from vq_pipeline.io.parquet_pages import ParquetPages
from vq_pipeline.io.table_writer import (
    CODE_DTYPES,
    OUTPUT_COLUMNS,
    SUFFIX_COLUMN,
    SUFFIX_DTYPE,
    code_dtype,
    codes_frame,
    concat_frames,
    file_sha256,
    level_codes_frame,
    parquet_bytes,
    with_suffix,
    write_embeddings,
    write_parquet_atomic,
)
from vq_pipeline.settings import DEFAULT_BATCH_ROWS

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


def scan(source: Source, *, storage_options: dict[str, Any] | None = None) -> pl.LazyFrame:
    """A lazy scan of one source (hive columns are not added: the key already names the partition)."""
    with _reading(source):
        uri = source.uri if source.is_remote else polars_path(source.uri)
        if source.format == "parquet":
            return pl.scan_parquet(uri, storage_options=storage_options, hive_partitioning=False, glob=False)
        return pl.scan_ipc(uri, storage_options=storage_options, hive_partitioning=False, glob=False)


@contextlib.contextmanager
def _reading(source: Source, rows: tuple[int, int] | None = None) -> Iterator[None]:
    """Turn whatever reading ``source`` raises (polars errors, Rust panics, OS errors) into an
    :class:`InvalidInputError` that names the file and, when known, the rows [start, stop)."""
    try:
        yield
    except VQError:
        raise
    except (Exception, pl.exceptions.PanicException) as exc:
        raise _unreadable(source, exc, rows) from None


def _unreadable(source: Source, exc: BaseException, rows: tuple[int, int] | None = None) -> InvalidInputError:
    where = f" at rows {rows[0]}..{rows[1] - 1}" if rows else ""
    cause = f"({type(exc).__name__}: {first_line(exc)})"
    if isinstance(exc, (pl.exceptions.ColumnNotFoundError, pl.exceptions.DuplicateError)):
        return InvalidInputError(  # the query asked for something the file does not have: not the file's fault
            f"table {source.uri!r} cannot be queried as asked {cause}; expected each requested column once. "
            f"Fix: check --column, --id-column and --keep against the table's columns."
        )
    if isinstance(exc, FileNotFoundError):
        fix = "check the path (was the file moved or deleted during the run?)"
    elif isinstance(exc, PermissionError):
        fix = "make the file readable by this user"
    else:
        fix = "rewrite or remove the file (is it truncated or corrupt?)"
    return InvalidInputError(
        f"table {source.uri!r} cannot be read {cause}{where}; expected a valid {source.format} file. Fix: {fix}."
    )


@dataclass(frozen=True)
class TableInfo:
    n_rows: int
    dim: int | None  # None for a List column: known after reading a row
    id_dtype: Any


def check_keep(keep: Sequence[str], *, id_column: str | None = None) -> None:
    """Refuse kept columns that would collide in the output table: a name given twice, or the name of
    one of the output's own columns (the id column, ``row`` when ids are row positions,
    :data:`OUTPUT_COLUMNS`). The embedding column itself may be kept.

    Raises:
        InvalidInputError: a repeated or clashing name.
    """
    seen: set[str] = set()
    for name in keep:
        if name in seen:
            raise InvalidInputError(
                f"keep={list(keep)!r} names {name!r} twice; expected each kept column once. "
                f"Fix: pass --keep {name} once."
            )
        seen.add(name)
    own = [id_column or "row", *OUTPUT_COLUMNS]
    for name in keep:
        if name in own:
            what = "the id column" if name == (id_column or "row") else "a column"
            raise InvalidInputError(
                f"keep={name!r} clashes with {what} the code table writes itself; expected kept columns other than "
                f"{', '.join(repr(c) for c in own)}. Fix: drop --keep {name}, or rename that column in the input."
            )


def _check_columns(
    source: Source, schema: pl.Schema, *, column: str, id_column: str | None = None, keep: Sequence[str] = ()
) -> None:
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
        InvalidInputError: kept columns that clash (:func:`check_keep`, before the file is opened),
            unreadable file, missing columns, or an embedding column that is not a numeric Array or List.
    """
    check_keep(keep, id_column=id_column)
    lf = scan(source, storage_options=storage_options)
    with _reading(source):
        schema = lf.collect_schema()
        n_rows = int(lf.select(pl.len()).collect().item())
    _check_columns(source, schema, column=column, id_column=id_column, keep=keep)
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


class _Rows:
    """Row ranges of some columns of one source: as slices of a lazy scan (one query per range), or,
    for a range inside a row group larger than itself, page by page when :class:`ParquetPages` knows
    the file's layout (polars would read and decode the whole row group for each range)."""

    def __init__(self, source: Source, columns: Sequence[str], storage_options: dict[str, Any] | None) -> None:
        self.source, self.columns = source, list(dict.fromkeys(columns))
        lf = scan(source, storage_options=storage_options)
        with _reading(source):
            schema = lf.collect_schema()
            self.n_rows = int(lf.select(pl.len()).collect().item())
        self.schema = schema
        self._lf = lf.select(self.columns) if all(c in schema for c in self.columns) else lf
        self._pages: ParquetPages | None = None
        if source.format == "parquet" and not source.is_remote and all(c in schema for c in self.columns):
            with _reading(source):
                self._pages = ParquetPages.open(source.uri, self.columns, schema)
            if self._pages is not None and self._pages.n_rows != self.n_rows:
                self.close()

    def read(self, start: int, stop: int) -> pl.DataFrame:
        """Rows [start, stop) of the columns."""
        with _reading(self.source, (start, stop)):
            if self._pages is not None and self._pages.larger_row_group(start, stop):
                try:
                    return self._pages.read(start, stop, self.schema)
                except InvalidInputError as exc:
                    raise _unreadable(self.source, exc, (start, stop)) from None
            return self._lf.slice(start, stop - start).collect()

    def close(self) -> None:
        if self._pages is not None:
            self._pages.close()
            self._pages = None


def iter_batches(
    source: Source,
    *,
    column: str,
    batch_rows: int,
    id_column: str | None = None,
    keep: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
) -> Iterator[Batch]:
    """Stream one source in batches of ``batch_rows`` rows (the last one shorter).

    Memory and time follow ``batch_rows``, not the file's row groups: a batch inside a larger row
    group of a local parquet file is read page by page, so a file written as one large row group is
    neither held whole nor decoded again for every batch. The embedding column may also be kept
    (``keep``).

    Raises:
        InvalidInputError: missing columns, null embeddings or ids, null elements, ragged or
            zero-length vectors, a dim that changes within the table, or a file that fails while being
            read (naming the rows of the batch).
    """
    rows = _Rows(source, [column, *([id_column] if id_column else []), *keep], storage_options)
    try:
        _check_columns(source, rows.schema, column=column, id_column=id_column, keep=keep)
        offset, dim = 0, None
        while offset < rows.n_rows:
            df = rows.read(offset, min(rows.n_rows, offset + batch_rows))
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
    finally:
        rows.close()


def _to_tensor(
    s: pl.Series, *, source: Source, column: str, offset: int | np.ndarray, dim: int | None
) -> tuple[torch.Tensor, int]:
    """(n, dim) float32 tensor of one batch's embedding column, zero-copy when polars allows it.

    ``offset``: the row number of the batch's first row, or (n,) row numbers of sampled rows; errors
    name rows by these numbers.
    """
    where = f"column={column!r} of {source.uri!r}"

    def row_number(i: int) -> int:
        return int(offset[i]) if isinstance(offset, np.ndarray) else offset + i

    if s.null_count():
        row = row_number(int(s.is_null().arg_true()[0]))
        raise InvalidInputError(
            f"{where} is null at row {row}; expected an embedding on "
            "every row. Fix: drop or fill rows without embeddings."
        )
    if isinstance(s.dtype, pl.List):
        lengths = s.list.len()
        want = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
        if want == 0 and len(lengths):
            raise InvalidInputError(
                f"{where} has a zero-length vector at row {row_number(0)}; expected vectors of dim >= 1. "
                f"Fix: drop empty vectors, or point --column at the embedding column."
            )
        bad = (lengths != want).arg_true()
        if len(bad):
            row = int(bad[0])
            raise InvalidInputError(
                f"{where} has a vector of length {int(lengths[row])} at row {row_number(row)}; expected every "
                f"vector to have length {want} (ragged or empty vectors). Fix: drop or repair that row."
            )
        s = s.cast(pl.Array(s.dtype.inner, want))
    n_dim = int(s.dtype.size)
    if dim is not None and n_dim != dim:
        raise InvalidInputError(
            f"{where} changes dim from {dim} to {n_dim} at row {row_number(0)}; expected one dim per table."
        )
    flat = s.explode() if len(s) else s
    if flat.null_count():
        row = row_number(int(flat.is_null().arg_true()[0]) // n_dim)
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
    """Up to ``limit`` ids that occur more than once across ``sources`` (reads only the id column).

    Raises:
        InvalidInputError: a missing id column, an id column whose type differs between files (naming
            both files and types), a null id (naming its file and row: checked before duplicates), or
            an unreadable file.
    """
    frames, first = [], None
    for s in sources:
        lf = scan(s, storage_options=storage_options)
        with _reading(s):
            schema = lf.collect_schema()
        _check_columns(s, schema, column=id_column)
        if first is None:
            first = (s, schema[id_column])
        elif schema[id_column] != first[1]:
            raise InvalidInputError(
                f"id_column={id_column!r} is {first[1]} in {first[0].uri!r} but {schema[id_column]} in {s.uri!r}; "
                f"expected one id type across the inputs. Fix: cast the id column to one type in every file "
                f"(e.g. pl.col({id_column!r}).cast(pl.{first[1]})), or encode the files in separate runs."
            )
        frames.append(lf.select(pl.col(id_column)))
    for s, lf in zip(sources, frames):
        # The first null's row from a row index: polars' streaming arg_max of a boolean column gives the last one.
        with _reading(s):
            nulls, row = (
                lf.with_row_index("__row")
                .select(pl.col(id_column).null_count(), pl.col("__row").filter(pl.col(id_column).is_null()).min())
                .collect(engine="streaming")
                .row(0)
            )
        if nulls:
            raise InvalidInputError(
                f"id_column={id_column!r} is null at row {row} of {s.uri!r} ({nulls} null ids in that file); "
                f"expected an id on every row. Fix: fill or drop rows without ids, or omit --id-column to use "
                f"row positions."
            )
    try:
        dup = pl.concat(frames).group_by(id_column).len().filter(pl.col("len") > 1).head(limit)
        return dup.collect(engine="streaming")[id_column].to_list()
    except (Exception, pl.exceptions.PanicException) as exc:
        for s, lf in zip(sources, frames):  # name the file that fails on its own
            with _reading(s):
                lf.select(pl.col(id_column).n_unique()).collect(engine="streaming")
        raise InvalidInputError(
            f"id_column={id_column!r} could not be checked for duplicates across {len(sources)} files "
            f"({type(exc).__name__}: {first_line(exc)}); expected id columns that read as one type. "
            f"Fix: read each file's id column with polars to find the one that differs, and rewrite it."
        ) from None


def shared_ids(
    paths: Sequence[str | os.PathLike[str]],
    sources: Sequence[Source],
    id_column: str,
    *,
    storage_options: dict[str, Any] | None = None,
    limit: int = 3,
) -> Iterator[tuple[Any, Any, list[Any]]]:
    """For each local parquet file of ``paths``, in order: (its ``id_column`` type, the type in ``sources``,
    up to ``limit`` ids of ``sources`` that it holds too: none when the types differ). The id columns
    of ``sources`` are read once, whatever the number of files.

    Raises:
        InvalidInputError: a file that cannot be read, or that has no ``id_column``.
    """
    theirs = pl.concat([scan(s, storage_options=storage_options).select(pl.col(id_column)) for s in sources])
    their_type = theirs.collect_schema()[id_column]
    unique: pl.DataFrame | None = None  # the ids of ``sources``, read when a file of their type needs them
    for path in paths:
        kept = Source(os.fspath(path), Path(path).name)
        with _reading(kept):
            lf = pl.scan_parquet(polars_path(path), glob=False)
            _check_columns(kept, lf.collect_schema(), column=id_column)
            kept_type = lf.collect_schema()[id_column]
        if kept_type != their_type:
            yield kept_type, their_type, []
            continue
        if unique is None:
            unique = theirs.unique().collect(engine="streaming")
        with _reading(kept):
            found = lf.select(pl.col(id_column)).join(unique.lazy(), on=id_column, how="inner").head(limit).collect()
        yield kept_type, their_type, found[id_column].to_list()


def sample_rows(
    sources: Sequence[Source],
    n_rows_per_source: Sequence[int],
    positions: np.ndarray,
    *,
    column: str,
    storage_options: dict[str, Any] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> list[tuple[Source, np.ndarray, torch.Tensor]]:
    """Read the rows at global ``positions`` (sorted, over the concatenated sources).

    Reads a window of at most ``batch_rows`` rows at a time, only windows that hold a wanted row:
    memory follows the sample and the window, not the file's row groups.

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
        rows = _Rows(source, [column], storage_options)
        try:
            _check_columns(source, rows.schema, column=column)
            parts, dim, i = [], None, 0
            while i < len(local):
                lo = int(local[i])
                hi = min(rows.n_rows, lo + batch_rows)
                j = int(np.searchsorted(local, hi))
                if lo >= rows.n_rows:
                    raise InvalidInputError(
                        f"row {lo} of {source.uri!r} was asked for but the table has {rows.n_rows} rows; expected "
                        f"the row count it had when the run started. Fix: rerun (was the file replaced?)."
                    )
                picked = rows.read(lo, hi)[column].gather(pl.Series(local[i:j] - lo))
                x, dim = _to_tensor(picked, source=source, column=column, offset=local[i:j], dim=dim)
                parts.append(x.clone())
                i = j
        finally:
            rows.close()
        out.append((source, local, torch.cat(parts)))
    return out


def fingerprint(source: Source, *, storage_options: dict[str, Any] | None = None) -> str:
    """A content fingerprint of one source.

    Local files: sha256 of the whole file, so touching a file (or copying it elsewhere) keeps its
    fingerprint and any change of content changes it. Remote files: sha256 of the URI, the row
    count and the schema (no listing API is used). See :func:`file_stat` for a cheap check of
    whether a local file may have changed since it was fingerprinted.
    """
    with _reading(source):
        if source.is_remote:
            lf = scan(source, storage_options=storage_options)
            h = hashlib.sha256(b"vq-source-v1|")
            h.update(
                f"{source.uri}|{lf.select(pl.len()).collect().item()}|{lf.collect_schema()}".encode(
                    "utf-8", "surrogateescape"
                )
            )
            return h.hexdigest()
        return "sha256:" + file_sha256(source.uri)


def file_stat(source: Source) -> str | None:
    """``size|mtime_ns|inode|device|ctime_ns`` of a local source (None for remote ones).

    While it is unchanged, so is the file's :func:`fingerprint`: any write to the file, and any change
    of its mtime, sets its ctime to the current time, which a user cannot set back (so an in-place
    edit that restores the size and the mtime still shows), and a copy elsewhere has another inode
    or device.
    """
    if source.is_remote:
        return None
    with _reading(source):
        st = os.stat(source.uri)
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}|{st.st_ctime_ns}"


def read_table(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read a whole (small) table, e.g. one output of an encode run."""
    with _reading(Source(str(path), Path(path).name)):
        return pl.read_parquet(polars_path(path))


__all__ = [
    "CODE_DTYPES",
    "OUTPUT_COLUMNS",
    "SUFFIX_COLUMN",
    "SUFFIX_DTYPE",
    "Batch",
    "Source",
    "TableInfo",
    "check_keep",
    "code_dtype",
    "codes_frame",
    "concat_frames",
    "discover",
    "duplicate_ids",
    "file_sha256",
    "file_stat",
    "fingerprint",
    "inspect_source",
    "iter_batches",
    "level_codes_frame",
    "parquet_bytes",
    "read_table",
    "row_positions",
    "sample_rows",
    "shared_ids",
    "scan",
    "with_suffix",
    "write_embeddings",
    "write_parquet_atomic",
]
