"""Exact pruning of Lloyd's E step by the triangle inequality (Hamerly's two bounds per row).

After the first iterations most rows keep their code, and two bounds per row prove it without
searching the centroids (Hamerly, "Making k-means even faster", SDM 2010):

* an upper bound ``U`` on the distance from the row to its code ``a``: its direct distance
  ``|x - c_a|``, which the E step computes for every row anyway (it is the row's term of the
  objective), widened by its float32 rounding;
* a lower bound ``L`` on the distance to every *other* centroid: the runner-up distance of the
  row's last search, minus the largest distance any other centroid has moved since
  (``|x - c'_j| >= |x - c_j| - |c'_j - c_j|``).

A row with ``U < max(L, s_a - U)``, where ``s_a`` is the distance from ``c_a`` to its nearest other
centroid, keeps its code: every other centroid is then strictly farther (``|x - c_j| >= |c_a - c_j| -
|x - c_a|``). Only the remaining rows go through the engine's search, which also gives their new
``L`` (the runner-up). So the codes, and with them the sums, counts, objective and farthest rows of
the E step, are those of the unpruned search, which finds the exact nearest code: a row is only
skipped when it has no near-tie. Every bound is loosened by a proven margin for its rounding
(float32 direct distances, the GEMM's rounding bound of the torch engine, float64 elsewhere), and a
float32 lower bound is stored rounded down.

With many codes, one centroid that moves far loosens every row's single ``L``. From
:data:`MIN_GROUPED_CODES` codes on (torch engine), the centroids are cut into up to
:data:`MAX_GROUPS` groups of nearby ones and each row keeps one lower bound per group, each loosened
only by its own group's largest move (Yinyang K-means, Ding et al., ICML 2015; only its global
filter: a row that fails it is searched against every centroid, in one GEMM).

The state is 8 bytes per row (an int32 code and a float32 lower bound; 4 more per extra group)
plus the centroids it holds for, kept by the data source that owns the rows
(:class:`vq_pipeline.compute.data.InMemoryRows`,
:class:`vq_pipeline.jobs.sources.StreamedTables`, or a partition's file on a worker,
:func:`vq_pipeline.jobs.partitioned.partition_stats_file`). Bounds hold for any change of centroids, so a
state is never wrong, only loose; a state that does not match the rows or the codebook's shape,
or an E step that did not finish, starts over with a full search.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# Unit roundoff of float32.
_U32 = 2.0**-24
# Relative margin for the bound arithmetic done in float32 (a few roundings of nonnegative terms).
_F32_SLACK = 2.0**-20
# The centroid separation test (``s_a``) needs an (n_codes, n_codes) distance table: up to this many
# codes (computed in blocks of _SEP_BLOCK rows, 64 MiB of float64 at most), none beyond.
_MAX_SEP_CODES = 8192
_SEP_BLOCK = 1024
#: At most this many groups of centroids keep their own lower bound per row (Yinyang's filter).
MAX_GROUPS = 16
#: Fewer codes than this keep one lower bound per row (Hamerly): with few codes the groups' extra pass
#: over each searched row's distances costs more than their tighter bounds save; with many, the groups
#: prune enough more rows to pay for it, if narrowly (figures in the docs' Benchmarks page, "Exact
#: pruned Lloyd").
MIN_GROUPED_CODES = 1024
#: The state of all rows together stays under this many bytes: fewer groups beyond it.
STATE_BUDGET = 2 * 2**30


class Grouping:
    """Centroids in ``t`` groups of ``width`` consecutive codes of ``order`` (the last group may be
    smaller): ``order`` (m,) int64 lists the codes group by group; ``group`` (m,) int64 is each code's
    group and ``position`` (m,) int64 its place in ``order``.

    The searches rank the centroids in this order (:meth:`arrange`), so that each group's smallest
    value is one strided reduction (:meth:`minima`).
    """

    def __init__(self, order: torch.Tensor, t: int) -> None:
        m = order.shape[0]
        self.order, self.width = order, -(-m // max(1, t))
        self.t = -(-m // self.width)
        self.position = torch.empty_like(order)
        self.position[order] = torch.arange(m, device=order.device)
        self.group = torch.div(self.position, self.width, rounding_mode="floor")  # (m,)

    @classmethod
    def of(cls, c: torch.Tensor, n_rows: int) -> Grouping:
        """Groups of nearby centroids of ``c`` (m, dim): one below :data:`MIN_GROUPED_CODES` codes
        (Hamerly's single bound), else one per 64 codes, at most :data:`MAX_GROUPS`, fewer when the
        state of ``n_rows`` rows would exceed :data:`STATE_BUDGET`. The centroids are ordered by a few
        Lloyd iterations over the centroids themselves (Yinyang K-means groups its initial centroids
        so), then cut into equal groups. Any grouping keeps the bounds valid; a good one keeps them
        tight."""
        m = c.shape[0]
        fit = (STATE_BUDGET // max(n_rows, 1) - 4) // 4
        t = int(max(1, min(MAX_GROUPS, m // 64, fit))) if m >= MIN_GROUPED_CODES else 1
        if t == 1:
            return cls(torch.arange(m, device=c.device), 1)
        cc = c.double()
        g = cc[torch.linspace(0, m - 1, t, device=c.device).round().long()]  # (t, dim)
        for _ in range(5):
            near = torch.cdist(cc, g).argmin(dim=1)  # (m,)
            sums = torch.zeros_like(g).index_add_(0, near, cc)  # (t, dim)
            sizes = torch.bincount(near, minlength=t)  # (t,)
            g = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None].double(), g)
        near = torch.cdist(cc, g).argmin(dim=1)  # (m,)
        return cls(near.sort(stable=True).indices, t)

    def arrange(self, c: torch.Tensor) -> torch.Tensor:
        """(m, dim) the centroids in group order, contiguous."""
        return c.index_select(0, self.order.to(c.device)).contiguous()

    def minima(self, v: torch.Tensor) -> torch.Tensor:
        """(r, t) the smallest of ``v`` (r, m), columns in group order (rows contiguous), per group."""
        r, m = v.shape
        if self.t == 1:
            return v.amin(dim=1, keepdim=True)
        full = (self.t - 1) * self.width
        head = v.as_strided((r, self.t - 1, self.width), (v.stride(0), self.width, 1)).amin(dim=2)  # (r, t - 1)
        return torch.cat([head, v[:, full:].amin(dim=1, keepdim=True)], dim=1)


class Bounds:
    """The pruning state of one fixed sequence of rows: each row's code and, per group of centroids,
    a lower bound on its distance to the group's centroids other than its code, valid for ``centroids``.

    Attributes:
        codes: (n_rows,) int32, the exact nearest code of each row under ``centroids``.
        lower: (n_rows, t) float32, lower bounds on ``min_{j in g, j != code} |x - c_j|`` (not squared).
        order: (n_codes,) int64, the codes group by group (:class:`Grouping`).
        centroids: (n_codes, dim) float32, the centroids the state holds for; None while there is no
            state (or an E step that would have updated it did not finish).
    """

    def __init__(self) -> None:
        self.codes: torch.Tensor | None = None
        self.lower: torch.Tensor | None = None
        self.order: torch.Tensor | None = None
        self.centroids: torch.Tensor | None = None

    def _held(self) -> tuple[torch.Tensor | None, ...]:
        return (self.codes, self.lower, self.order, self.centroids)

    @property
    def nbytes(self) -> int:
        """Bytes the state holds (what pruning costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self._held() if t is not None)

    def step(self, c: torch.Tensor, n_rows: int, engine: Any) -> PrunedSearch:
        """The search of one E step over ``n_rows`` rows against centroids ``c`` (n_codes, dim)."""
        return PrunedSearch(self, c, n_rows, engine)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a partition's state file (empty when there is no state)."""
        if any(t is None for t in self._held()):
            return {}
        return {k: t.cpu().numpy() for k, t in zip(("codes", "lower", "order", "centroids"), self._held())}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Bounds:
        """The state written by :meth:`to_arrays`; a malformed one gives no state (a full search)."""
        b = cls()
        try:
            codes, lower, order, cents = (arrays[k] for k in ("codes", "lower", "order", "centroids"))
        except KeyError:
            return b
        m = cents.shape[0] if cents.ndim == 2 else 0
        ok = (
            codes.dtype == np.int32
            and lower.dtype == np.float32
            and order.dtype == np.int64
            and cents.dtype == np.float32
            and codes.ndim == 1
            and lower.ndim == 2
            and lower.shape[0] == codes.shape[0]
            and m >= 1
            and order.shape == (m,)
            and np.array_equal(np.sort(order), np.arange(m))
            and lower.shape[1] == Grouping(torch.from_numpy(order), lower.shape[1]).t
            and (codes.size == 0 or (0 <= codes.min() and codes.max() < m))
            and bool(np.isfinite(cents).all())
            and not bool(np.isnan(lower).any())
        )
        if ok:
            b.codes, b.lower, b.order, b.centroids = (torch.from_numpy(a.copy()) for a in (codes, lower, order, cents))
        return b


class PrunedSearch:
    """One E step's search with the bounds of :class:`Bounds` (module docstring).

    Call it on consecutive chunks ``(rows, x_chunk)`` covering every row once, then
    :meth:`finish`; it returns what :meth:`vq_pipeline.compute.engines.Engine.nearest` returns for ``k=1``
    (the distances in the direct form, as the torch engine computes them).
    """

    def __init__(self, bounds: Bounds, c: torch.Tensor, n_rows: int, engine: Any) -> None:
        self.bounds, self.c, self.engine = bounds, c, engine
        self.n_pruned = 0
        n_codes, dim = c.shape
        b = bounds
        grouped = grouped_search(engine, dim)
        self.known = (
            all(t is not None for t in b._held())
            and b.centroids.shape == c.shape
            and b.codes.shape[0] == n_rows
            and b.codes.device == c.device
            and (grouped or b.lower.shape[1] == 1)
        )
        if self.known:
            self.grouping = Grouping(b.order, b.lower.shape[1])
            drift = _drift(b.centroids.to(c.device), c)  # (n_codes,) float64, rounded up
            moved = torch.zeros(self.grouping.t, dtype=torch.float64, device=c.device)
            moved.scatter_reduce_(0, self.grouping.group, drift, "amax")  # (t,) the most a group's centroid moved
            self.moved = moved.mul_(1.0 + _F32_SLACK).to(torch.float32)  # rounded up
            self.sep = _separation(c).mul_(1.0 - _F32_SLACK).to(torch.float32)  # (n_codes,) rounded down
        else:
            self.grouping = Grouping.of(c, n_rows) if grouped else Grouping(torch.arange(n_codes, device=c.device), 1)
            b.order = self.grouping.order
            b.codes = torch.zeros(n_rows, dtype=torch.int32, device=c.device)
            b.lower = torch.zeros((n_rows, self.grouping.t), dtype=torch.float32, device=c.device)
        self.arranged = self.grouping.arrange(c)  # (n_codes, dim) in group order
        # The state is half old, half new until finish(): an E step that stops midway leaves none.
        b.centroids = None
        self._eps = 2.0 * (dim + 4) * _U32  # relative error of a float32 direct squared distance

    def __call__(self, rows: slice, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqdist, idx)`` (n, 1) float32 and (n, 1) int64 for the chunk ``x`` (n, dim) of ``rows``."""
        b, c, n = self.bounds, self.c, x.shape[0]
        if not self.known:
            idx, lower = self._search(x)  # (n,), (n, t)
            d = direct_sqdist(x, c, idx)  # (n,)
        else:
            idx = b.codes[rows].long()  # (n,)
            d = direct_sqdist(x, c, idx)  # (n,)
            # >= |x - c_a|: the float32 direct distance widened by its rounding, and the sqrt's.
            up = d.mul(1.0 + self._eps + _F32_SLACK).sqrt_().mul_(1.0 + _F32_SLACK).add_(1e-16)  # (n,)
            lower = b.lower[rows].sub(self.moved)  # (n, t)
            torch.maximum(lower, (self.sep.index_select(0, idx) - up)[:, None], out=lower)
            least = lower.amin(dim=1)  # (n,)
            # float32 rounding of the subtractions: what the last two could lose, with room to spare.
            room = (least.abs() + float(self.moved.max()) + up).mul_(4.0 * _F32_SLACK).nan_to_num_(posinf=0.0)  # (n,)
            search = (up.add_(room) >= least).nonzero()[:, 0]  # (r,)
            if search.shape[0]:
                xs = x.index_select(0, search)  # (r, dim)
                found, low = self._search(xs)  # (r,), (r, t)
                idx = idx.index_copy(0, search, found)
                d = d.index_copy(0, search, direct_sqdist(xs, c, found))
                lower = lower.index_copy(0, search, low)
            self.n_pruned += n - search.shape[0]
        b.codes[rows] = idx.to(torch.int32)
        # Stored rounded down: a float32 result below 2^-100 is taken as 0, others shrink by 2^-20.
        b.lower[rows] = lower.clamp_(min=0.0).mul_(1.0 - _F32_SLACK).masked_fill_(lower < 2.0**-100, 0.0)
        return d[:, None], idx[:, None]

    def _search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r,) exact nearest codes of ``x`` (r, dim) and (r, t) float32 lower bounds on the distance
        (not squared) to each group's other centroids."""
        idx, low2 = runner_up(self.engine, x, self.c, self.arranged, self.grouping)
        return idx, low2.clamp_(min=0.0).sqrt_().mul_(1.0 - _F32_SLACK)

    def finish(self) -> None:
        """Every row was searched or proven: the state now holds for this step's centroids."""
        self.bounds.centroids = self.c.detach().clone()


def direct_sqdist(x: torch.Tensor, c: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(n,) float32 ``sum((c[idx] - x)**2)``, computed as the torch engine computes a row's distance."""
    return c.index_select(0, idx).sub_(x).square_().sum(dim=1)


def runner_up(
    engine: Any, x: torch.Tensor, c: torch.Tensor, arranged: torch.Tensor, grouping: Grouping
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, low2)``: (n,) int64 exact nearest code of each row of ``x`` (n, dim) among the centroids
    ``c`` (m, dim), and (n, t) float32 lower bounds on its squared distance to the centroids of each
    group other than that code (``inf`` where a group holds no other); ``arranged`` is
    ``grouping.arrange(c)``.

    The torch engine gives both from one GEMM (:meth:`TorchEngine.nearest_runner_up`). Any other
    engine, and one-dimensional rows, have one group (:func:`grouped_search`): their two nearest
    codes, the second's direct float32 distance loosened by its rounding.
    """
    m, dim = c.shape
    if grouped_search(engine, dim):
        return engine.nearest_runner_up(x, c, arranged, grouping)
    if m == 1:
        inf = torch.full((x.shape[0], 1), math.inf, dtype=torch.float32, device=x.device)
        return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device), inf
    sqdist, idx = engine.nearest(x, c, 2)  # (n, 2) ascending, (n, 2)
    return idx[:, 0], sqdist[:, 1:].mul(1.0 - 2.0 * (dim + 4) * _U32 - _F32_SLACK)


def grouped_search(engine: Any, dim: int) -> bool:
    """Whether ``engine`` gives per-group runner-up bounds for rows of width ``dim`` (else one group)."""
    return dim > 1 and hasattr(engine, "nearest_runner_up")


def _drift(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """(m,) float64 upper bounds on ``|new_j - old_j|``: differences of float32 values are exact in
    float64, the norm's rounding is far below the factor that covers it."""
    return torch.linalg.vector_norm(new.double() - old.double(), dim=1).mul_(1.0 + 1e-12)


def _separation(c: torch.Tensor) -> torch.Tensor:
    """(m,) float64 lower bounds on ``min_{j != a} |c_a - c_j|`` (0 above ``_MAX_SEP_CODES`` codes).

    The expansion ``|a|^2 + |b|^2 - 2 a.b`` of the centred centroids in float64 is within
    ``gamma_{dim+2} (|a| + |b|)^2`` of the exact value; the margin subtracted is four times that.
    """
    m, dim = c.shape
    if m == 1:
        return torch.full((1,), math.inf, dtype=torch.float64, device=c.device)
    if m > _MAX_SEP_CODES:
        return torch.zeros(m, dtype=torch.float64, device=c.device)
    cc = c.double()
    cc = cc - cc.mean(dim=0)  # (m, dim)
    sq = cc.square().sum(dim=1)  # (m,)
    margin = 4.0 * (dim + 2) * 2.0**-53 * 4.0 * float(sq.max())  # >= 4 gamma (|a| + |b|)^2
    out = torch.empty(m, dtype=torch.float64, device=c.device)
    for lo in range(0, m, _SEP_BLOCK):
        blk = cc[lo : lo + _SEP_BLOCK]  # (b, dim)
        d2 = torch.addmm(sq[None, :], blk, cc.T, alpha=-2.0).add_(sq[lo : lo + _SEP_BLOCK, None])  # (b, m)
        d2[torch.arange(blk.shape[0]), torch.arange(lo, lo + blk.shape[0])] = math.inf
        out[lo : lo + blk.shape[0]] = d2.amin(dim=1)
    return out.sub_(margin).clamp_min_(0.0).sqrt_()
