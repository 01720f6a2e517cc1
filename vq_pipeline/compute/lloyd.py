"""Lloyd's algorithm over a :class:`~vq_pipeline.compute.data.DataSource`: E/M steps, empty-cluster
repair, tolerance, per-iteration statistics, and the state a checkpoint holds.

The loop follows the KeOps K-means tutorial (an argmin over symbolic squared distances, then
centroid means) and adds what it leaves out:

* empty clusters are repaired by moving them to the points farthest from their centroids
  (scikit-learn's rule), falling back to splitting the largest cluster (FAISS splits a cluster
  drawn at random, weighted by size; the largest keeps the fit deterministic); every repair
  is counted, and no centroid is ever NaN or left behind at zero;
* stopping when the objective's relative decrease falls to ``tol``, or after ``n_iter`` updates;
* per-iteration statistics (objective, repairs, imbalance, seconds).

Lloyd reads its rows only through a :class:`vq_pipeline.compute.data.DataSource` (in memory, streamed
tables, partitions on workers): ``e_step(centroids)`` gives the sums, counts, objective and far rows of
one pass (:class:`vq_pipeline.compute.data.EStepStats`, float64 sums).

Tensors in, tensors out: no codebook, no tables, no paths.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from vq_pipeline.compute.data import DataSource, EStepStats
from vq_pipeline.errors import TooFewPointsError
from vq_pipeline.validate import normalize_rows, too_few_rows_fix

if TYPE_CHECKING:
    from vq_pipeline.compute.seeding import InitProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IterationStats:
    """One E step of Lloyd's loop, plus the M step that followed it (if any).

    ``objective`` is the objective of the centroids *before* this iteration's update: the sum of
    squared L2 distances ('l2') or of ``1 - cos`` ('cosine') to the nearest centroid.
    ``imbalance`` is ``n_codes * sum(counts**2) / n_rows**2`` (1.0 for equal cluster sizes).
    """

    iteration: int
    objective: float
    n_repairs: int
    n_empty: int
    imbalance: float
    seconds: float
    #: Rows whose search the pruned E step skipped (their code proven unchanged; 0 without pruning).
    pruned: int = 0


#: Fields of :class:`IterationStats` that describe the run rather than the result: a codebook keeps
#: them in ``timings`` (``iteration_seconds``, ``iteration_pruned``), not in ``stats['history']``, so
#: that the same fit gives the same file whether it was pruned, resumed or slow.
RUN_ONLY = ("seconds", "pruned")

#: Called with an :class:`InitProgress` while the initial centroids are chosen, then with an
#: :class:`IterationStats` after every iteration.
ProgressCallback = Callable[["IterationStats | InitProgress"], None]


@dataclass(frozen=True)
class LloydResult:
    """Outcome of one Lloyd run; ``counts`` and ``inertia`` belong to the returned ``centroids``."""

    centroids: torch.Tensor  # (n_codes, dim) float32, CPU
    counts: torch.Tensor  # (n_codes,) int64, CPU
    inertia: float
    n_iter: int  # centroid updates done
    converged: bool
    n_repairs: int
    history: list[IterationStats]
    bound_bytes: int = 0  # memory of the pruning state (:mod:`vq_pipeline.compute.prune`) at the last E step


def m_step(p: EStepStats, c: torch.Tensor, *, metric: str, subject: str = "x") -> tuple[torch.Tensor, int]:
    """New centroids from an E step's sums and counts, with empty clusters repaired. ``subject``: how
    an error names the rows (a level of a multi-level fit: that level's residuals or slice).

    Returns:
        (centroids, n_repairs): (n_codes, dim) float32 on c's device, and how many codes were empty.
    """
    nonempty = p.counts > 0  # (n_codes,)
    new = c.clone()  # (n_codes, dim)
    means = p.sums[nonempty] / p.counts[nonempty, None]  # (n_nonempty, dim) float64
    if metric == "cosine":
        norms = torch.linalg.vector_norm(means, dim=1, keepdim=True)  # (n_nonempty, 1)
        # Opposite unit vectors can cancel to ~0: keep the old centroid there rather than divide by it.
        ok = norms[:, 0] > 1e-12
        means = torch.where(ok[:, None], means / norms.clamp_min(1e-300), c[nonempty].double())
    new[nonempty] = means.to(torch.float32)
    empty = (~nonempty).nonzero()[:, 0].tolist()
    if empty:
        _repair(new, empty, p, metric=metric, subject=subject)
    return new, len(empty)


def _repair(c: torch.Tensor, empty: list[int], p: EStepStats, *, metric: str, subject: str = "x") -> None:
    """Move empty codes to the farthest distinct rows; split the largest clusters if rows run out."""
    picked: list[torch.Tensor] = []
    for d, row in zip(p.far_sqdist.tolist(), p.far_rows):
        if len(picked) == len(empty) or d <= 0:
            break
        if not any(torch.equal(row, q) for q in picked):
            picked.append(row)
    if not picked:
        # The farthest row sits on its centroid: every row does, so there is nothing left to move.
        n_distinct = int((p.counts > 0).sum())
        raise TooFewPointsError(
            f"{subject} has only {n_distinct} distinct rows but n_codes={c.shape[0]}; every row already sits on a "
            f"centroid, so {len(empty)} code(s) cannot be given any data. Expected at least n_codes distinct "
            f"rows. {too_few_rows_fix(c, n_distinct)}"
        )
    for code, row in zip(empty, picked):
        c[code] = row
    sizes = p.counts.to(torch.float64).clone()  # (n_codes,)
    for code in empty[len(picked) :]:
        big = int(sizes.argmax())
        sign = torch.ones(c.shape[1], device=c.device)
        sign[1::2] = -1
        delta = sign * (c[big].abs() + 1e-6) / 1024  # (dim,) FAISS-style symmetric nudge
        c[code], c[big] = c[big] + delta, c[big] - delta
        sizes[big] /= 2
        sizes[code] = sizes[big]
    if metric == "cosine":
        c[empty] = normalize_rows(c[empty])


@dataclass(frozen=True)
class LloydState:
    """Where one Lloyd run stands before an E step; the rest of the run depends only on it.

    A fit checkpoints it after every update; :func:`lloyd` resumed from it gives the same result
    as a run that never stopped.
    """

    centroids: torch.Tensor  # (n_codes, dim) float32, CPU
    iteration: int  # the number of the next E step (1: the first, on the initial centroids)
    prev_objective: float | None  # the objective of the E step before it (None: none yet)
    n_repairs: int  # empty-cluster repairs so far
    history: tuple[IterationStats, ...] = ()

    @classmethod
    def start(cls, centroids: torch.Tensor) -> LloydState:
        return cls(centroids.to("cpu", torch.float32), 1, None, 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain values and a tensor, for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {
            "centroids": self.centroids,
            "iteration": self.iteration,
            "prev": self.prev_objective,
            "total_repairs": self.n_repairs,
            "history": [asdict(h) for h in self.history],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LloydState:
        history = tuple(IterationStats(**h) for h in d["history"])
        return cls(d["centroids"], d["iteration"], d["prev"], d["total_repairs"], history)


def lloyd(
    source: DataSource,
    init: torch.Tensor,
    *,
    metric: str,
    n_iter: int,
    tol: float,
    resume: LloydState | None = None,
    on_event: ProgressCallback | None = None,
    on_update: Callable[[LloydState], None] | None = None,
) -> LloydResult:
    """Run Lloyd's algorithm from ``init`` until the objective settles or ``n_iter`` updates are done.

    Args:
        source: the rows (unit rows under cosine, validated); every E step is ``source.e_step``.
        init: (n_codes, dim) float32 starting centroids on the compute device.
        tol: stop when ``(previous - current) <= tol * previous`` for the objective.
        resume: a state given earlier to ``on_update``: continue from it (only ``init``'s device is used).
        on_event: called with an :class:`IterationStats` after every E step (and its update).
        on_update: called after every centroid update with the state to resume from, e.g. to checkpoint it.

    Each E step evaluates the current centroids; an update follows while the objective still falls
    by more than ``tol`` and fewer than ``n_iter`` updates are done. The last E step, on the returned
    centroids, gives the returned counts and inertia.
    """
    steps = lloyd_steps(
        source.n_rows,
        init,
        metric=metric,
        n_iter=n_iter,
        tol=tol,
        resume=resume,
        on_event=on_event,
        on_update=on_update,
    )
    return run_steps(steps, source.e_step)


#: A fit written as a generator: it yields the centroids it needs an E step on and is sent back the
#: :class:`EStepStats`; it returns its result. :func:`run_steps` runs one against a source;
#: :func:`vq_pipeline.fitting.multilevel` runs several in lockstep (one pass over the data per iteration).
Steps = Generator[torch.Tensor, EStepStats, Any]


def run_steps(steps: Steps, e_step: Callable[[torch.Tensor], EStepStats]) -> Any:
    """Run a fit written as :data:`Steps`, answering every request with ``e_step``; its result."""
    try:
        c = next(steps)
        while True:
            c = steps.send(e_step(c))
    except StopIteration as stop:
        return stop.value


def lloyd_steps(
    n_rows: int,
    init: torch.Tensor,
    *,
    metric: str,
    n_iter: int,
    tol: float,
    resume: LloydState | None = None,
    on_event: ProgressCallback | None = None,
    on_update: Callable[[LloydState], None] | None = None,
    subject: str = "x",
) -> Generator[torch.Tensor, EStepStats, LloydResult]:
    """:func:`lloyd` as :data:`Steps` over ``n_rows`` rows; ``subject`` names the rows in errors."""
    state = resume if resume is not None else LloydState.start(init)
    c = state.centroids.to(init.device)  # (n_codes, dim)
    scale = 0.5 if metric == "cosine" else 1.0  # |a - b|^2 = 2 (1 - cos) for unit vectors
    t0 = time.perf_counter()
    p = yield c
    objective = p.objective * scale
    while not _converged(state.prev_objective, objective, tol) and state.iteration <= n_iter:
        c, repairs = m_step(p, c, metric=metric, subject=subject)
        stats = _iteration_stats(state.iteration, objective, repairs, p, c, t0, n_rows, on_event)
        state = LloydState(
            c.to("cpu", torch.float32),
            state.iteration + 1,
            objective,
            state.n_repairs + repairs,
            (*state.history, stats),
        )
        if on_update is not None:
            on_update(state)
        t0 = time.perf_counter()
        p = yield c
        objective = p.objective * scale
    # The last E step evaluated the returned centroids: its stats close the history, with no update.
    stats = _iteration_stats(state.iteration, objective, 0, p, c, t0, n_rows, on_event)
    return LloydResult(
        centroids=c.to("cpu", torch.float32),
        counts=p.counts.cpu(),
        inertia=objective,
        n_iter=state.iteration - 1,
        converged=_converged(state.prev_objective, objective, tol),
        n_repairs=state.n_repairs,
        history=[*state.history, stats],
        bound_bytes=p.bound_bytes,
    )


def _converged(prev: float | None, objective: float, tol: float) -> bool:
    return prev is not None and prev - objective <= tol * prev


def _iteration_stats(
    it: int,
    objective: float,
    repairs: int,
    p: EStepStats,
    c: torch.Tensor,
    t0: float,
    n_rows: int,
    on_event: ProgressCallback | None,
) -> IterationStats:
    """One iteration's statistics (E step ``p`` on the centroids before update ``c``), logged and reported."""
    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)
    counts = p.counts.double()  # (n_codes,)
    stats = IterationStats(
        iteration=it,
        objective=objective,
        n_repairs=repairs,
        n_empty=int((p.counts == 0).sum()),
        imbalance=float(c.shape[0] * counts.square().sum() / n_rows**2),
        seconds=time.perf_counter() - t0,
        pruned=int(p.n_pruned),
    )
    log.info("iteration %d: objective=%.6g repairs=%d imbalance=%.3f", it, objective, repairs, stats.imbalance)
    if on_event is not None:
        on_event(stats)
    return stats


@dataclass(frozen=True)
class FitProgress:
    """How far a fit's restarts are: the next restart, the finished ones' inertias and best result,
    and the next restart's Lloyd state when it has begun (what a checkpoint holds)."""

    restart: int = 0
    inertias: tuple[float, ...] = ()
    best: LloydResult | None = None
    lloyd: LloydState | None = None
