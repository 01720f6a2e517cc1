"""Seeding: a fit's initial centroids, chosen among its rows (greedy k-means++, exact; k-means||).

:func:`kmeans_plus_plus` is greedy k-means++ as scikit-learn runs it: each step draws
``2 + ln(n_codes)`` candidate rows with probability proportional to their squared distance to the
nearest centre chosen so far, and keeps the candidate that lowers the total (the potential) the
most. It is exact: given the same generator it picks the same rows as the plain algorithm that
computes every distance in float64 in the direct form ``sum((x - c)**2)``, except where two
candidates' potentials tie within float64 rounding (each row's term is within
``(dim + 8) 2^-52 (|x - s| + |c - s|)^2`` of the direct form's, see below), or a draw falls as close
to the boundary between two rows. It avoids most of the distance computations with
the triangle inequality (Raff, "Exact Acceleration of K-Means++ and K-Means||", IJCAI 2021): every
row keeps its nearest centre ``a(x)`` and squared distance ``closest(x)``; if a candidate c lies at
``|c - a(x)|^2 >= 4 closest(x)``, then ``|x - c| >= |c - a(x)| - |x - a(x)| >= sqrt(closest(x))`` and
c cannot lower that row's distance. Only the rows for which some candidate fails this test are
computed, all candidates at once, by one float64 matrix product per chunk.

Rounding. Both sides of the test carry a proven bound on their float64 rounding error, so a row is
skipped only when the exact inequality holds with room to spare. A distance computed through the
matrix product (the expansion ``|x - s|^2 + |c - s|^2 - 2 (x - s).(c - s)`` around the rows' mean
``s``) is within :func:`_expansion_error` of the exact one; one that cannot be told from 0 within
that bound is computed again in the direct form, so copies of a chosen row get exactly 0 (they are
never drawn, and running out of distinct rows is detected). A squared distance below float32's
smallest subnormal number counts as 0, as it does for Lloyd's float32 distances: rows that float32
cannot tell apart are copies here too.

:func:`kmeans_parallel` is k-means|| (Bahmani et al., "Scalable K-Means++", VLDB 2012), an
approximate seeding: a few rounds each draw about ``2 n_codes`` rows at once, each row independently
with probability proportional to its squared distance to the candidates so far, through the
engine's nearest-code search; the candidates, weighted by the rows nearest to them, are then
reduced to ``n_codes`` centroids by weighted greedy k-means++.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vq_pipeline.compute.assign import nearest_in_chunks, plan_chunk_rows
from vq_pipeline.compute.engines import Engine
from vq_pipeline.compute.engines.torch import matmul_roundoff, product_gamma
from vq_pipeline.errors import TooFewPointsError
from vq_pipeline.runtime import share_cpus
from vq_pipeline.validate import row_chunks, too_few_rows_fix

log = logging.getLogger(__name__)

#: Unit roundoff of float64.
_U64 = 2.0**-53
#: A squared distance below float32's smallest subnormal number counts as 0 (see the module docstring).
_FLOAT32_ZERO = 2.0**-149
#: Rounds of k-means|| and rows drawn per round, per code. Bahmani et al. found 5 rounds enough; Spark
#: draws 2 by default. 2 rounds seed much faster than 5 at about the same objectives; a
#: smaller oversampling is faster still but worsened the objective on some data (figures in the docs'
#: Benchmarks page, "Seeding").
KMEANS_PARALLEL_ROUNDS = 2
KMEANS_PARALLEL_OVERSAMPLING = 2.0


@dataclass(frozen=True)
class InitProgress:
    """Seeding progress, reported before the first iteration: ``chosen`` of ``n_codes`` initial
    centroids picked so far, ``seconds`` after seeding began. A fit reports ``chosen=0`` when a
    seeding that takes time begins (k-means||, k-means++, progressive; ``note`` names it and its rows);
    k-means|| then reports each round (``note``: its candidates), k-means++ every few percent, and
    every init its end (``chosen == n_codes``). ``level``/``n_levels`` (a multi-level fit, ``level``
    counted from 0) and ``restart``/``n_init`` (counted from 0) are filled in by the fit."""

    chosen: int
    n_codes: int
    seconds: float
    note: str = ""
    restart: int = 0
    n_init: int = 1
    level: int | None = None
    n_levels: int = 1


def report_init(
    progress: Callable[[Any], None] | None, chosen: int, n_codes: int, t0: float, *, note: str = ""
) -> None:
    event = InitProgress(chosen=chosen, n_codes=n_codes, seconds=time.perf_counter() - t0, note=note)
    if progress is not None:
        progress(event)


def _expansion_error(dim: int) -> float:
    """``g`` such that ``g (|x - s| + |c - s|)^2`` bounds the float64 rounding error of a squared
    distance computed as ``|x - s|^2 + |c - s|^2 - 2 (x - s).(c - s)`` from float32 ``x``, ``c``, ``s``.

    With unit roundoff ``u``: ``x - s`` and ``c - s`` are rounded once per coordinate (relative
    ``u``); the squared norms are sums of ``dim`` non-negative terms (relative ``gamma_{dim+2}``);
    the dot product, in any summation order, is within ``gamma_{dim+2} |x - s| |c - s|`` (Higham,
    Accuracy and Stability of Numerical Algorithms, eq. 3.5, and Cauchy-Schwarz); the final sum and
    difference add ``2u`` of their operands' magnitudes, at most ``(|x - s| + |c - s|)^2``. In all,
    ``gamma_{dim+5} (|x - s| + |c - s|)^2``, with ``gamma_n = n u / (1 - n u)``; doubling it covers the
    rounding of the bound itself, evaluated from computed norms.
    """
    n = dim + 8
    return 2.0 * n * _U64 / (1.0 - n * _U64)


def _margin(dim: int) -> float:
    """Relative room a pruning test leaves: far above the direct form's rounding (``gamma_{dim+2}``)."""
    return max(2.0**-40, 8.0 * _expansion_error(dim))


def _product_error(dim: int, device: torch.device) -> float:
    """``g32``: the float32 screen's values are within ``g32`` times the sum of its operands'
    magnitudes of the exact squared distances (:meth:`_Greedy.screen`): ``gamma_{dim+10}`` at float32's
    unit roundoff, or at a coarser one where torch is set to let the product round its factors to TF32
    or bfloat16 (:func:`vq_pipeline.compute.engines.torch.product_gamma`, for a product of width ``dim + 5``),
    doubled for the rounding of the bound itself; ``inf`` where it would prove nothing."""
    g = product_gamma(dim + 5, matmul_roundoff(device))
    return 2.0 * g if g < 0.05 else math.inf


def _direct_sqdist(x: torch.Tensor, c: torch.Tensor, chunk_rows: int, device: torch.device) -> torch.Tensor:
    """(n_rows,) float64 ``sum((x - c)**2)`` in float64 of every row of ``x`` (n_rows, dim) to one
    row ``c`` (dim,) float32, on ``device``; exactly 0 for copies of ``c``."""
    c64 = c.to(device, torch.float64)  # (dim,)
    out = torch.empty(x.shape[0], dtype=torch.float64, device=device)  # (n_rows,)
    for rows in row_chunks(x.shape[0], chunk_rows):
        out[rows] = x[rows].to(device, torch.float64).sub_(c64).square_().sum(dim=1)
    return out.masked_fill_(out < _FLOAT32_ZERO, 0.0)


def _chunk_rows(n_rows: int, per_row: int, memory_budget: int, device: torch.device, cache_bytes: int) -> int:
    """Rows per chunk: ``per_row`` bytes of temporaries each within ``memory_budget``, and on the CPU
    about ``cache_bytes`` of them, which keeps a chunk's operands in cache."""
    rows = max(1, memory_budget // per_row)
    if device.type == "cpu":
        rows = min(rows, max(64, cache_bytes // per_row))
    return int(min(rows, max(n_rows, 1)))


def kmeans_plus_plus(
    x: torch.Tensor,
    n_codes: int,
    *,
    generator: torch.Generator,
    engine: Engine | None = None,
    memory_budget: int,
    device: torch.device,
    progress: Callable[[Any], None] | None = None,
    weights: torch.Tensor | None = None,
    t0: float | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding, exact, with triangle-inequality pruning (module docstring).

    The first centre is drawn uniformly (in proportion to ``weights`` when given). Each further step
    draws ``2 + ln(n_codes)`` candidates with probability proportional to ``weights`` times the
    squared distance to the nearest chosen centre, and keeps the one that lowers the weighted total
    the most (the first candidate on exact ties).

    Per step: the candidates' distances to the chosen centres (a small float64 product) prune the
    rows by the triangle inequality; a float32 product over the remaining rows proves, for most of
    them, that no candidate comes closer than their centre (:meth:`_Greedy.screen`); only the rows
    left, those a candidate does bring closer and those too near to call, get float64 distances
    (:func:`_candidate_sqdist`), from which the potentials and the winner's distances come. When every
    pairwise distance of the rows fits in ``memory_budget`` (k-means||'s candidates, small tables), they
    are computed once instead (``9 n_rows^2`` bytes: the float64 matrix and a mask), and a step reads
    ``n_trials`` rows of that matrix (:class:`_GreedyMatrix`):
    the same choices, without the fixed cost of the pruning passes in each of the ``n_codes`` steps.

    Args:
        x: (n_rows, dim) float32 rows (unit rows under cosine), any device; finite.
        generator: CPU generator; all randomness comes from it, drawn as the plain algorithm draws it.
        engine: unused (the distances are products computed here); kept for a uniform seeding signature.
        memory_budget: bytes of temporaries one chunk may use; nothing of size (n_rows, dim) is made.
        device: where to compute.
        progress: called with an :class:`InitProgress` about every 5% of the centroids (and at the end).
        weights: (n_rows,) non-negative row weights (k-means|| candidates), any device; None: all 1.
        t0: the ``time.perf_counter()`` that progress times count from (default: now).

    Returns:
        (n_codes, dim) float32 centroids on ``device``, each a row of ``x``.

    Raises:
        TooFewPointsError: fewer than ``n_codes`` distinct rows (of positive weight).
    """
    del engine
    n_rows = x.shape[0]
    n_trials = 2 + int(math.log(n_codes))
    small = n_rows * n_rows * 9 <= memory_budget  # every pairwise float64 distance at once, and a mask
    run: _Greedy | _GreedyMatrix
    if small:
        run = _GreedyMatrix(x, device, weights)
    else:
        run = _Greedy(x, n_codes, n_trials, memory_budget, device, weights)
    if run.weights is None:
        first = int(torch.randint(n_rows, (1,), generator=generator))
    else:  # in proportion to the weights, as scikit-learn draws it
        target = torch.rand(1, generator=generator, dtype=torch.float64) * float(run.weights.sum())
        first = int(torch.searchsorted(run.weights.cumsum(0), target.to(device), right=True).clamp_(max=n_rows - 1))
    chosen = [first]
    run.start(first)
    t0 = time.perf_counter() if t0 is None else t0
    report_every = max(1, n_codes // 20)
    for i in range(1, n_codes):
        share_cpus()
        if i % report_every == 0:
            report_init(progress, i, n_codes, t0)
        weighted = run.closest if run.weights is None else run.closest * run.weights  # (n_rows,)
        total = float(weighted.sum())
        if total <= 0:
            raise TooFewPointsError(
                f"x has only {i} distinct rows but n_codes={n_codes}; expected at least n_codes distinct rows. "
                f"{too_few_rows_fix(x, i)}"
            )
        cumulative = weighted.cumsum(0)  # (n_rows,)
        targets = torch.rand(n_trials, generator=generator, dtype=torch.float64) * total  # (n_trials,)
        # right=True lands on a row whose own weight is > 0, so a row already chosen is never drawn.
        candidates = torch.searchsorted(cumulative, targets.to(device), right=True).clamp_(max=n_rows - 1)
        chosen.append(int(candidates[run.step(i, candidates, total)]))
    report_init(progress, n_codes, n_codes, t0)
    return x[torch.tensor(chosen, device=x.device)].to(device, torch.float32).contiguous()


class _Greedy:
    """The state of one greedy k-means++ run over the rows ``x`` (n_rows, dim) float32.

    ``closest`` (n_rows,) float64: each row's squared distance to its nearest chosen centre ``near``
    (n_rows,) int64, within ``g (|x - s| + |c - s|)^2`` of the exact value (exact in the direct form
    where that bound cannot tell it from 0); ``limit`` (n_rows,): 4 times an upper bound on the exact
    value, with room to spare: a candidate c prunes a row when a lower bound on ``|c - a(x)|^2``
    reaches it. The chosen centres are kept shifted by ``s``, in float64 (``cs``, ``cn2``).
    """

    def __init__(
        self,
        x: torch.Tensor,
        n_codes: int,
        n_trials: int,
        memory_budget: int,
        device: torch.device,
        weights: torch.Tensor | None,
    ) -> None:
        n_rows, dim = x.shape
        self.x, self.device, self.n_trials = x, device, n_trials
        self.weights = None if weights is None else weights.to(device, torch.float64)  # (n_rows,)
        self.g, self.margin = _expansion_error(dim), _margin(dim)
        self.g32 = _product_error(dim, device)
        self.floor32 = 4.0 * (dim + 4) * 2.0**-126  # underflow in a float32 product
        # float64 rows and their float32 copy, candidates' distances, gains and flags
        self.chunk64 = _chunk_rows(n_rows, 12 * dim + 40 * n_trials + 64, memory_budget, device, 2**20)
        self.chunk32 = _chunk_rows(n_rows, 4 * dim + 40 * n_trials + 64, memory_budget, device, 2**22)
        # The shift s: the rows' mean, rounded to float32 (so exact in float64); every row's |x - s|^2.
        total_row = torch.zeros(dim, dtype=torch.float64, device=device)  # (dim,)
        for rows in row_chunks(n_rows, self.chunk64):
            total_row += x[rows].to(device, torch.float64).sum(dim=0)
        self.shift = (total_row / n_rows).to(torch.float32).double()  # (dim,)
        self.shift_norm = float(self.shift.norm())
        self.xn2 = torch.empty(n_rows, dtype=torch.float64, device=device)  # (n_rows,)
        for rows in row_chunks(n_rows, self.chunk64):
            self.xn2[rows] = x[rows].to(device, torch.float64).sub_(self.shift).square_().sum(dim=1)
        self.xn = self.xn2.sqrt()  # (n_rows,)
        self.xn2_32 = self.xn2.float()  # (n_rows,)
        self.cs = torch.empty((n_codes, dim), dtype=torch.float64, device=device)  # (n_codes, dim)
        self.cn2 = torch.empty(n_codes, dtype=torch.float64, device=device)  # (n_codes,)
        self.cn = torch.empty(n_codes, dtype=torch.float64, device=device)  # (n_codes,) their norms
        self.near = torch.zeros(n_rows, dtype=torch.int64, device=device)  # (n_rows,)
        self.closest = torch.empty(n_rows, dtype=torch.float64, device=device)  # (n_rows,)
        self.limit = torch.empty(n_rows, dtype=torch.float64, device=device)  # (n_rows,)

    def start(self, first: int) -> None:
        """Make row ``first`` the first centre: direct-form distances to it, exact."""
        self.cs[0] = self.x[first].to(self.device, torch.float64) - self.shift
        self.cn2[0], self.cn[0] = self.xn2[first], self.xn[first]
        self.closest = _direct_sqdist(self.x, self.x[first], self.chunk64, self.device)
        self.limit = self.closest * (4.0 * (1.0 + self.margin))

    def step(self, i: int, candidates: torch.Tensor, total: float) -> int:
        """Choose centre ``i`` among the rows ``candidates`` (n_trials,) int64, given the current
        weighted potential ``total``; update the state; return the winner's place in ``candidates``."""
        x, dev = self.x, self.device
        cand_x = x.index_select(0, candidates.to(x.device)).to(dev)  # (n_trials, dim) float32
        ts = cand_x.double().sub_(self.shift)  # (n_trials, dim)
        tn2 = ts.square().sum(dim=1)  # (n_trials,)
        tn = tn2.sqrt()  # (n_trials,)

        # Lower bounds on the candidates' squared distances to the chosen centres; the rows that some
        # candidate may bring closer, by the triangle inequality.
        cn = self.cn[:i]  # (i,)
        to_centres = torch.addmm(tn2[:, None] + self.cn2[None, :i], ts, self.cs[:i].T, alpha=-2.0)  # (n_trials, i)
        to_centres -= (tn[:, None] + cn[None, :]).square_().mul_(self.g)
        floor = to_centres.amin(dim=0).clamp_min_(0.0)  # (i,)
        mask = self.limit > floor[self.near]  # (n_rows,)
        rows = mask.nonzero()[:, 0]  # (r,)

        # Of those, the rows that the float32 screen cannot clear get float64 distances.
        unsure = self.screen(rows, ts, tn2, tn)  # (u,)
        dist = torch.empty((unsure.shape[0], self.n_trials), dtype=torch.float64, device=dev)  # (u, n_trials)
        saved = torch.zeros(self.n_trials, dtype=torch.float64, device=dev)  # (n_trials,)
        for lo in range(0, unsure.shape[0], self.chunk64):
            r = unsure[lo : lo + self.chunk64]  # (b,)
            d = _candidate_sqdist(x, r, self.shift, cand_x, ts, tn2, tn, self.xn2, self.xn, self.g)  # (b, n_trials)
            gain = (self.closest[r, None] - d).clamp_min_(0.0)  # (b, n_trials)
            if self.weights is not None:
                gain *= self.weights[r, None]
            saved += gain.sum(dim=0)
            dist[lo : lo + self.chunk64] = d
        best = int((total - saved).argmin())

        self.cs[i], self.cn2[i], self.cn[i] = ts[best], tn2[best], tn[best]
        moved = dist[:, best] < self.closest[unsure]  # (u,)
        r, d = unsure[moved], dist[:, best][moved]  # (m,), (m,)
        self.closest[r] = d
        self.near[r] = i
        # The bound of a distance from the expansion, added to it: an upper bound on the exact one.
        self.limit[r] = (self.xn[r] + tn[best]).square_().mul_(self.g).add_(d).mul_(4.0 * (1.0 + self.margin))
        return best

    def screen(self, rows: torch.Tensor, ts: torch.Tensor, tn2: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
        """(u,) int64: those of ``rows`` (r,) that some candidate may bring closer than ``closest``.

        A float32 product ``x . (c - s)`` gives ``|x - c|^2 = |x - s|^2 + |c - s|^2 + 2 s.(c - s) - 2 x.(c - s)``
        within ``e = g32 ((|x - s| + |c - s|)^2 + 4 |s| |c - s|)`` (:func:`_product_error`; the terms
        bound every operand's magnitude), at most ``e`` with the largest ``|c - s|``: a row is cleared
        when its nearest candidate's value, less that, still reaches its ``closest`` with room to
        spare. Per row, only the minimum over the candidates is kept: at low dimensions, per-pair
        work would cost more than the product. Most rows are read in place, in contiguous
        chunks, when most are to be screened; otherwise the rows are gathered.
        """
        x, dev, n_rows = self.x, self.device, self.x.shape[0]
        ts32 = ts.float()  # (n_trials, dim)
        bias = (tn2 + 2.0 * (ts @ self.shift)).float()  # (n_trials,)
        reach = float(tn.max())  # the largest |c - s|: one bound per row covers every candidate
        step = self.chunk32
        everything = rows.shape[0] * 2 > n_rows
        n = n_rows if everything else rows.shape[0]
        out = []
        for lo in range(0, n, step):
            if everything:
                sel: slice | torch.Tensor = slice(lo, min(lo + step, n_rows))
                xb = x[sel].to(dev)  # (b, dim) float32, read in place on its device
            else:
                sel = rows[lo : lo + step]  # (b,)
                xb = x.index_select(0, sel.to(x.device)).to(dev)  # (b, dim)
            # The nearest candidate's value (less the row's own |x - s|^2, added after the minimum).
            d = torch.addmm(bias[None, :], xb, ts32.T, alpha=-2.0).amin(dim=1).add_(self.xn2_32[sel]).double()  # (b,)
            xn = self.xn[sel]  # (b,)
            err = (xn + reach).square_().add_(4.0 * self.shift_norm * reach).mul_(self.g32).add_(self.floor32)  # (b,)
            found = (d.sub_(err) < self.closest[sel] * (1.0 + self.margin)).nonzero()[:, 0]  # (f,) places in the chunk
            out.append(found.add_(lo) if everything else sel[found])
        return torch.cat(out) if out else rows


class _GreedyMatrix:
    """The state of one greedy k-means++ run over few rows ``x`` (n_rows, dim) float32: the same choices
    as :class:`_Greedy` (same draws, same rule, distances within the same float64 bound of the direct
    form's, and exact where that bound cannot tell them from 0), from every pairwise squared distance
    computed once. A step then costs a few passes over ``n_trials`` rows of that matrix instead of the
    pruning and screening passes, whose fixed cost dominates when the rows are few: k-means|| ends
    with a weighted k-means++ over about ``4 n_codes`` candidates, one step per code."""

    def __init__(self, x: torch.Tensor, device: torch.device, weights: torch.Tensor | None) -> None:
        self.weights = None if weights is None else weights.to(device, torch.float64)  # (n_rows,)
        x64 = x.to(device, torch.float64)  # (n_rows, dim)
        shift = x64.mean(dim=0).float().double()  # (dim,) the rows' mean rounded to float32, as _Greedy's
        xs = x64 - shift  # (n_rows, dim)
        xn2 = xs.square().sum(dim=1)  # (n_rows,)
        xn = xn2.sqrt()  # (n_rows,)
        d = (xn2[:, None] + xn2[None, :]).addmm_(xs, xs.T, alpha=-2.0)  # (n_rows, n_rows), in place
        g = _expansion_error(x.shape[1])
        pr, pt = (d <= g * 4.0 * float(xn.max()) ** 2).nonzero(as_tuple=True)  # (p,), (p,) maybe within the bound
        near = d[pr, pt] <= (xn[pr] + xn[pt]).square_().mul_(g)  # (p,) cannot be told from 0
        pr, pt = pr[near], pt[near]
        d[pr, pt] = (x64[pr] - x64[pt]).square_().sum(dim=1)  # the direct form: exactly 0 on the diagonal
        self.d = d.masked_fill_(d < _FLOAT32_ZERO, 0.0)  # (n_rows, n_rows)
        self.closest = torch.empty(x.shape[0], dtype=torch.float64, device=device)  # (n_rows,)

    def start(self, first: int) -> None:
        self.closest = self.d[first].clone()

    def step(self, i: int, candidates: torch.Tensor, total: float) -> int:
        """As :meth:`_Greedy.step`: choose among ``candidates`` the row that lowers the potential most."""
        del i
        dist = self.d.index_select(0, candidates.to(self.d.device))  # (n_trials, n_rows)
        gain = (self.closest[None, :] - dist).clamp_min_(0.0)  # (n_trials, n_rows)
        if self.weights is not None:
            gain *= self.weights[None, :]
        best = int((total - gain.sum(dim=1)).argmin())
        torch.minimum(self.closest, dist[best], out=self.closest)
        return best


def _candidate_sqdist(
    x: torch.Tensor,
    r: torch.Tensor,
    shift: torch.Tensor,
    cand_x: torch.Tensor,
    ts: torch.Tensor,
    tn2: torch.Tensor,
    tn: torch.Tensor,
    xn2: torch.Tensor,
    xn: torch.Tensor,
    g: float,
) -> torch.Tensor:
    """(b, m) float64 squared distances of the rows ``x[r]`` to m candidates, each within its bound
    ``g (|x - s| + |c - s|)^2`` of the exact value, and exact (in the direct form) where they cannot be
    told from 0 within it.

    Args:
        r: (b,) int64 row indices on the compute device. shift: (dim,) float64 ``s``.
        cand_x: (m, dim) float32 candidates on the compute device;
        ts, tn2, tn: their (m, dim) shifted float64 copies, (m,) squared norms and norms.
        xn2, xn: (n_rows,) every row's shifted squared norm and norm.
    """
    xb = x.index_select(0, r.to(x.device)).to(shift.device)  # (b, dim) float32
    xs = xb.double().sub_(shift)  # (b, dim)
    d = torch.addmm(xn2[r, None] + tn2[None, :], xs, ts.T, alpha=-2.0)  # (b, m)
    unsure = d <= (xn[r, None] + tn[None, :]).square_().mul_(g)  # (b, m) cannot be told from 0
    if bool(unsure.any()):
        pr, pt = unsure.nonzero(as_tuple=True)  # (p,), (p,)
        d[pr, pt] = (xb[pr].double() - cand_x[pt].double()).square_().sum(dim=1)
    return d.masked_fill_(d < _FLOAT32_ZERO, 0.0)


def kmeans_parallel(
    x: torch.Tensor,
    n_codes: int,
    *,
    generator: torch.Generator,
    engine: Engine,
    memory_budget: int,
    device: torch.device,
    progress: Callable[[Any], None] | None = None,
    rounds: int = KMEANS_PARALLEL_ROUNDS,
    oversampling: float = KMEANS_PARALLEL_OVERSAMPLING,
) -> torch.Tensor:
    """k-means|| seeding (Bahmani et al. 2012), approximate: not the rows k-means++ would pick.

    One row is drawn uniformly; then each of ``rounds`` rounds draws every row independently with
    probability ``min(1, oversampling * n_codes * closest(x) / sum(closest))``, where ``closest`` is the
    squared distance to the nearest candidate so far, and updates ``closest`` through the engine's
    nearest-code search against the new candidates. More rounds follow while fewer than ``n_codes``
    distinct candidates exist. Each candidate is weighted by the rows nearest to it, and weighted
    greedy k-means++ (:func:`kmeans_plus_plus`) picks ``n_codes`` of them.

    Args:
        x: (n_rows, dim) float32 rows (unit rows under cosine), any device; finite.
        generator: CPU generator; all randomness comes from it (same generator state, same rows).
        engine: computes the nearest candidates. memory_budget: bytes of temporaries one chunk may use.
        device: where to compute. progress: after each round (``chosen=0``, ``note``: the candidates so
            far), then as for :func:`kmeans_plus_plus` (its final step), with times from the start.

    Returns:
        (n_codes, dim) float32 centroids on ``device``, each a row of ``x``.

    Raises:
        TooFewPointsError: fewer than ``n_codes`` distinct rows.
    """
    n_rows, dim = x.shape
    t0 = time.perf_counter()
    per_round = oversampling * n_codes
    chunk = _chunk_rows(n_rows, 12 * dim + 64, memory_budget, device, 2**20)
    first = int(torch.randint(n_rows, (1,), generator=generator))
    picked = [torch.tensor([first], device=device)]  # candidate row indices, by round
    closest = _direct_sqdist(x, x[first], chunk, device)  # (n_rows,) float64
    near = torch.zeros(n_rows, dtype=torch.int64, device=device)  # (n_rows,) index of the nearest candidate
    n_picked, done = 1, 0
    while True:
        total = float(closest.sum())
        rows, weights = _weighted_candidates(x, torch.cat(picked), near, n_picked)  # (m, dim), (m,)
        if total <= 0 or (done >= rounds and rows.shape[0] >= n_codes):
            break
        u = torch.rand(n_rows, generator=generator, dtype=torch.float64).to(device)  # (n_rows,)
        new = (u * total < closest * per_round).nonzero()[:, 0]  # (m,) never a row at distance 0
        done += 1
        if new.numel() == 0:
            continue
        c = x.index_select(0, new.to(x.device)).to(device, torch.float32).contiguous()  # (m, dim)
        rows_per_chunk = plan_chunk_rows(n_rows, c.shape[0], dim, k=1, engine=engine, memory_budget=memory_budget)
        for part, _, sqdist, idx in nearest_in_chunks(x, c, k=1, engine=engine, chunk_rows=rows_per_chunk):
            d = sqdist[:, 0].double().masked_fill_(sqdist[:, 0] < _FLOAT32_ZERO, 0.0)  # (b,)
            better = d < closest[part]  # (b,)
            closest[part] = torch.where(better, d, closest[part])
            near[part] = torch.where(better, idx[:, 0] + n_picked, near[part])
        picked.append(new)
        n_picked += new.shape[0]
        report_init(progress, 0, n_codes, t0, note=f"k-means|| round {done}: {n_picked:,} candidates")
    if rows.shape[0] < n_codes:
        raise TooFewPointsError(
            f"x has only {rows.shape[0]} distinct rows but n_codes={n_codes}; expected at least n_codes distinct "
            f"rows. {too_few_rows_fix(x, rows.shape[0])}"
        )
    log.debug("k-means||: %d candidates in %d rounds", rows.shape[0], done)
    return kmeans_plus_plus(
        rows,
        n_codes,
        generator=generator,
        memory_budget=memory_budget,
        device=device,
        progress=progress,
        weights=weights,
        t0=t0,
    )


def _weighted_candidates(
    x: torch.Tensor, picked: torch.Tensor, near: torch.Tensor, n_picked: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct candidate rows (m, dim) float32 and their weights (m,) float64: how many rows of
    ``x`` are nearest to each (``near`` (n_rows,) indexes ``picked`` (n_picked,)). Copies of one row
    are merged; candidates that no row is nearest to are left out."""
    weights = torch.bincount(near, minlength=n_picked).double()  # (n_picked,)
    keep = weights > 0  # (n_picked,)
    rows = x.index_select(0, picked[keep].to(x.device)).to(near.device, torch.float32)  # (k, dim)
    rows, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (m, dim), (k,)
    merged = torch.zeros(rows.shape[0], dtype=torch.float64, device=near.device)  # (m,)
    return rows, merged.index_add_(0, inverse, weights[keep])
