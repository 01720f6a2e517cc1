"""Balanced codes: every code holds at most ``cap = ceil((1 + balance) * n_rows / n_codes)`` rows.

The capped assignment (a transportation problem: each row to one code, each code at most ``cap``
rows, least total distance) is solved over each row's ``k`` nearest codes (its candidates):

1. **An auction** (Bertsekas' forward auction, all free rows bidding at once): every code has ``cap``
   slots and a price ``p_j >= 0``; a free row bids for its candidate of least ``d_ij + p_j``, by what
   it would lose taking its next choice plus a small increment; a code keeps its ``cap`` best bids.
   Run to the end over every code, it is within ``n_rows`` increments of the optimum. Every price
   vector gives a lower bound on the optimum (Lagrangian duality)::

       L(p) = sum_i min(min_j in cand(i) (d_ij + p_j), d_i,k) - cap * sum_j p_j

   where ``d_i,k``, the row's ``k``-th candidate distance, stands for every code outside its candidates
   (none is nearer; the term is left out when every code is a candidate). ``L(p)`` bounds the optimum
   over **all** codes, not only the candidates.

   With many rows (:data:`PRESOLVE_MIN_ROWS`), many per code (twice :data:`PRESOLVE_ROWS_PER_CODE`),
   the auction first runs on every ``stride``-th row, with the cap scaled alike, and its prices start
   the auction of all rows, which then runs a few rounds only. Prices depend little on how many rows
   share them, and most of an auction's rounds go into price wars that the presolve fights on far
   fewer rows. A start that leaves a rough gap over :data:`PRESOLVE_MAX_GAP` is dropped for one from
   zero prices. The bound is taken at every price vector met.
2. **Repair**, which guarantees the cap. Rows the auction left without a code (after its last round)
   take their nearest candidate; the rows of codes then over the cap move, cheapest extra
   distance first, to a candidate with room; a row none of whose candidates has room moves to its
   nearest code with room by exact distance (``nearest_with_room``: the caller holds the rows).

The result states its cost, the best lower bound met and the gap between them: the assignment is
within ``gap`` of the optimum (within ``relative_gap`` of it, relatively).

Used by the balanced E step of a fit (:class:`BalancedEStep`, one source pass for the candidates
and one for the sums) and by :func:`encode_balanced` (the codes of a known set of rows under a fitted
codebook). Tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from vq_pipeline.compute.assign import nearest_in_chunks, plan_chunk_rows
from vq_pipeline.compute.data import MAX_FAR_CANDIDATES, DataSource, EStepStats, farthest
from vq_pipeline.compute.engines import Engine, get_engine
from vq_pipeline.errors import DimensionMismatchError, InvalidInputError
from vq_pipeline.runtime import share_cpus
from vq_pipeline.settings import DEFAULT_MEMORY_BUDGET
from vq_pipeline.validate import as_embeddings, check_int, check_nonzero_rows, normalize_rows, resolve_device

#: Candidates per row of the capped assignment (its nearest codes): the prices move rows among them.
BALANCE_CANDIDATES = 8
#: Auction rounds of the capped assignment at most; the repair guarantees the cap after any number.
BALANCE_ROUNDS = 2048
#: ... in each E step of a fit, where the assignment is redone every iteration (its gap is recorded).
BALANCE_FIT_ROUNDS = 256
#: A capped assignment of more than twice this many rows per code first solves every ``stride``-th
#: row's problem, whose prices start the whole one ...
PRESOLVE_ROWS_PER_CODE = 48
#: ... with this many rows in all at least: smaller problems are solved from zero prices at once (they
#: are fast, and a presolve's start costs them up to about 2% more distance on small, uneven problems).
PRESOLVE_MIN_ROWS = 65_536
#: Rounds of the whole problem after a presolve: an eighth of ``max_rounds``, and this many at least.
WARM_ROUNDS = 32
#: ... unless the presolve's start leaves a gap over this share: the auction then starts from zero.
PRESOLVE_MAX_GAP = 0.02
#: The auction's bid increment, relative to the rows' mean distance to their nearest code.
BALANCE_STEP = 1e-2

#: ``nearest_with_room(rows, allowed)``: for the (m,) int64 row positions ``rows`` and the (n_codes,)
#: bool mask ``allowed`` of the codes with room, each row's nearest allowed code (m,) int64 and its
#: distance (m,) float (the same distance as the candidates').
NearestWithRoom = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_balance(balance: Any, *, name: str = "balance") -> float | None:
    """``balance`` as a float >= 0, or None (off); anything else is refused."""
    if balance is None:
        return None
    if isinstance(balance, bool) or not isinstance(balance, int | float) or not math.isfinite(balance) or balance < 0:
        raise InvalidInputError(
            f"{name}={balance!r}; expected None (off) or a number >= 0: every code then holds at most "
            f"ceil((1 + {name}) * n_rows / n_codes) rows. Fix: pass e.g. {name}=0.05 (codes at most 5% over an "
            f"equal share), or None."
        )
    return float(balance)


def code_cap(n_rows: int, n_codes: int, balance: float) -> int:
    """``ceil((1 + balance) * n_rows / n_codes)``, computed on the decimal ``balance`` as written
    (``balance=0.05`` and 1000 rows in 10 codes give 105, not 106 from 0.05's binary value)."""
    share = (1 + Fraction(repr(float(balance)))) * n_rows / n_codes
    return max(1, math.ceil(share))


@dataclass(frozen=True)
class CappedAssignment:
    """A capped assignment and how close to the optimum it is.

    Attributes:
        codes: (n,) int64, every code used at most ``cap`` times.
        distances: (n,) float64, each row's distance to its code (the candidates' distance).
        cost: the sum of ``distances``. bound: a lower bound on the least cost of any assignment under
            the cap (over all codes). gap: ``cost - bound`` (>= 0; 0 proves the optimum).
        rounds: price rounds run on the whole problem. moved: rows the repair moved to another candidate.
            fallback_rows: rows it moved outside their candidates (``nearest_with_room``). presolve_rows:
            the rows of the presolve whose prices started the auction (0: none, it started from zero).
    """

    codes: torch.Tensor
    distances: torch.Tensor
    cap: int
    cost: float
    bound: float
    rounds: int
    moved: int
    fallback_rows: int
    presolve_rows: int = 0

    @property
    def gap(self) -> float:
        return max(0.0, self.cost - self.bound)

    @property
    def relative_gap(self) -> float:
        """``gap / bound`` (0 when both are 0): the assignment costs at most this share more than the optimum."""
        if self.gap == 0:
            return 0.0
        return self.gap / self.bound if self.bound > 0 else math.inf

    @property
    def max_code_size(self) -> int:
        return int(torch.bincount(self.codes).max()) if self.codes.numel() else 0

    def summary(self) -> dict[str, Any]:
        """Plain numbers for a codebook's stats or a report."""
        return {
            "cap": self.cap,
            "max_code_size": self.max_code_size,
            "cost": self.cost,
            "bound": self.bound,
            "gap": self.gap,
            "relative_gap": self.relative_gap if math.isfinite(self.relative_gap) else None,
            "rounds": self.rounds,
            "moved": self.moved,
            "fallback_rows": self.fallback_rows,
            "presolve_rows": self.presolve_rows,
        }


def capped_assign(
    cand_idx: torch.Tensor,
    cand_dist: torch.Tensor,
    n_codes: int,
    cap: int,
    *,
    nearest_with_room: NearestWithRoom | None = None,
    max_rounds: int = BALANCE_ROUNDS,
    step: float = BALANCE_STEP,
) -> CappedAssignment:
    """Assign every row one code, each code at most ``cap`` rows, at least total distance (within the
    stated gap; see the module's docstring).

    Args:
        cand_idx: (n, k) int64, each row's ``k`` nearest codes, nearest first; any device (computed on CPU).
        cand_dist: (n, k) float, their distances, ascending (smaller is better).
        n_codes: codes in all; ``n <= n_codes * cap``.
        nearest_with_room: the exact fall-back (:data:`NearestWithRoom`); needed only when ``k < n_codes``
            and some rows find no room among their candidates.
        max_rounds: auction rounds at most (0: the repair alone, from each row's nearest candidate).
        step: the bid increment, times the rows' mean distance to their nearest code.
    """
    n, k = cand_idx.shape
    if n > n_codes * cap:
        raise InvalidInputError(
            f"cap={cap} with n_codes={n_codes} holds {n_codes * cap} rows but there are n_rows={n}; expected "
            f"n_codes * cap >= n_rows. Fix: pass cap >= {-(-n // n_codes)}."
        )
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return CappedAssignment(empty, empty.double(), cap, 0.0, 0.0, 0, 0, 0, 0)
    idx = cand_idx.to("cpu", torch.int64)  # (n, k)
    d = cand_dist.to("cpu", torch.float64)  # (n, k)
    outside = d[:, -1] if k < n_codes else None  # (n,) no code outside the candidates is nearer
    # The bid increment: the assignment costs at most n * eps more than the optimum over the candidates.
    eps = step * max(float(d[:, 0].abs().mean()), 1e-30)
    # One candidate leaves a row nowhere to go: the repair alone places the rows then.
    rounds_left = max_rounds if k > 1 else 0
    stride = n // (PRESOLVE_ROWS_PER_CODE * n_codes) if n >= PRESOLVE_MIN_ROWS else 0
    warm, presolve_rows, bounds = None, 0, []
    if stride >= 2 and rounds_left:
        # Presolve: the prices of every stride-th row's problem (the cap scaled alike) start the whole
        # problem, which then needs a few rounds only (prices barely depend on how many rows share them).
        sub = slice(None, None, stride)
        presolve_rows = idx[sub].shape[0]
        sub_cap = max(1, math.ceil(cap * presolve_rows / n))
        _, warm, _ = _auction(d[sub], idx[sub], n_codes, sub_cap, eps, rounds_left)
        bounds.append(_lagrangian(d, idx, warm, outside, cap))
    if warm is None:
        code, price, rounds = _auction(d, idx, n_codes, cap, eps, rounds_left)
    else:
        code, price, rounds = _auction(d, idx, n_codes, cap, eps, max(WARM_ROUNDS, rounds_left // 8), warm)
        bounds += _bounds(d, idx, price, outside, cap)
        if _rough_gap(d, idx, code, max(bounds)) > PRESOLVE_MAX_GAP:  # a poor start: from zero prices
            code, price, more = _auction(d, idx, n_codes, cap, eps, rounds_left)
            rounds, presolve_rows = rounds + more, 0
    bound = max(bounds + _bounds(d, idx, price, outside, cap))
    lost = code < 0  # rows the auction left to the repair (outside their candidates, or out of rounds)
    code[lost] = idx[lost, 0]
    dist = _at_code(d, idx, code).clone()  # (n,)
    moved, fallback = _repair(code, dist, idx, d, n_codes, cap), 0
    if bool((torch.bincount(code, minlength=n_codes) > cap).any()):
        if nearest_with_room is None:
            raise InvalidInputError(
                f"rows of codes over cap={cap} find no room among their k={k} candidates, and no "
                f"nearest_with_room was given; expected a fall-back search or more candidates. Fix: pass "
                f"nearest_with_room, or k up to n_codes={n_codes} candidates."
            )
        fallback = _fallback(code, dist, n_codes, cap, nearest_with_room)
    cost = float(dist.sum())
    return CappedAssignment(code, dist, cap, cost, min(bound, cost), rounds, moved, fallback, presolve_rows)


def _bounds(
    d: torch.Tensor, idx: torch.Tensor, price: torch.Tensor, outside: torch.Tensor | None, cap: int
) -> list[float]:
    """:func:`_lagrangian` at ``price`` and scaled down (prices a price war raised give less)."""
    return [_lagrangian(d, idx, price * scale, outside, cap) for scale in (1.0, 0.8, 0.6, 0.4, 0.2)]


def _at_code(values: torch.Tensor, idx: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """(n,) each row's entry of ``values`` (n, k) at its ``code`` among its candidates ``idx`` (n, k); a
    row whose code is not a candidate (-1: not placed) gets its first entry."""
    return values.gather(1, (idx == code[:, None]).to(torch.int8).argmax(dim=1, keepdim=True))[:, 0]


def _rough_gap(d: torch.Tensor, idx: torch.Tensor, code: torch.Tensor, bound: float) -> float:
    """The relative gap of the auction's ``code`` (-1: not placed) to ``bound``, before the repair: the
    rows not placed counted at their ``k``-th candidate's distance."""
    cost = float(torch.where(code >= 0, _at_code(d, idx, code), d[:, -1]).sum())
    return (cost - bound) / bound if bound > 0 else math.inf


def _lagrangian(
    d: torch.Tensor, idx: torch.Tensor, price: torch.Tensor, outside: torch.Tensor | None, cap: int
) -> float:
    """``L(p)`` in float64: a lower bound on the least capped cost over all codes, for any prices
    ``price`` (n_codes,) >= 0, given the candidates ``idx`` (n, k), their distances ``d`` (n, k) and
    each row's bound ``outside`` (n,) on its distance to the other codes."""
    p = price.double()  # (n_codes,)
    best = (d + p[idx]).amin(dim=1)  # (n,)
    if outside is not None:
        best = torch.minimum(best, outside)
    return float(best.sum() - cap * p.sum())


def _auction(
    d: torch.Tensor,
    idx: torch.Tensor,
    n_codes: int,
    cap: int,
    eps: float,
    max_rounds: int,
    price: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A forward auction (Jacobi: every free row bids in each round) for codes of ``cap`` slots each.

    Prices start at zero, or at ``price`` (a presolve's). A free row bids for its candidate of least
    ``d_ij + price_j``, raising the price by what it would lose by taking its next choice, plus ``eps``;
    a code keeps its ``cap`` highest bids and frees the others. A code's price is its lowest kept bid
    once full (0 before). With every code a candidate, the rows all placed, the cost is at most
    ``n * eps`` above the optimum (Bertsekas' auction).

    Returns:
        code: (n,) int64, -1 for the rows the auction did not place. price: (n_codes,) float32. rounds.
    """
    n = idx.shape[0]
    d32 = d.float()  # (n, k)
    warm = price
    price = torch.zeros(n_codes, dtype=torch.float32) if warm is None else warm.clone()  # (n_codes,)
    code = torch.full((n,), -1, dtype=torch.int64)  # (n,) held code
    paid = torch.zeros(n, dtype=torch.float32)  # (n,) the held slot's price: the row's bid
    held = torch.zeros(n_codes, dtype=torch.int64)  # (n_codes,) slots held
    free = torch.arange(n)  # (m,) the rows without a code, that bid next
    rounds = 0
    while True:
        rounds, price = _auction_phase(d32, idx, cap, eps, rounds, max_rounds, price, code, paid, held, free)
        # Started from zero, prices only rise and every placed row stays within eps of its best
        # candidate. Started from a presolve's, a code bid on that ends with room drops to price 0, and
        # rows placed before may then prefer it by more than eps: they bid again.
        if rounds >= max_rounds or warm is None:
            return code, price, rounds
        red = d32 + price[idx]  # (n, k)
        own = _at_code(red, idx, code)  # (n,)
        free = ((code >= 0) & (own > red.amin(dim=1) + eps)).nonzero()[:, 0]  # (m,)
        if not free.numel():
            return code, price, rounds
        held -= torch.bincount(code[free], minlength=n_codes)
        code[free] = -1


def _auction_phase(
    d32: torch.Tensor,
    idx: torch.Tensor,
    cap: int,
    eps: float,
    rounds: int,
    max_rounds: int,
    price: torch.Tensor,
    code: torch.Tensor,
    paid: torch.Tensor,
    held: torch.Tensor,
    free: torch.Tensor,
) -> tuple[int, torch.Tensor]:
    """Rounds of :func:`_auction` from ``price`` until no row is free or ``max_rounds``: (rounds so far,
    price). Updates the rows' ``code`` (n,) and ``paid`` (n,) and the codes' ``held`` (n_codes,) in
    place; ``free`` (m,): the rows without a code."""
    n_codes, k = held.shape[0], idx.shape[1]
    while rounds < max_rounds and free.numel():
        share_cpus()
        rounds += 1
        cand = idx[free]  # (m, k)
        red = d32[free] + price[cand]  # (m, k)
        pos = red.argmin(dim=1)  # (m,) (argmin and amin: min(dim=1) is many times slower on small inputs)
        v = red.gather(1, pos[:, None])[:, 0]  # (m,)
        w = red.scatter(1, pos[:, None], math.inf).amin(dim=1) if k > 1 else torch.full_like(v, math.inf)
        target = cand.gather(1, pos[:, None])[:, 0]  # (m,)
        bid = price[target] + torch.where(torch.isfinite(w), w - v, 0.0) + eps  # (m,)
        top = torch.full((n_codes,), -math.inf).scatter_reduce(0, target, bid, "amax")  # (n_codes,) highest bid
        hit = top > -math.inf  # (n_codes,) the codes bid on
        # A code keeps its cap highest bids of holders and bidders, so the holders it can free are those
        # that paid no more than its highest new bid; the others keep their slots without being ranked.
        holders = (paid <= top[code.clamp_min(0)]).logical_and_(code >= 0).nonzero()[:, 0]  # (h,)
        pool = torch.cat([holders, free])  # (h + m,)
        pool_code = torch.cat([code[holders], target])
        pool_price = torch.cat([paid[holders], bid])
        held -= torch.bincount(code[holders], minlength=n_codes)  # (n_codes,) now the slots kept unranked
        rank, order = _rank_within(pool_code, -pool_price, n_codes)  # highest bids first
        keep = rank < (cap - held)[pool_code[order]]
        kept, free = order[keep], pool[order[~keep]]
        code[free] = -1
        code[pool[kept]], paid[pool[kept]] = pool_code[kept], pool_price[kept]
        held += torch.bincount(pool_code[kept], minlength=n_codes)
        # A full code's price is its lowest kept bid: a ranked one (the unranked paid more).
        low = torch.full((n_codes,), math.inf).scatter_reduce(0, pool_code[kept], pool_price[kept], "amin")
        price = torch.where(hit, torch.where(held >= cap, torch.where(low < math.inf, low, price), 0.0), price)
    return rounds, price


def _rank_within(group: torch.Tensor, key: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order ``(group, key)`` ascending and give each entry's rank within its group (entries of equal
    keys in their order in ``key``: the same answer on every run).

    Returns:
        rank: (m,) int64, rank of entry ``order[i]`` in its group. order: (m,) int64 permutation.
    """
    m = group.shape[0]
    key_rank = torch.empty(m, dtype=torch.int64)
    key_rank[key.argsort(stable=True)] = torch.arange(m)
    order = (group * m + key_rank).argsort()  # by group, then key: one exact integer sort
    g = group[order]  # (m,)
    sizes = torch.bincount(g, minlength=n_groups)  # (n_groups,)
    start = torch.cumsum(sizes, 0) - sizes  # (n_groups,)
    rank = torch.arange(m) - start[g]  # (m,)
    return rank, order


def _apply_moves(
    code: torch.Tensor,
    dist: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    target_dist: torch.Tensor,
    counts: torch.Tensor,
    cap: int,
) -> int:
    """Move rows of codes over the cap to ``target`` codes with room, cheapest extra distance first:
    each over-full code gives up at most its excess, each target takes at most its room. Updates
    ``code``, ``dist`` and ``counts`` in place; returns the rows moved (> 0 when any move is possible)."""
    n_codes = counts.shape[0]
    extra = target_dist - dist[rows]  # (m,) inf where there is no target
    ok = torch.isfinite(extra)
    rows, target, target_dist, extra = rows[ok], target[ok], target_dist[ok], extra[ok]
    if rows.numel() == 0:
        return 0
    excess = counts - cap  # (n_codes,)
    source = code[rows]
    rank, order = _rank_within(source, extra, n_codes)
    give = order[rank < excess[source[order]]]  # each code's cheapest excess rows
    rows, target, target_dist, extra = rows[give], target[give], target_dist[give], extra[give]
    room = (cap - counts).clamp_min(0)
    rank, order = _rank_within(target, extra, n_codes)
    take = order[rank < room[target[order]]]
    rows, target = rows[take], target[take]
    counts -= torch.bincount(code[rows], minlength=n_codes)
    counts += torch.bincount(target, minlength=n_codes)
    code[rows], dist[rows] = target, target_dist[take]
    return int(rows.numel())


def _repair(code: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, d: torch.Tensor, n_codes: int, cap: int) -> int:
    """Move the excess rows of over-full codes to their nearest candidate with room, in rounds, until
    no code is over the cap or no such row has a candidate with room; the rows moved."""
    counts = torch.bincount(code, minlength=n_codes)  # (n_codes,)
    moved = 0
    while bool((counts > cap).any()):
        rows = (counts[code] > cap).nonzero()[:, 0]  # (m,)
        has_room = (counts < cap)[idx[rows]]  # (m, k)
        alt = torch.where(has_room, d[rows], math.inf)  # (m, k)
        alt_pos = alt.argmin(dim=1)  # (m,)
        alt_d = alt.gather(1, alt_pos[:, None])[:, 0]
        target = idx[rows].gather(1, alt_pos[:, None])[:, 0]
        n_moved = _apply_moves(code, dist, rows, target, alt_d, counts, cap)
        if n_moved == 0:
            break
        moved += n_moved
    return moved


def _fallback(
    code: torch.Tensor, dist: torch.Tensor, n_codes: int, cap: int, nearest_with_room: NearestWithRoom
) -> int:
    """Move the excess rows of over-full codes to their nearest code with room (exact search by the
    caller); every round moves at least one row. The rows moved."""
    counts = torch.bincount(code, minlength=n_codes)  # (n_codes,)
    moved = 0
    while bool((counts > cap).any()):
        rows = (counts[code] > cap).nonzero()[:, 0]  # (m,)
        target, target_dist = nearest_with_room(rows, counts < cap)
        target = target.to("cpu", torch.int64)
        n_moved = _apply_moves(code, dist, rows, target, target_dist.to("cpu", torch.float64), counts, cap)
        if n_moved == 0:  # the nearest code with room of a row cannot be over the cap: a broken search
            raise InvalidInputError(
                f"nearest_with_room gave no code with room for {rows.numel()} rows; expected codes where "
                f"allowed is True. Fix: search only the allowed codes."
            )
        moved += n_moved
    return moved


# ----------------------------------------------------------------------------- rows in memory, sources


def nearest_allowed(
    x: torch.Tensor, c: torch.Tensor, allowed: torch.Tensor, *, engine: Engine, memory_budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest allowed code of every row of ``x`` (m, dim) among centroids ``c`` (n_codes, dim) on
    the compute device, ``allowed`` (n_codes,) bool: (m,) int64 codes and (m,) float32 squared L2, CPU."""
    keep = allowed.to(c.device).nonzero()[:, 0]  # (n_allowed,)
    sub = c[keep].contiguous()  # (n_allowed, dim)
    codes = torch.empty(x.shape[0], dtype=torch.int64)
    dist = torch.empty(x.shape[0], dtype=torch.float32)
    chunk = plan_chunk_rows(x.shape[0], sub.shape[0], c.shape[1], k=1, engine=engine, memory_budget=memory_budget)
    for rows, _, sqdist, idx in nearest_in_chunks(x, sub, k=1, engine=engine, chunk_rows=chunk):
        codes[rows] = keep[idx[:, 0]].cpu()
        dist[rows] = sqdist[:, 0].cpu()
    return codes, dist


def candidates(
    x: torch.Tensor, c: torch.Tensor, k: int, *, engine: Engine, memory_budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codes of the rows ``x`` (n, dim) among ``c`` (n_codes, dim) on the compute
    device: (n, k) int64 and (n, k) float32 squared L2, ascending, CPU."""
    idx = torch.empty((x.shape[0], k), dtype=torch.int64)
    dist = torch.empty((x.shape[0], k), dtype=torch.float32)
    chunk = plan_chunk_rows(x.shape[0], c.shape[0], c.shape[1], k=k, engine=engine, memory_budget=memory_budget)
    for rows, _, sqdist, i in nearest_in_chunks(x, c, k=k, engine=engine, chunk_rows=chunk):
        idx[rows], dist[rows] = i.cpu(), sqdist.cpu()
    return idx, dist


def _rows_at(source: DataSource, positions: torch.Tensor) -> torch.Tensor:
    """The rows of ``source`` at the sorted (m,) int64 ``positions``, in one pass: (m, dim) float32."""
    parts, a = [], 0
    for xb in source.batches():
        b = a + xb.shape[0]
        lo, hi = torch.searchsorted(positions, torch.tensor([a, b])).tolist()
        if hi > lo:
            parts.append(xb[(positions[lo:hi] - a).to(xb.device)].to("cpu", torch.float32))
        a = b
    return torch.cat(parts) if parts else torch.empty((0, source.dim), dtype=torch.float32)


@dataclass(frozen=True)
class BalancedEStep:
    """The E step of a balanced fit over ``source``: each pass assigns the rows under the cap
    (:func:`capped_assign` over the ``k`` nearest codes, the exact fall-back reading the rows it needs
    in one more pass), then a second pass sums the rows of each code. Streamed sources stay streamed:
    only the (n_rows, k) candidates are held. ``EStepStats.balance`` carries the assignment's
    :meth:`CappedAssignment.summary` and ``balance``."""

    source: DataSource
    balance: float
    n_codes: int
    engine: str = "auto"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    k: int = BALANCE_CANDIDATES
    max_rounds: int = BALANCE_FIT_ROUNDS

    @property
    def cap(self) -> int:
        return code_cap(self.source.n_rows, self.n_codes, self.balance)

    def __call__(self, c: torch.Tensor) -> EStepStats:
        n_codes, dim = c.shape
        eng = get_engine(self.engine, c.device, dim)
        k = min(self.k, n_codes)
        parts = [candidates(xb, c, k, engine=eng, memory_budget=self.memory_budget) for xb in self.source.batches()]
        idx = torch.cat([p[0] for p in parts]) if parts else torch.empty((0, k), dtype=torch.int64)
        dist = torch.cat([p[1] for p in parts]) if parts else torch.empty((0, k))

        def with_room(rows: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            positions = rows.sort().values
            x = _rows_at(self.source, positions).to(c.device)
            codes, d = nearest_allowed(x, c, allowed, engine=eng, memory_budget=self.memory_budget)
            back = torch.empty_like(codes), torch.empty_like(d)
            back[0][torch.searchsorted(positions, rows)] = codes
            back[1][torch.searchsorted(positions, rows)] = d
            return back

        a = capped_assign(idx, dist, n_codes, self.cap, nearest_with_room=with_room, max_rounds=self.max_rounds)
        del idx, dist, parts
        return _sums(self.source, c, a, self.balance)


def _sums(source: DataSource, c: torch.Tensor, a: CappedAssignment, balance: float) -> EStepStats:
    """The E step's statistics of the assignment ``a`` of ``source``'s rows (a second pass)."""
    n_codes, dim = c.shape
    sums = torch.zeros((n_codes, dim), dtype=torch.float64, device=c.device)  # (n_codes, dim)
    far_d = torch.empty(0, dtype=torch.float32, device=c.device)  # (<= n_far,)
    far_x = torch.empty((0, dim), dtype=torch.float32, device=c.device)  # (<= n_far, dim)
    n_far, start = min(n_codes, MAX_FAR_CANDIDATES), 0
    for xb in source.batches():
        xb = xb.to(c.device, torch.float32)
        stop = start + xb.shape[0]
        code = a.codes[start:stop].to(c.device)  # (n,)
        sums.index_add_(0, code, xb.double())
        d = a.distances[start:stop].to(c.device, torch.float32)  # (n,)
        top = d.topk(min(n_far, d.shape[0]), sorted=True)
        far_d, far_x = farthest(torch.cat([far_d, top.values]), torch.cat([far_x, xb[top.indices]]), n_codes)
        start = stop
    counts = torch.bincount(a.codes, minlength=n_codes).to(c.device)
    info = {"balance": balance, **a.summary()}
    return EStepStats(sums, counts, a.cost, far_d, far_x, balance=info)


# ----------------------------------------------------------------------------- encode a known set


def encode_balanced(
    centroids: torch.Tensor,
    metric: str,
    x: Any,
    balance: float,
    *,
    codec: str = "flat",
    k: int = BALANCE_CANDIDATES,
    engine: str = "auto",
    device: str | torch.device | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    name: str = "x",
) -> tuple[torch.Tensor, list[CappedAssignment]]:
    """The codes of a known set of rows ``x`` under a fitted codebook, every code (of every level) used
    by at most ``ceil((1 + balance) * n_rows / n_codes)`` rows, each level's assignment within its
    stated gap of the least distance under the cap.

    Args:
        centroids: (n_codes, dim) float32 (``codec='flat'``) or (levels, n_codes, sub_dim) float32
            ('residual': level ``l`` assigns what the capped codes of levels ``0..l-1`` leave; 'product':
            each slice on its own), CPU, validated (unit rows for a cosine flat codebook).
        metric: 'l2' or 'cosine' (rows L2-normalized first, as encode does).
        x: (n_rows, dim) embeddings, anything :func:`~vq_pipeline.validate.as_embeddings` accepts.
        balance: >= 0. k: candidates per row (at most n_codes).

    Returns:
        codes: (n_rows,) int64 for 'flat', else (n_rows, levels) int64, CPU. assignments: one
        :class:`CappedAssignment` per level (its cost, bound and gap are in squared L2 of the unit rows
        under cosine: twice ``1 - cos``).
    """
    balance = check_balance(balance)
    if balance is None:
        raise InvalidInputError("balance=None; expected a number >= 0. Fix: pass e.g. balance=0.05.")
    x = as_embeddings(x, name=name)
    c_all = centroids if codec != "flat" else centroids[None]
    n_levels, n_codes, sub = c_all.shape
    dim = sub * n_levels if codec == "product" else sub
    if x.shape[1] != dim:
        raise DimensionMismatchError(
            f"{name}.shape[1]={x.shape[1]} but the codebook has dim={dim}; expected embeddings of width {dim}. "
            f"Fix: encode with the codebook fitted on this embedding model, or refit."
        )
    k = check_int("k", k, minimum=1)
    if metric == "cosine":
        check_nonzero_rows(x, name=name)
        x = normalize_rows(x)
    dev = resolve_device(device, x)
    eng = get_engine(engine, dev, sub)
    budget = check_int("memory_budget", memory_budget, minimum=1)
    cap = code_cap(x.shape[0], n_codes, balance)
    rows = x.to(dev, torch.float32)
    codes = torch.empty((x.shape[0], n_levels), dtype=torch.int64)
    out: list[CappedAssignment] = []
    for level in range(n_levels):
        c = c_all[level].to(dev, torch.float32).contiguous()  # (n_codes, sub)
        xl = rows[:, level * sub : (level + 1) * sub].contiguous() if codec == "product" else rows  # (n, sub)
        idx, dist = candidates(xl, c, min(k, n_codes), engine=eng, memory_budget=budget)

        def with_room(r: torch.Tensor, allowed: torch.Tensor, xl: torch.Tensor = xl, c: torch.Tensor = c) -> Any:
            return nearest_allowed(xl[r.to(xl.device)], c, allowed, engine=eng, memory_budget=budget)

        a = capped_assign(idx, dist, n_codes, cap, nearest_with_room=with_room)
        codes[:, level] = a.codes
        out.append(a)
        if codec == "residual":
            rows = rows - c[a.codes.to(dev)]  # (n, dim) what the levels so far leave
    return (codes[:, 0] if codec == "flat" else codes), out


__all__ = [
    "BALANCE_CANDIDATES",
    "BalancedEStep",
    "CappedAssignment",
    "candidates",
    "capped_assign",
    "check_balance",
    "code_cap",
    "encode_balanced",
    "nearest_allowed",
]
