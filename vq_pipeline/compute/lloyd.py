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

import dataclasses
import datetime
import logging
import math
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import torch

from vq_pipeline.compute.data import DataSource, EStepStats
from vq_pipeline.compute.seeding import InitProgress
from vq_pipeline.errors import TooFewPointsError
from vq_pipeline.validate import normalize_rows, too_few_rows_fix

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


@dataclass(frozen=True)
class IterationProgress(IterationStats):
    """What a fit's ``progress`` callback receives after every E step: the :class:`IterationStats`
    that the history keeps, and where the fit stands (for :class:`vq_pipeline.fitting.kmeans.ProgressLines`).

    Every E step but the last is followed by a centroid update: it is iteration ``iteration`` of at
    most ``n_iter``. The last E step (``done``) evaluates the returned centroids and updates nothing:
    the run made ``iteration - 1`` updates (:attr:`n_updates`), the number the codebook's
    ``stats['iterations']`` records. ``change`` is the objective's relative change since the E step
    before (None for the first); ``elapsed`` the seconds since this Lloyd run started or resumed, at
    iteration ``first``. ``level``/``n_levels`` (a multi-level fit, ``level`` counted from 0),
    ``restart``/``n_init`` (counted from 0) and ``prune`` are filled in by the fit that runs Lloyd.
    """

    n_iter: int = 0
    elapsed: float = 0.0
    first: int = 1
    change: float | None = None
    done: bool = False
    converged: bool = False
    tol: float = 0.0
    prune: bool = False
    restart: int = 0
    n_init: int = 1
    level: int | None = None
    n_levels: int = 1

    @property
    def n_updates(self) -> int:
        """Centroid updates so far: ``iteration`` after an update, ``iteration - 1`` on the last E step."""
        return self.iteration - 1 if self.done else self.iteration


#: Called with an :class:`InitProgress` while the initial centroids are chosen, then with an
#: :class:`IterationProgress` (an :class:`IterationStats`) after every E step.
ProgressCallback = Callable[[IterationStats | InitProgress], None]


def with_context(progress: ProgressCallback | None, **context: Any) -> ProgressCallback | None:
    """``progress`` with each event's fields named in ``context`` (those it has) set: how a fit tells
    the callback which restart or level an event belongs to. None stays None."""
    if progress is None:
        return None

    def forward(event: Any) -> None:
        names = {f.name for f in dataclasses.fields(event)}
        progress(dataclasses.replace(event, **{k: v for k, v in context.items() if k in names}))

    return forward


#: Seconds between the lines a log gets while seeding, between its start and its end (at least 1).
SEEDING_INTERVAL = 1.0
#: Seconds between the iteration lines a log gets at INFO (:func:`log_progress`; the others go to DEBUG).
LOG_ITERATION_INTERVAL = 10.0


class ProgressLines:
    """A fit's ``progress`` callback that turns its events into the lines a person reads: what ``vq fit``
    prints when stderr is not a terminal, what the fit flows log, and what the library logs at INFO.

    * Seeding: a line when it begins (the init and its rows), one at its end, and at most one every
      ``seeding_interval`` seconds (at least 1) in between, so a seeding of ``t`` seconds gives at most
      ``2 + t`` lines: ``seeding 64 initial centroids (k-means|| from 16,384 rows)``, ...,
      ``seeding: 64/64 initial centroids (0.4 s)``.
    * Iterations: ``iteration 3/50: objective 1234.5678 (-1.2%), 0.6 s elapsed, ETA at most 9.4 s``, with
      the repaired empty codes when there are any and the rows proven unchanged when pruning is on; the
      objective has the significant digits its change needs to show. Then the end of the Lloyd run:
      ``converged after 12 iterations: objective ... (-0.0034%), 1.6 s`` or ``stopped after 50 iterations
      (n_iter=50), not converged: ...``. The iterations it names are the updates the run made (what the
      codebook's ``stats['iterations']`` adds up), and there is one iteration line for each.
      With ``iteration_interval`` > 0, an iteration goes to ``info`` only when a second has passed since
      the run's last line (its first iteration) or ``iteration_interval`` seconds (the others), and to
      ``debug`` otherwise: a quick fit logs its seeding and its end, a long one a line every interval.
    * A multi-level fit's lines begin with its level (``level 2/4, ``); a fit with restarts names them
      (``restart 1/3, ``).

    Args:
        info: where a line goes (``print``, ``logger.info``, a console). debug: where the lines left
            out of ``info`` go (None: nowhere).
        clock: monotonic seconds for the intervals (tests pass their own).
    """

    def __init__(
        self,
        info: Callable[[str], None],
        *,
        debug: Callable[[str], None] | None = None,
        iteration_interval: float = 0.0,
        seeding_interval: float = SEEDING_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.info, self.debug, self.clock = info, debug, clock
        self.iteration_interval = max(0.0, float(iteration_interval))
        self.seeding_interval = max(1.0, float(seeding_interval))
        self.shown: dict[tuple[Any, ...], float] = {}  # (level, restart) -> clock at its last ``info`` line
        self.seen: set[tuple[Any, ...]] = set()  # ("seeding" or "lloyd", (level, restart)) already begun
        self.digits: dict[tuple[Any, ...], int] = {}  # (level, restart) -> significant digits of the objective

    def __call__(self, event: Any) -> None:
        if not isinstance(event, InitProgress | IterationProgress):
            return
        run = (event.level, event.restart)
        kind = "seeding" if isinstance(event, InitProgress) else "lloyd"
        first = (kind, run) not in self.seen
        self.seen.add((kind, run))
        if isinstance(event, InitProgress):
            always, interval = first or event.chosen >= event.n_codes, self.seeding_interval
        else:
            always = event.done or not self.iteration_interval
            # The first iteration a second after seeding ended; then one every iteration_interval.
            interval = self.seeding_interval if first else self.iteration_interval
        now, last = self.clock(), self.shown.get(run)
        text = self.line(event, start=first)
        if always or last is None or now - last >= interval:
            self.shown[run] = now
            self.info(text)
        elif self.debug is not None:
            self.debug(text)

    def line(self, event: InitProgress | IterationProgress, *, start: bool = False) -> str:
        """The line of one event (``start``: the first seeding event of its run)."""
        if isinstance(event, InitProgress):
            return self.prefix(event) + _seeding_line(event, start=start)
        return self.prefix(event) + self._iteration_line(event)

    @staticmethod
    def prefix(event: InitProgress | IterationProgress) -> str:
        """What begins the lines of ``event``: its level (``level 2/4, ``) and restart (``restart 1/3, ``)."""
        prefix = ""
        if event.level is not None and event.n_levels > 1:
            prefix += f"level {event.level + 1}/{event.n_levels}, "
        if event.n_init > 1:
            prefix += f"restart {event.restart + 1}/{event.n_init}, "
        return prefix

    def _iteration_line(self, e: IterationProgress) -> str:
        key = (e.level, e.restart)
        # Never fewer digits than the line before: consecutive objectives stay told apart.
        digits = max(self.digits.get(key, 7) if e.iteration > e.first else 7, _digits(e.change))
        self.digits[key] = digits
        objective = f"objective {e.objective:.{digits}g}"
        if e.change is not None:
            objective += " (unchanged)" if e.change == 0 else f" ({100 * e.change:+.2g}%)"
        if e.done:
            n = e.n_updates
            if e.converged:
                head = f"converged after {n:,} iteration{'' if n == 1 else 's'}"
            else:
                head = f"stopped after {n:,} iteration{'' if n == 1 else 's'} (n_iter={e.n_iter}), not converged"
            return f"{head}: {objective}, {_duration(e.elapsed)}"
        extra = f", {e.n_repairs:,} empty code{'' if e.n_repairs == 1 else 's'} repaired" if e.n_repairs else ""
        if e.prune:
            extra += f", {e.pruned:,} row{'' if e.pruned == 1 else 's'} proven unchanged"
        timing = f"{_duration(e.elapsed)} elapsed"
        if e.iteration < e.n_iter:  # the updates left at most, at this run's pace
            per = e.elapsed / max(1, e.iteration - e.first + 1)
            timing += f", ETA at most {_duration(per * (e.n_iter - e.iteration))}"
        return f"iteration {e.iteration}/{e.n_iter}: {objective}{extra}, {timing}"


def _seeding_line(e: InitProgress, *, start: bool) -> str:
    if start and e.chosen < e.n_codes:
        return f"seeding {e.n_codes:,} initial centroids{f' ({e.note})' if e.note else ''}"
    note = f"{e.note}, " if e.note and e.chosen < e.n_codes else ""
    return f"seeding: {e.chosen:,}/{e.n_codes:,} initial centroids ({note}{e.seconds:.1f} s)"


def _digits(change: float | None) -> int:
    """Significant digits that show a relative change ``change`` of the objective (at least 7)."""
    if not change or not math.isfinite(change):
        return 7
    return int(min(17, max(7, 3 - math.floor(math.log10(abs(change))))))


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else str(datetime.timedelta(seconds=round(seconds)))


def log_progress(logger: Any, *, iteration_interval: float = LOG_ITERATION_INTERVAL) -> ProgressLines:
    """A ``progress`` callback that logs a fit's lines (:class:`ProgressLines`) to ``logger`` (a
    :class:`logging.Logger` or an adapter, e.g. Prefect's run logger): seeding and the end of each Lloyd
    run at INFO, iterations at INFO at most every ``iteration_interval`` seconds (:class:`ProgressLines`),
    every other line at DEBUG."""
    return ProgressLines(logger.info, debug=logger.debug, iteration_interval=iteration_interval)


def print_progress(file: TextIO | None = None) -> ProgressLines:
    """A ``progress`` callback that prints the lines ``vq fit`` prints when stderr is not a terminal
    (:class:`ProgressLines`, every iteration) to ``file`` (default: ``sys.stderr``)."""

    def write(text: str) -> None:
        print(text, file=file or sys.stderr, flush=True)

    return ProgressLines(write)


def chained(first: ProgressCallback, then: ProgressCallback | None) -> ProgressCallback:
    """A ``progress`` callback that calls ``first``, then ``then`` (if any), with every event."""
    if then is None:
        return first

    def both(event: Any) -> None:
        first(event)
        then(event)

    return both


def also_logged(progress: ProgressCallback | None) -> ProgressCallback:
    """``progress`` (if any) after the library's own log of the fit's lines (:func:`log_progress` on the
    ``vq_pipeline.compute.lloyd`` logger)."""
    return chained(log_progress(log), progress)


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
    #: A balanced fit: the capped assignment of the last E step (:attr:`EStepStats.balance`), else None.
    balance: dict[str, Any] | None = None


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
        on_event: called with an :class:`IterationProgress` after every E step (and its update).
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
    t0 = t_run = time.perf_counter()
    run = dict(n_iter=n_iter, first=state.iteration, tol=tol)
    p = yield c
    objective = p.objective * scale
    while not _converged(state.prev_objective, objective, tol) and state.iteration <= n_iter:
        c, repairs = m_step(p, c, metric=metric, subject=subject)
        stats = _iteration_stats(state.iteration, objective, repairs, p, c, t0, n_rows)
        _report(on_event, stats, state.prev_objective, t_run, run, done=False, converged=False)
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
    stats = _iteration_stats(state.iteration, objective, 0, p, c, t0, n_rows)
    converged = _converged(state.prev_objective, objective, tol)
    _report(on_event, stats, state.prev_objective, t_run, run, done=True, converged=converged)
    return LloydResult(
        centroids=c.to("cpu", torch.float32),
        counts=p.counts.cpu(),
        inertia=objective,
        n_iter=state.iteration - 1,  # the one count of iterations: the updates made
        converged=converged,
        n_repairs=state.n_repairs,
        history=[*state.history, stats],
        bound_bytes=p.bound_bytes,
        balance=p.balance,
    )


def _converged(prev: float | None, objective: float, tol: float) -> bool:
    return prev is not None and prev - objective <= tol * prev


def _report(
    on_event: ProgressCallback | None,
    stats: IterationStats,
    prev: float | None,
    t_run: float,
    run: dict[str, Any],
    *,
    done: bool,
    converged: bool,
) -> None:
    """Give ``on_event`` the :class:`IterationProgress` of the E step ``stats``."""
    if on_event is None:
        return
    change = None if prev is None or prev == 0 else (stats.objective - prev) / prev
    elapsed = time.perf_counter() - t_run
    on_event(IterationProgress(**asdict(stats), elapsed=elapsed, change=change, done=done, converged=converged, **run))


def _iteration_stats(
    it: int,
    objective: float,
    repairs: int,
    p: EStepStats,
    c: torch.Tensor,
    t0: float,
    n_rows: int,
) -> IterationStats:
    """One iteration's statistics (E step ``p`` on the centroids before update ``c``)."""
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
    return stats


@dataclass(frozen=True)
class FitProgress:
    """How far a fit's restarts are: the next restart, the finished ones' inertias and best result,
    and the next restart's Lloyd state when it has begun (what a checkpoint holds)."""

    restart: int = 0
    inertias: tuple[float, ...] = ()
    best: LloydResult | None = None
    lloyd: LloydState | None = None
