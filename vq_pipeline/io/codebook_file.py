"""Reading the codebook file format with numpy only: header checks, arrays, and a plain description.

:class:`vq_pipeline.codebook.Codebook` builds on this (``Codebook.load`` reads through
:func:`read_codebook_bytes`); ``vq inspect`` uses :func:`load_info`, which validates a file exactly
as ``Codebook.load`` does without importing torch. The layout is described in
:mod:`vq_pipeline.codebook`. Only this module and ``codebook.py`` touch safetensors.

What a file may ask of a reader is bounded by its size and by documented caps: at most
:data:`MAX_LEVELS` levels (refused from the header, before the tensor data is read); tensor shapes
that the bytes in the file exactly fill (so the work of encoding a row is the centroid values the
file holds); centroids, and residual sums of levels, within :data:`MAX_SQUARED_NORM`; counts of a
level summing to at most :data:`MAX_TRAINING_ROWS`; and ``fit`` settings that agree with the file's
codec, levels, n_codes, dim, metric and rotation (:func:`check_settings`). Scalar and binary codebooks
(one level per dimension) are not held to :data:`MAX_LEVELS`: each of their levels is one value per
code, so the bytes in the file bound them; their grids must increase, and a rotation must be an
orthogonal (dim, dim) matrix (:func:`check_values`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vq_pipeline.errors import CodebookFileError, InvalidInputError, UnsupportedFormatError
from vq_pipeline.settings import CODEC_ROTATIONS, CODECS, METRICS, PER_DIMENSION_CODECS, ROTATIONS, SCALAR_RANGES

FORMAT_NAME = "vq-pipeline.codebook"
#: 1.2 adds scalar and binary codebooks (``codec`` "scalar"/"binary", ``levels == dim``, (dim, n_codes, 1)
#: grids) and the optional ``rotation`` tensor, (dim, dim) F32. Only files that use them are written as
#: 1.2; the others byte for byte as before: flat codebooks as 1.0, residual and product ones as 1.1.
FORMAT_VERSION = "1.2"
#: 1.1 adds multi-level codebooks (metadata ``codec`` and ``levels``; (levels, n_codes, sub_dim)
#: centroids and (levels, n_codes) counts). A file without ``codec`` is flat.
MULTI_LEVEL_FORMAT_VERSION = "1.1"
FLAT_FORMAT_VERSION = "1.0"
#: Versions that predate scalar and binary codecs and rotations: a file claiming one of them while
#: using those is refused as lying.
_PRE_CODEC_VERSIONS = ("1.0", "1.1")
#: Codes per dimension of each per-dimension codec (scalar: 2**bits for bits 8 and 4).
PER_DIMENSION_N_CODES = {"scalar": (256, 16), "binary": (2,)}
#: The largest ``max |R^T R - I|`` a rotation may have.
ROTATION_TOLERANCE = 1e-4
#: Most levels (codes per row) of a residual or product codebook, in a file and in a fit. Real ones
#: have a handful to a few hundred; each level is one more pass over every encoded row and one more
#: code per row of every code table, whatever the level holds, so the work and memory a file can
#: ask of an encode, a plot or a report stays bounded by this and by the tensor bytes in the file.
MAX_LEVELS = 256
#: Most training rows one level's counts may sum to: float64, in which reports compute shares and
#: means, holds every integer up to here exactly, and a mini-batch stream's int64 arithmetic on counts
#: stays far from overflowing (no real table comes near 9.0e15 rows).
MAX_TRAINING_ROWS = 2**53
#: The squared norm above which rows are refused (:data:`vq_pipeline.validate.MAX_SQUARED_NORM`, kept
#: equal by a test; that module imports torch, which reading a file with numpy must not): centroids,
#: and a residual codebook's reconstructions, are held to it too, so that every distance between a
#: row and a code stays finite in float32.
MAX_SQUARED_NORM = 8.0e37
# What bounds a hostile file's cost before it is parsed: the header is read only when its declared
# length is at most _MAX_HEADER_BYTES (a real header holds metadata: a few KiB, more with many
# sources); its JSON, and then the JSON inside its metadata strings, is parsed only when it holds at
# most _MAX_JSON_ITEMS separators and brackets (``,:[{``; a real codebook: about 10 per iteration and
# 1 per source), which bounds the Python objects parsing makes (a dense 16 MiB of ``[{},{},...``
# would make millions); JSON may nest at most _MAX_JSON_DEPTH levels (a real codebook nests 3); and
# the tensor data is read only when the file is exactly as long as the header says it is.
_MAX_HEADER_BYTES = 16 * 2**20
_MAX_JSON_ITEMS = 2**18
_MAX_JSON_DEPTH = 32
_EXPECTED_TENSORS = {"centroids": ("F32", 2), "counts": ("I64", 1)}
#: Tensors a file may hold besides the expected ones (from format 1.2).
_OPTIONAL_TENSORS = {"rotation": ("F32", 2)}
_ITEM_BYTES = {"F32": 4, "I64": 8}
_FIX = "Fix: point at a codebook written by `vq fit` or Codebook.save, or refit it."
_PATH_FIX = "Fix: pass the .safetensors file written by `vq fit` or Codebook.save."


def fingerprint_of(metric: str, centroids: np.ndarray, codec: str = "flat", rotation: np.ndarray | None = None) -> str:
    """sha256 of the metric, codec, shape, centroid bytes and rotation bytes (when there is a rotation):
    the identity of what encoding uses. Codebooks without a rotation keep the fingerprint they had.

    Args:
        centroids: (n_codes, dim) float32 for 'flat', (levels, n_codes, sub_dim) otherwise.
        rotation: (dim, dim) float32, or None.
    """
    if codec == "flat":  # the identity of flat codebooks is unchanged since format 1.0
        n_codes, dim = centroids.shape
        h = hashlib.sha256(f"{FORMAT_NAME}|{metric}|{n_codes}|{dim}|".encode())
    else:
        levels, n_codes, sub_dim = centroids.shape
        h = hashlib.sha256(f"{FORMAT_NAME}|{metric}|{codec}|{levels}|{n_codes}|{sub_dim}|".encode())
    h.update(np.ascontiguousarray(centroids, dtype="<f4").tobytes())
    if rotation is not None:
        r = np.ascontiguousarray(rotation, dtype="<f4")
        h.update(f"|rotation|{r.shape[0]}|{r.shape[1]}|".encode())
        h.update(r.tobytes())
    return h.hexdigest()


def rotation_deviation(rotation: np.ndarray) -> float:
    """``max |R^T R - I|`` of a square matrix, computed in float64 (0 for an orthogonal one)."""
    r = np.asarray(rotation, dtype=np.float64)
    return float(np.abs(r.T @ r - np.eye(r.shape[0])).max()) if r.size else 0.0


def check_rotation(rotation: Any, codec: str, dim: int) -> None:
    """Refuse a rotation that ``codec`` does not take, or one that is not a finite orthogonal
    (dim, dim) float32 matrix (``max |R^T R - I| <= ROTATION_TOLERANCE``)."""
    if rotation is None:
        return
    allowed = CODEC_ROTATIONS.get(codec, ("none",))
    if allowed == ("none",):
        raise InvalidInputError(
            f"rotation given with codec={codec!r}; the {codec} codec takes no rotation (rotations apply to "
            f"{', '.join(c for c, r in CODEC_ROTATIONS.items() if len(r) > 1)}). Fix: drop the rotation, or refit."
        )
    shape = tuple(getattr(rotation, "shape", ()))
    if shape != (dim, dim) or getattr(rotation, "dtype", None) != np.float32:
        raise InvalidInputError(
            f"rotation.shape={shape} (dtype={getattr(rotation, 'dtype', None)}); expected a ({dim}, {dim}) float32 "
            f"matrix for dim={dim}. Fix: refit the codebook."
        )
    if not np.isfinite(rotation).all():
        raise InvalidInputError("rotation holds NaN or ±Inf values; expected finite numbers. Fix: refit the codebook.")
    deviation = rotation_deviation(rotation)
    if deviation > ROTATION_TOLERANCE:
        raise InvalidInputError(
            f"rotation is not orthogonal: max |R^T R - I|={deviation:.3g}; expected at most "
            f"{ROTATION_TOLERANCE:g}. Fix: refit the codebook (or orthogonalize R)."
        )


def check_values(
    centroids: np.ndarray, counts: np.ndarray, metric: str, codec: str = "flat", rotation: np.ndarray | None = None
) -> None:
    """Refuse what no fit writes and what would break encoding or reports: non-finite centroids;
    centroids whose squared norm exceeds :data:`MAX_SQUARED_NORM` and, for a residual codebook,
    levels whose reconstructions could (the largest centroid norm of each level so far, summed: the
    triangle inequality's bound on every partial sum of codes); negative counts, and counts of one
    level that sum to more than :data:`MAX_TRAINING_ROWS`; and (under cosine) centroids that are not
    unit rows (for a residual codebook, those of level 0; product slices and later residual levels are
    free). Messages name the level and the code. Scalar grids must be strictly increasing (or constant)
    in every dimension, binary grids ``[m - s, m + s]`` must have ``s >= 0``; a rotation is checked by
    :func:`check_rotation`.

    Args:
        centroids: (n_codes, dim) float32 for 'flat', (levels, n_codes, sub_dim) otherwise.
        counts: (n_codes,) or (levels, n_codes) int64.
        rotation: (dim, dim) float32, or None.
    """
    if not np.isfinite(centroids).all():
        raise InvalidInputError("centroids hold NaN or ±Inf values; expected finite numbers. Fix: refit the codebook.")
    _check_norms(centroids, codec)
    _check_counts(counts)
    check_rotation(rotation, codec, level_dims(codec, tuple(centroids.shape))[2])
    if codec in PER_DIMENSION_CODECS:
        _check_grid(centroids, codec)
    if codec != "flat":
        if codec != "residual" or metric != "cosine":
            return
        centroids = centroids[0]  # (n_codes, dim): residual level 0
    if metric == "cosine":
        norms = np.linalg.norm(centroids.astype(np.float64), axis=1)  # (n_codes,)
        worst = float(np.abs(norms - 1).max())
        if worst > 1e-3:
            raise InvalidInputError(
                f"cosine centroid norms deviate from 1 by up to {worst:.3g}; expected unit-norm rows. "
                f"Fix: normalize the centroids, or use metric='l2'."
            )


# Values per block of the norm scan: bounds its float64 temporaries (2 MiB).
_SCAN_VALUES = 2**18
_NORM_FIX = "Fix: refit the codebook on rescaled embeddings (e.g. divided by their maximum absolute value)."


def _squared_norms(c: np.ndarray) -> np.ndarray:
    """(n,) float64 squared norms of the rows of the (n, d) float32 ``c``, scanned in bounded blocks."""
    out = np.empty(c.shape[0], dtype=np.float64)  # (n,)
    step = max(1, _SCAN_VALUES // max(1, c.shape[1]))
    for start in range(0, c.shape[0], step):
        block = c[start : start + step].astype(np.float64)  # (step, d)
        out[start : start + step] = np.einsum("ij,ij->i", block, block)
    return out


def _check_norms(centroids: np.ndarray, codec: str) -> None:
    """Refuse centroids, and residual reconstructions, whose squared norms exceed MAX_SQUARED_NORM."""
    flat = codec == "flat"
    levels = centroids[None] if flat else centroids  # (levels, n_codes, sub_dim)
    reach = 0.0  # residual: the largest norm any sum of codes of the levels so far can have
    for level, c in enumerate(levels):
        sq = _squared_norms(c)  # (n_codes,)
        code = int(np.argmax(sq))
        where = f"centroids[{code}]" if flat else f"centroids[{level}, {code}] (level {level}, code {code})"
        if sq[code] > MAX_SQUARED_NORM:
            raise InvalidInputError(
                f"{where} has squared norm {sq[code]:.3e}; expected at most MAX_SQUARED_NORM={MAX_SQUARED_NORM:.1e} "
                f"so that squared distances stay finite in float32. {_NORM_FIX}"
            )
        if codec in ("product", "scalar", "binary"):  # slices: a reconstruction's squared norms add up
            reach += float(sq[code])
            if reach > MAX_SQUARED_NORM:
                raise InvalidInputError(
                    f"{where} lets a reconstruction of levels 0..{level} reach a squared norm of {reach:.3e} (the "
                    f"largest squared norm of each level's slice, summed); expected at most "
                    f"MAX_SQUARED_NORM={MAX_SQUARED_NORM:.1e} so that distances stay finite in float32. {_NORM_FIX}"
                )
            continue
        if codec != "residual":
            continue
        reach += math.sqrt(float(sq[code]))
        if reach**2 > MAX_SQUARED_NORM:
            raise InvalidInputError(
                f"{where} lets a reconstruction of levels 0..{level} reach a squared norm of {reach**2:.3e} (the "
                f"largest centroid norm of each level, summed, squared); expected at most "
                f"MAX_SQUARED_NORM={MAX_SQUARED_NORM:.1e} so that the residuals' squared distances stay finite in "
                f"float32. {_NORM_FIX}"
            )


def _check_grid(centroids: np.ndarray, codec: str) -> None:
    """Refuse a scalar grid that is not strictly increasing (or constant) in some dimension, and a
    binary grid whose upper value is below its lower one (a negative scale)."""
    g = centroids[:, :, 0]  # (dim, n_codes)
    if codec == "binary":
        bad = g[:, 1] < g[:, 0]
        if bad.any():
            d = int(np.argmax(bad))
            raise InvalidInputError(
                f"centroids[{d}]=[{float(g[d, 0])!r}, {float(g[d, 1])!r}] (dimension {d}) has a negative scale; "
                f"expected a binary grid [mean - scale, mean + scale] with scale >= 0. Fix: refit the codebook."
            )
        return
    diffs = np.diff(g, axis=1)  # (dim, n_codes - 1)
    bad = ~((diffs > 0).all(axis=1) | (diffs == 0).all(axis=1))  # (dim,)
    if bad.any():
        d = int(np.argmax(bad))
        k = int(np.argmax(diffs[d] <= 0)) if (diffs[d] > 0).any() else int(np.argmax(diffs[d] != 0))
        raise InvalidInputError(
            f"centroids[{d}, {k}:{k + 2}]=[{float(g[d, k])!r}, {float(g[d, k + 1])!r}] (dimension {d}) breaks the "
            f"scalar grid; expected values strictly increasing in the code (or all equal). Fix: refit the codebook."
        )


def _check_counts(counts: np.ndarray) -> None:
    """Refuse negative counts, and counts of one level that sum to more than MAX_TRAINING_ROWS."""
    levels = counts.reshape(-1, counts.shape[-1])  # (levels, n_codes)
    negative = levels < 0
    if negative.any():
        level, code = (int(i[0]) for i in np.nonzero(negative))
        where = f"counts[{code}]" if counts.ndim < 2 else f"counts[{level}, {code}]"
        raise InvalidInputError(
            f"{where}={int(levels[level, code])} is negative; expected counts >= 0 (the training rows of each "
            f"code). Fix: refit the codebook."
        )
    # Exact sums without int64 wrap-around: the high and low 32 bits of each count summed apart.
    high = (levels >> 32).sum(axis=1, dtype=np.int64)  # (levels,)
    low = (levels & 0xFFFFFFFF).sum(axis=1, dtype=np.int64)  # (levels,)
    for level, (h, lo) in enumerate(zip(high.tolist(), low.tolist(), strict=True)):
        total = (h << 32) + lo
        if total > MAX_TRAINING_ROWS:
            which = "counts" if counts.ndim < 2 else f"counts of level {level}"
            raise InvalidInputError(
                f"{which} sum to {total} training rows; expected at most MAX_TRAINING_ROWS={MAX_TRAINING_ROWS} "
                f"(2**53): counts are the rows each code was trained on. Fix: refit the codebook."
            )


#: Fit settings that only a multi-level codebook records (a level of one, as a flat codebook, drops them).
MULTI_LEVEL_SETTINGS = ("codec", "levels", "train_beam", "rotation", "bits", "scalar_range", "rotation_iters")


def check_settings(
    settings: Any,
    *,
    metric: str,
    codec: str,
    shape: tuple[int, ...],
    name: str = "settings",
    rotated: bool = False,
) -> None:
    """Refuse fit settings that contradict the codebook they were recorded with: a ``codec``,
    ``levels``, ``n_codes``, ``dim`` or ``metric`` entry that is present must equal the codebook's (an
    absent one is fine: older files record fewer). ``name`` is how messages call the settings.
    ``rotation`` (present) must be a rotation the codec takes, other than "none" exactly when the
    codebook holds one (``rotated``); ``bits`` and ``scalar_range`` belong to scalar codebooks only
    (``2**bits == n_codes``); ``rotation_iters`` is an integer >= 1.

    Args:
        shape: the centroids' shape, (n_codes, dim) for 'flat', else (levels, n_codes, sub_dim).
    """
    if not isinstance(settings, dict):
        return
    levels, n_codes, dim = level_dims(codec, shape)
    actual = {"codec": codec, "levels": levels, "n_codes": n_codes, "dim": dim, "metric": metric}
    for key, value in actual.items():
        found = settings.get(key, value)
        if type(found) is type(value) and found == value:
            continue
        structure = ", ".join(f"{k}={v!r}" for k, v in actual.items())
        raise InvalidInputError(
            f"{name}.{key}={_short(found)} contradicts the codebook's {key}={value!r} ({structure}); expected the "
            f"settings it was fitted with, which agree with its structure. Fix: refit the codebook."
        )
    fix = "Fix: refit the codebook."
    if "rotation" in settings:
        found = settings["rotation"]
        allowed = CODEC_ROTATIONS.get(codec, ("none",))
        if not isinstance(found, str) or found not in ROTATIONS or found not in allowed:
            raise InvalidInputError(
                f"{name}.rotation={_short(found)} with codec={codec!r}; expected one of {allowed}. {fix}"
            )
        if (found != "none") != rotated:
            has = "holds a rotation" if rotated else "holds no rotation"
            raise InvalidInputError(
                f"{name}.rotation={found!r} contradicts the codebook, which {has}; expected the settings it was "
                f"fitted with. {fix}"
            )
    if "bits" in settings:
        found = settings["bits"]
        if codec != "scalar":
            raise InvalidInputError(
                f"{name}.bits={_short(found)} with codec={codec!r}; bits belong to scalar codes. {fix}"
            )
        if type(found) is not int or found not in (8, 4) or 2**found != n_codes:
            raise InvalidInputError(
                f"{name}.bits={_short(found)} contradicts the codebook's n_codes={n_codes}; expected "
                f"2**bits == n_codes (bits 8: 256 codes, bits 4: 16). {fix}"
            )
    if "scalar_range" in settings:
        found = settings["scalar_range"]
        if codec != "scalar" or found not in SCALAR_RANGES:
            raise InvalidInputError(
                f"{name}.scalar_range={_short(found)} with codec={codec!r}; expected one of {SCALAR_RANGES}, for a "
                f"scalar codebook. {fix}"
            )
    if "rotation_iters" in settings:
        found = settings["rotation_iters"]
        if type(found) is not int or found < 1:
            raise InvalidInputError(f"{name}.rotation_iters={_short(found)}; expected an integer >= 1. {fix}")


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_list_of_str(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_str_to_str(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


# The JSON type of each known entry of the JSON-valued metadata, as (test, what to say is expected).
# An entry may be absent (older files and fits in memory lack some); one that is present must have
# its type, because reports and drift checks compute with them. Other entries are kept as they are.
_COUNT = (_is_count, "an integer >= 0")
_NUMBER = (_is_number, "a number")
_BOOLEAN = (lambda v: isinstance(v, bool), "a boolean")
_STRING = (lambda v: isinstance(v, str), "a string")
_ARRAY = (lambda v: isinstance(v, list), "an array")
_ENTRY_TYPES: dict[str, dict[str, tuple[Any, str]]] = {
    # What an estimator continued from a file takes from it (VectorQuantizer.from_codebook); the
    # entries that describe the codebook's structure must also agree with it (check_settings).
    "fit": {
        "n_iter": _COUNT,
        "seed": _COUNT,
        "n_init": _COUNT,
        "tol": _NUMBER,
    },
    "stats": {
        "n_rows": _COUNT,
        "rows_total": _COUNT,
        "sample": _COUNT,
        "sample_seed": _COUNT,
        "init_sample": _COUNT,
        "partitions": _COUNT,
        "iterations": _COUNT,
        "n_repairs": _COUNT,
        "empty_codes": _COUNT,
        "inertia": _NUMBER,
        "objective": _STRING,
        "converged": _BOOLEAN,
        "mode": _STRING,
        "restart_inertias": _ARRAY,
        "history": _ARRAY,
        "alignment": (lambda v: isinstance(v, dict), "an object"),
    },
    "timings": {
        "fit_seconds": _NUMBER,
        "init_seconds": _NUMBER,
        "iteration_seconds": _ARRAY,
        "iteration_pruned": _ARRAY,
        "prune_state_bytes": _COUNT,
    },
}


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with its article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _short(value: Any) -> str:
    """``repr(value)`` cut to 80 characters (repr escapes control characters)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _nesting(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (0 for a scalar), without recursion;
    stops counting past ``_MAX_JSON_DEPTH``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > _MAX_JSON_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_json(text: str, what: str, source: str) -> Any:
    """``json.loads(text)``, refusing invalid JSON and JSON nested deeper than ``_MAX_JSON_DEPTH``."""
    try:
        value = json.loads(text)
        too_deep = _nesting(value) > _MAX_JSON_DEPTH
    except json.JSONDecodeError as exc:
        raise CodebookFileError(f"{source}: {what} is not valid JSON ({exc}); the file is corrupt. {_FIX}") from None
    except RecursionError:
        too_deep = True
    if too_deep:
        raise CodebookFileError(
            f"{source}: {what} nests JSON arrays or objects more than {_MAX_JSON_DEPTH} levels deep; expected "
            f"codebook metadata (3 levels). The file is corrupt or hostile. {_FIX}"
        )
    return value


def _check_items(texts: str | Iterable[str], what: str, source: str) -> None:
    """Refuse ``texts`` (one string or several) before they are parsed as JSON when they hold more than
    ``_MAX_JSON_ITEMS`` separators and brackets (counted inside strings too: an upper bound on the
    values that parsing makes)."""
    n_items = sum(text.count(c) for text in ([texts] if isinstance(texts, str) else texts) for c in ",:[{")
    if n_items > _MAX_JSON_ITEMS:
        raise CodebookFileError(
            f"{source}: {what} holds {n_items} JSON separators and brackets; expected at most {_MAX_JSON_ITEMS} "
            f"(a codebook's metadata holds about 10 per fit iteration and 1 per source). The file is corrupt or "
            f"hostile. {_FIX}"
        )


def _header_length(head: bytes, size: int, source: str) -> int:
    """The header length that a file's first 8 bytes declare, once it is known that a JSON header of
    that length fits in the ``size`` bytes of the file (``head``: at least its first 9 bytes)."""
    (n_header,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (None,)
    if n_header is not None and n_header <= min(size - 8, _MAX_HEADER_BYTES) and head[8:9] == b"{":
        return n_header
    # Not a safetensors header: say what it looks like instead. (A pickle's first bytes can also
    # read as a plausible header length, so this is only asked once the header check failed.)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head[:4] == b"PK\x03\x04":
        raise CodebookFileError(
            f"{source} looks like a pickle or torch.save archive, not a safetensors codebook; pickles are "
            f"never loaded because loading one can run arbitrary code. {_FIX}"
        )
    if n_header is None:
        raise CodebookFileError(f"{source} is {size} bytes long: too short to be a safetensors file. {_FIX}")
    if n_header > _MAX_HEADER_BYTES:
        raise CodebookFileError(
            f"{source}: header length={n_header} bytes; expected at most {_MAX_HEADER_BYTES} bytes for a codebook "
            f"header. The file is corrupt or not a codebook. {_FIX}"
        )
    if n_header > size - 8:
        raise CodebookFileError(
            f"{source}: header length={n_header} bytes but the file has {size - 8} bytes after it; "
            f"expected a safetensors file. The file is truncated or not a codebook. {_FIX}"
        )
    raise CodebookFileError(
        f"{source}: the {n_header}-byte header starts with {head[8:9]!r}; expected a JSON object ('{{'). "
        f"The file is corrupt or not a codebook. {_FIX}"
    )


def _check_header(raw: bytes, n_after: int, source: str) -> tuple[dict[str, str], int]:
    """Check a codebook's JSON header by hand (``raw``: its bytes; ``n_after``: how many bytes of the
    file follow it). Returns its string metadata and the size of the tensor data it describes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodebookFileError(
            f"{source}: the header is not UTF-8 text ({exc}); the file is corrupt. {_FIX}"
        ) from None
    _check_items(text, "the header", source)
    header = _parse_json(text, "the header", source)
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CodebookFileError(f"{source}: the header has no metadata; expected a vq-pipeline codebook. {_FIX}")
    meta = header.pop("__metadata__")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise CodebookFileError(
                f"{source}: metadata {key}={_short(value)} is {_json_type(value)}; expected a string (safetensors "
                f"metadata maps strings to strings). The file is corrupt. {_FIX}"
            )
    # The metadata strings are parsed as JSON later, together: one budget for all of them.
    _check_items(meta.values(), "the metadata", source)
    if meta.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(f"{source}: format={meta.get('format')!r}; expected {FORMAT_NAME!r}. {_FIX}")
    version = meta.get("format_version", "")
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise UnsupportedFormatError(
            f"{source}: format_version={version!r}; this release reads major version "
            f"{FORMAT_VERSION.split('.')[0]} ({FORMAT_VERSION}). Fix: upgrade vq-pipeline, or refit the codebook."
        )
    if meta.get("metric") not in METRICS:
        raise CodebookFileError(f"{source}: metric={meta.get('metric')!r}; expected one of {METRICS}. {_FIX}")
    sizes = [meta.get("n_codes", ""), meta.get("dim", "")]
    if not all(s.isascii() and s.isdigit() and len(s) <= 18 and int(s) > 0 for s in sizes):
        raise CodebookFileError(
            f"{source}: n_codes={meta.get('n_codes')!r}, dim={meta.get('dim')!r}; expected positive integers. {_FIX}"
        )
    n_codes, dim = int(sizes[0]), int(sizes[1])
    codec, levels = _codec_and_levels(meta, dim, source)
    pre_codec = version in _PRE_CODEC_VERSIONS
    if codec in PER_DIMENSION_CODECS and pre_codec:
        raise CodebookFileError(
            f"{source}: codec={codec!r} in a file of format_version={version!r}; {codec} codebooks are written as "
            f"format {FORMAT_VERSION}. The header is inconsistent. {_FIX}"
        )
    if codec in PER_DIMENSION_CODECS and n_codes not in PER_DIMENSION_N_CODES[codec]:
        raise CodebookFileError(
            f"{source}: n_codes={n_codes} with codec={codec!r}; expected one of {PER_DIMENSION_N_CODES[codec]} "
            f"codes per dimension. The header is inconsistent. {_FIX}"
        )
    tensors = dict(_EXPECTED_TENSORS)
    if "rotation" in header:
        if pre_codec:
            raise CodebookFileError(
                f"{source}: a 'rotation' tensor in a file of format_version={version!r}; rotations are written as "
                f"format {FORMAT_VERSION}. The header is inconsistent. {_FIX}"
            )
        if len(CODEC_ROTATIONS.get(codec, ())) < 2:
            raise CodebookFileError(
                f"{source}: a 'rotation' tensor with codec={codec!r}; the {codec} codec takes no rotation. "
                f"The header is inconsistent. {_FIX}"
            )
        tensors.update(_OPTIONAL_TENSORS)
    if set(header) != set(tensors):
        optional = f" (and optionally {sorted(_OPTIONAL_TENSORS)})" if not pre_codec else ""
        raise CodebookFileError(
            f"{source}: tensors={sorted(header)}; expected exactly {sorted(_EXPECTED_TENSORS)}{optional}. {_FIX}"
        )
    if codec == "flat":
        expected_shapes = {"centroids": [n_codes, dim], "counts": [n_codes]}
    else:
        sub_dim = dim // levels if codec in ("product", "scalar", "binary") else dim
        expected_shapes = {"centroids": [levels, n_codes, sub_dim], "counts": [levels, n_codes]}
    expected_shapes["rotation"] = [dim, dim]
    spans = []
    for name, (dtype, _) in tensors.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != dtype or info.get("shape") != expected_shapes[name]:
            raise CodebookFileError(
                f"{source}: tensor {name!r} is {_short(info)}; expected dtype {dtype} and shape "
                f"{expected_shapes[name]} (from metadata codec={codec!r}, levels={levels}, n_codes={n_codes}, "
                f"dim={dim}). The header is inconsistent. "
                f"{_FIX}"
            )
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CodebookFileError(
                f"{source}: tensor {name!r} has data_offsets={_short(offsets)}; the header is corrupt. {_FIX}"
            )
        if offsets[1] > n_after:
            raise CodebookFileError(
                f"{source}: tensor {name!r} ends at byte {offsets[1]} but only {n_after} data bytes follow the "
                f"header; the file is truncated. {_FIX}"
            )
        n_bytes = _ITEM_BYTES[dtype] * math.prod(expected_shapes[name])  # Python ints: no int64 wrap-around
        if offsets[1] - offsets[0] != n_bytes:
            raise CodebookFileError(
                f"{source}: tensor {name!r} has data_offsets={offsets} ({offsets[1] - offsets[0]} bytes); expected "
                f"{n_bytes} bytes for dtype {dtype} and shape {expected_shapes[name]}. The header is inconsistent. "
                f"{_FIX}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    if spans[0][0] != 0:
        raise CodebookFileError(
            f"{source}: tensor {spans[0][2]!r} occupies bytes {spans[0][:2]} of the data; expected the tensors to "
            f"fill it from byte 0 with no gap or overlap. The header is corrupt. {_FIX}"
        )
    for a, b in zip(spans, spans[1:], strict=False):
        if a[1] != b[0]:
            raise CodebookFileError(
                f"{source}: tensors {a[2]!r} and {b[2]!r} occupy bytes {a[:2]} and {b[:2]} of the data; expected "
                f"them to fill it from byte 0 with no gap or overlap. The header is corrupt. {_FIX}"
            )
    return meta, spans[-1][1]


def _codec_and_levels(meta: dict[str, str], dim: int, source: str) -> tuple[str, int]:
    """The codec and levels a header declares (a file without them is flat, as every 1.0 file is)."""
    codec, levels_text = meta.get("codec", "flat"), meta.get("levels", "1")
    if codec not in CODECS:
        raise CodebookFileError(f"{source}: codec={codec!r}; expected one of {CODECS}. {_FIX}")
    if not (levels_text.isascii() and levels_text.isdigit() and len(levels_text) <= 6 and int(levels_text) > 0):
        raise CodebookFileError(f"{source}: levels={levels_text!r}; expected a positive integer. {_FIX}")
    levels = int(levels_text)
    if codec in PER_DIMENSION_CODECS:
        if levels != dim:
            raise CodebookFileError(
                f"{source}: levels={levels} with codec={codec!r} and dim={dim}; expected levels == dim (one code per "
                f"dimension). The header is inconsistent. {_FIX}"
            )
        return codec, levels
    if levels > MAX_LEVELS:
        raise CodebookFileError(
            f"{source}: levels={levels}; expected at most MAX_LEVELS={MAX_LEVELS} codes per row (each level is one "
            f"more pass over every encoded row). The file is corrupt or hostile. {_FIX}"
        )
    if codec == "flat" and levels != 1:
        raise CodebookFileError(f"{source}: levels={levels} with codec='flat'; expected levels=1. {_FIX}")
    if codec == "product" and dim % levels:
        raise CodebookFileError(
            f"{source}: dim={dim} is not a multiple of levels={levels}, as a product codebook's is. {_FIX}"
        )
    return codec, levels


def _check_size(size: int, n_header: int, n_data: int, source: str) -> None:
    """Refuse a file that is longer than its header says (the shorter ones are refused by
    :func:`_check_header`): a codebook is exactly the length field, the header and the tensor data."""
    expected = 8 + n_header + n_data
    if size != expected:
        raise CodebookFileError(
            f"{source} is {size} bytes long but its header describes {expected} bytes (8 + a {n_header}-byte "
            f"header + {n_data} bytes of tensor data); "
            + (
                f"{size - expected} bytes follow the tensor data. The file is corrupt or not a codebook. "
                if size > expected
                else "the file is truncated. "
            )
            + _FIX
        )


def read_codebook_bytes(data: bytes, source: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Check the header by hand, then let safetensors read the arrays (numpy, no pickles).

    Returns:
        (string metadata, {"centroids": (n_codes, dim) float32, "counts": (n_codes,) int64}).
    """
    n_header = _header_length(data[:9], len(data), source)
    meta, n_data = _check_header(data[8 : 8 + n_header], len(data) - 8 - n_header, source)
    _check_size(len(data), n_header, n_data, source)
    try:
        from safetensors.numpy import load as _st_load

        arrays = _st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CodebookFileError(f"{source}: safetensors could not read it ({exc}). {_FIX}") from None
    return meta, arrays


def write_codebook_bytes(
    meta: dict[str, str], centroids: np.ndarray, counts: np.ndarray, rotation: np.ndarray | None = None
) -> bytes:
    """A codebook's safetensors bytes (what :func:`read_codebook_bytes` reads back): the string
    ``meta``, float32 ``centroids``, int64 ``counts`` and (when given) the float32 ``rotation`` after
    them, little-endian, with a deterministic header (keys sorted: the safetensors library orders
    metadata by hash, differently per process)."""
    c = np.ascontiguousarray(centroids, dtype="<f4")
    n = np.ascontiguousarray(counts, dtype="<i8")
    header = {
        "__metadata__": meta,
        "centroids": {"dtype": "F32", "shape": list(c.shape), "data_offsets": [0, c.nbytes]},
        "counts": {"dtype": "I64", "shape": list(n.shape), "data_offsets": [c.nbytes, c.nbytes + n.nbytes]},
    }
    parts = [c.tobytes(), n.tobytes()]
    if rotation is not None:
        r = np.ascontiguousarray(rotation, dtype="<f4")
        start = c.nbytes + n.nbytes
        header["rotation"] = {"dtype": "F32", "shape": list(r.shape), "data_offsets": [start, start + r.nbytes]}
        parts.append(r.tobytes())
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + b"".join(parts)


def json_field(meta: dict[str, str], key: str, source: str, kind: type) -> Any:
    """A JSON-valued metadata entry of type ``kind`` (``dict`` or ``list``; empty when absent)."""
    raw = meta.get(key, "")
    if raw == "":
        return kind()
    value = _parse_json(raw, f"metadata {key}", source)
    if not isinstance(value, kind):
        expected = {dict: "an object", list: "an array"}.get(kind, kind.__name__)
        raise CodebookFileError(
            f"{source}: metadata {key}={_short(value)} is {_json_type(value)}; expected {expected}. {_FIX}"
        )
    return value


def _typed_entries(meta: dict[str, str], key: str, source: str) -> dict[str, Any]:
    """A JSON-object metadata entry whose known entries have the types ``_ENTRY_TYPES`` gives."""
    value = json_field(meta, key, source, dict)
    for name, (test, expected) in _ENTRY_TYPES[key].items():
        if name in value and not test(value[name]):
            found = value[name]
            raise CodebookFileError(
                f"{source}: metadata {key}.{name}={_short(found)} is {_json_type(found)}; expected {expected}. {_FIX}"
            )
    return value


def provenance_fields(meta: dict[str, str], source: str) -> dict[str, Any]:
    """The metadata of a codebook file as the keyword arguments of a Codebook (or CodebookInfo).

    ``fit`` must be a JSON object whose ``n_iter``, ``seed``, ``n_init`` and ``tol`` (which an estimator
    continued from the file takes) have their types, other entries are only shown (their agreement
    with the file's structure is checked by :func:`check_settings`); ``stats`` and ``timings`` entries
    that reports compute with must have their types; ``sources`` must be an array of strings and
    ``versions`` an object of strings.
    """
    sources = json_field(meta, "sources", source, list)
    versions = json_field(meta, "versions", source, dict)
    for key, value, ok, expected in (
        ("sources", sources, _is_list_of_str(sources), "an array of strings"),
        ("versions", versions, _is_str_to_str(versions), "an object whose values are strings"),
    ):
        if not ok:
            bad = next(v for v in (value if isinstance(value, list) else value.values()) if not isinstance(v, str))
            raise CodebookFileError(
                f"{source}: metadata {key} holds {_short(bad)}, {_json_type(bad)}; expected {expected}. {_FIX}"
            )
    return dict(
        metric=meta["metric"],
        codec=meta.get("codec", "flat"),
        settings=_typed_entries(meta, "fit", source),
        stats=_typed_entries(meta, "stats", source),
        data_fingerprint=meta.get("data_fingerprint", ""),
        sources=tuple(sources),
        column=meta.get("column", ""),
        parent_fingerprint=meta.get("parent_fingerprint", ""),
        versions=versions,
        created_at=meta.get("created_at", ""),
        timings=_typed_entries(meta, "timings", source),
    )


def _open_regular_file(p: Path) -> int:
    """A read-only descriptor of the regular file ``p``; anything else is refused without being opened
    (a device or FIFO is never read; O_NONBLOCK keeps a FIFO swapped in meanwhile from blocking)."""
    name = f"codebook path={str(p)!r}"
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise CodebookFileError(f"{name} does not exist; expected a .safetensors codebook file. {_PATH_FIX}") from None
    except (OSError, ValueError) as exc:
        raise CodebookFileError(
            f"{name} cannot be read ({exc}); expected a readable codebook file. {_PATH_FIX}"
        ) from None
    kind = _not_regular(st.st_mode)
    if kind is None:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(p, flags)
        except OSError as exc:
            raise CodebookFileError(
                f"{name} cannot be opened ({exc.strerror or exc}); expected a readable codebook file. {_PATH_FIX}"
            ) from None
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind is None:
            return fd
        os.close(fd)
    stream = "" if kind == "a folder" else " (save a stream to a file first)"
    raise CodebookFileError(
        f"{name} is {kind}, not a regular file; expected a .safetensors codebook file. "
        f"Fix: pass the .safetensors file written by `vq fit` or Codebook.save{stream}."
    )


def _not_regular(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def read_up_to(f: io.FileIO, n: int) -> bytes:
    """The next ``n`` bytes of ``f``, fewer at its end; one allocation when the read is whole."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_file(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The bytes of a codebook file and its name for messages, read without trusting the file.

    Only a regular file is opened. Its first bytes are checked before more is read: the length
    field, then the JSON header (at most ``_MAX_HEADER_BYTES``), which says how many bytes of tensor
    data follow. A file of any other length is refused before its data is read, so memory follows
    the codebook's size, never the file's.
    """
    p = Path(path)
    source = f"codebook file {str(p)!r}"
    with io.FileIO(_open_regular_file(p), "rb", closefd=True) as f:
        size = os.fstat(f.fileno()).st_size
        n_header = _header_length(read_up_to(f, 9), size, source)
        f.seek(8)
        _, n_data = _check_header(read_up_to(f, n_header), size - 8 - n_header, source)
        _check_size(size, n_header, n_data, source)
        f.seek(0)
        try:
            data = read_up_to(f, size)
        except MemoryError:
            raise CodebookFileError(
                f"{source} holds a codebook of {size} bytes, more than this process can hold in memory. "
                f"Fix: load it on a machine with more memory, or fit fewer codes."
            ) from None
        if len(data) != size or f.read(1):
            raise CodebookFileError(f"{source} changed while it was being read. Fix: load it again once it is written.")
    return data, source


def is_codebook_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file whose header names this format: a codebook (which a fit may
    replace, even one that no longer loads), not some other file. Reads at most the header."""
    p = Path(path)
    try:
        with io.FileIO(_open_regular_file(p), "rb", closefd=True) as f:
            size = os.fstat(f.fileno()).st_size
            n_header = _header_length(read_up_to(f, 9), size, "")
            f.seek(8)
            text = read_up_to(f, n_header).decode("utf-8", errors="replace")
            _check_items(text, "the header", "")
            header = _parse_json(text, "the header", "")
    except (CodebookFileError, OSError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def summarize(codebook: Any) -> dict[str, Any]:
    """A JSON-friendly description (no arrays) of a Codebook or a CodebookInfo."""
    rotation = {} if getattr(codebook, "rotation", None) is None else {"rotated": True}
    return {
        "fingerprint": codebook.fingerprint,
        "metric": codebook.metric,
        "n_codes": codebook.n_codes,
        "dim": codebook.dim,
        "codec": codebook.codec,
        "levels": codebook.levels,
        **rotation,
        "fit": codebook.settings,
        "stats": codebook.stats,
        "data_fingerprint": codebook.data_fingerprint,
        "sources": list(codebook.sources),
        "column": codebook.column,
        "parent_fingerprint": codebook.parent_fingerprint,
        "versions": codebook.versions,
        "created_at": codebook.created_at,
        "timings": codebook.timings,
        "empty_codes": int((codebook.counts == 0).sum()),
    }


def level_dims(codec: str, centroids_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(levels, n_codes, dim) of centroids of this shape: (n_codes, dim) for 'flat', else
    (levels, n_codes, sub_dim) with dim = sub_dim (residual) or levels * sub_dim (product, and scalar
    and binary, whose sub_dim is 1)."""
    if codec == "flat":
        return 1, int(centroids_shape[0]), int(centroids_shape[1])
    levels, n_codes, sub_dim = (int(v) for v in centroids_shape)
    return levels, n_codes, sub_dim * levels if codec in ("product", "scalar", "binary") else sub_dim


class CodebookViews:
    """What a Codebook and a CodebookInfo derive alike from ``centroids``, ``counts`` and ``metric``
    (CPU tensors or numpy arrays)."""

    centroids: Any
    counts: Any
    metric: str
    codec: str
    rotation: Any

    @property
    def n_codes(self) -> int:
        """Codes per level."""
        return level_dims(self.codec, tuple(self.centroids.shape))[1]

    @property
    def dim(self) -> int:
        """The width of the embeddings encoded (and of decoded vectors)."""
        return level_dims(self.codec, tuple(self.centroids.shape))[2]

    @property
    def levels(self) -> int:
        """Codes per row: 1 for a flat codebook."""
        return level_dims(self.codec, tuple(self.centroids.shape))[0]

    @property
    def fingerprint(self) -> str:
        """sha256 of the metric, codec, shape, centroid bytes and rotation bytes (when there is a
        rotation): the identity of what encoding uses."""
        rotation = None if self.rotation is None else np.asarray(self.rotation)
        return fingerprint_of(self.metric, np.asarray(self.centroids), self.codec, rotation)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (no tensors or arrays) for people and artifacts."""
        return summarize(self)


@dataclass(frozen=True, eq=False)
class CodebookInfo(CodebookViews):
    """A codebook file read with numpy: the same attributes as a Codebook, arrays instead of tensors."""

    centroids: np.ndarray  # (n_codes, dim) float32; (levels, n_codes, sub_dim) multi-level
    counts: np.ndarray  # (n_codes,) int64; (levels, n_codes) multi-level
    metric: str
    codec: str = "flat"
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    sources: tuple[str, ...] = ()
    column: str = ""
    parent_fingerprint: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    timings: dict[str, Any] = field(default_factory=dict)
    rotation: np.ndarray | None = None  # (dim, dim) float32, or None


def check_file_values(
    centroids: np.ndarray, counts: np.ndarray, fields: dict[str, Any], rotation: np.ndarray | None = None
) -> None:
    """:func:`check_settings` of a file's ``fit`` metadata, then :func:`check_values` of its arrays.

    Args:
        fields: :func:`provenance_fields` of the file.
    """
    codec, metric = fields["codec"], fields["metric"]
    check_settings(
        fields["settings"],
        metric=metric,
        codec=codec,
        shape=tuple(centroids.shape),
        name="metadata fit",
        rotated=rotation is not None,
    )
    check_values(centroids, counts, metric, codec, rotation)


def load_info(path: str | os.PathLike[str]) -> CodebookInfo:
    """Read and validate a codebook file as ``Codebook.load`` does, with numpy only (no torch)."""
    data, source = read_file(path)
    meta, arrays = read_codebook_bytes(data, source)
    fields = provenance_fields(meta, source)
    rotation = arrays.get("rotation")
    try:
        check_file_values(arrays["centroids"], arrays["counts"], fields, rotation)
    except InvalidInputError as exc:
        raise CodebookFileError(f"{source} is not a valid codebook: {exc}") from None
    return CodebookInfo(centroids=arrays["centroids"], counts=arrays["counts"], rotation=rotation, **fields)


__all__ = [
    "write_codebook_bytes",
    "read_up_to",
    "FLAT_FORMAT_VERSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MULTI_LEVEL_FORMAT_VERSION",
    "PER_DIMENSION_N_CODES",
    "ROTATION_TOLERANCE",
    "check_rotation",
    "rotation_deviation",
    "CodebookInfo",
    "CodebookViews",
    "check_file_values",
    "check_settings",
    "check_values",
    "MAX_LEVELS",
    "MULTI_LEVEL_SETTINGS",
    "MAX_SQUARED_NORM",
    "MAX_TRAINING_ROWS",
    "fingerprint_of",
    "level_dims",
    "is_codebook_file",
    "json_field",
    "load_info",
    "provenance_fields",
    "read_codebook_bytes",
    "read_file",
    "summarize",
]
