"""Progressive-dimension initialization ("progressive"): K-means grown one principal direction group
at a time, as FAISS's ``ProgressiveDimClustering`` trains its residual quantizers.

The seeding rows are rotated onto their principal axes (float64 eigen-decomposition of their
covariance). K-means then runs ``STEPS`` times, on the first ``round(dim ** (s / STEPS))`` principal
coordinates at step ``s = 1..STEPS``: the first step from distinct random rows, each later one from
the previous step's centroids padded with zeros, at most ``N_ITER`` Lloyd iterations each (the same
exact Lloyd, repairs included), fewer once an update lowers the step's objective by at most the fit's
``tol`` (0: all ``N_ITER``). The last step's centroids, rotated back, start the full fit.

Clustering the strong directions first keeps centroids off the noise directions, so a residual
codebook started this way reaches a lower error on new rows than one started from k-means++ (figures
in the docs' Benchmarks page, "Multi-level codes against FAISS"). It is the ``init="auto"`` choice
for residual codebooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from vq_pipeline.compute.data import InMemoryRows
from vq_pipeline.compute.engines import Engine
from vq_pipeline.compute.seeding import report_init
from vq_pipeline.validate import normalize_rows

#: Dimension steps, and Lloyd iterations per step (FAISS's defaults).
STEPS = 10
N_ITER = 10
#: The steps run on at most this many rows per code (a seeded sample; FAISS's max_points_per_centroid).
ROWS_PER_CODE = 256


def progressive_dims(
    x: torch.Tensor,
    n_codes: int,
    *,
    generator: torch.Generator,
    engine: Engine,
    memory_budget: int,
    device: torch.device,
    metric: str = "l2",
    progress: Callable[[Any], None] | None = None,
    tol: float = 0.0,
) -> torch.Tensor:
    """Initial centroids by progressive-dimension K-means (module docstring).

    Args:
        x: (n_rows, dim) float32 seeding rows (unit rows under cosine), any device; finite,
            ``n_rows >= n_codes``; a seeded sample of ``ROWS_PER_CODE * n_codes`` of them when more.
        generator: CPU generator of the first step's random rows.
        engine: the engine of every Lloyd step. memory_budget: bytes of temporaries per chunk.
        metric: 'cosine' normalizes the result (a zero centroid is replaced by a seeding row).
        tol: a step stops once an update lowers its objective by at most this share (the fit's ``tol``).

    Returns:
        (n_codes, dim) float32 centroids on ``device``.
    """
    from vq_pipeline.compute.lloyd import lloyd  # kmeans imports this module lazily: no cycle at import time

    t0 = time.perf_counter()
    if x.shape[0] > ROWS_PER_CODE * n_codes:
        keep = torch.randperm(x.shape[0], generator=generator)[: ROWS_PER_CODE * n_codes].sort().values
        x = x[keep.to(x.device)]
    xd = x.to(device, torch.float64)  # (n_rows, dim)
    n_rows, dim = xd.shape
    mean = xd.mean(dim=0)  # (dim,)
    xd -= mean
    cov = xd.T @ xd / max(1, n_rows)  # (dim, dim)
    values, vectors = torch.linalg.eigh(cov)
    axes = vectors[:, values.argsort(descending=True)]  # (dim, dim) principal axes, strongest first
    xt = (xd @ axes).to(torch.float32)  # (n_rows, dim) principal coordinates
    del xd
    pick = torch.randperm(n_rows, generator=generator)[:n_codes]
    c = None
    for step in range(1, STEPS + 1):
        width = max(1, min(dim, round(dim ** (step / STEPS))))
        rows = xt[:, :width].contiguous()  # (n_rows, width)
        if c is None:
            c0 = rows[pick.to(rows.device)].clone()  # (n_codes, width) distinct random rows
        else:
            c0 = torch.zeros((n_codes, width), dtype=torch.float32, device=device)
            c0[:, : min(width, c.shape[1])] = c[:, :width]
        source = InMemoryRows(rows, engine=engine.name, memory_budget=memory_budget)
        c = lloyd(source, c0, metric="l2", n_iter=N_ITER, tol=tol).centroids.to(device)
        report_init(progress, round(n_codes * step / STEPS), n_codes, t0)
    if c.shape[1] < dim:
        c = torch.cat([c, torch.zeros((n_codes, dim - c.shape[1]), dtype=torch.float32, device=device)], dim=1)
    out = (c.double() @ axes.T + mean).to(torch.float32)  # (n_codes, dim) back in the rows' coordinates
    if metric == "cosine":
        zero = torch.linalg.vector_norm(out, dim=1) == 0
        out[zero] = x[pick[: int(zero.sum())].to(x.device)].to(device)
        out = normalize_rows(out)
    return out.contiguous()


__all__ = ["N_ITER", "STEPS", "progressive_dims"]
