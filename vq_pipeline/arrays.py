"""Array types at the public edge: numpy, torch or polars in, results back in the caller's own type.

* In: embeddings as a numpy array (read-only ones too), a torch tensor, or a polars Series (or a
  one-column DataFrame) of ``Array`` or same-length ``List`` rows; codes as integers of any of these.
  :func:`vq_pipeline.validate.as_embeddings` hands polars objects to :func:`polars_embeddings`.
* Out: :func:`like` turns a result tensor into the caller's type: numpy in, numpy out (int64 codes,
  float32 distances and vectors); polars in, a named polars Series out (``Int64`` codes, ``Float32``
  distances, ``Array(Float32, dim)`` vectors; one ``Array`` of k per row for top-k results); torch
  in, CPU tensors out.

polars objects are recognised by their type's module, and polars is imported only inside the
functions that handle them, so only callers that pass polars objects (and have loaded polars
already) load it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vq_pipeline.errors import InvalidInputError

#: What :func:`array_kind` tells apart; results come back in the same kind.
KINDS = ("torch", "numpy", "polars", "other")


def is_polars(x: Any) -> bool:
    """Whether ``x`` is a polars object (Series, DataFrame, LazyFrame, ...), without importing polars."""
    return type(x).__module__.partition(".")[0] == "polars"


def array_kind(x: Any) -> str:
    """'torch', 'numpy', 'polars' or 'other': the type family of ``x``, which results are given back in."""
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    return "polars" if is_polars(x) else "other"


def _one_series(x: Any, name: str, what: str) -> Any:
    """The polars Series of ``x``: ``x`` itself, or the only column of a DataFrame."""
    import polars as pl

    if isinstance(x, pl.Series):
        return x
    if isinstance(x, pl.DataFrame):
        if x.width == 1:
            return x.to_series(0)
        nested = [c for c, t in x.schema.items() if isinstance(t, (pl.Array, pl.List))]
        col = (nested or x.columns or [what])[0]
        shown = ", ".join(map(repr, x.columns[:5])) + (", ..." if x.width > 5 else "")
        raise InvalidInputError(
            f"{name} is a polars DataFrame with {x.width} columns ({shown}); expected a Series or a one-column "
            f"DataFrame of {what}s. Fix: pass the {what} column alone, e.g. df[{col!r}] or df.select({col!r})."
        )
    raise InvalidInputError(
        f"{name} has type polars.{type(x).__name__}; expected a polars Series or a one-column DataFrame. "
        f"Fix: collect a LazyFrame first (lf.collect()), then pass its {what} column, e.g. df[{what!r}]."
    )


def polars_embeddings(x: Any, *, name: str = "x") -> np.ndarray:
    """The (n_rows, dim) numpy array of a polars embedding Series or one-column DataFrame.

    Args:
        x: a polars Series of ``Array(<number>, dim)`` or ``List(<number>)`` rows, all of one length,
            without nulls; or a DataFrame holding only such a column.

    Returns:
        (n_rows, dim) numpy array of the column's number type (float32 for ``Float32``); a read-only
        view of polars' buffer when polars allows it. Nested ``Array`` types give more dimensions,
        which the caller refuses.

    Raises:
        InvalidInputError: not a Series or one-column DataFrame, not a vector column, a null row or
            element, or rows of different lengths (naming the first bad row).
    """
    import polars as pl

    s = _one_series(x, name, "embedding")
    where = f"{name} (polars Series {s.name!r})"
    if not isinstance(s.dtype, (pl.Array, pl.List)):
        raise InvalidInputError(
            f"{where} has dtype={s.dtype}; expected one embedding per row, as Array(Float32, dim) or List(Float32). "
            f"Fix: pass the embedding column, or build it with pl.Series(name, x_2d, dtype=pl.Array(pl.Float32, dim))."
        )
    if s.null_count():
        row = int(s.is_null().arg_true()[0])
        raise InvalidInputError(
            f"{where} is null at row {row}; expected an embedding on every row. Fix: drop or fill rows without "
            f"embeddings, e.g. s.drop_nulls()."
        )
    if isinstance(s.dtype, pl.List):
        lengths = s.list.len()  # (n_rows,)
        want = int(lengths[0]) if len(s) else 0
        if len(s) and want == 0:
            raise InvalidInputError(
                f"{where} has an empty vector at row 0; expected vectors of length dim >= 1. Fix: drop empty rows."
            )
        bad = (lengths != want).arg_true()
        if len(bad):
            row = int(bad[0])
            raise InvalidInputError(
                f"{where} has a vector of length {int(lengths[row])} at row {row}, but row 0 has length {want}; "
                f"expected every List row to have the same length. Fix: drop or repair row {row} (and any other "
                f"ragged rows), then pass the column, or cast it with s.cast(pl.Array(pl.Float32, {want}))."
            )
        if not len(s):
            return np.empty((0, 0), dtype=np.float32)
        s = s.cast(pl.Array(s.dtype.inner, want))
    leaf = s.dtype
    while isinstance(leaf, (pl.Array, pl.List)):
        leaf = leaf.inner
    if not (leaf.is_float() or leaf.is_integer()):
        raise InvalidInputError(
            f"{where} has dtype={s.dtype} with {leaf} elements; expected numbers (floating point or integer). "
            f"Fix: cast the column, e.g. s.cast(pl.Array(pl.Float32, dim))."
        )
    flat = s
    while isinstance(flat.dtype, (pl.Array, pl.List)):
        flat = flat.explode()  # row-major: len(s) * per_row elements
    if flat.null_count():
        per_row = len(flat) // max(len(s), 1)
        row = int(flat.is_null().arg_true()[0]) // per_row
        raise InvalidInputError(
            f"{where} has a null element inside the vector at row {row}; expected numbers only. "
            f"Fix: drop or repair that row."
        )
    return s.rechunk().to_numpy()  # (n_rows, dim), read-only when it is a view of polars' buffer


def as_codes(codes: Any, *, n_codes: int, name: str = "codes", levels: int | None = None) -> torch.Tensor:
    """Validate codes and return them as a (n_rows,) int64 CPU tensor ((n_rows, levels) with ``levels``).

    Args:
        codes: (n_rows,) integers in ``0..n_codes-1``: a numpy array, a torch tensor (any device) or a
            polars integer Series (or one-column DataFrame) without nulls. With ``levels`` (a
            multi-level codebook): (n_rows, levels), polars rows of ``Array`` or ``List`` type.
        n_codes: the codebook's number of codes (per level).

    Raises:
        InvalidInputError: another type, a non-integer dtype, another shape, nulls, or a code out of
            range (naming the first one and how many there are).
    """
    kind = array_kind(codes)
    fix_dtype = f"Fix: pass the integer codes that encode returned, or convert them, e.g. {name}.astype(np.int64)."
    if kind == "polars":
        s = _one_series(codes, name, "code")
        if levels is not None:
            return _checked(_nested_codes(s, name, levels), n_codes, name, levels)
        if not s.dtype.is_integer():
            raise InvalidInputError(
                f"{name} (polars Series {s.name!r}) has dtype={s.dtype}; expected integer codes, one per row. "
                f"Fix: pass the 'code' Series that encode returned (for top-k codes, the nearest: s.arr.first())."
            )
        if s.null_count():
            row = int(s.is_null().arg_true()[0])
            raise InvalidInputError(
                f"{name} (polars Series {s.name!r}) is null at row {row}; expected a code on every row. "
                f"Fix: drop or fill rows without codes."
            )
        arr = s.to_numpy()
    elif kind == "torch":
        if codes.dtype == torch.bool or codes.dtype.is_floating_point or codes.dtype.is_complex:
            raise InvalidInputError(
                f"{name}.dtype={codes.dtype} is not an integer type; expected int64 codes. {fix_dtype}"
            )
        arr = codes.detach().cpu().numpy()
    elif kind == "numpy":
        if codes.dtype.kind not in "iu":
            raise InvalidInputError(
                f"{name}.dtype={codes.dtype} is not an integer type; expected int64 codes. {fix_dtype}"
            )
        arr = codes
    else:
        raise InvalidInputError(
            f"{name} has type {type(codes).__name__}; expected a numpy array, torch tensor or polars Series of "
            f"integer codes. Fix: wrap it with numpy.asarray(...) first."
        )
    return _checked(arr, n_codes, name, levels)


def _checked(arr: np.ndarray, n_codes: int, name: str, levels: int | None) -> torch.Tensor:
    """Shape and range checks of integer codes; a writable int64 copy."""
    if levels is not None:
        if arr.ndim != 2 or arr.shape[1] != levels:
            raise InvalidInputError(
                f"{name}.shape={tuple(arr.shape)}; expected (n_rows, {levels}) codes, one per level. "
                f"Fix: pass the codes that this codebook's encode returned."
            )
    elif arr.ndim != 1:
        raise InvalidInputError(
            f"{name}.shape={tuple(arr.shape)}; expected (n_rows,) codes, one per row. "
            f"Fix: for top-k codes of shape (n_rows, k), decode the nearest ones, {name}[:, 0]."
        )
    bad = (arr < 0) | (arr >= n_codes)  # (n_rows,) or (n_rows, levels)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = ", ".join(map(str, first))
        raise InvalidInputError(
            f"{name}[{where}]={int(arr[first])} is out of range ({int(bad.sum())} code(s) are); expected codes "
            f"0..{n_codes - 1} of this codebook (n_codes={n_codes}). Fix: decode with the codebook that "
            f"produced these codes."
        )
    return torch.from_numpy(arr.astype(np.int64))  # a writable copy: (n_rows,) or (n_rows, levels) int64


def _nested_codes(s: Any, name: str, levels: int) -> Any:
    """The (n_rows, levels) numpy codes of a polars Series of ``Array``/``List`` integer rows."""
    import polars as pl

    if not isinstance(s.dtype, (pl.Array, pl.List)):
        raise InvalidInputError(
            f"{name} (polars Series {s.name!r}) has dtype={s.dtype}; expected Array or List rows of {levels} "
            f"codes. Fix: pass the 'codes' column that vq encode or encode returned."
        )
    if s.null_count():
        row = int(s.is_null().arg_true()[0])
        raise InvalidInputError(
            f"{name} (polars Series {s.name!r}) is null at row {row}; expected codes on every row. "
            f"Fix: drop or fill rows without codes."
        )
    lengths = s.list.len() if isinstance(s.dtype, pl.List) else None
    if lengths is not None and (lengths != levels).any():
        row = int((lengths != levels).arg_true()[0])
        raise InvalidInputError(
            f"{name}[{row}] holds {int(lengths[row])} codes; expected {levels}, one per level. "
            f"Fix: pass the codes that this codebook's encode returned."
        )
    flat = s.explode() if lengths is not None else s.arr.explode()  # (n_rows * levels,)
    if not flat.dtype.is_integer() or flat.null_count():
        raise InvalidInputError(
            f"{name} (polars Series {s.name!r}) holds {flat.dtype} values"
            f"{' with nulls' if flat.null_count() else ''}; expected integer codes. "
            f"Fix: pass the 'codes' column that vq encode or encode returned."
        )
    return flat.to_numpy().reshape(len(s), levels)


def like(kind: str, t: torch.Tensor, *, name: str) -> Any:
    """``t`` in the array type ``kind`` (see :func:`array_kind`).

    Args:
        t: (n_rows,) or (n_rows, k) CPU tensor, int64 or float32, owned by the caller (not copied).
        name: the polars Series name.

    Returns:
        numpy: ``t.numpy()`` (shares memory). polars: a Series ``name`` of ``Int64`` or ``Float32``,
        or of ``Array(<that>, k)`` for 2-d ``t``. torch (and anything else): ``t``.
    """
    if kind == "numpy":
        return t.numpy()
    if kind != "polars":
        return t
    import polars as pl

    a = t.numpy()
    inner = pl.Int64 if a.dtype == np.int64 else pl.Float32
    return pl.Series(name, a, dtype=inner if a.ndim == 1 else pl.Array(inner, a.shape[1]))
