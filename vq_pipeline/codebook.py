"""The Codebook value object and its file format: one self-describing safetensors file.

File layout (safetensors: an 8-byte little-endian header length, a JSON header, raw tensor bytes)::

    centroids   F32 (n_codes, dim)    the codes' vectors; unit rows under the cosine metric
                    (levels, n_codes, sub_dim) for a multi-level codebook (see vq_pipeline.compute.levels);
                    (dim, n_codes, 1) for scalar and binary codebooks: each dimension's grid of values
    counts      I64 (n_codes,)        training rows assigned to each code by the final E step
                    (levels, n_codes) for a multi-level codebook
    rotation    F32 (dim, dim)        optional (format 1.2): the orthogonal R rows are rotated by
                                      (``x @ R``) before they are coded; residual, product, binary
    __metadata__ (str -> str; nested values are JSON):
        format              "vq-pipeline.codebook"
        format_version      "1.0" for flat codebooks, "1.1" for residual and product ones, "1.2" for
                            scalar and binary codebooks and codebooks with a rotation (a reader
                            refuses a major version it does not know; 1.2 readers read every 1.0
                            and 1.1 file, and refuse a 1.0/1.1 file that uses what 1.2 added)
        metric, n_codes, dim, dtype
        codec, levels       multi-level codebooks only: "residual", "product", "scalar" or "binary",
                            and codes per row (``dim`` for scalar and binary)
        fit                 JSON: the settings (n_codes, metric, init, seed, n_iter, tol, n_init,
                            engine, device, ...)
        stats               JSON: rows used, inertia, iterations, converged, empty-cluster repairs,
                            per-iteration history (objective, repairs, imbalance)
        data_fingerprint    sha256 of the training data
        sources, column     JSON list of source URIs, and the embedding column ("" in memory)
        parent_fingerprint  fingerprint of the codebook a warm-started refit started from, or ""
        versions            JSON: vq-pipeline, torch, pykeops, python
        created_at          UTC ISO-8601
        timings             JSON: fit seconds, per-iteration seconds

Everything but ``created_at`` and ``timings`` is a function of the data, the settings and the
device kind, so two identical fits give files that differ only in those two values. The writer
emits keys in sorted order (the safetensors library orders metadata by hash, differently per
process), and reading uses the safetensors library after checking the header by hand, so a
truncated, lying, pickled or random file gets a :class:`CodebookFileError`, never code execution.
Loading a file reads its first bytes, then its header, and reads the tensor data only when the file
is exactly as long as the header says: memory follows the codebook's size, never the file's.
Metadata of the wrong JSON type is refused naming the entry (see
:func:`vq_pipeline.io.codebook_file.provenance_fields`).

What a file may ask of a reader is bounded (:mod:`vq_pipeline.io.codebook_file`): at most ``MAX_LEVELS``
levels, refused from the header before the tensor data is read (a fit refuses more too, so every file
written loads), so the work of encoding one row is the centroid values in the file, times the beam,
in at most ``MAX_LEVELS`` passes; fit settings whose ``codec``, ``levels``, ``n_codes``, ``dim``,
``metric``, ``rotation`` or ``bits`` contradict the file are refused; centroids (and a residual
codebook's partial sums of levels, bounded by the sum of each level's largest norm) must have squared norms of at most
``MAX_SQUARED_NORM``, as rows must; each level's counts must sum to at most ``MAX_TRAINING_ROWS``.
A Codebook built in memory is held to the same rules.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata as _md
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vq_pipeline.arrays import array_kind, as_codes, like
from vq_pipeline.compute.align import align_codebook
from vq_pipeline.compute.assign import DEFAULT_MEMORY_BUDGET, encode
from vq_pipeline.compute.codecs import pack_bits, pack_nibbles, unpack_bits, unpack_nibbles
from vq_pipeline.compute.balanced import encode_balanced
from vq_pipeline.compute.levels import decode, encode_multilevel, reconstruction_error
from vq_pipeline.errors import CodebookFileError, InvalidInputError
from vq_pipeline.io.codebook_file import (
    FLAT_FORMAT_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    MULTI_LEVEL_FORMAT_VERSION,
    MULTI_LEVEL_SETTINGS,
    CodebookViews,
    check_settings,
    check_values,
    provenance_fields,
    read_codebook_bytes,
    read_file,
    write_codebook_bytes,
)
from vq_pipeline.io.fileio import atomic_write_bytes
from vq_pipeline.settings import CODECS, METRICS, PER_DIMENSION_CODECS
from vq_pipeline.validate import as_embeddings, check_int, normalize_rows

# Metadata that changes from run to run; everything else is reproducible.
RUN_KEYS = ("created_at", "timings")


def library_versions() -> dict[str, str]:
    """Versions recorded in every codebook (without importing pykeops, which prints and probes)."""

    def version(dist: str) -> str:
        try:
            return _md.version(dist)
        except _md.PackageNotFoundError:
            return "not installed"

    return {
        "vq-pipeline": version("vq-pipeline"),
        "torch": torch.__version__,
        "pykeops": version("pykeops"),
        "python": sys.version.split()[0],
    }


@dataclass(frozen=True, eq=False)
class Codebook(CodebookViews):
    """A fitted codebook: centroids, their training counts, the metric and provenance.

    Attributes:
        centroids: (n_codes, dim) float32 CPU tensor; rows have unit norm under 'cosine'. A
            multi-level codebook (``codec`` 'residual' or 'product') holds (levels, n_codes, sub_dim).
        counts: (n_codes,) int64 CPU tensor of training assignments; (levels, n_codes) multi-level.
        metric: 'l2' or 'cosine'.
        codec: 'flat' (one code per row), 'residual' or 'product' (``levels`` codes per row; see
            :mod:`vq_pipeline.compute.levels`), 'scalar' or 'binary' (one code per dimension:
            centroids (dim, n_codes, 1) hold each dimension's grid of values; see
            :mod:`vq_pipeline.compute.codecs`).
        settings: the fit's settings (stored under the file's ``fit`` metadata key). stats: training
            statistics. The other fields are provenance.
        rotation: None, or a (dim, dim) float32 orthogonal matrix R (residual, product and binary
            codebooks): rows are coded as ``x @ R`` and reconstructions rotated back by ``R.T``.
    """

    centroids: torch.Tensor
    counts: torch.Tensor
    metric: str
    codec: str = "flat"
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    sources: tuple[str, ...] = ()
    column: str = ""
    parent_fingerprint: str = ""
    versions: dict[str, str] = field(default_factory=library_versions)
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    timings: dict[str, Any] = field(default_factory=dict)
    rotation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InvalidInputError(f"metric={self.metric!r} is not supported; expected one of {METRICS}.")
        if self.codec not in CODECS:
            raise InvalidInputError(f"codec={self.codec!r} is not supported; expected one of {CODECS}.")
        c, n = self.centroids, self.counts
        ndim, what = (2, "(n_codes, dim)") if self.codec == "flat" else (3, "(levels, n_codes, sub_dim)")
        if not isinstance(c, torch.Tensor) or c.ndim != ndim or min(c.shape) < 1:
            raise InvalidInputError(
                f"centroids.shape={tuple(getattr(c, 'shape', ()))}; expected a non-empty {what} tensor "
                f"for codec={self.codec!r}."
            )
        if c.dtype != torch.float32:
            raise InvalidInputError(f"centroids.dtype={c.dtype}; expected torch.float32.")
        if not isinstance(n, torch.Tensor) or n.dtype != torch.int64 or tuple(n.shape) != tuple(c.shape[:-1]):
            raise InvalidInputError(
                f"counts (shape={tuple(getattr(n, 'shape', ()))}, dtype={getattr(n, 'dtype', None)}) must be an "
                f"int64 tensor of shape {tuple(c.shape[:-1])}, one count per code."
            )
        if self.codec in PER_DIMENSION_CODECS and c.shape[2] != 1:
            raise InvalidInputError(
                f"centroids.shape={tuple(c.shape)}; expected (dim, n_codes, 1) for codec={self.codec!r}: one grid of "
                f"values per dimension."
            )
        r = self.rotation
        if r is not None and not isinstance(r, torch.Tensor):
            raise InvalidInputError(f"rotation={type(r).__name__}; expected a (dim, dim) float32 tensor or None.")
        r_np = None if r is None else r.detach().cpu().numpy()
        check_settings(self.settings, metric=self.metric, codec=self.codec, shape=tuple(c.shape), rotated=r is not None)
        check_values(c.detach().cpu().numpy(), n.detach().cpu().numpy(), self.metric, self.codec, r_np)
        # Private copies: a caller mutating its tensors must not change a codebook.
        object.__setattr__(self, "centroids", c.detach().to("cpu").contiguous().clone())
        object.__setattr__(self, "counts", n.detach().to("cpu").contiguous().clone())
        if r is not None:
            object.__setattr__(self, "rotation", r.detach().to("cpu").contiguous().clone())
        object.__setattr__(self, "sources", tuple(self.sources))

    def encode(
        self,
        x: Any,
        *,
        top_k: int = 1,
        return_distances: bool = False,
        beam: int = 1,
        engine: str = "auto",
        device: str | torch.device | None = None,
        memory_budget: int | None = None,
        balance: float | None = None,
    ) -> Any:
        """Assign every row of ``x`` its nearest code(s); results come back in ``x``'s array type.

        Args:
            x: (n_rows, dim) embeddings: a torch tensor (any device), a numpy array (read-only ones
                too), or a polars Series (or one-column DataFrame) of ``Array`` or same-length ``List``
                rows; float16/bfloat16/float64/integer values are converted to float32.
            top_k: number of nearest codes per row, nearest first (flat codebooks only).
            return_distances: also return distances: squared L2 for 'l2', ``1 - cos`` for 'cosine'
                (for a multi-level codebook, to the row's reconstruction ``decode(codes)``).
            beam: residual codebooks: keep this many best partial tuples per row at every level (1:
                greedy, the default); never worse than greedy on any row. Other codecs: must be 1.
                Scalar and binary codes are computed in closed form (:mod:`vq_pipeline.compute.codecs`),
                on the rotated rows for a codebook with a rotation.
            engine: 'auto', 'keops' or 'torch'. device: None (CUDA if available), 'cpu', 'cuda'.
            memory_budget: bytes of temporaries one chunk may use (default 256 MiB).
            balance: None (each row its nearest code), or ``eps >= 0``: ``x`` is a known set of items
                whose codes (of every level) may each be used by at most ``ceil((1 + eps) * n_rows /
                n_codes)`` rows, assigned within a stated gap of the least total distance under that cap
                (:func:`vq_pipeline.compute.balanced.encode_balanced`). Flat, residual and product
                codebooks without a rotation; ``top_k`` and ``beam`` must be 1.

        Returns:
            codes, shape (n_rows,) for ``top_k=1`` else (n_rows, top_k), nearest first; with
            ``return_distances``, the pair ``(codes, distances)`` (codes first: the reverse of FAISS's
            ``(D, I)``), distances float32 of the same shape. In the type of ``x``: torch: int64 and
            float32 CPU tensors; numpy: int64 and float32 arrays; polars: Series ``code`` (Int64) and
            ``distance`` (Float32), named ``codes`` and ``distances`` of ``Array(Int64|Float32, top_k)``
            when ``top_k > 1``. Int64 whatever ``n_codes``, as numpy and torch codes are (code tables
            written by ``vq encode`` use the smallest unsigned type instead). A multi-level codebook
            gives (n_rows, levels) codes, one per level (polars: ``codes`` of ``Array(Int64, levels)``);
            scalar and binary codebooks (n_rows, dim) uint8 codes, one per dimension, unpacked
            (:meth:`pack` gives the file form; polars: ``Array(UInt8, dim)``): a byte per value, as
            FAISS's scalar quantizer returns them, where int64 would take twice the rows' own memory.
        """

        kind = array_kind(x)
        if balance is not None:
            return self._encode_balanced(x, balance, top_k, beam, return_distances, engine, device, memory_budget)
        if self.codec != "flat":
            codes, dists = encode_multilevel(
                self.centroids,
                self.codec,
                self.metric,
                x,
                top_k=top_k,
                beam=beam,
                return_distances=return_distances,
                engine=engine,
                device=device,
                memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget,
                rotation=self.rotation,
            )
            codes = like(kind, codes, name="codes")
            return (codes, like(kind, dists, name="distance")) if dists is not None else codes
        if beam != 1:
            check_int("beam", beam, minimum=1)
            raise InvalidInputError(
                f"beam={beam} with a {self.codec} codebook; beam search is for residual codebooks. Fix: pass beam=1."
            )
        out = encode(
            self.centroids,
            self.metric,
            x,
            top_k=top_k,
            return_distances=return_distances,
            engine=engine,
            device=device,
            memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget,
        )
        codes, dists = out if return_distances else (out, None)
        many = "s" if codes.ndim == 2 else ""
        codes = like(kind, codes, name=f"code{many}")
        return (codes, like(kind, dists, name=f"distance{many}")) if dists is not None else codes

    def _encode_balanced(
        self,
        x: Any,
        balance: float,
        top_k: int,
        beam: int,
        return_distances: bool,
        engine: str,
        device: str | torch.device | None,
        memory_budget: int | None,
    ) -> Any:
        """:meth:`encode` with ``balance``: capped codes of the known set ``x``."""
        if self.codec in PER_DIMENSION_CODECS or self.rotation is not None or top_k != 1 or beam != 1:
            what = (
                f"codec={self.codec!r}"
                if self.codec in PER_DIMENSION_CODECS
                else "a rotation"
                if self.rotation is not None
                else f"top_k={top_k}, beam={beam}"
            )
            raise InvalidInputError(
                f"balance={balance!r} with {what}; expected a flat, residual or product codebook without a rotation, "
                f"one code (tuple) per row (top_k=1, beam=1). Fix: drop balance, or encode with such a codebook."
            )
        kind = array_kind(x)
        codes, _ = encode_balanced(
            self.centroids,
            self.metric,
            x,
            balance,
            codec=self.codec,
            engine=engine,
            device=device,
            memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget,
        )
        name = "code" if self.codec == "flat" else "codes"
        if not return_distances:
            return like(kind, codes, name=name)
        rows = as_embeddings(x)
        if self.metric == "cosine":
            rows = normalize_rows(rows)
        decoded = (
            self.centroids[codes]
            if self.codec == "flat"
            else decode(self.centroids, self.codec, codes, metric=self.metric)
        )
        dists = reconstruction_error(rows, decoded, self.metric)  # (n_rows,) float32
        return like(kind, codes, name=name), like(kind, dists, name="distance")

    def decode(self, codes: Any) -> Any:
        """Codes back to vectors: the centroid of every code, in the array type of ``codes``.

        Args:
            codes: (n_rows,) integer codes ``0..n_codes-1``, as :meth:`encode` returns them: numpy
                array, torch tensor (any device) or polars integer Series (or one-column DataFrame);
                (n_rows, levels) for a multi-level codebook (polars: ``Array`` or ``List`` rows).

        Returns:
            (n_rows, dim) float32 reconstructions (unit rows under 'cosine'), a copy: a numpy array, a
            CPU torch tensor, or a polars Series ``embedding`` of ``Array(Float32, dim)``. Flat: the
            centroid of every code; residual: the sum of the levels' centroids; product: their
            concatenation; scalar and binary: each dimension's grid value. With a rotation R, the
            result is rotated back (``@ R.T``) before the normalization under 'cosine'.

        Raises:
            InvalidInputError: another type or shape, non-integer codes, nulls, or codes out of range.
        """
        if self.codec != "flat":
            idx = as_codes(codes, n_codes=self.n_codes, name="codes", levels=self.levels)  # (n_rows, levels)
            out = decode(self.centroids, self.codec, idx, metric=self.metric, rotation=self.rotation)  # (n_rows, dim)
            return like(array_kind(codes), out, name="embedding")
        idx = as_codes(codes, n_codes=self.n_codes, name="codes")  # (n_rows,) int64
        return like(array_kind(codes), self.centroids[idx], name="embedding")  # (n_rows, dim) float32

    def pack(self, codes: Any) -> Any:
        """Scalar and binary codes in their file form: (n_rows, dim) codes as :meth:`encode` returns them
        (numpy or torch) to (n_rows, width) uint8 in the same array type. 8-bit scalar: the codes as
        bytes (width ``dim``); 4-bit scalar: two codes per byte, the even dimension in the low nibble
        (width ``ceil(dim / 2)``); binary: numpy ``packbits`` order, the first dimension in the most
        significant bit (width ``ceil(dim / 8)``)."""
        self._check_per_dimension("pack")
        numpy_in = isinstance(codes, np.ndarray)
        idx = as_codes(codes, n_codes=self.n_codes, name="codes", levels=self.levels)  # (n_rows, dim) int64
        if self.codec == "binary":
            out = pack_bits(idx)
        elif self.n_codes == 16:
            out = pack_nibbles(idx)
        else:
            out = idx.to(torch.uint8)
        return out.numpy() if numpy_in else out

    def unpack(self, packed: Any) -> Any:
        """(n_rows, dim) uint8 codes (as :meth:`encode` returns them) of :meth:`pack`'s output (numpy or torch
        uint8), in the same array type."""
        self._check_per_dimension("unpack")
        numpy_in = isinstance(packed, np.ndarray)
        p = torch.from_numpy(np.ascontiguousarray(packed)) if numpy_in else packed
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.ndim != 2:
            raise InvalidInputError(
                f"packed (type={type(packed).__name__}, dtype={getattr(packed, 'dtype', None)}, "
                f"shape={tuple(getattr(packed, 'shape', ()))}); expected an (n_rows, width) uint8 numpy array or "
                f"torch tensor, as pack returns it. Fix: pass the packed codes."
            )
        p = p.cpu()
        if self.codec == "binary":
            out = unpack_bits(p, self.dim)
        elif self.n_codes == 16:
            out = unpack_nibbles(p, self.dim)
        else:
            if p.shape[1] != self.dim:
                raise InvalidInputError(
                    f"packed.shape[1]={p.shape[1]}; expected {self.dim} bytes per row for dim={self.dim}. "
                    f"Fix: unpack with the codebook the codes were written with."
                )
            out = p.clone()
        out = out.to(torch.uint8)
        return out.numpy() if numpy_in else out

    def _check_per_dimension(self, what: str) -> None:
        if self.codec not in PER_DIMENSION_CODECS:
            raise InvalidInputError(
                f"{what} with codec={self.codec!r}; packed codes are the file form of scalar and binary codebooks. "
                f"Fix: store the codes encode returns as they are, or fit with codec='scalar' or 'binary'."
            )

    def aligned_to(
        self,
        reference: Codebook,
        x: Any = None,
        *,
        method: str = "auto",
        engine: str = "auto",
        device: str | torch.device | None = None,
        memory_budget: int | None = None,
    ) -> Codebook:
        """This codebook with its codes renumbered to agree with ``reference``'s (the codebook it
        replaces): the same cells, so rows keep their code wherever the cells allow.

        With rows ``x`` ((n_rows, dim), torch or numpy; e.g. a sample of the training rows) the
        numbering keeps the most rows of ``x`` in their reference code; without, it pairs the
        closest centroids. What was done is recorded in ``stats["alignment"]`` (reference
        fingerprint, mapping, kept share and churn, method), and saved with the codebook. The
        centroids change order, so the fingerprint changes too. See
        :func:`vq_pipeline.compute.align.align_codebook` for the options and errors.
        """
        return align_codebook(
            self, reference, x, method=method, engine=engine, device=device, memory_budget=memory_budget
        )

    def level(self, level: int) -> Codebook:
        """Level ``level`` of a multi-level codebook as a flat codebook (its centroids and counts; the
        metric it was fitted with: the codebook's for residual level 0, else 'l2'); ``level(0)`` of a
        flat codebook is the codebook itself. Of a codebook with a rotation, the level codes rotated
        rows (``x @ codebook.rotation``); of a scalar or binary codebook, level ``d`` is dimension
        ``d``'s grid as a one-wide flat codebook."""
        level = check_int("level", level, minimum=0, maximum=self.levels - 1, hint=f"the codebook has {self.levels}.")
        if self.codec == "flat":
            return self
        metric = self.metric if (self.codec == "residual" and level == 0) else "l2"
        settings = self.settings
        if isinstance(settings, dict):  # the level's own structure: flat, its metric and width
            settings = {k: v for k, v in settings.items() if k not in MULTI_LEVEL_SETTINGS}
            settings.update((k, v) for k, v in (("metric", metric), ("dim", self.centroids.shape[-1])) if k in settings)
        return Codebook(
            centroids=self.centroids[level],
            counts=self.counts[level],
            metric=metric,
            settings=settings,
            stats=dict(self.stats.get("levels", [{}] * self.levels)[level]),
            data_fingerprint=self.data_fingerprint,
            sources=self.sources,
            column=self.column,
            versions=self.versions,
            created_at=self.created_at,
        )

    # ----------------------------------------------------------------- file format

    def to_metadata(self) -> dict[str, str]:
        """The safetensors string metadata of this codebook."""

        def js(value: Any) -> str:
            return json.dumps(value, sort_keys=True, separators=(",", ":"))

        multi = {} if self.codec == "flat" else {"codec": self.codec, "levels": str(self.levels)}
        if self.rotation is not None or self.codec in PER_DIMENSION_CODECS:
            version = FORMAT_VERSION
        else:
            version = MULTI_LEVEL_FORMAT_VERSION if multi else FLAT_FORMAT_VERSION
        return {
            "format": FORMAT_NAME,
            "format_version": version,
            **multi,
            "metric": self.metric,
            "n_codes": str(self.n_codes),
            "dim": str(self.dim),
            "dtype": "float32",
            "fit": js(self.settings),
            "stats": js(self.stats),
            "data_fingerprint": self.data_fingerprint,
            "sources": js(list(self.sources)),
            "column": self.column,
            "parent_fingerprint": self.parent_fingerprint,
            "versions": js(self.versions),
            "created_at": self.created_at,
            "timings": js(self.timings),
        }

    def to_bytes(self) -> bytes:
        """Serialize to safetensors bytes with a deterministic (sorted) header."""
        rotation = None if self.rotation is None else self.rotation.numpy()
        return write_codebook_bytes(self.to_metadata(), self.centroids.numpy(), self.counts.numpy(), rotation)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the codebook atomically to ``path`` (temporary file, fsync, rename) and return it."""
        return atomic_write_bytes(Path(path), self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<bytes>", metric: str | None = None) -> Codebook:
        """Parse and validate codebook bytes; see :meth:`load`."""
        meta, arrays = read_codebook_bytes(data, source)
        if metric is not None and metric != meta["metric"]:
            raise InvalidInputError(
                f"metric={metric!r} was requested but {source} holds a metric={meta['metric']!r} codebook. "
                f"Fix: request metric={meta['metric']!r}, or fit a {metric!r} codebook."
            )
        fields = provenance_fields(meta, source)
        try:
            shape = tuple(arrays["centroids"].shape)
            rotation = arrays.get("rotation")
            check_settings(
                fields["settings"],
                metric=fields["metric"],
                codec=fields["codec"],
                shape=shape,
                name="metadata fit",
                rotated=rotation is not None,
            )
            return cls(
                centroids=torch.from_numpy(arrays["centroids"]),
                counts=torch.from_numpy(arrays["counts"]),
                rotation=None if rotation is None else torch.from_numpy(rotation),
                **fields,
            )
        except InvalidInputError as exc:
            raise CodebookFileError(f"{source} is not a valid codebook: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, metric: str | None = None) -> Codebook:
        """Read and validate a codebook file.

        Args:
            path: a ``.safetensors`` file written by :meth:`save`.
            metric: if given, refuse a codebook of another metric.

        Raises:
            CodebookFileError: missing paths, folders, devices and FIFOs; truncated, overlong,
                corrupt, pickled or random files; lying headers, deeply nested or wrongly typed
                metadata; more than ``MAX_LEVELS`` levels (residual, product); fit settings that
                contradict the file; a rotation that is not a finite orthogonal (dim, dim) matrix, or
                one on a flat or scalar codebook or in a 1.0/1.1 file; scalar grids that do not
                increase, binary grids with a negative scale;
                NaN centroids, or centroids (residual: sums of levels) whose squared norms exceed
                ``MAX_SQUARED_NORM``; negative counts, or counts of a level summing above
                ``MAX_TRAINING_ROWS``. UnsupportedFormatError: another format or an unknown major
                version.
            InvalidInputError: ``metric`` differs from the file's.
        """
        data, source = read_file(path)
        return cls.from_bytes(data, source=source, metric=metric)


def tensor_fingerprint(x: torch.Tensor) -> str:
    """sha256 of a (n_rows, dim) float32 tensor's shape and bytes, hashed in bounded slices."""
    h = hashlib.sha256(f"float32|{tuple(x.shape)}|".encode())
    rows = max(1, (64 * 2**20) // max(1, x.shape[1] * 4))
    for start in range(0, x.shape[0], rows):
        # hashed through the buffer protocol: no copy of a slice that is already contiguous little-endian
        h.update(np.ascontiguousarray(x[start : start + rows].detach().cpu().numpy(), dtype="<f4").data)
    return h.hexdigest()
