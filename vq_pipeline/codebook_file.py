"""Reading the codebook file format with numpy only: header checks, arrays, and a plain description.

:class:`vq_pipeline.codebook.Codebook` builds on this (``Codebook.load`` reads through
:func:`read_codebook_bytes`); ``vq inspect`` uses :func:`load_info`, which validates a file exactly
as ``Codebook.load`` does without importing torch. The layout is described in
:mod:`vq_pipeline.codebook`. Only this module and ``codebook.py`` touch safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CodebookFileError, InvalidInputError, UnsupportedFormatError
from .settings import METRICS

FORMAT_NAME = "vq-pipeline.codebook"
FORMAT_VERSION = "1.0"
_MAX_HEADER_BYTES = 16 * 2**20
_EXPECTED_TENSORS = {"centroids": ("F32", 2), "counts": ("I64", 1)}
_FIX = "Fix: point at a codebook written by `vq fit` or Codebook.save, or refit it."


def fingerprint_of(metric: str, centroids: np.ndarray) -> str:
    """sha256 of the metric, shape and centroid bytes: the identity of what encoding uses."""
    n_codes, dim = centroids.shape
    h = hashlib.sha256(f"{FORMAT_NAME}|{metric}|{n_codes}|{dim}|".encode())
    h.update(np.ascontiguousarray(centroids, dtype="<f4").tobytes())
    return h.hexdigest()


def check_values(centroids: np.ndarray, counts: np.ndarray, metric: str) -> None:
    """Refuse non-finite centroids, negative counts and (under cosine) centroids that are not unit rows.

    Args:
        centroids: (n_codes, dim) float32. counts: (n_codes,) int64.
    """
    if not np.isfinite(centroids).all():
        raise InvalidInputError("centroids hold NaN or ±Inf values; expected finite numbers. Fix: refit the codebook.")
    if (counts < 0).any():
        raise InvalidInputError("counts hold negative values; expected counts >= 0.")
    if metric == "cosine":
        norms = np.linalg.norm(centroids.astype(np.float64), axis=1)  # (n_codes,)
        worst = float(np.abs(norms - 1).max())
        if worst > 1e-3:
            raise InvalidInputError(
                f"cosine centroid norms deviate from 1 by up to {worst:.3g}; expected unit-norm rows. "
                f"Fix: normalize the centroids, or use metric='l2'."
            )


def _check_header(data: bytes, source: str) -> tuple[dict[str, str], int]:
    """Check a safetensors codebook's header by hand; return its metadata and header length."""
    (n_header,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (None,)
    if n_header is None or n_header > min(len(data) - 8, _MAX_HEADER_BYTES) or data[8:9] != b"{":
        # Not a safetensors header: say what it looks like instead. (A pickle's first bytes can also
        # read as a plausible header length, so this is only asked once the header check failed.)
        if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or data[:4] == b"PK\x03\x04":
            raise CodebookFileError(
                f"{source} looks like a pickle or torch.save archive, not a safetensors codebook; pickles are "
                f"never loaded because loading one can run arbitrary code. {_FIX}"
            )
        if n_header is None:
            raise CodebookFileError(f"{source} is {len(data)} bytes long: too short to be a safetensors file. {_FIX}")
        raise CodebookFileError(
            f"{source}: header length={n_header} bytes but the file has {len(data) - 8} bytes after it; "
            f"expected a safetensors file. The file is truncated or not a codebook. {_FIX}"
        )
    try:
        header = json.loads(data[8 : 8 + n_header].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodebookFileError(
            f"{source}: the header is not valid JSON ({exc}); the file is corrupt. {_FIX}"
        ) from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CodebookFileError(f"{source}: the header has no metadata; expected a vq-pipeline codebook. {_FIX}")
    meta = header.pop("__metadata__")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CodebookFileError(f"{source}: metadata values must be strings; the file is corrupt. {_FIX}")
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
    try:
        n_codes, dim = int(meta["n_codes"]), int(meta["dim"])
    except (KeyError, ValueError):
        raise CodebookFileError(
            f"{source}: n_codes={meta.get('n_codes')!r}, dim={meta.get('dim')!r}; expected integers. {_FIX}"
        ) from None
    if set(header) != set(_EXPECTED_TENSORS):
        raise CodebookFileError(
            f"{source}: tensors={sorted(header)}; expected exactly {sorted(_EXPECTED_TENSORS)}. {_FIX}"
        )
    expected_shapes = {"centroids": [n_codes, dim], "counts": [n_codes]}
    n_data = len(data) - 8 - n_header
    for name, (dtype, _) in _EXPECTED_TENSORS.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != dtype or info.get("shape") != expected_shapes[name]:
            raise CodebookFileError(
                f"{source}: tensor {name!r} is {info!r}; expected dtype {dtype} and shape {expected_shapes[name]} "
                f"(from metadata n_codes={n_codes}, dim={dim}). The header is inconsistent. {_FIX}"
            )
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CodebookFileError(
                f"{source}: tensor {name!r} has data_offsets={offsets!r}; the header is corrupt. {_FIX}"
            )
        if offsets[1] > n_data:
            raise CodebookFileError(
                f"{source}: tensor {name!r} ends at byte {offsets[1]} but only {n_data} data bytes follow the "
                f"header; the file is truncated. {_FIX}"
            )
    return meta, n_header


def read_codebook_bytes(data: bytes, source: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Check the header by hand, then let safetensors read the arrays (numpy, no pickles).

    Returns:
        (string metadata, {"centroids": (n_codes, dim) float32, "counts": (n_codes,) int64}).
    """
    meta, _ = _check_header(data, source)
    try:
        from safetensors.numpy import load as _st_load

        arrays = _st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CodebookFileError(f"{source}: safetensors could not read it ({exc}). {_FIX}") from None
    return meta, arrays


def json_field(meta: dict[str, str], key: str, source: str, kind: type) -> Any:
    """A JSON-valued metadata entry of type ``kind`` (empty when absent)."""
    raw = meta.get(key, "")
    if raw == "":
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise CodebookFileError(
            f"{source}: metadata {key}={raw[:80]!r} is not valid JSON; the file is corrupt."
        ) from None
    if not isinstance(value, kind):
        raise CodebookFileError(f"{source}: metadata {key} is a {type(value).__name__}; expected a {kind.__name__}.")
    return value


def provenance_fields(meta: dict[str, str], source: str) -> dict[str, Any]:
    """The metadata of a codebook file as the keyword arguments of a Codebook (or CodebookInfo)."""
    return dict(
        metric=meta["metric"],
        fit=json_field(meta, "fit", source, dict),
        stats=json_field(meta, "stats", source, dict),
        data_fingerprint=meta.get("data_fingerprint", ""),
        sources=tuple(json_field(meta, "sources", source, list)),
        column=meta.get("column", ""),
        parent_fingerprint=meta.get("parent_fingerprint", ""),
        versions=json_field(meta, "versions", source, dict),
        created_at=meta.get("created_at", ""),
        timings=json_field(meta, "timings", source, dict),
    )


def read_file(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The bytes of a codebook file and its name for messages; a missing path or a folder is refused."""
    p = Path(path)
    if not p.is_file():
        raise CodebookFileError(
            f"codebook path={str(p)!r} {'is a folder' if p.is_dir() else 'does not exist'}; "
            f"expected a .safetensors codebook file. Fix: pass the file written by `vq fit` or Codebook.save."
        )
    return p.read_bytes(), f"codebook file {str(p)!r}"


def summarize(codebook: Any) -> dict[str, Any]:
    """A JSON-friendly description (no arrays) of a Codebook or a CodebookInfo."""
    return {
        "fingerprint": codebook.fingerprint,
        "metric": codebook.metric,
        "n_codes": codebook.n_codes,
        "dim": codebook.dim,
        "fit": codebook.fit,
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


class CodebookViews:
    """What a Codebook and a CodebookInfo derive alike from ``centroids``, ``counts`` and ``metric``
    (CPU tensors or numpy arrays)."""

    centroids: Any
    counts: Any
    metric: str

    @property
    def n_codes(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def fingerprint(self) -> str:
        """sha256 of the metric, shape and centroid bytes: the identity of what encoding uses."""
        return fingerprint_of(self.metric, np.asarray(self.centroids))

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (no tensors or arrays) for people and artifacts."""
        return summarize(self)


@dataclass(frozen=True, eq=False)
class CodebookInfo(CodebookViews):
    """A codebook file read with numpy: the same attributes as a Codebook, arrays instead of tensors."""

    centroids: np.ndarray  # (n_codes, dim) float32
    counts: np.ndarray  # (n_codes,) int64
    metric: str
    fit: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    sources: tuple[str, ...] = ()
    column: str = ""
    parent_fingerprint: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    timings: dict[str, Any] = field(default_factory=dict)


def load_info(path: str | os.PathLike[str]) -> CodebookInfo:
    """Read and validate a codebook file as ``Codebook.load`` does, with numpy only (no torch)."""
    data, source = read_file(path)
    meta, arrays = read_codebook_bytes(data, source)
    fields = provenance_fields(meta, source)
    try:
        check_values(arrays["centroids"], arrays["counts"], fields["metric"])
    except InvalidInputError as exc:
        raise CodebookFileError(f"{source} is not a valid codebook: {exc}") from None
    return CodebookInfo(centroids=arrays["centroids"], counts=arrays["counts"], **fields)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CodebookInfo",
    "CodebookViews",
    "check_values",
    "fingerprint_of",
    "json_field",
    "load_info",
    "provenance_fields",
    "read_codebook_bytes",
    "read_file",
    "summarize",
]
