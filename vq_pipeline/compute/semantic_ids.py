"""Semantic ids from multi-level codes: collision statistics, and a suffix that makes every row's tuple unique.

A multi-level codec (residual, product) gives each row a tuple of ``levels`` codes, an ``(n_rows,
levels)`` integer array used as the row's semantic id. Two rows collide when their whole tuples are
equal. :func:`collision_stats` measures that; :func:`unique_suffix` gives each row one more integer,
its rank (0, 1, 2, ...) among the rows sharing its tuple, ordered by id, so that ``(codes, suffix)``
is unique within the encoded set. The suffix of an id depends only on the set of ``(id, codes)``
pairs, never on the order of the rows.

:func:`vq_pipeline.jobs.semantic_ids.suffix_table` and
:func:`vq_pipeline.jobs.semantic_ids.collision_stats_table` compute the same from parquet files with
polars' streaming engine, without bringing rows into Python. Only numpy is imported with this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vq_pipeline.errors import InvalidInputError

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
        return collision_record(0, 0, 0, 0, [0] * levels)
    _, starts, _ = _sort_rows(arr, np.zeros(n_rows, dtype=np.int64))
    sizes = np.diff(np.append(starts, n_rows))  # (n_groups,) rows per distinct tuple
    usage = [int(np.unique(arr[:, level]).size) for level in range(levels)]
    return collision_record(n_rows, int(starts.size), int(sizes.max()), int(sizes[sizes > 1].sum()), usage)


def collision_record(n_rows: int, n_unique: int, largest: int, collided: int, usage: list[int]) -> dict[str, Any]:
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


__all__ = ["SUFFIX_COLUMN", "collision_stats", "unique_suffix"]
