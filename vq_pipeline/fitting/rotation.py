"""Rotations learned before rows are quantized: OPQ for product and residual codes, ITQ for binary codes.

Both alternate two exact minimizations of one squared error, so the error never rises from one round
to the next (up to float rounding):

* OPQ (Ge et al. 2013; FAISS's ``OPQMatrix``): with the rows ``X`` and an orthogonal ``R``, fit the
  codes of ``Z = X R`` for a few Lloyd iterations (warm-started from the previous round's centroids),
  then set ``R = procrustes(X^T Y)``, ``Y`` the decoded codes: the orthogonal ``R`` closest to mapping
  the rows onto their reconstructions. Error: ``|X R - Y|^2``.
* ITQ (Gong and Lazebnik 2011): with centred rows ``Z``, ``B = sign(Z R)`` (+1 where ``Z R > 0``, else
  -1, as :func:`vq_pipeline.compute.codecs.binary_encode` decides), then ``R = procrustes(Z^T B)``.
  Error: ``|B - Z R|^2``.

Both run on a seeded sample of the training rows held in memory (:func:`rotation_sample`); the codes
are then fitted over all rows through the learned rotation. The statistics ``X^T Y`` and ``Z^T B`` are
sums over rows (:func:`vq_pipeline.compute.codecs.procrustes` takes them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vq_pipeline.compute.codecs import procrustes, random_rotation
from vq_pipeline.compute.data import DataSource
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.fitting.options import FitOptions

#: A rotation is learned on at most ``max(ROTATION_SAMPLE_ROWS, SAMPLE_ROWS_PER_CODE * n_codes)`` rows
#: (FAISS's OPQ trains on at most 65,536).
ROTATION_SAMPLE_ROWS = 65_536
SAMPLE_ROWS_PER_CODE = 256
#: Mixed into the seed of the rotation's sample, so that it is not the stream seeding draws from.
ROTATION_STREAM = 0x726F74
#: OPQ: Lloyd iterations of the first round's codes (from seeded random rows), and of every later round.
OPQ_FIRST_ITERS = 8
OPQ_ROUND_ITERS = 2
#: Bytes of the (levels, rows, n_codes) distance block of one chunk of OPQ's assignment.
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class LearnedRotation:
    """What a learned rotation's rounds leave.

    Attributes:
        rotation: (dim, dim) float32 CPU orthogonal matrix; rows are rotated as ``x @ rotation``.
        centroids: OPQ: the last round's (levels, n_codes, sub_dim) float32 CPU centroids, fitted on the
            sample rotated by the rotation before the last (a warm start for the codes over all rows);
            None for ITQ.
        losses: the mean squared error of the sample after each round (OPQ: ``|X R - Y|^2 / n``; ITQ:
            ``|B - Z R|^2 / n``), first the one of the starting rotation.
    """

    rotation: torch.Tensor
    centroids: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)


def rotation_rows(n_rows: int, n_codes: int) -> int:
    """How many of ``n_rows`` training rows a rotation is learned on."""
    return min(n_rows, max(ROTATION_SAMPLE_ROWS, SAMPLE_ROWS_PER_CODE * n_codes))


def rotation_sample(source: DataSource, n: int, seed: int, *, stream: int = ROTATION_STREAM) -> torch.Tensor:
    """(min(n, n_rows), dim) float32 rows of ``source`` in row order: a uniform sample of distinct rows
    drawn by ``numpy.random.default_rng([seed, stream])``, the same rows whether the source holds them
    in memory or reads them from tables (all rows when ``n >= n_rows``)."""
    x = source.sample(n, np.random.default_rng([seed, stream]))
    if x.shape[0] > n:  # a source in memory returns all its rows: draw the same positions here
        positions = np.sort(np.random.default_rng([seed, stream]).choice(x.shape[0], size=n, replace=False))
        x = x[torch.from_numpy(positions).to(x.device)]
    return x.to(torch.float32)


def source_rotation(source: DataSource, opts: FitOptions) -> tuple[torch.Tensor | None, LearnedRotation | None, dict]:
    """The rotation of a product or residual fit over ``source`` under ``opts.rotation``: None for
    'none', the seeded random one for 'random', OPQ on a seeded sample of :func:`rotation_rows` rows for
    'opq'. Returns (the (dim, dim) float32 rotation or None, what OPQ learned or None, the statistics
    the codebook records: ``rotation_rows``, ``rotation_losses``, ``rotation_seconds``)."""
    if opts.rotation == "none":
        return None, None, {}
    if opts.rotation == "random":
        return random_rotation(source.dim, opts.seed), None, {}
    if opts.rotation != "opq":
        raise InvalidInputError(
            f"rotation={opts.rotation!r} with codec={opts.codec!r}; expected 'none', 'random' or 'opq'. "
            f"Fix: pass rotation='opq' (learned with the codes) or 'random'."
        )
    t0 = time.perf_counter()
    sample = rotation_sample(source, rotation_rows(source.n_rows, opts.n_codes), opts.seed)
    learned = opq(sample, opts)
    stats = {
        "rotation_rows": int(sample.shape[0]),
        "rotation_losses": learned.losses,
        "rotation_seconds": time.perf_counter() - t0,
    }
    return learned.rotation, learned, stats


def learn_opq(sample: torch.Tensor, opts: FitOptions) -> torch.Tensor:
    """The (dim, dim) float32 OPQ rotation of ``opts.codec`` ('product' or 'residual') codes of
    ``opts.levels`` levels of ``opts.n_codes`` codes, learned on ``sample`` in ``opts.rotation_iters``
    rounds (:func:`opq`)."""
    return opq(sample, opts).rotation


def opq(sample: torch.Tensor, opts: FitOptions) -> LearnedRotation:
    """OPQ on ``sample`` (n, dim) float32 (unit rows under cosine): from a starting rotation (product
    codes: :func:`balanced_pca`; residual codes: a seeded random rotation), the codes of the rotated
    rows are fitted for :data:`OPQ_FIRST_ITERS` Lloyd iterations from seeded random rows, then every
    round refits them for :data:`OPQ_ROUND_ITERS` iterations from the previous round's
    centroids and solves the rotation (Procrustes); ``opts.rotation_iters`` rounds.

    Product codes: each level's K-means on its slice of the rotated rows (all levels in one batched
    computation). Residual codes: the levels one after the other on what the levels before leave.
    Empty codes keep their centroid within the rounds (the fit over all rows repairs them)."""
    if opts.codec not in ("product", "residual"):
        raise InvalidInputError(
            f"codec={opts.codec!r} with rotation='opq'; expected codec 'product' or 'residual'. "
            f"Fix: pass codec='product' (or 'residual'), or rotation='random'."
        )
    x = sample.to(opts.device, torch.float32).contiguous()
    n, dim = x.shape
    n_levels, n_codes = opts.levels, opts.n_codes
    if n < n_codes:
        raise InvalidInputError(
            f"the rotation's sample has n_rows={n} rows; expected at least n_codes={n_codes}. "
            f"Fix: fit on more rows, or pass fewer n_codes."
        )
    sub = dim // n_levels if opts.codec == "product" else dim
    r = balanced_pca(x, n_levels) if opts.codec == "product" else random_rotation(dim, opts.seed).to(x.device)
    r = r.to(x.device, torch.float32)
    x_sq = float(x.double().square().sum())
    z = x @ r
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed))[:n_codes].to(x.device)
    if opts.codec == "product":
        c = _slices(z, n_levels)[:, pick].clone()  # (levels, n_codes, sub)
    else:
        c = torch.zeros((n_levels, n_codes, sub), dtype=torch.float32, device=x.device)
    y = _fit_round(z, c, opts.codec, OPQ_FIRST_ITERS, seed=opts.seed, first=True)
    losses = [float((z - y).double().square().sum()) / n]  # the starting rotation's
    for _ in range(opts.rotation_iters):
        z = x @ r
        y = _fit_round(z, c, opts.codec, OPQ_ROUND_ITERS, seed=opts.seed, first=False)  # updates c in place
        xty = x.T @ y  # (dim, dim): a sum over rows
        r = procrustes(xty).to(x.device, torch.float32)
        trace = float((r.double() * xty.double()).sum())  # tr(R^T X^T Y)
        losses.append(max(0.0, x_sq + float(y.double().square().sum()) - 2.0 * trace) / n)
    return LearnedRotation(r.cpu(), c.cpu(), losses)


def balanced_pca(x: torch.Tensor, n_levels: int) -> torch.Tensor:
    """(dim, dim) float32 orthogonal: the principal directions of ``x`` (n, dim), allocated to ``n_levels``
    equal slices so that the products of the slices' variances are as equal as a greedy allocation makes
    them (Ge et al. 2013, "eigenvalue allocation": each direction, largest variance first, goes to the
    slice with room whose product of variances is smallest). OPQ for product codes starts from it."""
    n, dim = x.shape
    x64 = x.double()
    centred = x64 - x64.mean(dim=0, keepdim=True)
    values, vectors = torch.linalg.eigh(centred.T @ centred / max(n - 1, 1))  # ascending
    order = torch.argsort(values, descending=True, stable=True)
    values, vectors = values[order].clamp(min=1e-12 * max(float(values.max()), 1e-300)), vectors[:, order]
    sub = dim // n_levels
    slots: list[list[int]] = [[] for _ in range(n_levels)]
    log_product = [0.0] * n_levels
    for j in range(dim):
        level = min((lv for lv in range(n_levels) if len(slots[lv]) < sub), key=lambda lv: (log_product[lv], lv))
        slots[level].append(j)
        log_product[level] += math.log(float(values[j]))
    columns = [j for slot in slots for j in slot]
    return vectors[:, columns].to(torch.float32)


def learn_itq(sample_centred: torch.Tensor, opts: FitOptions) -> torch.Tensor:
    """The (dim, dim) float32 ITQ rotation of ``sample_centred`` (n, dim) float32 rows minus their
    training mean, from a seeded random rotation, in ``opts.rotation_iters`` rounds (:func:`itq`)."""
    return itq(sample_centred, opts).rotation


def itq(sample_centred: torch.Tensor, opts: FitOptions) -> LearnedRotation:
    """ITQ on centred rows: ``losses[0]`` is the error of the starting (random) rotation, ``losses[t]``
    the one after round ``t``."""
    z = sample_centred.to(opts.device, torch.float32).contiguous()
    n, dim = z.shape
    r = random_rotation(dim, opts.seed).to(z.device, torch.float32)
    z_sq = float(z.double().square().sum())
    v = z @ r
    losses = [float((_signs(v) - v).double().square().sum()) / max(n, 1)]
    for _ in range(opts.rotation_iters):
        b = _signs(v)
        ztb = z.T @ b  # (dim, dim): a sum over rows
        r = procrustes(ztb).to(z.device, torch.float32)
        trace = float((r.double() * ztb.double()).sum())  # tr(R^T Z^T B)
        losses.append(max(0.0, n * dim + z_sq - 2.0 * trace) / max(n, 1))
        v = z @ r
    return LearnedRotation(r.cpu(), None, losses)


def itq_loss(z: torch.Tensor, r: torch.Tensor) -> float:
    """``|sign(Z R) - Z R|^2 / n`` in float64: the error ITQ lowers (the oracle of its statistics)."""
    v = z.double() @ r.double()
    b = torch.where(v > 0, 1.0, -1.0).double()
    return float((b - v).square().sum()) / max(z.shape[0], 1)


def _signs(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, 1.0, -1.0).to(torch.float32)


def _slices(z: torch.Tensor, n_levels: int) -> torch.Tensor:
    """(n, dim) -> (levels, n, dim / levels): each level's contiguous slice of the columns."""
    n, dim = z.shape
    return z.reshape(n, n_levels, dim // n_levels).transpose(0, 1)


def _fit_round(z: torch.Tensor, c: torch.Tensor, codec: str, iters: int, *, seed: int, first: bool) -> torch.Tensor:
    """Refit the codes ``c`` (levels, n_codes, sub) of the rotated rows ``z`` (n, dim) in place for
    ``iters`` Lloyd iterations; returns (n, dim) what the last assignment decodes to under the updated
    centroids (the rows' reconstructions whose error the rotation then lowers)."""
    n, dim = z.shape
    if codec == "product":
        zs = _slices(z, c.shape[0])
        codes = _lloyd(zs, c, iters)
        return _gather(c, codes).transpose(0, 1).reshape(n, dim)
    residual = z.clone()
    for level in range(c.shape[0]):
        cl = c[level : level + 1]
        if first:  # residual level from seeded rows of what the levels before leave
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + level))[: c.shape[1]].to(z.device)
            cl.copy_(residual[pick][None])
        codes = _lloyd(residual[None], cl, iters)
        residual -= _gather(cl, codes)[0]
    return z - residual


def _gather(c: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(levels, n_codes, sub) centroids at (levels, n) codes -> (levels, n, sub)."""
    return torch.gather(c, 1, codes[:, :, None].expand(-1, -1, c.shape[2]))


def _assign(zs: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The nearest code of every row of every level: (levels, n) int64, and the summed squared distance."""
    n_levels, n, _ = zs.shape
    n_codes = c.shape[1]
    c_sq = c.square().sum(dim=2)[:, None, :]  # (levels, 1, n_codes)
    codes = torch.empty((n_levels, n), dtype=torch.int64, device=zs.device)
    total = 0.0
    step = max(1, CHUNK_BYTES // (4 * n_levels * n_codes))
    ct = c.transpose(1, 2)  # (levels, sub, n_codes)
    for a in range(0, n, step):
        zb = zs[:, a : a + step]  # (levels, b, sub)
        d = torch.baddbmm(c_sq, zb, ct, alpha=-2.0)  # (levels, b, n_codes): |c|^2 - 2 z.c
        best = d.min(dim=2)
        codes[:, a : a + step] = best.indices
        total += float(best.values.double().sum() + zb.double().square().sum())
    return codes, total


def _lloyd(zs: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` Lloyd iterations of every level's centroids ``c`` (levels, n_codes, sub) in place on
    ``zs`` (levels, n, sub); a code no row chose keeps its centroid. Returns the last assignment's
    (levels, n) codes (the ones the updated centroids are the means of)."""
    n_levels, n, sub = zs.shape
    n_codes = c.shape[1]
    offsets = (torch.arange(n_levels, device=zs.device) * n_codes)[:, None]
    flat_rows = zs.reshape(n_levels * n, sub) if zs.is_contiguous() else zs.contiguous().reshape(n_levels * n, sub)
    codes = torch.zeros((n_levels, n), dtype=torch.int64, device=zs.device)
    for _ in range(max(1, iters)):
        codes, _ = _assign(zs, c)
        index = (codes + offsets).reshape(-1)
        sums = torch.zeros((n_levels * n_codes, sub), dtype=torch.float64, device=zs.device)
        sums.index_add_(0, index, flat_rows.double())
        counts = torch.bincount(index, minlength=n_levels * n_codes).to(torch.float64)[:, None]
        means = (sums / counts.clamp(min=1)).to(torch.float32).reshape(n_levels, n_codes, sub)
        keep = (counts == 0).reshape(n_levels, n_codes, 1)
        c.copy_(torch.where(keep, c, means))
    return codes


def orthogonality_error(r: torch.Tensor) -> float:
    """``max |R^T R - I|`` in float64."""
    r64 = r.double()
    return float((r64.T @ r64 - torch.eye(r.shape[0], dtype=torch.float64)).abs().max())


__all__ = [
    "LearnedRotation",
    "OPQ_FIRST_ITERS",
    "OPQ_ROUND_ITERS",
    "ROTATION_SAMPLE_ROWS",
    "itq",
    "itq_loss",
    "learn_itq",
    "learn_opq",
    "opq",
    "orthogonality_error",
    "rotation_rows",
    "rotation_sample",
    "source_rotation",
]
