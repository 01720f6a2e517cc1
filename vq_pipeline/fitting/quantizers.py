"""Scalar and binary codebooks fitted from a :class:`~vq_pipeline.compute.data.DataSource`: per-dimension
grids calibrated in a few streamed passes over the rows (no Lloyd).

* scalar (``bits`` 8 or 4): each dimension's range ``[lo, hi]`` is its minimum and maximum over all
  rows (one pass; ``scalar_range='minmax'``), or its 0.001 and 0.999 quantiles (numpy's linear
  interpolation) over a seeded sample of at most :data:`QUANTILE_SAMPLE_ROWS` rows
  (``scalar_range='quantile'``), or per dimension the range of least squared error on that sample
  among the min/max and trimmed quantile ranges (``scalar_range='mse'``:
  :func:`vq_pipeline.compute.codecs.least_error_range`); the grid is
  :func:`vq_pipeline.compute.codecs.scalar_grid`.
* binary: the rows are rotated (``rotation`` 'random': a seeded random rotation; 'itq': learned on a
  seeded sample of the centred rows, :func:`vq_pipeline.fitting.rotation.learn_itq`), ``m`` is the
  mean of the rotated rows (the mean of the rows, one pass, rotated) and ``s`` the mean absolute
  deviation ``mean |z_d - m_d|`` (a second pass): for fixed signs, the scale of least squared error.

A last pass encodes the training rows as :meth:`Codebook.encode` does, for the counts and statistics:
``mse`` (the mean of the distance encode returns: squared L2, ``1 - cos`` under cosine), ``level_mse``
(each dimension's mean squared error in the coded space), ``used_codes`` per dimension, and
``clipped`` (scalar: the share of training values outside their dimension's range) or ``bit_balance``
(binary: the mean over dimensions of ``2 min(p_d, 1 - p_d)``, ``p_d`` the share of rows whose bit ``d``
is 1: 1 when every bit splits the rows in half, 0 when bits are constant). Sums are float64, added in
batch order, so a streamed fit gives the codebook of the same rows in memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.codecs import binary_grid, least_error_range, random_rotation, rotate_rows, scalar_grid
from vq_pipeline.compute.data import DataSource
from vq_pipeline.compute.levels import decode, encode_levels, reconstruction_error
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.fitting.multilevel import objective_name
from vq_pipeline.fitting.options import FitOptions
from vq_pipeline.fitting.rotation import itq, rotation_rows, rotation_sample

#: A quantile range is calibrated on a seeded sample of at most this many rows.
QUANTILE_SAMPLE_ROWS = 65_536
#: The quantiles of ``scalar_range='quantile'``.
QUANTILES = (0.001, 0.999)
#: Mixed into the seed of the quantile sample (not the stream a rotation's sample draws from).
QUANTILE_STREAM = 0x7175616E


def fit_scalar(
    source: DataSource,
    opts: FitOptions,
    *,
    data_fingerprint: str,
    sources: Sequence[str] = (),
    column: str = "",
    extra_stats: dict[str, Any] | None = None,
    t_start: float | None = None,
    **_: Any,
) -> Codebook:
    """A scalar codebook of ``opts.bits`` bits per dimension over ``source`` (validated rows, unit rows
    under cosine); see the module's docstring. Takes the keywords of
    :func:`vq_pipeline.fitting.kmeans.fit_source` (progress and checkpoints have nothing to report or
    keep: the passes are few)."""
    t_start = time.perf_counter() if t_start is None else t_start
    _check_codec(opts, "scalar")
    dev = opts.device
    extra: dict[str, Any] = {}
    if opts.scalar_range in ("minmax", "mse"):
        lo = torch.full((source.dim,), float("inf"), dtype=torch.float32, device=dev)
        hi = torch.full((source.dim,), float("-inf"), dtype=torch.float32, device=dev)
        for xb in source.batches():
            xb = xb.to(dev, torch.float32)
            if xb.shape[0]:
                lo = torch.minimum(lo, xb.min(dim=0).values)
                hi = torch.maximum(hi, xb.max(dim=0).values)
        lo64, hi64 = lo.double().cpu().numpy(), hi.double().cpu().numpy()
    if opts.scalar_range in ("quantile", "mse"):
        sample = rotation_sample(source, QUANTILE_SAMPLE_ROWS, opts.seed, stream=QUANTILE_STREAM).cpu()
        if opts.scalar_range == "quantile":
            q = np.quantile(sample.numpy().astype(np.float64), QUANTILES, axis=0)  # (2, dim)
            lo64, hi64 = q[0], q[1]
        else:
            lo64, hi64 = least_error_range(sample.to(torch.float32), lo64, hi64, opts.bits)
        extra["quantile_rows"] = int(sample.shape[0])
    grid = scalar_grid(lo64, hi64, opts.bits)
    t_stats = time.perf_counter()
    stats = grid_stats(source, grid, opts, None)
    return _codebook(grid, None, stats, opts, t_start, t_stats, data_fingerprint, sources, column, extra, extra_stats)


def fit_binary(
    source: DataSource,
    opts: FitOptions,
    *,
    data_fingerprint: str,
    sources: Sequence[str] = (),
    column: str = "",
    extra_stats: dict[str, Any] | None = None,
    t_start: float | None = None,
    **_: Any,
) -> Codebook:
    """A binary codebook (one bit per dimension) over ``source``, with ``opts.rotation`` 'none',
    'random' or 'itq'; see the module's docstring."""
    t_start = time.perf_counter() if t_start is None else t_start
    _check_codec(opts, "binary")
    dev, dim = opts.device, source.dim
    total = torch.zeros(dim, dtype=torch.float64, device=dev)
    n_rows = 0
    for xb in source.batches():
        total += xb.to(dev, torch.float64).sum(dim=0)
        n_rows += xb.shape[0]
    mean_x = total / max(n_rows, 1)  # (dim,) float64
    rotation, extra = None, {}
    if opts.rotation == "random":
        rotation = random_rotation(dim, opts.seed)
    elif opts.rotation == "itq":
        t0 = time.perf_counter()
        sample = rotation_sample(source, rotation_rows(n_rows, opts.n_codes), opts.seed)
        learned = itq(sample.to(dev) - mean_x.to(torch.float32), opts)
        rotation = learned.rotation
        extra = {
            "rotation_rows": int(sample.shape[0]),
            "rotation_losses": learned.losses,
            "rotation_seconds": time.perf_counter() - t0,
        }
    r = None if rotation is None else rotation.to(dev)
    mean_z = mean_x if r is None else mean_x @ r.double()  # the mean of the rotated rows
    dev_sum = torch.zeros(dim, dtype=torch.float64, device=dev)
    for xb in source.batches():
        dev_sum += (rotate_rows(xb.to(dev, torch.float32), r).double() - mean_z).abs().sum(dim=0)
    grid = binary_grid(mean_z.cpu(), (dev_sum / max(n_rows, 1)).cpu())
    t_stats = time.perf_counter()
    stats = grid_stats(source, grid, opts, rotation)
    return _codebook(
        grid, rotation, stats, opts, t_start, t_stats, data_fingerprint, sources, column, extra, extra_stats
    )


def grid_stats(source: DataSource, grid: torch.Tensor, opts: FitOptions, rotation: torch.Tensor | None) -> dict:
    """One pass encoding the training rows under the (dim, K, 1) ``grid`` (rows rotated first when
    ``rotation`` is given), as :meth:`Codebook.encode` does: the (dim, K) ``counts``, ``mse``,
    ``level_mse``, ``used_codes``, and ``clipped`` (scalar) or ``bit_balance`` (binary)."""
    dev = opts.device
    dim, k = int(grid.shape[0]), int(grid.shape[1])
    g = grid.to(dev)
    r = None if rotation is None else rotation.to(dev, torch.float32)
    lo, hi = g[:, 0, 0], g[:, -1, 0]
    offsets = torch.arange(dim, device=dev) * k
    counts = torch.zeros(dim * k, dtype=torch.int64, device=dev)
    level_err = torch.zeros(dim, dtype=torch.float64, device=dev)
    total_err, clipped, n_rows = 0.0, 0, 0
    for xb in source.batches():
        z = rotate_rows(xb.to(dev, torch.float32), r)
        codes = encode_levels(z, g, opts.codec)  # (n, dim)
        counts += torch.bincount((codes + offsets).reshape(-1), minlength=dim * k)
        z64 = z.double()
        grid_dec = decode(g, opts.codec, codes, metric="l2").double()  # each value's grid point
        level_err += (z64 - grid_dec).square().sum(dim=0)
        dec = grid_dec if opts.metric == "l2" else decode(g, opts.codec, codes, metric=opts.metric).double()
        total_err += float(reconstruction_error(z64, dec, opts.metric).sum())
        if opts.codec == "scalar":
            clipped += int(((z < lo) | (z > hi)).sum())
        n_rows += z.shape[0]
    counts = counts.reshape(dim, k).cpu()
    n = max(n_rows, 1)
    stats: dict[str, Any] = {
        "counts": counts,
        "mse": total_err / n,
        "level_mse": (level_err / n).tolist(),
        "used_codes": (counts > 0).sum(dim=1).tolist(),
    }
    if opts.codec == "scalar":
        stats["clipped"] = clipped / max(n_rows * dim, 1)
    else:
        share = counts[:, 1].double() / n
        stats["bit_balance"] = float((2.0 * torch.minimum(share, 1.0 - share)).mean())
    return stats


def _check_codec(opts: FitOptions, codec: str) -> None:
    if opts.codec != codec:
        raise InvalidInputError(
            f"codec={opts.codec!r} given to the {codec} fit; expected codec={codec!r}. "
            f"Fix: fit through vq_pipeline.fitting.kmeans.fit_source, which picks the fit of each codec."
        )


def _codebook(
    grid: torch.Tensor,
    rotation: torch.Tensor | None,
    pass_stats: dict[str, Any],
    opts: FitOptions,
    t_start: float,
    t_stats: float,
    data_fingerprint: str,
    sources: Sequence[str],
    column: str,
    extra: dict[str, Any],
    extra_stats: dict[str, Any] | None,
) -> Codebook:
    counts = pass_stats.pop("counts")
    n_rows = int(counts[0].sum()) if counts.shape[0] else 0
    stats = {
        "n_rows": n_rows,
        "objective": objective_name(opts.metric),
        "inertia": pass_stats["mse"] * n_rows,
        "iterations": 0,
        "converged": True,
        "n_repairs": 0,
        "empty_codes": int((counts == 0).sum()),
        **pass_stats,
        **extra,
        **(extra_stats or {}),
    }
    now = time.perf_counter()
    return Codebook(
        centroids=grid,
        counts=counts,
        metric=opts.metric,
        codec=opts.codec,
        settings=opts.settings(opts.engine),
        stats=stats,
        data_fingerprint=data_fingerprint,
        sources=tuple(sources),
        column=column,
        rotation=rotation,
        timings={"fit_seconds": now - t_start, "stats_seconds": now - t_stats},
    )


__all__ = ["QUANTILES", "QUANTILE_SAMPLE_ROWS", "fit_binary", "fit_scalar", "grid_stats"]
