"""Chunked GEMM engine in plain torch that returns the exact nearest codes.

Squared distances are expanded as ``|x|^2 - 2 x.c + |c|^2`` so that a matrix product does the work.
That expansion loses precision when the data sit far from the origin (a relative error of about
``eps * |x|^2`` swamps small differences), so both sides are first shifted by the centroids' mean,
which leaves every distance unchanged. Even centred, float32 rounding cannot separate centroids that
lie much closer together than the data's extent (a scalar quantizer: dim 1 and thousands of codes
put up to half the rows on the wrong code). So the float32 GEMM only *proposes* an answer: a row's
answer stands when the gap between its k-th and (k+1)-th candidates exceeds twice a proven bound on
the GEMM's rounding error (:func:`_rounding_bound`). The other rows are ranked again by the same
expansion in float64, whose bound leaves only genuine near-ties, and those by the direct form
``sum((x - c)**2)`` in float64 (:func:`_exact_nearest`). In one dimension, where the float32 GEMM
could prove almost nothing, a binary search over the sorted centroids finds the candidates instead
(:func:`_nearest_on_a_line`). Exact ties go to the lowest code. The distances returned are computed
in the direct form in float32.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

# The (rows, n_codes) block of one GEMM is kept about this size: a block that stays in cache makes
# the argmin that reads it back several times faster than one that spills to memory.
_BLOCK_BYTES = 8 * 2**20
# Entries of one block of the float64 re-ranking (rows, n_codes), and of one batch of (row, code)
# pairs times dim: they bound its temporaries at 64 bytes per entry at most, whatever the chunk's size.
_RERANK_ELEMENTS = 2**18


def _split_rows(n: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(lo, hi)`` over row ranges covering ``0..n``, on torch's number of threads.

    For numpy reductions over the rows of a distance block: numpy releases the GIL, so the ranges
    run in parallel on the helper threads of :func:`_pool`.
    """
    threads = min(torch.get_num_threads(), n // _MIN_ROWS_PER_THREAD)
    if threads < 2:
        work(0, n)
        return
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool().submit(work, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    work(bounds[0], bounds[1])
    for f in futures:
        f.result()


def _argmin_rows(partial: torch.Tensor) -> torch.Tensor:
    """(n, 1) int64 index of each row's smallest entry (the first one on ties) of ``partial`` (n, m).

    On the CPU this is numpy's SIMD ``argmin``, on torch's number of threads: torch's CPU
    ``min(dim=1)`` is a scalar loop that can take as long as the GEMM itself, numpy's vectorized
    argmin on one thread beats torch's on more, and splitting the rows over threads shortens it further
    (figures in the docs' Engines page, "Measurements behind the torch engine").
    """
    if partial.device.type != "cpu":
        return partial.min(dim=1, keepdim=True).indices  # min's indices: faster than argmin (docs: Engines)
    a = partial.numpy()
    out = np.empty(a.shape[0], dtype=np.int64)

    def work(lo: int, hi: int) -> None:
        out[lo:hi] = a[lo:hi].argmin(axis=1)

    _split_rows(a.shape[0], work)
    return torch.from_numpy(out)[:, None]


def _best_two_rows(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx, best, gap)`` of each row of ``partial`` (n, m): (n, 1) int64 index of the smallest entry
    (the first one on ties, as in :func:`_argmin_rows`), (n,) its value, and (n,) the second-smallest
    value minus the smallest (``inf`` when m == 1; NaN when the row holds a NaN).

    On the CPU: numpy's argmin twice, the second time with the winner masked (in place, restored),
    per threaded row range; the second pass re-reads a block that is still in cache, so it costs
    less than a first pass over it.
    """
    n, m = partial.shape
    if partial.device.type != "cpu":
        vals, idx = partial.topk(min(2, m), dim=1, largest=False, sorted=True)  # (n, 2), (n, 2)
        gap = vals[:, 1] - vals[:, 0] if m > 1 else torch.full_like(vals[:, 0], math.inf)  # (n,)
        return idx[:, :1], vals[:, 0], gap
    a = partial.numpy()
    idx = np.empty(n, dtype=np.int64)
    best = np.empty(n, dtype=a.dtype)
    gap = np.full(n, np.inf, dtype=a.dtype)

    def work(lo: int, hi: int) -> None:
        block, rows = a[lo:hi], np.arange(hi - lo)
        j = block.argmin(axis=1)
        b = block[rows, j]
        idx[lo:hi], best[lo:hi] = j, b
        if m > 1:
            block[rows, j] = np.inf
            np.subtract(block[rows, block.argmin(axis=1)], b, out=gap[lo:hi])
            block[rows, j] = b

    _split_rows(n, work)
    return torch.from_numpy(idx)[:, None], torch.from_numpy(best), torch.from_numpy(gap)


def _proven_best_rows(
    partial: torch.Tensor, bound: torch.Tensor, marks: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """``(idx, unproven)``: (n, 1) int64 index of each row's smallest entry of ``partial`` (n, m) on the
    CPU where the rounding bound ``bound`` (n,) proves it, and a (r,) int64 numpy array of the rows
    where it does not. Overwrites ``out`` (n, m) float32, ``partial`` itself when None; the indices
    of unproven rows are meaningless (the caller ranks them again).

    A row is proven when exactly one of its entries is at most ``t = fl(best + 2 E)``, with ``best`` its
    smallest entry and ``E`` its ``bound``: every other entry ``p_j > t`` then has ``p_j - best > 2 E``
    exactly (rounding is monotone and ``p_j`` is a float), which is the gap test of the module
    docstring. A NaN anywhere in the row, or a ``t`` that is not finite, leaves the row unproven.

    Four vectorized passes over the block, instead of numpy's per-row argmin twice: ``amin``; the
    entries at most ``t`` set to 1 and the others to 0, in place; times ``marks`` (m,), where
    ``marks[j] = 1 + j / M`` with ``M`` a power of two ``>= m``; and a row sum. A row with exactly one
    marked entry sums exactly to its ``marks[j]`` in ``[1, 2)``, which gives ``j``; two or more sum
    to at least 2 in any order of addition (every partial sum of nonnegative floats with one term
    ``>= 1`` is ``>= 1``), none to 0. This takes less time than the two argmins of
    :func:`_best_two_rows` at every width measured (see ``_WIDE_ROWS``).
    """
    m = partial.shape[1]
    scale = float(1 << max(0, (m - 1).bit_length()))  # M
    thr = partial.amin(dim=1).add_(bound, alpha=2.0)  # (n,) fl(best + 2E)
    s = torch.le(partial, thr[:, None], out=partial if out is None else out).mul_(marks).sum(dim=1)  # (n,)
    sv, tv = s.numpy(), thr.numpy()
    unproven = np.flatnonzero(~((sv >= 1.0) & (sv < 2.0)) | ~np.isfinite(tv))  # (r,)
    return s.sub_(1.0).mul_(scale).to(torch.int64)[:, None], unproven


# Rows at least this wide go through numpy's argmin twice (:func:`_best_two_rows`), narrower ones
# through :func:`_proven_best_rows`, whose marks ``1 + j / M`` stay exact in float32 up to M = 2^23.
# The four passes were faster than the two argmins at every width measured, so the limit is set by the
# marks' exactness, not by speed. (A measurement with passive OpenMP waits had favoured the argmins for
# wide rows: the numpy helper threads then ran beside sleeping OpenMP threads; see
# :func:`vq_pipeline.runtime.omp_wait_settings`. Figures in the docs' Engines page, "Measurements
# behind the torch engine".)
_WIDE_ROWS = 1 << 22


def _marks(m: int, device: torch.device) -> torch.Tensor:
    """(m,) float32 ``1 + j / M`` for :func:`_proven_best_rows`, ``M`` the least power of two >= m."""
    scale = float(1 << max(0, (m - 1).bit_length()))
    return torch.arange(m, dtype=torch.float32, device=device).div_(scale).add_(1.0)


# Below this many rows per thread, splitting the argmin costs more than it saves.
_MIN_ROWS_PER_THREAD = 1024
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The helper threads of :func:`_split_rows`, started on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="vq-argmin")
        return _POOL


def _forget_pool() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool)


# Unit roundoff of a float32 matrix product's factors under each precision torch can be set to run it
# at: IEEE float32, TF32 (10 stored mantissa bits; "high" also allows bfloat16x2, which is finer) and
# bfloat16 (7 bits; "medium", "bf16").
_ROUNDOFF = {
    "none": 2.0**-24,
    "ieee": 2.0**-24,
    "highest": 2.0**-24,
    "tf32": 2.0**-11,
    "high": 2.0**-11,
    "bf16": 2.0**-8,
    "medium": 2.0**-8,
}


def matmul_roundoff(device: torch.device) -> float:
    """Unit roundoff of a float32 ``torch.mm`` on ``device`` under torch's current precision settings.

    ``torch.set_float32_matmul_precision('high')``, ``torch.backends.cuda.matmul.allow_tf32`` or the
    backends' ``fp32_precision`` may let a product round its factors to TF32 or bfloat16; the bound
    must widen with them, or it would vouch for answers it cannot prove (:func:`product_gamma`).
    A setting not known here gives ``inf``: no bound, every row is ranked again in float64.
    """
    names = []
    # getattr: a served flow pickles this function by value, and cloudpickle would try to pickle the
    # torch.backends module objects (not plain modules in recent torch) if their names were spelled out.
    backends = getattr(torch, "backends")  # noqa: B009
    try:
        names.append(str(backends.fp32_precision))  # the default the backends inherit
        if device.type == "cuda":
            names.append(str(backends.cuda.matmul.fp32_precision))
            names.append("tf32" if backends.cuda.matmul.allow_tf32 else "ieee")
        else:
            names.append(str(getattr(backends, "mkldnn").matmul.fp32_precision))  # noqa: B009
    except (AttributeError, RuntimeError):  # an older torch without these settings
        pass
    try:
        names.append(torch.get_float32_matmul_precision())
    except RuntimeError:  # legacy and new precision settings mixed
        names.append("unknown")
    return max(_ROUNDOFF.get(name, math.inf) for name in names)


def _gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``, or ``inf`` from ``n u >= 0.1`` on (there the bound would
    be too loose to prove anything, and its own evaluation error would no longer fit the margin that
    :func:`_rounding_bound` leaves for it)."""
    return n * u / (1.0 - n * u) if n * u < 0.1 else math.inf


def product_gamma(dim: int, u: float) -> float:
    """The ``gamma`` of :func:`_rounding_bound` for rows of width ``dim`` and a matrix product whose
    factors have unit roundoff ``u`` (:func:`matmul_roundoff`).

    IEEE float32 (``u = 2^-24``): ``gamma_{dim+5}(u)``, every operation at that precision.

    TF32 or bfloat16 (a coarser ``u``): tensor cores, AVX512-BF16 and oneDNN round the float32 factors
    to the coarser format, multiply them exactly (a product of two such significands fits in float32's)
    and add the products in float32. Each factor is within relative ``2u`` of its float32 value, which
    covers truncation as well as rounding (and a factor split into two or three bfloat16 parts, as
    "high" may do, with its smallest cross product dropped), so each product is within
    ``(1 + 2u)^2 - 1`` of the float32 factors' product. The sum of at most ``3 (dim + 1)`` products
    (three per term for split factors), in any order, is within ``gamma_{3 dim + 3}`` at ``2^-23``
    (float32 with the truncated alignment some tensor cores use, Fasi et al., SIAM J. Sci. Comput.
    2021) of their magnitudes, and the centring and ``|cs|^2`` add the ``gamma_4`` at float32's
    roundoff of :func:`_rounding_bound`: in all ``(1 + 2u)^2 (1 + gamma_{3 dim + 7}(2^-23)) - 1``, about
    ``4u``. (The bound of every operation at ``u``, ``gamma_{dim+5}(u)``, is infinite from dim ~200 at
    TF32: it proved nothing.) ``inf`` for an unknown precision (``u = inf``).
    """
    if u <= _ROUNDOFF["ieee"]:
        return _gamma(dim + 5, u)
    if not math.isfinite(u) or 2.0 * u >= 0.05:
        return math.inf
    return (1.0 + 2.0 * u) ** 2 * (1.0 + _gamma(3 * dim + 7, 2.0**-23)) - 1.0


def _rounding_bound(xs: torch.Tensor, cs_norm_max: float, gamma: float) -> torch.Tensor:
    """(n,) bound ``E_i`` on ``|partial_ij - T_ij|`` for every centroid j of each row i of ``xs``, for a
    ``partial`` computed from float32 rows and centroids by the centred expansion.

    Derivation. With ``s`` the (float32) shift, the exact key that ranks centroid j for row x like
    ``|x - c_j|^2`` does is ``T_j = |c_j - s|^2 - 2 (x - s).(c_j - s)`` (it is ``|x - c_j|^2 - |x - s|^2``
    for any ``s``). With unit roundoff ``u``, the engine computes:
      - ``xs = fl(x - s)`` and ``cs = fl(c - s)``: each coordinate within relative ``u`` of its exact
        value, so each product ``xs_d * (-2 cs_jd)`` is within ``gamma_2`` of the exact one;
      - ``w_j = |cs_j|^2``, within ``gamma_4`` of ``|c_j - s|^2`` when summed in float64 and rounded
        once to float32 (the two roundings of ``cs``, the float64 sum's error far below ``u``, the
        final rounding), within ``gamma_{dim + 2}`` when summed in the working precision;
      - ``partial_ij``: the dot product of length dim + 1 of ``[xs_i | 1]`` with ``[-2 cs_j | w_j]``
        in a matrix product, in any summation order (blocked, FMA or not), within ``gamma_{dim+1}``
        times the sum of the absolute values of its terms (Higham, Accuracy and Stability of
        Numerical Algorithms, 2nd ed., eq. 3.5).
    With ``gamma_a + gamma_b + gamma_a gamma_b <= gamma_{a+b}``, the total is
    ``|partial_ij - T_j| <= gamma (|c_j - s|^2 + 2 sum_d |x_d - s_d| |c_jd - s_d|) <= gamma C (C + 2 |x - s|)``
    by Cauchy-Schwarz, where ``C = max_j |c_j - s|`` and ``gamma`` is ``gamma_{dim + 5}`` (float32
    GEMM, float64 ``w``), :func:`product_gamma` (a GEMM that rounds its factors to TF32 or bfloat16)
    or ``gamma_{2 dim + 5}`` (all in float64).
    ``C`` comes from float64 and ``|xs_i|`` from ``xs`` (relative error below (dim + 2) u), and the
    bound itself is evaluated in a few operations: the factor 1.25 covers those errors while
    ``(dim + 8) u < 0.2`` (:func:`_gamma` gives ``inf`` before that). The term ``(2 dim + 8) 2^-126``
    covers underflow in float32 (an absolute error below the smallest normal number per rounding,
    even with denormals flushed).
    A row's answer is then proven when its computed gap exceeds ``2 E_i``, which the subtraction
    that gives the gap cannot fake (it is exact to relative ``u``), or, for the nearest code alone,
    when no entry but the smallest is at most ``fl(best + 2 E_i)`` (:func:`_proven_best_rows`).

    Args:
        xs: (n, dim) float32 or float64, the rows minus the shift, any device.
        cs_norm_max: ``C`` above. gamma: ``gamma`` above, from :func:`_gamma`.
    """
    norm = torch.linalg.vector_norm(xs, dim=1)  # (n,)
    if math.isinf(gamma):  # nothing can be proven
        return torch.full_like(norm, math.inf)
    g, floor = 1.25 * gamma, (2 * xs.shape[1] + 8) * 2.0**-126
    return norm.mul_(2.0 * g * cs_norm_max).add_(g * cs_norm_max * cs_norm_max + floor)  # (n,)


def _pair_sqdist(x: torch.Tensor, c: torch.Tensor, r: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """(p,) float64 ``sum((x[r] - c[j])**2)`` for p (row, code) pairs, in batches of bounded memory.

    Float64 ranks float32 inputs as exactly as the oracle does: equal values mean a genuine tie.

    Args:
        x: (s, dim) float64 rows. c: (m, dim) float64 centroids, same device. r, j: (p,) int64.
    """
    step = max(1, _RERANK_ELEMENTS // max(1, x.shape[1]))
    if r.shape[0] <= step:
        return c.index_select(0, j).sub_(x.index_select(0, r)).square_().sum(dim=1)  # (p,)
    out = torch.empty(r.shape[0], dtype=torch.float64, device=x.device)  # (p,)
    for lo in range(0, r.shape[0], step):
        diff = c.index_select(0, j[lo : lo + step]).sub_(x.index_select(0, r[lo : lo + step]))  # (b, dim)
        out[lo : lo + step] = diff.square_().sum(dim=1)
    return out


def _exact_nearest(x: torch.Tensor, k: int, terms: tuple) -> torch.Tensor:
    """(r, k) int64: the k nearest codes of the rows ``x`` (r, dim) float32 by the exact squared
    distance, nearest first, the lowest code on ties; ``terms`` is :meth:`TorchEngine._exact_terms`.

    The same centred expansion as the float32 GEMM, in float64: its rounding bound
    (:func:`_rounding_bound` at ``u = 2^-53``) is some 10^-9 times the float32 one, so only codes
    within it of the k-th best, genuine ties and near-ties, remain candidates (usually just the k
    answers); those are ranked in the direct form ``sum((x - c)**2)`` in float64. Rows go through in
    blocks of at most ``_RERANK_ELEMENTS`` (rows, codes) entries, which bounds the memory whatever
    ``r`` is.
    """
    shift, c, cs, w, cs_norm_max = terms  # (dim,), (m, dim), (m, dim), (m,) float64, float
    m, dim = cs.shape
    out = torch.empty((x.shape[0], k), dtype=torch.int64, device=x.device)  # (r, k)
    step = max(1, _RERANK_ELEMENTS // m)
    gamma = _gamma(2 * dim + 5, 2.0**-53)
    for lo in range(0, x.shape[0], step):
        xb = x[lo : lo + step].double()  # (b, dim)
        b = xb.shape[0]
        xs = xb - shift  # (b, dim)
        partial = torch.addmm(w, xs, cs.T, alpha=-2.0)  # (b, m) float64: |cs|^2 - 2 xs.cs
        kth = partial.amin(dim=1) if k == 1 else partial.topk(k, dim=1, largest=False).values.amax(dim=1)  # (b,)
        # Every code among the exact nearest k has partial <= kth + 2E; 3E leaves room for rounding.
        # Float32 inputs keep every term finite in float64: no NaN to take care of.
        threshold = _rounding_bound(xs, cs_norm_max, gamma).mul_(3.0).add_(kth)  # (b,)
        r, j = (partial <= threshold[:, None]).nonzero(as_tuple=True)  # (p,), (p,): by row, then code
        del partial
        if r.shape[0] == k * b:  # every row has at least k candidates, so here exactly k: its answer
            out[lo : lo + b] = j.view(b, k)
            continue
        d = _pair_sqdist(xb, c, r, j)  # (p,)
        if k == 1:  # the smallest code at each row's smallest distance, without sorting
            least = torch.full((b,), math.inf, dtype=d.dtype, device=d.device)
            at = d == least.scatter_reduce_(0, r, d, "amin")[r]  # (p,)
            code = torch.full((b,), m, dtype=j.dtype, device=j.device)  # (b,)
            out[lo : lo + b, 0] = code.scatter_reduce_(0, r[at], j[at], "amin")
            continue
        # Stable sorts, last key first: by row, then distance, then code (the pairs' own order).
        order = d.sort(stable=True).indices  # (p,)
        order = order[r[order].sort(stable=True).indices]  # (p,)
        r, j = r[order], j[order]
        count = torch.bincount(r, minlength=b)  # (b,)
        rank = torch.arange(r.shape[0], device=r.device) - (count.cumsum(0) - count)[r]  # (p,) place in its row
        keep = rank < k
        out[lo + r[keep], rank[keep]] = j[keep]
    return out


def _sorted_line(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, up, down)`` for one-dimensional centroids ``c`` (m, 1).

    ``values`` (m,) are the centroids sorted; ``up`` (m,) and ``down`` (m,) are the codes in that
    order, equal values ordered by code ascending in ``up`` and descending in ``down``.
    """
    v = c[:, 0]  # (m,)
    up = v.sort(stable=True).indices  # (m,)
    reverse = torch.arange(v.shape[0] - 1, -1, -1, device=c.device)  # (m,)
    down = reverse[v[reverse].sort(stable=True).indices]  # (m,)
    return v[up], up, down


def _nearest_on_a_line(x: torch.Tensor, c: torch.Tensor, k: int, line: tuple) -> torch.Tensor:
    """(n, k) int64: the k nearest codes of one-dimensional rows ``x`` (n, 1), nearest first, the lowest
    code on ties; ``line`` is :func:`_sorted_line` of ``c`` (m, 1).

    Ordered by (distance, code), the centroids below a row are best read downwards from it, with
    equal values by code ascending (``down`` read backwards), and those at or above it upwards
    (``up``); the k best of all are among the k best of each side. Their distances are compared in
    float64, where ``|x - c|`` of two float32 numbers is exact or, at worst, monotone in ``c``.
    """
    values, up, down = line
    m = values.shape[0]
    q = x[:, 0].contiguous()  # (n,)
    at = torch.searchsorted(values, q)  # (n,) first sorted position whose value is >= the row's
    steps = torch.arange(k, device=x.device)  # (k,)
    above, below = at[:, None] + steps, at[:, None] - 1 - steps  # (n, k), (n, k) sorted positions
    codes = torch.cat([up[above.clamp(max=m - 1)], down[below.clamp(min=0)]], dim=1)  # (n, 2k)
    valid = torch.cat([above < m, below >= 0], dim=1)  # (n, 2k)
    d = (c[:, 0].double()[codes] - q.double()[:, None]).abs_().masked_fill_(~valid, math.inf)  # (n, 2k)
    codes = codes.masked_fill_(~valid, m)  # (n, 2k): an absent candidate sorts after every code
    codes, order = codes.sort(dim=1)  # (n, 2k) by code, then stably by distance
    pick = d.gather(1, order).sort(dim=1, stable=True).indices[:, :k]  # (n, k)
    return codes.gather(1, pick)


class TorchEngine:
    name = "torch"

    def __init__(self, device: torch.device | None = None) -> None:
        self._on_gpu = device is not None and device.type == "cuda"
        # Centroid-side terms of the last codebook seen, reused across the chunks of one pass.
        self._prepared: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, float] | None = None
        self._work: tuple[torch.Tensor, torch.Tensor] | None = None  # see _ranking
        self._line: tuple[torch.Tensor, int, tuple] | None = None  # see _line_of
        self._exact: tuple[torch.Tensor, int, tuple] | None = None  # see _exact_terms
        self._marks: torch.Tensor | None = None  # see _marks_of
        self._scratch: torch.Tensor | None = None  # see _scratch_of

    def preferred_chunk_rows(self, n_codes: int, dim: int) -> int:
        """Rows per chunk that keep the distance block near cache size (see ``_BLOCK_BYTES``).

        On a GPU there is no such cache to fit, and every chunk costs kernel launches: there, the
        memory budget alone sets the chunk size.
        """
        if self._on_gpu:
            return 1 << 20
        return max(256, _BLOCK_BYTES // (4 * max(n_codes, dim)))

    def _centred(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(shift, weights, cs_norm_max)`` for the centroids ``c`` (m, dim).

        ``shift`` (dim,) is the centroids' mean and ``cs = c - shift`` the shifted centroids;
        ``weights`` (dim + 1, m) is ``[-2 cs | |cs|^2]`` transposed, so that one matrix product of
        ``[x - shift | 1]`` with it gives ``|cs|^2 - 2 (x - shift).cs`` without a separate pass to add
        the bias, which is faster than ``addmm`` plus the shift at small widths and no slower at large ones.
        ``|cs|^2`` is summed in float64 and rounded once, which keeps the rounding bound small
        (:func:`_rounding_bound`); ``cs_norm_max`` is ``max |cs_j|``, the bound's ``C``.
        Cached for the tensor ``c`` (checked by identity and in-place version), so a pass over many
        chunks computes them once.
        """
        p = self._prepared
        if p is not None and p[0] is c and p[1] == c._version:
            return p[2], p[3], p[4]
        shift = c.mean(dim=0)  # (dim,)
        cs = c - shift  # (m, dim)
        sq = cs.double().square().sum(dim=1)  # (m,) float64
        weights = torch.cat([cs * -2.0, sq.to(cs.dtype)[:, None]], dim=1).T.contiguous()  # (dim+1, m)
        cs_norm_max = float(sq.max().sqrt()) if sq.numel() else 0.0
        self._prepared = (c, c._version, shift, weights, cs_norm_max)
        return shift, weights, cs_norm_max

    def _ranking(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(partial, xs, cs_norm_max)``: ``partial`` (n, m) = ``|cs|^2 - 2 xs.cs``, which ranks the
        centroids of each row like the squared distance (the row's own ``|xs|^2`` is left out);
        ``xs`` = ``x - shift`` (n, dim) and ``cs`` = ``c - shift`` (m, dim); see :meth:`_centred`."""
        shift, weights, cs_norm_max = self._centred(c)
        n, dim = x.shape
        # Two buffers are reused from chunk to chunk (cheaper than fresh ones): [x - shift | 1]
        # and the (n, m) product. Only nearest() uses them: its results never alias them. Larger
        # buffers serve a shorter chunk on the CPU only; on a GPU, a chunk halved after running out of
        # memory must not keep the larger buffers alive.
        w = self._work
        if (
            w is None
            or w[0].device != x.device
            or w[0].shape[1] != dim + 1
            or w[1].shape[1] != weights.shape[1]
            or w[0].shape[0] < n
            or (w[0].shape[0] > n and x.device.type != "cpu")
        ):
            self._work = None  # released before the new ones are allocated
            aug = torch.empty((n, dim + 1), dtype=x.dtype, device=x.device)
            aug[:, dim] = 1.0
            w = self._work = (aug, torch.empty((n, weights.shape[1]), dtype=x.dtype, device=x.device))
        aug, partial = w[0][:n], w[1][:n]  # (n, dim + 1), (n, m); leading rows are contiguous
        xs = torch.sub(x, shift, out=aug[:, :dim])  # (n, dim) view of aug
        return torch.mm(aug, weights, out=partial), xs, cs_norm_max

    def _scratch_of(self, partial: torch.Tensor) -> torch.Tensor:
        """A (n, m) float32 block shaped like ``partial``, kept between calls (CPU)."""
        s = self._scratch
        if s is None or s.shape[1] != partial.shape[1] or s.shape[0] < partial.shape[0]:
            s = self._scratch = torch.empty_like(partial)
        return s[: partial.shape[0]]

    def _marks_of(self, m: int) -> torch.Tensor:
        """:func:`_marks` (m,) on the CPU, kept for the last ``m``."""
        if self._marks is None or self._marks.shape[0] != m:
            self._marks = _marks(m, torch.device("cpu"))
        return self._marks

    def _line_of(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`_sorted_line` of ``c`` (m, 1), cached like :meth:`_centred`."""
        p = self._line
        if p is not None and p[0] is c and p[1] == c._version:
            return p[2]
        line = _sorted_line(c)
        self._line = (c, c._version, line)
        return line

    def _exact_terms(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(shift, c, cs, w, cs_norm_max)`` in float64 for :func:`_exact_nearest`: the shift of
        :meth:`_centred` (dim,), the centroids ``c`` (m, dim), ``cs = c - shift`` (m, dim),
        ``w = |cs|^2`` (m,) and ``max |cs|``. Made on the first row that needs them and cached like
        :meth:`_centred`."""
        p = self._exact
        if p is not None and p[0] is c and p[1] == c._version:
            return p[2]
        shift = self._centred(c)[0].double()  # (dim,)
        c64 = c.double()  # (m, dim)
        cs = c64 - shift  # (m, dim)
        w = cs.square().sum(dim=1)  # (m,)
        terms = (shift, c64, cs, w, float(w.max().sqrt()))
        self._exact = (c, c._version, terms)
        return terms

    def nearest(
        self, x: torch.Tensor, c: torch.Tensor, k: int, *, distances: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """See :meth:`vq_pipeline.compute.engines.Engine.nearest`.

        The codes are exact (module docstring): the k nearest by the exact squared distance, the
        lowest code first among equal distances.
        """
        if x.shape[1] == 1:
            idx = _nearest_on_a_line(x, c, k, self._line_of(c))  # (n, k)
        else:
            idx = self._nearest_by_gemm(x, c, k)  # (n, k)
        if k == 1 and not distances:
            return None, idx
        if k == 1:  # in place: one (n, dim) temporary instead of three
            diff = c.index_select(0, idx[:, 0]).sub_(x)  # (n, dim)
            return diff.square_().sum(dim=1, keepdim=True), idx  # (n, 1)
        # k > 1 always recomputes, so that the order of the k codes never depends on ``distances``;
        # the codes are sorted first so that equal distances list the lowest code first.
        idx = idx.sort(dim=1).values  # (n, k)
        sqdist = (x[:, None, :] - c[idx]).square().sum(dim=2)  # (n, k)
        sqdist, order = sqdist.sort(dim=1, stable=True)  # (n, k)
        return sqdist, idx.gather(1, order)

    def _nearest_by_gemm(self, x: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
        """(n, k) int64 exact nearest codes of ``x`` (n, dim): the GEMM's where its bound proves them,
        the float64 direct form's elsewhere (module docstring)."""
        partial, xs, cs_norm_max = self._ranking(x, c)  # (n, m), (n, dim)
        m = partial.shape[1]
        if k == 1 and x.device.type == "cpu" and m < _WIDE_ROWS:
            bound = _rounding_bound(xs, cs_norm_max, product_gamma(x.shape[1], matmul_roundoff(x.device)))  # (n,)
            idx, unproven = _proven_best_rows(partial, bound, self._marks_of(m))  # (n, 1), (r,)
            if unproven.size:
                rows = torch.from_numpy(unproven)  # (r,)
                idx[rows] = _exact_nearest(x.index_select(0, rows), k, self._exact_terms(c))  # (r, 1)
            return idx
        if k == 1:
            idx, kth, gap = _best_two_rows(partial)  # (n, 1), (n,), (n,)
        else:
            vals, idx = partial.topk(min(k + 1, m), dim=1, largest=False, sorted=True)  # (n, k'), (n, k')
            kth = vals[:, k - 1]  # (n,)
            gap = vals[:, k] - kth if k < m else None  # (n,); k == m: the set is every code, no choice
            idx = idx[:, :k]  # (n, k)
        if gap is None:
            return idx
        bound = _rounding_bound(xs, cs_norm_max, product_gamma(x.shape[1], matmul_roundoff(x.device)))  # (n,)
        if x.device.type == "cpu":  # the same test in numpy, without torch's per-operation overhead
            g, b, v = gap.numpy(), bound.numpy(), kth.numpy()
            rows = torch.from_numpy(np.flatnonzero(~(g > 2.0 * b) | ~np.isfinite(v)))  # (r,)
        else:
            rows = (~(gap > 2.0 * bound) | ~kth.isfinite()).nonzero()[:, 0]  # (r,)
        if rows.numel():  # unproven rows: a NaN anywhere counts as unproven
            idx = idx.contiguous()
            idx[rows] = _exact_nearest(x.index_select(0, rows), k, self._exact_terms(c))  # (r, k)
        return idx

    def nearest_runner_up(
        self, x: torch.Tensor, c: torch.Tensor, arranged: torch.Tensor, grouping: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, low2)`` for the pruned E step (:func:`vq_pipeline.compute.prune.runner_up`): (n,) int64 the
        exact nearest code of each row of ``x`` (n, dim), dim > 1, among the centroids ``c`` (m, dim),
        and (n, t) float32 lower bounds on its squared distance to the other centroids of each group
        of ``grouping`` (:class:`vq_pipeline.compute.prune.Grouping`; ``arranged`` is ``c`` in its order).

        One GEMM against ``arranged`` gives both: the best code as in :meth:`_nearest_by_gemm`
        (proven by the marks of :func:`_proven_best_rows` on the CPU, by the gap test elsewhere, else
        ranked again in float64 among ``c``, so that ties go to the lowest code), and, with that
        code's entry set to ``inf``, each group's smallest ranking value ``p_g`` (the second-smallest
        value of the gap test when there is one group, off the CPU). A centroid's squared distance
        is ``T_j + |x - s|^2`` with ``T_j >= partial_j - E`` (:func:`_rounding_bound`), so
        ``p_g - E + |x - s|^2`` bounds the group's other centroids from below;
        ``|x - s|^2 >= |xs|^2 (1 - (dim + 8) u)`` (``xs`` is within relative ``u`` of ``x - s`` per
        coordinate, its float32 sum of squares within ``gamma_dim``), and the float32 evaluation
        loses at most a few ``u`` of its operands, which the last term takes off four times over.
        """
        partial, xs, cs_norm_max = self._ranking(x, arranged)  # (n, m) columns in group order, (n, dim)
        n, dim = x.shape
        m = partial.shape[1]
        xsq = xs.square().sum(dim=1).mul_(1.0 - (dim + 8) * _ROUNDOFF["ieee"])  # (n,) before the buffers change
        bound = _rounding_bound(xs, cs_norm_max, product_gamma(dim, matmul_roundoff(x.device)))  # (n,)
        order = grouping.order.to(x.device)
        marks = x.device.type == "cpu" and m < _WIDE_ROWS
        if marks:  # the marks proof into a scratch block, which keeps ``partial`` for the minima below
            scratch = self._scratch_of(partial)
            j, unproven = _proven_best_rows(partial, bound, self._marks_of(m), out=scratch)  # (n, 1), (r,)
            idx = order[j[:, 0].clamp_(0, m - 1)]  # (n,) meaningless on unproven rows, ranked again below
            rows = torch.from_numpy(unproven)  # (r,)
        else:
            j, best, gap = _best_two_rows(partial)  # (n, 1), (n,), (n,) in group order
            idx = order[j[:, 0]]  # (n,)
            if x.device.type == "cpu":
                g, b, v = gap.numpy(), bound.numpy(), best.numpy()
                rows = torch.from_numpy(np.flatnonzero(~(g > 2.0 * b) | ~np.isfinite(v)))  # (r,)
            else:
                rows = (~(gap > 2.0 * bound) | ~best.isfinite()).nonzero()[:, 0]  # (r,)
        if rows.numel():
            idx[rows] = _exact_nearest(x.index_select(0, rows), 1, self._exact_terms(c))[:, 0]  # (r,)
        if grouping.t == 1 and not marks:
            # the second-smallest value: at most fl(best + gap) (1 + u), one rounding
            least = best.add(gap).mul_(1.0 - 2.0 * _ROUNDOFF["ieee"])[:, None]  # (n, 1)
        else:  # each group's smallest entry once the chosen code's is set to inf
            partial[torch.arange(n, device=x.device), grouping.position.to(x.device)[idx]] = math.inf
            least = grouping.minima(partial)  # (n, t)
        room = (least.abs() + (bound + xsq)[:, None]).mul_(2.0**-20).nan_to_num_(posinf=0.0)  # (n, t)
        return idx, least.sub_(bound[:, None]).add_(xsq[:, None]).sub_(room)

    def sqdist(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """See :meth:`vq_pipeline.compute.engines.Engine.sqdist`: the centred GEMM form, clamped at 0.

        Left inexact on purpose, unlike :meth:`nearest`: its error is absolute and about float32's
        precision times ``C (C + 2 |x - shift|)`` (:func:`_rounding_bound`), which may swamp the
        distance of a row that nearly coincides with a candidate; k-means++ only samples rows in
        proportion to these distances, and such rows carry almost no weight either way.
        """
        partial, xs, _ = self._ranking(x, c)  # (n, m), (n, dim)
        self._work = None  # the caller keeps ``partial``: hand the buffers over
        return partial.add_(xs.square().sum(dim=1, keepdim=True)).clamp_min_(0.0)

    def bytes_per_row(self, n_codes: int, dim: int, k: int) -> int:
        # partial (n_codes) + topk/argmin temporaries (k + 1) + bound, gap and flags + [x - shift | 1]
        # (dim + 1) + gathered diffs (k * dim). The re-ranking of unproven rows adds their float32
        # copy and a fixed block of at most 64 * _RERANK_ELEMENTS bytes (16 MiB), whatever the chunk's
        # size; the one-dimensional search needs less than the partial it does without.
        return 4 * n_codes * 2 + 16 * (k + 1) + 16 + 4 * (dim + 1) + 4 * dim * (1 + 2 * k)
