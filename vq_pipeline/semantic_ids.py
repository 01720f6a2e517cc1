"""Semantic ids from multi-level codes: collision statistics, and a suffix that makes every row's tuple unique.

A multi-level codec (residual, product) gives each row a tuple of ``levels`` codes, an ``(n_rows,
levels)`` integer array used as the row's semantic id. Two rows collide when their whole tuples are
equal. :func:`collision_stats` measures that; :func:`unique_suffix` gives each row one more integer,
its rank (0, 1, 2, ...) among the rows sharing its tuple, ordered by id, so that ``(codes, suffix)``
is unique within the encoded set. The suffix of an id depends only on the set of ``(id, codes)``
pairs, never on the order of the rows.

:func:`suffix_table` and :func:`collision_stats_table` compute the same from parquet files with
polars' streaming engine, without bringing rows into Python. Only numpy is imported with this
module; polars is imported by the two table functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    import polars as pl

Files = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

SUFFIX_COLUMN = "suffix"


def _as_codes(codes: Any) -> np.ndarray:
    """Validate ``codes`` ((n_rows,) or (n_rows, levels) integers >= 0) and return them as (n_rows, levels)."""
    arr = np.asarray(codes)
    if arr.ndim not in (1, 2):
        raise InvalidInputError(
            f"codes.shape={arr.shape} has ndim={arr.ndim}; expected (n_rows,) or (n_rows, levels). "
            f"Fix: pass one row of codes per embedding, e.g. codes.reshape(n_rows, levels)."
        )
    if arr.ndim == 1:
        arr = arr[:, None]  # (n_rows, 1): a flat codec is one level
    if arr.shape[1] == 0:
        raise InvalidInputError(
            f"codes.shape={arr.shape} has levels=0; expected at least one code per row. "
            f"Fix: pass the codes of at least one level."
        )
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)  # an empty list reads as float64 but holds no value that is not an integer
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(
            f"codes.dtype={arr.dtype} is not an integer type; expected integer codes (indices into each level). "
            f"Fix: pass the codes the codec returned, or cast whole-number values with codes.astype(np.int64)."
        )
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        row, level = np.unravel_index(int(np.argmin(arr)), arr.shape)
        raise InvalidInputError(
            f"codes[{row}, {level}]={int(arr[row, level])} is negative; expected codes >= 0. "
            f"Fix: pass the codes the codec returned (negative values are not indices into a level)."
        )
    return arr


def _id_ranks(ids: Any, n_rows: int) -> np.ndarray:
    """(n_rows,) int64 rank of each id among ``ids``; duplicates are an error."""
    if ids is None:
        return np.arange(n_rows, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise InvalidInputError(
            f"ids.shape={arr.shape} does not match codes with n_rows={n_rows}; expected ({n_rows},), one id per row. "
            f"Fix: pass the ids of the rows that were encoded, in the same order as codes."
        )
    try:
        uniq, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
    except TypeError as exc:
        raise InvalidInputError(
            f"ids.dtype={arr.dtype} cannot be sorted ({exc}); expected ids of one sortable type (integers or strings). "
            f"Fix: convert the ids to one type, e.g. ids.astype(str)."
        ) from None
    if uniq.shape[0] < n_rows:
        dup = np.flatnonzero(counts > 1)  # (n_repeated_ids,)
        first, second = np.flatnonzero(inverse.reshape(-1) == dup[0])[:2]
        value = uniq[dup[0]].item() if isinstance(uniq[dup[0]], np.generic) else uniq[dup[0]]
        raise InvalidInputError(
            f"ids[{first}]=ids[{second}]={value!r} ({dup.size} ids repeat); expected unique ids, which order the "
            f"rows that share codes. Fix: deduplicate the rows, or pass ids=None to order by row position."
        )
    return inverse.reshape(-1).astype(np.int64, copy=False)


def _sort_rows(codes: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order the rows by (codes, rank) and find the groups of equal tuples.

    Returns (order, starts, group): the row order (n_rows,), the sorted position where each group
    starts (n_groups,), and the group of each sorted position (n_rows,).
    """
    n_rows = codes.shape[0]
    order = np.lexsort((ranks, *codes.T[::-1]))  # (n_rows,) the last key sorts first: level 0, 1, ..., then rank
    ordered = codes[order]  # (n_rows, levels)
    new = np.ones(n_rows, dtype=bool)  # (n_rows,) the sorted row starts a new tuple
    new[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    starts = np.flatnonzero(new)  # (n_groups,)
    group = np.cumsum(new) - 1  # (n_rows,)
    return order, starts, group


def collision_stats(codes: Any) -> dict[str, Any]:
    """How often rows share their whole tuple of codes.

    Args:
        codes: (n_rows, levels) or (n_rows,) non-negative integer array (numpy or anything
            ``np.asarray`` takes, e.g. a CPU tensor).

    Returns:
        JSON-able values: ``n_rows``; ``n_unique`` (distinct tuples); ``collision_rate`` (share of
        rows whose tuple at least one other row has); ``largest_group`` (most rows sharing one
        tuple); ``max_suffix`` (``largest_group - 1``, the largest :func:`unique_suffix`); ``usage``
        (distinct codes used at each level). Empty input gives zeros.

    Raises:
        InvalidInputError: codes that are not integers, negative, or not 1-D or 2-D.
    """
    arr = _as_codes(codes)
    n_rows, levels = arr.shape
    if n_rows == 0:
        return _stats(0, 0, 0, 0, [0] * levels)
    _, starts, _ = _sort_rows(arr, np.zeros(n_rows, dtype=np.int64))
    sizes = np.diff(np.append(starts, n_rows))  # (n_groups,) rows per distinct tuple
    usage = [int(np.unique(arr[:, level]).size) for level in range(levels)]
    return _stats(n_rows, int(starts.size), int(sizes.max()), int(sizes[sizes > 1].sum()), usage)


def _stats(n_rows: int, n_unique: int, largest: int, collided: int, usage: list[int]) -> dict[str, Any]:
    return {
        "n_rows": n_rows,
        "n_unique": n_unique,
        "collision_rate": collided / n_rows if n_rows else 0.0,
        "largest_group": largest,
        "max_suffix": max(largest - 1, 0),
        "usage": usage,
    }


def unique_suffix(codes: Any, ids: Any = None) -> np.ndarray:
    """Each row's rank among the rows that share its whole tuple of codes, ordered by id.

    ``(codes[i], suffix[i])`` is unique over the rows. A row whose tuple no other row has gets 0.
    The suffix of an id depends only on the set of (id, codes) pairs, not on the rows' order.

    Args:
        codes: (n_rows, levels) or (n_rows,) non-negative integer array.
        ids: optional (n_rows,) array of unique, sortable ids (integers or strings) that order the
            rows within a tuple; None orders them by row position.

    Returns:
        (n_rows,) int64 suffixes.

    Raises:
        InvalidInputError: bad codes (see :func:`collision_stats`), ids of another length,
            duplicate ids, or ids that cannot be sorted.
    """
    arr = _as_codes(codes)
    n_rows = arr.shape[0]
    ranks = _id_ranks(ids, n_rows)  # (n_rows,)
    suffix = np.empty(n_rows, dtype=np.int64)
    if n_rows == 0:
        return suffix
    order, starts, group = _sort_rows(arr, ranks)
    suffix[order] = np.arange(n_rows, dtype=np.int64) - starts[group]  # position within its group
    return suffix


# --- parquet files, with polars ---------------------------------------------------------------------------------------


def _scan(files: Files, storage_options: dict[str, Any] | None) -> pl.LazyFrame:
    import polars as pl

    paths = [os.fspath(f) for f in files] if isinstance(files, Sequence) and not isinstance(files, str) else files
    if isinstance(paths, list) and not paths:
        raise InvalidInputError(
            "files=[] names no table; expected at least one parquet file. Fix: pass the encoded files."
        )
    return _query(files, lambda: pl.scan_parquet(paths, storage_options=storage_options))


def _query(files: Files, run: Any) -> Any:
    """Run ``run()`` and turn what reading the files raises into an :class:`InvalidInputError`."""
    import polars as pl

    try:
        return run()
    except InvalidInputError:
        raise
    except (Exception, pl.exceptions.PanicException) as exc:
        lines = str(exc).strip().splitlines()
        cause = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise InvalidInputError(
            f"files={_short(files)} cannot be read ({cause}); expected readable parquet files with one schema. "
            f"Fix: check the paths, and that every file has the same id and codes column types."
        ) from None


def _short(files: Files) -> str:
    if isinstance(files, Sequence) and not isinstance(files, str):
        names = [os.fspath(f) for f in files]
        return repr(names) if len(names) <= 3 else f"[{names[0]!r}, ... {len(names)} files]"
    return repr(os.fspath(files))


def _codes_layout(files: Files, schema: Any, codes_column: str) -> tuple[str, int | None]:
    """The codes column's kind ('flat', 'array' or 'list') and its levels (None for a list: read later)."""
    import polars as pl

    if codes_column not in schema:
        raise InvalidInputError(
            f"codes_column={codes_column!r} is not a column of files={_short(files)} (columns: {list(schema)}); "
            f"expected the column of codes. Fix: pass codes_column= the name of the codes column."
        )
    dtype = schema[codes_column]
    if dtype.is_integer():
        return "flat", 1
    if isinstance(dtype, (pl.Array, pl.List)) and dtype.inner.is_integer():
        if isinstance(dtype, pl.Array):
            if len(dtype.shape) != 1 or dtype.shape[0] == 0:
                raise InvalidInputError(
                    f"codes_column={codes_column!r} has type {dtype}; expected Array(integer, levels) with "
                    f"levels >= 1. Fix: store one 1-D array of codes per row."
                )
            return "array", dtype.shape[0]
        return "list", None
    raise InvalidInputError(
        f"codes_column={codes_column!r} has type {dtype}; expected an integer column or Array(integer, levels). "
        f"Fix: pass the column of codes the codec wrote, or cast it, e.g. pl.col({codes_column!r}).cast(pl.UInt32)."
    )


def _check_codes(files: Files, lf: pl.LazyFrame, codes_column: str, kind: str, levels: int | None) -> tuple[int, int]:
    """Check the codes column (no nulls, no negative codes, one length per list); return (n_rows, levels)."""
    import polars as pl

    col = pl.col(codes_column)
    values = col if kind == "flat" else col.arr.explode() if kind == "array" else col.list.explode()
    checks = [
        pl.len().alias("rows"),
        col.null_count().alias("nulls"),
        values.null_count().alias("inner_nulls"),
        values.min().cast(pl.Int64, strict=False).alias("low"),  # an unsigned minimum past int64 is no negative code
    ]
    if kind == "list":
        checks += [col.list.len().min().alias("short"), col.list.len().max().alias("long")]
    found = _query(files, lambda: lf.select(checks).collect(engine="streaming")).row(0, named=True)
    nulls = found["nulls"] + (found["inner_nulls"] if kind != "flat" else 0)
    if nulls:
        raise InvalidInputError(
            f"codes_column={codes_column!r} holds {nulls} null codes in files={_short(files)}; expected a code "
            f"at every level of every row. Fix: drop or re-encode the rows without codes."
        )
    if found["low"] is not None and found["low"] < 0:
        raise InvalidInputError(
            f"codes_column={codes_column!r} holds a negative code ({found['low']}) in files={_short(files)}; "
            f"expected codes >= 0. Fix: pass the codes the codec wrote (negative values are not indices)."
        )
    if levels is not None:
        return int(found["rows"]), levels
    if found["rows"] and (found["short"] != found["long"] or found["short"] == 0):
        raise InvalidInputError(
            f"codes_column={codes_column!r} holds lists of {found['short']} to {found['long']} codes in "
            f"files={_short(files)}; expected the same number of levels (>= 1) on every row. "
            f"Fix: re-encode the rows with one codec, or cast to pl.Array(pl.UInt32, levels)."
        )
    return int(found["rows"]), int(found["short"] or 1)


def collision_stats_table(
    files: Files, *, codes_column: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`collision_stats` of the codes in parquet files, computed by polars (group by the codes).

    Args:
        files: a parquet path or glob, or a list of them (local or object storage).
        codes_column: an integer column (one level), or ``Array(integer, levels)`` (``List`` with one
            length on every row also works).
        storage_options: polars' options for object storage.

    Returns:
        The same dict as :func:`collision_stats`.

    Raises:
        InvalidInputError: unreadable files, a missing codes column, codes that are not integers, null
            or negative.
    """
    import polars as pl

    lf = _scan(files, storage_options)
    schema = _query(files, lf.collect_schema)
    kind, levels = _codes_layout(files, schema, codes_column)
    n_rows, levels = _check_codes(files, lf, codes_column, kind, levels)
    if n_rows == 0:
        return _stats(0, 0, 0, 0, [0] * levels)
    size = pl.col("n")
    groups = (
        lf.group_by(codes_column)
        .agg(pl.len().alias("n"))
        .select(
            pl.len().alias("n_unique"),
            size.max().alias("largest"),
            size.filter(size > 1).sum().cast(pl.Int64).alias("collided"),
        )
    )
    found = _query(files, lambda: groups.collect(engine="streaming")).row(0, named=True)
    col = pl.col(codes_column)

    def level(i: int) -> pl.Expr:
        return col if kind == "flat" else col.arr.get(i) if kind == "array" else col.list.get(i)

    usage = _query(
        files,
        lambda: lf.select([level(i).n_unique().alias(f"level_{i}") for i in range(levels)]).collect(engine="streaming"),
    ).row(0)
    return _stats(
        n_rows, int(found["n_unique"]), int(found["largest"]), int(found["collided"]), [int(u) for u in usage]
    )


def suffix_table(
    files: Files, *, id_column: str, codes_column: str, storage_options: dict[str, Any] | None = None
) -> pl.DataFrame:
    """:func:`unique_suffix` of the rows in parquet files, computed by polars (rank of the id within
    each group of equal codes).

    Args:
        files: a parquet path or glob, or a list of them (local or object storage).
        id_column: a column of unique, non-null ids (integers or strings) that order the rows within a
            tuple of codes.
        codes_column: an integer column (one level), or ``Array(integer, levels)`` (``List`` with one
            length on every row also works).
        storage_options: polars' options for object storage.

    Returns:
        A DataFrame with ``id_column`` and ``suffix`` (UInt32), one row per input row in the order
        the files are read; join it to the codes on ``id_column``.

    Raises:
        InvalidInputError: unreadable files, missing columns, a null or repeated id, or codes that are
            not integers, null or negative.
    """
    import polars as pl

    if id_column in (codes_column, SUFFIX_COLUMN):
        raise InvalidInputError(
            f"id_column={id_column!r} is also the name of the codes or suffix column; expected distinct names. "
            f"Fix: pass id_column= the column of row ids."
        )
    lf = _scan(files, storage_options)
    schema = _query(files, lf.collect_schema)
    if id_column not in schema:
        raise InvalidInputError(
            f"id_column={id_column!r} is not a column of files={_short(files)} (columns: {list(schema)}); "
            f"expected a column of unique row ids. Fix: pass id_column= the name of the id column."
        )
    kind, levels = _codes_layout(files, schema, codes_column)
    _check_codes(files, lf, codes_column, kind, levels)
    ident = pl.col(id_column)
    rows, nulls, n_unique = _query(
        files,
        lambda: (
            lf.select(pl.len().alias("rows"), ident.null_count().alias("nulls"), ident.n_unique().alias("ids"))
            .collect(engine="streaming")
            .row(0)
        ),
    )
    if nulls:
        raise InvalidInputError(
            f"id_column={id_column!r} is null on {nulls} rows of files={_short(files)}; expected an id on every "
            f"row. Fix: fill or drop the rows without ids."
        )
    if n_unique < rows:
        dup, count = _query(
            files,
            lambda: lf.group_by(id_column).len().filter(pl.col("len") > 1).head(1).collect(engine="streaming").row(0),
        )
        raise InvalidInputError(
            f"{id_column}={dup!r} occurs {count} times in files={_short(files)} ({rows - n_unique} repeated rows); "
            f"expected unique ids, which order the rows that share codes. Fix: deduplicate the rows by "
            f"{id_column!r} before computing suffixes."
        )
    # Ordinal ranks of unique ids are the ids' order: the same suffix whatever the order of rows and files.
    suffix = (ident.rank("ordinal").over(codes_column) - 1).cast(pl.UInt32).alias(SUFFIX_COLUMN)
    return _query(files, lambda: lf.select(ident, suffix).collect(engine="streaming"))


__all__ = ["collision_stats", "collision_stats_table", "suffix_table", "unique_suffix"]
