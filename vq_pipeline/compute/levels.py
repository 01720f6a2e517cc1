"""Multi-level codes: what each level quantizes, and encoding and decoding through all levels.

A multi-level codebook holds ``levels`` flat codebooks of ``n_codes`` centroids each, stacked as one
(levels, n_codes, sub_dim) tensor:

* ``residual``: every level has the full width (``sub_dim == dim``); level ``l`` quantizes what
  levels ``0..l-1`` leave, ``x - (c_0[k_0] + ... + c_{l-1}[k_{l-1}])``. A row's codes are a
  coarse-to-fine tuple (semantic ids). Level 0 uses the codebook's metric (unit centroids under
  cosine); later levels quantize residuals in squared L2.
* ``product``: level ``l`` quantizes the contiguous slice ``[l * sub_dim, (l + 1) * sub_dim)`` of the
  dimensions (``dim == levels * sub_dim``), in squared L2.
* ``scalar`` and ``binary``: one level per dimension (``sub_dim == 1``, ``levels == dim``), each a fixed
  grid of values (:mod:`vq_pipeline.compute.codecs`), coded in closed form.

Under cosine, rows are L2-normalized first and :func:`decode` returns unit vectors. A codebook with a
``rotation`` R codes the rotated rows ``z = x @ R`` (after the normalization); :func:`decode` rotates
reconstructions back (``z_hat @ R.T``), then normalizes. Distances are measured on the rotated rows.

:class:`RowMap` turns a row into what one level quantizes, so that every level is fitted by the same
Lloyd over the same data sources as a flat codebook: residuals and slices are computed per batch and
never written out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vq_pipeline.compute.assign import nearest_in_chunks, plan_chunk_rows
from vq_pipeline.compute.codecs import binary_encode, grid_decode, rotate_rows, scalar_encode, unrotate_rows
from vq_pipeline.compute.engines import Engine, get_engine
from vq_pipeline.errors import DimensionMismatchError, InvalidInputError
from vq_pipeline.validate import (
    as_embeddings,
    check_beam,
    check_int,
    check_nonzero_rows,
    normalize_rows,
    resolve_device,
)

#: The multi-level codecs (``flat`` is one level, no map).
MULTI_LEVEL_CODECS = ("residual", "product", "scalar", "binary")
#: Codecs whose levels are contiguous slices of the dimensions (scalar, binary: one-wide slices).
SLICED_CODECS = ("product", "scalar", "binary")


@dataclass(frozen=True, eq=False)
class RowMap:
    """What one level of a multi-level codebook sees of a row.

    ``kind='slice'``: the columns ``[start, stop)`` of rows of width ``in_dim``. ``kind='residual'``:
    the row minus its greedy reconstruction by ``prefix``, the (n_prefix, n_codes, in_dim) float32
    centroids of the levels before. With a (in_dim, in_dim) ``rotation``, rows are rotated first
    (``x @ rotation``) and the slice or residual taken of the rotated rows.
    """

    kind: str
    in_dim: int
    start: int = 0
    stop: int = 0
    prefix: torch.Tensor | None = None
    engine: str = "auto"
    memory_budget: int = 256 * 2**20
    #: residual: the rows of the ``beam`` best partial tuples of the prefix (1: the greedy one)
    beam: int = 1
    #: (in_dim, in_dim) float32 orthogonal matrix applied to rows first (None: none)
    rotation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        r = self.rotation
        if r is not None:
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != (self.in_dim, self.in_dim):
                raise InvalidInputError(
                    f"rotation.shape={tuple(getattr(r, 'shape', ()))}; expected ({self.in_dim}, {self.in_dim}) "
                    f"for rows of width in_dim={self.in_dim}. Fix: pass the codebook's rotation."
                )
            object.__setattr__(self, "rotation", r.detach().to("cpu", torch.float32).contiguous())

    @classmethod
    def columns(cls, start: int, stop: int, in_dim: int, *, rotation: torch.Tensor | None = None) -> RowMap:
        return cls("slice", in_dim, start=start, stop=stop, rotation=rotation)

    @classmethod
    def residual(
        cls,
        prefix: torch.Tensor,
        *,
        beam: int = 1,
        engine: str = "auto",
        memory_budget: int = 256 * 2**20,
        rotation: torch.Tensor | None = None,
    ) -> RowMap:
        p = prefix.detach().to("cpu", torch.float32)
        return cls(
            "residual",
            int(p.shape[2]),
            prefix=p,
            engine=engine,
            memory_budget=memory_budget,
            beam=beam,
            rotation=rotation,
        )

    def out_dim(self, dim: int) -> int:
        return self.stop - self.start if self.kind == "slice" else dim

    @property
    def expansion(self) -> int:
        """Rows out per row in: the beam's width (1 for slices and greedy residuals)."""
        if self.kind != "residual" or self.beam <= 1 or self.prefix is None:
            return 1
        return beam_width(self.beam, int(self.prefix.shape[1]), int(self.prefix.shape[0]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) float32 rows -> (n, out_dim) float32 on the same device."""
        return self.of_rotated(rotate_rows(x, self.rotation))

    def of_rotated(self, x: torch.Tensor) -> torch.Tensor:
        """What this map gives of rows already rotated by its rotation (``x @ rotation``): levels that
        share a rotation and a pass rotate each batch once (:func:`vq_pipeline.compute.data.e_steps`)."""
        if self.kind == "slice":
            return x[:, self.start : self.stop].contiguous()
        assert self.prefix is not None
        if self.expansion > 1:
            return beam_residuals(x, self.prefix, self.beam, memory_budget=self.memory_budget)
        _, residual = greedy_residual(x, self.prefix, engine=self.engine, memory_budget=self.memory_budget)
        return residual

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a worker (``np.savez``; no pickles)."""
        prefix = np.zeros((0, 0, 0), np.float32) if self.prefix is None else self.prefix.numpy()
        rotation = np.zeros((0, 0), np.float32) if self.rotation is None else self.rotation.numpy()
        return {
            "rotation": rotation,
            "kind": np.array(self.kind),
            "bounds": np.array([self.in_dim, self.start, self.stop], np.int64),
            "prefix": prefix,
            "engine": np.array(self.engine),
            "memory_budget": np.array(self.memory_budget, np.int64),
            "beam": np.array(self.beam, np.int64),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> RowMap:
        kind = str(a["kind"])
        if kind not in ("slice", "residual"):
            raise InvalidInputError(f"row map kind={kind!r}; expected 'slice' or 'residual'.")
        in_dim, start, stop = (int(v) for v in a["bounds"])
        prefix = torch.from_numpy(np.array(a["prefix"], np.float32)) if kind == "residual" else None
        beam = int(a["beam"]) if "beam" in a else 1
        r = np.array(a["rotation"], np.float32) if "rotation" in a else np.zeros((0, 0), np.float32)
        rotation = torch.from_numpy(r) if r.size else None
        return cls(kind, in_dim, start, stop, prefix, str(a["engine"]), int(a["memory_budget"]), beam, rotation)


def _engine_for(x: torch.Tensor, n_codes: int, dim: int, k: int, engine: str, memory_budget: int) -> tuple[Engine, int]:
    eng = get_engine(engine, x.device, dim)
    return eng, plan_chunk_rows(x.shape[0], n_codes, dim, k=k, engine=eng, memory_budget=memory_budget)


def greedy_residual(
    x: torch.Tensor, centroids: torch.Tensor, *, engine: str = "auto", memory_budget: int = 256 * 2**20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual encoding: at each level the nearest code of what the levels before left.

    Args:
        x: (n, dim) float32 rows (unit rows under cosine), any device.
        centroids: (levels, n_codes, dim) float32.

    Returns:
        codes (n, levels) int64 and the final residual (n, dim) float32, on ``x``'s device.
    """
    n_levels, n_codes, dim = centroids.shape
    residual = x.to(torch.float32).clone()  # (n, dim)
    codes = torch.empty((x.shape[0], n_levels), dtype=torch.int64, device=x.device)  # (n, levels)
    if x.shape[0] == 0:
        return codes, residual
    c_all = centroids.to(x.device, torch.float32)
    eng, chunk = _engine_for(x, n_codes, dim, 1, engine, memory_budget)
    for level in range(n_levels):
        c = c_all[level].contiguous()  # (n_codes, dim)
        for rows, _, _, idx in nearest_in_chunks(residual, c, k=1, engine=eng, chunk_rows=chunk, distances=False):
            codes[rows, level] = idx[:, 0].to(x.device)
        residual -= c[codes[:, level]]
    return codes, residual


def _beam_rows(memory_budget: int, beam: int, n_codes: int, dim: int) -> int:
    """Rows per chunk of a beam search: each holds ``beam`` residuals, ``beam * n_codes`` scores and
    ``beam**2`` candidates."""
    per_row = 4 * beam * (2 * dim + n_codes + 2 * beam) + 64
    return max(1, memory_budget // per_row)


def _beam_chunk(xb: torch.Tensor, c_all: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the levels ``c_all`` (levels, n_codes, dim) for the rows ``xb`` (n, dim).

    Returns:
        tuples (n, b, levels) int64 and their residuals (n, b, dim) float32, ``b = min(beam, ...)``
        partial tuples per row, best first by the squared norm of what they leave. Candidates are
        ranked by ``|r|^2 + |c|^2 - 2 r.c`` (a product: a heuristic search, so no exactness proof).
    """
    n, dim = xb.shape
    res = xb[:, None, :].clone()  # (n, b, dim)
    tuples = torch.zeros((n, 1, 0), dtype=torch.int64, device=xb.device)  # (n, b, level)
    for c in c_all:  # c: (n_codes, dim)
        b = res.shape[1]
        flat = res.reshape(n * b, dim)  # (n*b, dim)
        scores = torch.addmm((c * c).sum(dim=1)[None, :], flat, c.T, alpha=-2.0)  # (n*b, n_codes)
        scores += flat.square().sum(dim=1, keepdim=True)
        k = min(beam, c.shape[0])
        top = scores.topk(k, dim=1, largest=False, sorted=True)  # (n*b, k) each
        cand = top.values.reshape(n, b * k)  # (n, b*k) every extension's error
        keep = cand.topk(min(beam, b * k), dim=1, largest=False, sorted=True).indices  # (n, b')
        parent, child = keep // k, top.indices.reshape(n, b * k).gather(1, keep)  # (n, b'), (n, b')
        tuples = torch.cat([tuples.gather(1, parent[:, :, None].expand(-1, -1, tuples.shape[2])), child[:, :, None]], 2)
        res = res.gather(1, parent[:, :, None].expand(-1, -1, dim)) - c[child]  # (n, b', dim)
    return tuples, res


def beam_residual(
    x: torch.Tensor,
    centroids: torch.Tensor,
    beam: int,
    *,
    engine: str = "auto",
    memory_budget: int = 256 * 2**20,
) -> torch.Tensor:
    """Residual encoding by beam search: keep the ``beam`` best partial tuples per row at every level
    (by the squared norm of what they leave), then the best full tuple by its exact residual norm;
    never worse than greedy on any row (the greedy tuple is kept unless another is strictly better).

    Args:
        x: (n, dim) float32 rows. centroids: (levels, n_codes, dim) float32.

    Returns:
        (n, levels) int64 codes on ``x``'s device.
    """
    n_levels, n_codes, dim = centroids.shape
    greedy, g_res = greedy_residual(x, centroids, engine=engine, memory_budget=memory_budget)
    if min(beam, n_codes) <= 1 or x.shape[0] == 0:
        return greedy
    c_all = centroids.to(x.device, torch.float32)
    step = _beam_rows(memory_budget, beam, n_codes, dim)
    out = greedy.clone()
    for a in range(0, x.shape[0], step):
        xb = x[a : a + step].to(torch.float32)  # (n, dim)
        tuples, res = _beam_chunk(xb, c_all, beam)  # (n, b, levels), (n, b, dim)
        final = res.square().sum(dim=2)  # (n, b)
        best = final.argmin(dim=1)  # (n,)
        better = final.gather(1, best[:, None])[:, 0] < g_res[a : a + step].square().sum(dim=1)  # (n,)
        chosen = tuples[torch.arange(xb.shape[0], device=x.device), best]  # (n, levels)
        out[a : a + step][better] = chosen[better]
    return out


def beam_residuals(x: torch.Tensor, prefix: torch.Tensor, beam: int, *, memory_budget: int) -> torch.Tensor:
    """What the ``beam`` best partial tuples of ``prefix`` (n_prefix, n_codes, dim) leave of each row
    of ``x`` (n, dim): (n * b, dim) float32, each row's ``b = beam_width(beam, n_codes, n_prefix)``
    residuals in a block, best first. Training a residual level on these (as FAISS's residual
    quantizer does with its beam) makes it serve beam-search encoding, and gives it more rows."""
    n_prefix, n_codes, dim = prefix.shape
    c_all = prefix.to(x.device, torch.float32)
    b = beam_width(beam, n_codes, n_prefix)
    out = torch.empty((x.shape[0], b, dim), dtype=torch.float32, device=x.device)
    step = _beam_rows(memory_budget, beam, n_codes, dim)
    for a in range(0, x.shape[0], step):
        out[a : a + step] = _beam_chunk(x[a : a + step].to(torch.float32), c_all, beam)[1]
    return out.reshape(x.shape[0] * b, dim)


def beam_width(beam: int, n_codes: int, n_prefix: int) -> int:
    """Partial tuples a beam search keeps after ``n_prefix`` levels of ``n_codes`` codes."""
    width = 1
    for _ in range(n_prefix):
        width = min(beam, width * n_codes)
    return width


def decode(
    centroids: torch.Tensor, codec: str, codes: torch.Tensor, *, metric: str, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes back to vectors.

    Args:
        centroids: (levels, n_codes, sub_dim) float32. codes: (n, levels) int64, in range.
        rotation: the codebook's (dim, dim) rotation R, or None.

    Returns:
        (n, dim) float32: the sum of the levels' centroids (residual), their concatenation (product),
        each dimension's grid value (scalar, binary); rotated back by ``R.T`` when there is a rotation;
        L2-normalized under cosine (a zero sum stays zero).
    """
    if codec in ("scalar", "binary"):
        out = grid_decode(centroids, codes)
    else:
        n_levels = centroids.shape[0]
        parts = [centroids[level][codes[:, level]] for level in range(n_levels)]  # levels x (n, sub_dim)
        if codec == "product":
            out = torch.cat(parts, dim=1) if parts else torch.empty(0)
        else:
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
    out = unrotate_rows(out, rotation)
    if metric == "cosine":
        norms = torch.linalg.vector_norm(out, dim=1, keepdim=True)  # (n, 1)
        out = out / torch.where(norms > 0, norms, torch.ones_like(norms))
    return out


def encode_levels(
    x: torch.Tensor,
    centroids: torch.Tensor,
    codec: str,
    *,
    beam: int = 1,
    engine: str = "auto",
    memory_budget: int = 256 * 2**20,
) -> torch.Tensor:
    """(n, levels) int64 codes (uint8 for scalar and binary) of (n, dim) float32 rows (unit rows under
    cosine; rotated rows for a rotated codebook), on ``x``'s device: greedy or beam search for
    residual, exact per slice for product, the closed forms of :mod:`vq_pipeline.compute.codecs` for
    scalar and binary."""
    n_levels, n_codes, sub = centroids.shape
    if codec == "scalar":
        return scalar_encode(x, centroids)
    if codec == "binary":
        return binary_encode(x, centroids)
    if codec == "residual":
        if beam > 1:
            return beam_residual(x, centroids, beam, engine=engine, memory_budget=memory_budget)
        return greedy_residual(x, centroids, engine=engine, memory_budget=memory_budget)[0]
    codes = torch.empty((x.shape[0], n_levels), dtype=torch.int64, device=x.device)
    if x.shape[0] == 0:
        return codes
    c_all = centroids.to(x.device, torch.float32)
    eng, chunk = _engine_for(x, n_codes, sub, 1, engine, memory_budget)
    for level in range(n_levels):
        xs = x[:, level * sub : (level + 1) * sub]  # (n, sub) view; chunks are made contiguous
        for rows, _, _, idx in nearest_in_chunks(
            xs, c_all[level].contiguous(), k=1, engine=eng, chunk_rows=chunk, distances=False
        ):
            codes[rows, level] = idx[:, 0].to(x.device)
    return codes


def reconstruction_error(x: torch.Tensor, decoded: torch.Tensor, metric: str) -> torch.Tensor:
    """(n,) distances of rows ``x`` (n, dim) to their reconstructions ``decoded`` (n, dim), in ``x``'s
    dtype: squared L2, or under cosine (unit rows, unit or zero reconstructions) ``1 - cos``, which is
    half their squared distance (``|a - b|^2 = 2 (1 - cos)`` for unit ``a``, ``b``; ``1`` for a zero
    reconstruction). The one objective of a codebook: flat and multi-level, fit statistics and encode."""
    d = (x - decoded).square().sum(dim=1)
    return d * 0.5 if metric == "cosine" else d


def check_product_dim(dim: int, levels: int) -> int:
    """The slice width of a product codebook; a clear error when ``dim`` does not split evenly."""
    if dim % levels:
        divisors = [d for d in range(1, min(dim, 64) + 1) if dim % d == 0]
        raise InvalidInputError(
            f"levels={levels} does not divide dim={dim}; the product codec splits the dimensions into "
            f"levels equal contiguous slices. Fix: pick levels from the divisors of {dim} "
            f"({', '.join(map(str, divisors))}), or use codec='residual'."
        )
    return dim // levels


#: Rows per batch of the multi-level encode and of a multi-level fit's statistics pass.
ENCODE_BATCH_ROWS = 65_536


def encode_multilevel(
    centroids: torch.Tensor,
    codec: str,
    metric: str,
    x: Any,
    *,
    top_k: int = 1,
    beam: int = 1,
    return_distances: bool = False,
    engine: str = "auto",
    device: Any = None,
    memory_budget: int,
    name: str = "x",
    row_offset: int = 0,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (n_rows, levels) int64 codes (uint8 for scalar and binary codebooks) of ``x`` (CPU) under the
    (levels, n_codes, sub_dim) float32 ``centroids`` of a ``codec`` codebook, and with
    ``return_distances`` the (n_rows,) float32 distance of each row to its reconstruction (squared L2;
    ``1 - cos`` under cosine); the work behind a multi-level :meth:`Codebook.encode`. ``name``,
    ``row_offset``: how error messages name ``x`` and number its rows (a table batch: the column's name
    and the batch's first row in the table). ``rotation``: the codebook's (dim, dim) rotation R: rows
    are coded as ``x @ R`` (after the normalization under cosine), and distances measured between
    those and their reconstructions."""
    n_levels, n_codes, sub = centroids.shape
    dim = sub * n_levels if codec in SLICED_CODECS else sub
    if rotation is not None and tuple(rotation.shape) != (dim, dim):
        raise InvalidInputError(
            f"rotation.shape={tuple(rotation.shape)}; expected ({dim}, {dim}) for a codebook of dim={dim}. "
            f"Fix: pass the codebook's own rotation."
        )
    if top_k != 1:
        raise InvalidInputError(
            f"top_k={top_k} with a {codec} codebook; expected top_k=1 (one tuple of codes per row). "
            f"Fix: pass top_k=1, or search one level with codebook.level(l).encode(x, top_k={top_k})."
        )
    beam = check_int("beam", beam, minimum=1)
    if codec == "residual":
        beam = check_beam("beam", beam, n_codes=n_codes, levels=n_levels)
    elif beam > 1:
        raise InvalidInputError(
            f"beam={beam} with a {codec} codebook; beam search is for residual codebooks (each {codec} "
            f"level is already exact). Fix: pass beam=1."
        )
    check_int("memory_budget", memory_budget, minimum=1)
    x = as_embeddings(x, name=name, row_offset=row_offset)
    if x.shape[1] != dim:
        raise DimensionMismatchError(
            f"{name}.shape[1]={x.shape[1]} but the codebook has dim={dim}; expected embeddings of width "
            f"{dim}. Fix: encode with the codebook fitted on this embedding model, or refit."
        )
    if metric == "cosine":
        check_nonzero_rows(x, name=name, row_offset=row_offset)
    dev = resolve_device(device, x)
    c = centroids.to(dev)
    r = None if rotation is None else rotation.to(dev, torch.float32)
    per_dim = codec in ("scalar", "binary")  # codes < 256: bytes, as their file form stores them
    codes = torch.empty((x.shape[0], n_levels), dtype=torch.uint8 if per_dim else torch.int64)
    dists = torch.empty(x.shape[0], dtype=torch.float32) if return_distances else None
    for a in range(0, x.shape[0], ENCODE_BATCH_ROWS):
        xb = x[a : a + ENCODE_BATCH_ROWS].to(dev, torch.float32)
        if metric == "cosine":
            xb = normalize_rows(xb)
        xb = rotate_rows(xb, r)
        cb = encode_levels(xb, c, codec, beam=beam, engine=engine, memory_budget=memory_budget)
        codes[a : a + xb.shape[0]] = cb.cpu()
        if dists is not None:
            dists[a : a + xb.shape[0]] = reconstruction_error(xb, decode(c, codec, cb, metric=metric), metric).cpu()
    return codes, dists


__all__ = [
    "MULTI_LEVEL_CODECS",
    "RowMap",
    "SLICED_CODECS",
    "beam_residual",
    "beam_residuals",
    "beam_width",
    "check_product_dim",
    "decode",
    "encode_multilevel",
    "encode_levels",
    "greedy_residual",
    "reconstruction_error",
]
