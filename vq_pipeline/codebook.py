"""The Codebook value object and its file format: one self-describing safetensors file.

File layout (safetensors: an 8-byte little-endian header length, a JSON header, raw tensor bytes)::

    centroids   F32 (n_codes, dim)    the codes' vectors; unit rows under the cosine metric
                    (levels, n_codes, sub_dim) for a multi-level codebook (see vq_pipeline.compute.levels)
    counts      I64 (n_codes,)        training rows assigned to each code by the final E step
                    (levels, n_codes) for a multi-level codebook
    __metadata__ (str -> str; nested values are JSON):
        format              "vq-pipeline.codebook"
        format_version      "1.0" for flat codebooks, "1.1" for multi-level ones (a reader refuses a
                            major version it does not know; 1.1 readers read every 1.0 file)
        metric, n_codes, dim, dtype
        codec, levels       multi-level codebooks only: "residual" or "product", and codes per row
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
in at most ``MAX_LEVELS`` passes; fit settings whose ``codec``, ``levels``, ``n_codes``, ``dim`` or
``metric`` contradict the file are refused; centroids (and a residual codebook's partial sums of
levels, bounded by the sum of each level's largest norm) must have squared norms of at most
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
from vq_pipeline.compute.levels import decode, encode_multilevel
from vq_pipeline.errors import CodebookFileError, InvalidInputError
from vq_pipeline.io.codebook_file import (
    FLAT_FORMAT_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
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
from vq_pipeline.settings import CODECS, METRICS
from vq_pipeline.validate import check_int

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
            :mod:`vq_pipeline.compute.levels`).
        settings: the fit's settings (stored under the file's ``fit`` metadata key). stats: training
            statistics. The other fields are provenance.
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
        check_settings(self.settings, metric=self.metric, codec=self.codec, shape=tuple(c.shape))
        check_values(c.detach().cpu().numpy(), n.detach().cpu().numpy(), self.metric, self.codec)
        # Private copies: a caller mutating its tensors must not change a codebook.
        object.__setattr__(self, "centroids", c.detach().to("cpu").contiguous().clone())
        object.__setattr__(self, "counts", n.detach().to("cpu").contiguous().clone())
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
            engine: 'auto', 'keops' or 'torch'. device: None (CUDA if available), 'cpu', 'cuda'.
            memory_budget: bytes of temporaries one chunk may use (default 256 MiB).

        Returns:
            codes, shape (n_rows,) for ``top_k=1`` else (n_rows, top_k), nearest first; with
            ``return_distances``, the pair ``(codes, distances)`` (codes first: the reverse of FAISS's
            ``(D, I)``), distances float32 of the same shape. In the type of ``x``: torch: int64 and
            float32 CPU tensors; numpy: int64 and float32 arrays; polars: Series ``code`` (Int64) and
            ``distance`` (Float32), named ``codes`` and ``distances`` of ``Array(Int64|Float32, top_k)``
            when ``top_k > 1``. Int64 whatever ``n_codes``, as numpy and torch codes are (code tables
            written by ``vq encode`` use the smallest unsigned type instead). A multi-level codebook
            gives (n_rows, levels) codes, one per level (polars: ``codes`` of ``Array(Int64, levels)``).
        """

        kind = array_kind(x)
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
            concatenation.

        Raises:
            InvalidInputError: another type or shape, non-integer codes, nulls, or codes out of range.
        """
        if self.codec != "flat":
            idx = as_codes(codes, n_codes=self.n_codes, name="codes", levels=self.levels)  # (n_rows, levels)
            out = decode(self.centroids, self.codec, idx, metric=self.metric)  # (n_rows, dim) float32
            return like(array_kind(codes), out, name="embedding")
        idx = as_codes(codes, n_codes=self.n_codes, name="codes")  # (n_rows,) int64
        return like(array_kind(codes), self.centroids[idx], name="embedding")  # (n_rows, dim) float32

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
        flat codebook is the codebook itself."""
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
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if multi else FLAT_FORMAT_VERSION,
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
        return write_codebook_bytes(self.to_metadata(), self.centroids.numpy(), self.counts.numpy())

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
            check_settings(
                fields["settings"], metric=fields["metric"], codec=fields["codec"], shape=shape, name="metadata fit"
            )
            return cls(
                centroids=torch.from_numpy(arrays["centroids"]),
                counts=torch.from_numpy(arrays["counts"]),
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
                metadata; more than ``MAX_LEVELS`` levels; fit settings that contradict the file;
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
