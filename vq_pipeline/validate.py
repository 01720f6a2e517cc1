"""Validation at the public edge: turn user input into clean float32 tensors, or explain why not.

Everything here raises subclasses of :class:`vq_pipeline.errors.InvalidInputError` (a
``ValueError``) whose messages give ``name=value``, what was expected, and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vq_pipeline.arrays import is_polars, polars_embeddings
from vq_pipeline.errors import InvalidInputError, NonFiniteError

# Largest squared row norm accepted. Squared distances between two such rows can reach 4x this,
# which must stay below float32's max (3.4e38) for every engine to compute them.
MAX_SQUARED_NORM = 8.0e37
_MAX_NORM = MAX_SQUARED_NORM**0.5

# Rows per pass of the validation scans: bounds their temporary memory (a float64 copy).
_SCAN_ROWS = 1 << 15


def row_chunks(n_rows: int, chunk_rows: int) -> Iterator[slice]:
    """Yield consecutive row slices of at most ``chunk_rows`` rows covering ``0..n_rows``."""
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a clear error."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidInputError(
            f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, choices))}. "
            f"Fix: pass {name}={choices[0]!r} or another listed value."
        )
    return value


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None, hint: str = "") -> int:
    """Return ``value`` as an int within ``[minimum, maximum]``, else raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(
            f"{name}={value!r} has type {type(value).__name__}; expected an integer >= {minimum}. "
            f"Fix: pass a whole number.{(' ' + hint) if hint else ''}"
        )
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InvalidInputError(
            f"{name}={value} is out of range; expected an integer {bound}.{(' Fix: ' + hint) if hint else ''}"
        )
    return value


def max_beam(n_codes: int, levels: int) -> int:
    """The widest beam that changes anything over ``levels`` levels of ``n_codes`` codes: a beam search
    keeps at most ``n_codes ** (levels - 1)`` partial tuples before its last level, so every larger beam
    keeps them all and gives the same codes (and a residual fit on them, the same codebook)."""
    return n_codes ** max(levels - 1, 0)


def check_beam(name: str, beam: Any, *, n_codes: int, levels: int) -> int:
    """Return ``beam`` as an int between 1 and :func:`max_beam`, else raise a clear error."""
    beam = check_int(name, beam, minimum=1)
    limit = max_beam(n_codes, levels)
    if beam > limit:
        raise InvalidInputError(
            f"{name}={beam} exceeds {limit}, the most partial tuples a beam search over levels={levels} levels of "
            f"n_codes={n_codes} codes keeps (n_codes ** (levels - 1)); every larger {name} gives the same codes. "
            f"Fix: pass {name} between 1 and {limit} (1: greedy)."
        )
    return beam


def check_float(name: str, value: Any, *, minimum: float = 0.0) -> float:
    """Return ``value`` as a finite float ``>= minimum``, else raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"{name}={value!r} is not a number; expected a float >= {minimum}.")
    value = float(value)
    if not np.isfinite(value) or value < minimum:
        raise InvalidInputError(f"{name}={value} is out of range; expected a finite float >= {minimum}.")
    return value


def as_embeddings(x: Any, *, name: str = "x", row_offset: int = 0, row_numbers: Any = None) -> torch.Tensor:
    """Validate embeddings and return them as a contiguous float32 tensor on x's device.

    Args:
        x: array-like of shape (n_rows, dim): a torch tensor (any device), a numpy array (read-only
            ones too, without a copy), or a polars Series (or one-column DataFrame) of ``Array`` or
            same-length ``List`` rows (see :func:`vq_pipeline.arrays.polars_embeddings`).
            Floating dtypes (float16, bfloat16, float32, float64) and integer dtypes are accepted
            and converted to float32; bool, complex and object dtypes are refused.

        name, row_offset: how messages name the array, and the row number of its first row (for
            batches of a larger table). row_numbers: instead, the row number of every row (for samples).

    Returns:
        Tensor of shape (n_rows, dim), float32, contiguous, same device as ``x`` (CPU for numpy).

    Raises:
        InvalidInputError: wrong type, rank, empty, or non-numeric dtype.
        NonFiniteError: NaN or ±Inf anywhere, values beyond float32's range, or a squared row norm
            above ``MAX_SQUARED_NORM``.
    """
    if is_polars(x):
        x = polars_embeddings(x, name=name)  # (n_rows, dim) numpy, often a read-only view
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise InvalidInputError(
                f"{name}.dtype={x.dtype} is not numeric; expected floating point or integer embeddings. "
                f"Fix: convert {name} with x.astype(np.float32)."
            )
        x = _from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        raise InvalidInputError(
            f"{name} has type {type(x).__name__}; expected a torch.Tensor or numpy.ndarray of shape (n_rows, dim), or "
            f"a polars Series of vectors. Fix: wrap it with numpy.asarray(...) first."
        )
    if x.dtype == torch.bool or x.dtype.is_complex or not (x.dtype.is_floating_point or _is_integer(x.dtype)):
        raise InvalidInputError(
            f"{name}.dtype={x.dtype} is not a real number type; expected floating point or integer embeddings. "
            f"Fix: convert {name} to float32."
        )
    if x.ndim != 2:
        raise InvalidInputError(
            f"{name}.shape={tuple(x.shape)} has {x.ndim} dimension(s); expected a 2-d (n_rows, dim) array. "
            f"Fix: reshape to (n_rows, dim), e.g. x.reshape(len(x), -1)."
        )
    n_rows, dim = x.shape
    if n_rows == 0 or dim == 0:
        raise InvalidInputError(
            f"{name}.shape={tuple(x.shape)} is empty; expected at least one row and one column. "
            f"Fix: check the input table is not empty and the embedding column holds vectors."
        )
    x32 = x.to(torch.float32).contiguous()
    _check_values(x, x32, name=name, number=_numbering(row_offset, row_numbers))
    return x32


def _from_numpy(x: np.ndarray) -> torch.Tensor:
    """A tensor of ``x``'s values, sharing its memory when it is C-contiguous in native byte order.

    A read-only array goes through DLPack, which torch takes without the "NumPy array is not
    writable" warning of ``torch.from_numpy``; that is safe because nothing here writes into
    embeddings (the tensors returned by :func:`as_embeddings` are only read).
    """
    x = np.ascontiguousarray(x)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # a writable native copy; torch refuses other byte orders
    if x.flags.writeable:
        return torch.from_numpy(x)
    return torch.from_dlpack(x) if x.size else torch.from_numpy(x.copy())


def _is_integer(dtype: torch.dtype) -> bool:
    return dtype in (
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    )


def _numbering(row_offset: int, row_numbers: Any) -> Any:
    """Map a row index to the row number shown in messages."""
    if row_numbers is not None:
        return lambda i: int(row_numbers[i])
    return lambda i: i + row_offset


def _check_values(x: torch.Tensor, x32: torch.Tensor, *, name: str, number: Any) -> None:
    """One pass over the rows' norms finds NaN/Inf and overflow; errors are located after."""
    for rows in row_chunks(x32.shape[0], _SCAN_ROWS):
        block = x32[rows]  # (chunk, dim)
        # vector_norm is NaN/Inf when any value is, or when the squares overflow; much faster than an
        # einsum of the squares. Rows over the bound are confirmed in float64 before an error is raised.
        bad = ~(torch.linalg.vector_norm(block, dim=1) <= _MAX_NORM)  # (chunk,) bool; NaN compares False
        if bool(bad.any()):
            for i in bad.nonzero()[:, 0].tolist():
                if not _row_is_acceptable(block[i]):
                    _raise_bad_row(x[rows], block, i, rows.start, name=name, number=number, x_all=x)


def _row_is_acceptable(row: torch.Tensor) -> bool:
    """Exact check of one row: finite, with a squared norm of at most ``MAX_SQUARED_NORM``."""
    return bool(torch.isfinite(row).all()) and float(row.double().square().sum()) <= MAX_SQUARED_NORM


def _raise_bad_row(
    orig: torch.Tensor, block: torch.Tensor, i: int, start: int, *, name: str, number: Any, x_all: torch.Tensor
) -> None:
    row = number(start + i)
    if orig.dtype.is_floating_point and not bool(torch.isfinite(orig[i]).all()):
        col = int((~torch.isfinite(orig[i])).nonzero()[0])
        n_bad = sum(int((~torch.isfinite(x_all[r])).sum()) for r in row_chunks(x_all.shape[0], _SCAN_ROWS))
        raise NonFiniteError(
            f"{name}[{row}, {col}]={orig[i, col].item()!r}: {name} holds {n_bad} non-finite value(s) (NaN or ±Inf), "
            f"the first at row {row}, column {col}; expected finite float32 numbers. "
            f"Fix: drop or impute those rows before fitting or encoding."
        )
    if not bool(torch.isfinite(block[i]).all()):
        col = int((~torch.isfinite(block[i])).nonzero()[0])
        raise NonFiniteError(
            f"{name}[{row}, {col}]={orig[i, col].item()!r}: a value outside float32's range (|v| > 3.4e38) at row "
            f"{row}, column {col}; expected finite float32 numbers. Fix: rescale the embeddings, or drop that row."
        )
    sq = float(block[i].double().square().sum())
    raise NonFiniteError(
        f"squared norm of {name}[{row}]={sq:.3e} is too large; expected at most {MAX_SQUARED_NORM:.1e} so that "
        f"squared distances stay finite in float32. Fix: rescale the embeddings (e.g. divide by their maximum "
        f"absolute value)."
    )


def check_nonzero_rows(x: torch.Tensor, *, name: str = "x", row_offset: int = 0, row_numbers: Any = None) -> None:
    """Refuse zero-norm rows, which have no direction under the cosine metric.

    Args:
        x: (n_rows, dim) float32 tensor, any device.
    """
    for rows in row_chunks(x.shape[0], _SCAN_ROWS):
        zero = ~(x[rows] != 0).any(dim=1)  # (chunk,) bool; exact even for denormals, whose squares underflow
        if bool(zero.any()):
            row = _numbering(row_offset, row_numbers)(rows.start + int(zero.nonzero()[0]))
            raise InvalidInputError(
                f"{name}[{row}] has norm 0; the cosine metric needs a direction for every row. "
                f"Fix: drop all-zero embeddings, or use metric='l2'."
            )


#: Below this largest absolute value, squared distances between rows underflow float32 (smallest
#: normal 1.2e-38) or lose most of their bits, so distinct rows look identical to K-means.
TINY_SCALE = 1e-15


def too_few_rows_fix(x: torch.Tensor, n_distinct: int) -> str:
    """The "Fix: ..." sentence of a "too few distinct rows" message for the rows ``x`` (any shape).

    Usually: fewer codes or more data. But when ``x`` is so close to 0 that float32 cannot tell its
    rows apart, it says so, and that a common scale fixes it.
    """
    m = float(x.abs().max()) if x.numel() else 0.0
    if 0 < m < TINY_SCALE:
        return (
            f"The rows hold no value larger than {m:.3g} in magnitude: their squared distances underflow "
            f"float32, so distinct rows look identical. Fix: multiply the embeddings by a constant such as "
            f"{1 / m:.0e} (the codes do not change with a common scale)."
        )
    return f"Fix: lower n_codes to {n_distinct} or less, or deduplicate/enlarge the training data."


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` with each row scaled to unit L2 norm.

    Args:
        x: (n_rows, dim) float32 tensor without zero rows, any device.

    Returns:
        (n_rows, dim) float32 tensor on the same device.
    """
    # Scale first: rows near float32's max would overflow while squaring.
    scale = x.abs().amax(dim=1, keepdim=True)  # (n_rows, 1)
    y = x / scale
    return y / torch.linalg.vector_norm(y, dim=1, keepdim=True)  # (n_rows, dim)


def resolve_device(device: Any, x: torch.Tensor | None = None) -> torch.device:
    """Resolve ``device`` (None, 'cpu', 'cuda', 'cuda:1' or torch.device) to a torch.device.

    None means: x's device if it is a CUDA tensor, else CUDA if available, else CPU.
    """
    if device is None:
        if x is not None and x.device.type == "cuda":
            return x.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(
            f"device={device!r} is not a device; expected 'cpu', 'cuda' or 'cuda:N'. Fix: pass device='cpu'."
        ) from exc
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device={device!r} is not supported; expected 'cpu' or 'cuda'.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            f"device={device!r} was requested but no CUDA GPU is available here. Fix: pass device='cpu'."
        )
    return dev
