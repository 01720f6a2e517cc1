"""Lloyd's K-means through an engine: init, E/M steps, empty-cluster repair, tolerance, restarts.

The loop follows the KeOps K-means tutorial (an argmin over symbolic squared distances, then
centroid means) and adds what it leaves out:

* k-means++ initialization (greedy, as in scikit-learn: ``2 + ln(n_codes)`` candidates per step),
  exact and pruned by the triangle inequality, in bounded chunks, and k-means|| (the default), which
  draws candidates in a few rounds and reduces them by weighted k-means++ (:mod:`vq_pipeline.seeding`);
* empty clusters are repaired by moving them to the points farthest from their centroids
  (scikit-learn's rule), falling back to splitting the largest cluster (FAISS splits a cluster
  drawn at random, weighted by size; the largest keeps the fit deterministic); every repair
  is counted, and no centroid is ever NaN or left behind at zero;
* stopping when the objective's relative decrease falls to ``tol``, or after ``n_iter`` updates;
* ``n_init`` seeded restarts, keeping the lowest objective;
* per-iteration statistics (objective, repairs, imbalance, seconds).

Lloyd reads its rows only through a :class:`vq_pipeline.data.DataSource` (in memory, streamed tables,
partitions on workers): ``e_step(centroids)`` gives the sums, counts, objective and far rows of one
pass (:class:`vq_pipeline.data.EStepStats`, float64 sums), ``sample`` the rows that seeding draws from.
"""

from __future__ import annotations

import contextlib
import logging

import time
from dataclasses import asdict, dataclass
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .codebook import Codebook, tensor_fingerprint
from .settings import FitSettings
from .fit_options import FitOptions, _check_init_tensor, fit_options, maybe_to_device  # noqa: F401 - fit_options re-exported
from .data import SEED_ROWS_PER_CODE, DataSource, EStepStats, InMemoryRows
from .engines import Engine, get_engine
from .errors import TooFewPointsError
from .seeding import InitProgress, _report_init, kmeans_parallel, kmeans_plus_plus  # noqa: F401 - re-exported
from .validate import (
    as_embeddings,
    check_nonzero_rows,
    normalize_rows,
    too_few_rows_fix,
)

if TYPE_CHECKING:
    from .checkpoint import FitCheckpoint

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
    bound_bytes: int = 0  # memory of the pruning state (:mod:`vq_pipeline.prune`) at the last E step


def m_step(p: EStepStats, c: torch.Tensor, *, metric: str) -> tuple[torch.Tensor, int]:
    """New centroids from an E step's sums and counts, with empty clusters repaired.

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
        _repair(new, empty, p, metric=metric)
    return new, len(empty)


def _repair(c: torch.Tensor, empty: list[int], p: EStepStats, *, metric: str) -> None:
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
            f"x has only {n_distinct} distinct rows but n_codes={c.shape[0]}; every row already sits on a "
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
#: :func:`vq_pipeline.multilevel` runs several in lockstep (one pass over the data per iteration).
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
) -> Generator[torch.Tensor, EStepStats, LloydResult]:
    """:func:`lloyd` as :data:`Steps` over ``n_rows`` rows."""
    state = resume if resume is not None else LloydState.start(init)
    c = state.centroids.to(init.device)  # (n_codes, dim)
    scale = 0.5 if metric == "cosine" else 1.0  # |a - b|^2 = 2 (1 - cos) for unit vectors
    t0 = time.perf_counter()
    p = yield c
    objective = p.objective * scale
    while not _converged(state.prev_objective, objective, tol) and state.iteration <= n_iter:
        c, repairs = m_step(p, c, metric=metric)
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


def _restart_seed(seed: int, restart: int) -> int:
    return (seed * 1_000_003 + restart) % (2**63)


@dataclass(frozen=True)
class FitProgress:
    """How far a fit's restarts are: the next restart, the finished ones' inertias and best result,
    and the next restart's Lloyd state when it has begun (what a checkpoint holds)."""

    restart: int = 0
    inertias: tuple[float, ...] = ()
    best: LloydResult | None = None
    lloyd: LloydState | None = None


def fit_codebook(
    x: Any,
    n_codes: int,
    *,
    metric: str = FitSettings.metric,
    n_iter: int = FitSettings.n_iter,
    tol: float = FitSettings.tol,
    init: str | torch.Tensor | Codebook = FitSettings.init,
    seed: int = FitSettings.seed,
    n_init: int = FitSettings.n_init,
    engine: str = FitSettings.engine,
    device: str | torch.device | None = FitSettings.device,
    memory_budget: int = FitSettings.memory_budget,
    codec: str = FitSettings.codec,
    levels: int = FitSettings.levels,
    train_beam: int = FitSettings.train_beam,
    prune: bool = FitSettings.prune,
    progress: ProgressCallback | None = None,
    sources: tuple[str, ...] = (),
    column: str = "",
) -> Codebook:
    """Fit a K-means codebook with Lloyd's algorithm.

    Args:
        x: (n_rows, dim) embeddings: torch tensor (any device), numpy array (read-only ones too,
            without a copy), or a polars Series (or one-column DataFrame) of Array or same-length
            List rows. float16, bfloat16, float64 and integer inputs are converted to float32;
            NaN/Inf are refused.
        n_codes: number of centroids, ``1 <= n_codes <= n_rows``.
        metric: 'l2' (squared Euclidean) or 'cosine' (rows and centroids L2-normalized; centroids
            re-normalized after every update).
        n_iter: at most this many centroid updates (0 evaluates the initial centroids only).
        tol: stop when the objective's relative decrease is ``<= tol``.
        init: 'auto' (default: 'progressive' for residual codebooks, else 'k-means||'),
            'k-means++' (exact greedy k-means++), 'k-means||' (approximate k-means||: 2 rounds of
            oversampling, then weighted k-means++ on the candidates; faster), 'progressive'
            (K-means over more and more principal directions, see :mod:`vq_pipeline.progressive`),
            'random' (distinct random rows), 'first' (the first n_codes rows, as in the KeOps
            tutorial), a (n_codes, dim) tensor, or a Codebook to warm-start from (its fingerprint is
            recorded as the parent). The file records the init used ('k-means||' for 'auto' flat).
        seed: seed of every random choice; with the same data, settings and device kind the
            codebook is the same.
        n_init: restarts from different seeded inits; the lowest objective wins.
        engine: 'auto', 'keops' or 'torch'. device: None (CUDA if available), 'cpu' or 'cuda'.
        memory_budget: bytes of temporaries one chunk may use.
        codec: 'flat' (default: one code per row), 'residual' (``levels`` codes per row, each level
            fitted by exact Lloyd on what the levels before it leave: coarse-to-fine semantic ids) or
            'product' (the dimensions split into ``levels`` contiguous slices, one K-means each,
            advanced together in one pass over the data per iteration). ``n_codes`` is per level.
            See :mod:`vq_pipeline.levels`.
        levels: codes per row for 'residual' and 'product' (1 for 'flat'); 'product' needs
            ``dim % levels == 0``.
        train_beam: 'residual': every level after the first is fitted on what the ``train_beam``
            best partial tuples of the levels before leave of each row (so ``train_beam`` times as
            many rows; 1: the greedy residuals). Encode with ``beam=train_beam`` to match.
        prune: skip the search of the rows whose code the triangle inequality proves unchanged
            (Hamerly's bounds, 8 bytes of state per row; :mod:`vq_pipeline.prune`). The codebook is
            the same as without; ``timings['iteration_pruned']`` gives each pass's skipped rows. Off
            by default: it did not save time in the benchmarks (README, "Engines").
        progress: called with :class:`InitProgress` events while the initial centroids are chosen
            (k-means++ and the last step of k-means|| about every 5%), then with an
            :class:`IterationStats` after every iteration (of every level, for a multi-level codec).
        sources, column: provenance recorded in the codebook.

    Returns:
        A :class:`Codebook` whose counts and inertia belong to its centroids.
    """
    t_start = time.perf_counter()
    settings = FitSettings.from_keywords(locals())
    x = as_embeddings(x)
    n_rows, dim = x.shape
    opts = fit_options(n_codes, settings, dim=dim, n_rows=n_rows, x_device=x)
    data_fingerprint = tensor_fingerprint(x)
    if opts.metric == "cosine":
        check_nonzero_rows(x)
        x = normalize_rows(x)
    source = InMemoryRows(
        maybe_to_device(x, opts.device), engine=opts.engine, memory_budget=opts.memory_budget, prune=opts.prune
    )
    return fit_source(
        source,
        opts,
        data_fingerprint=data_fingerprint,
        sources=sources,
        column=column,
        progress=progress,
        t_start=t_start,
    )


def fit_source(
    source: DataSource,
    opts: FitOptions,
    *,
    data_fingerprint: str,
    sources: Sequence[str] = (),
    column: str = "",
    extra_stats: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    t_start: float | None = None,
    checkpoint: FitCheckpoint | None = None,
) -> Codebook:
    """Lloyd restarts over ``source``, seeded from its :meth:`~vq_pipeline.data.DataSource.sample`;
    the one fit behind every entry point (in memory, streamed tables, partitions).

    Args:
        source: the training rows: validated, unit rows under cosine.
        checkpoint: where to save the state after every update, and to resume from if it holds a
            state of this very fit (same data fingerprint and settings); removed once the fit ends.

    A multi-level codec (``opts.codec``) fits its levels through :func:`fit_steps` each
    (:func:`vq_pipeline.multilevel.fit_levels`).
    """
    kwargs = dict(
        data_fingerprint=data_fingerprint,
        sources=sources,
        column=column,
        extra_stats=extra_stats,
        progress=progress,
        t_start=t_start,
        checkpoint=checkpoint,
    )
    if opts.codec != "flat":
        from .multilevel import fit_levels

        return fit_levels(source, opts, **kwargs)
    return run_steps(fit_steps(source, opts, **kwargs), source.e_step)


def fit_steps(
    source: DataSource,
    opts: FitOptions,
    *,
    data_fingerprint: str,
    sources: Sequence[str] = (),
    column: str = "",
    extra_stats: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    t_start: float | None = None,
    checkpoint: FitCheckpoint | None = None,
) -> Generator[torch.Tensor, EStepStats, Codebook]:
    """A flat :func:`fit_source` as :data:`Steps`: seeding reads ``source.sample``, and every E step
    is asked of the caller."""
    # One fit per checkpoint file: a second one fails at once instead of overwriting this one's state.
    with checkpoint.locked() if checkpoint is not None else contextlib.nullcontext():
        t_start = time.perf_counter() if t_start is None else t_start
        eng = get_engine(opts.engine, opts.device, source.dim)
        seed_rows = _seeding_rows(source, opts)
        done = checkpoint.load(data_fingerprint, opts) if checkpoint is not None else None
        if done is not None:
            log.info("resuming the fit from checkpoint %s (restart %d)", checkpoint.path, done.restart)
        done = done or FitProgress()
        init_seconds = 0.0
        for restart in range(done.restart, opts.n_init):
            resume = done.lloyd if restart == done.restart else None
            save = None
            if checkpoint is not None:

                def save(state: LloydState, restart: int = restart, done: FitProgress = done) -> None:
                    checkpoint.save(
                        data_fingerprint, opts, restart=restart, inertias=done.inertias, best=done.best, lloyd=state
                    )

            t0 = time.perf_counter()
            c0 = resume.centroids if resume is not None else _initial_centroids(seed_rows, opts, restart, eng, progress)
            init_seconds += time.perf_counter() - t0
            if resume is None and save is not None:
                # A checkpoint as soon as the initial centroids exist: a fit stopped before its first
                # update resumes without seeding again (k-means++ can take longer than an iteration).
                resume = LloydState.start(c0)
                save(resume)
            result = yield from lloyd_steps(
                source.n_rows,
                c0.to(opts.device),
                metric=opts.metric,
                n_iter=opts.n_iter,
                tol=opts.tol,
                resume=resume,
                on_event=progress,
                on_update=save,
            )
            best = result if done.best is None or result.inertia < done.best.inertia else done.best
            done = FitProgress(restart + 1, (*done.inertias, result.inertia), best)
            if checkpoint is not None:
                checkpoint.save(
                    data_fingerprint, opts, restart=done.restart, inertias=done.inertias, best=best, lloyd=None
                )
        best, n_rows, inertias = done.best, source.n_rows, list(done.inertias)
        assert best is not None
        if checkpoint is not None:
            checkpoint.clear()
    history = [asdict(h) for h in best.history]
    return Codebook(
        centroids=best.centroids,
        counts=best.counts,
        metric=opts.metric,
        settings=opts.settings(eng.name),
        stats={
            "n_rows": n_rows,
            "inertia": best.inertia,
            "iterations": best.n_iter,
            "converged": best.converged,
            "n_repairs": best.n_repairs,
            "empty_codes": int((best.counts == 0).sum()),
            "restart_inertias": inertias,
            "history": [{k: v for k, v in h.items() if k not in RUN_ONLY} for h in history],
            **(extra_stats or {}),
        },
        data_fingerprint=data_fingerprint,
        sources=tuple(sources),
        column=column,
        parent_fingerprint=opts.parent_fingerprint,
        timings={
            "fit_seconds": time.perf_counter() - t_start,
            "init_seconds": init_seconds,
            "iteration_seconds": [h["seconds"] for h in history],
            **(
                {"iteration_pruned": [h["pruned"] for h in history], "prune_state_bytes": best.bound_bytes}
                if opts.prune
                else {}
            ),
        },
    )


def _seeding_rows(source: DataSource, opts: FitOptions) -> torch.Tensor | None:
    """The rows a named init draws from (None for a given tensor): the head for 'first', else a
    seeded sample of ``SEED_ROWS_PER_CODE * n_codes`` rows (all rows for a source in memory)."""
    if isinstance(opts.init, torch.Tensor):
        return None
    if opts.init == "first":
        return source.sample(opts.n_codes, None)
    return source.sample(SEED_ROWS_PER_CODE * opts.n_codes, np.random.default_rng(opts.seed))


def _initial_centroids(
    seed_rows: torch.Tensor | None, opts: FitOptions, restart: int, eng: Engine, progress: ProgressCallback | None
) -> torch.Tensor:
    """(n_codes, dim) float32 initial centroids of one restart on the compute device."""
    n_codes, dev = opts.n_codes, opts.device
    generator = torch.Generator().manual_seed(_restart_seed(opts.seed, restart))
    t0 = time.perf_counter()
    if isinstance(opts.init, torch.Tensor):
        c0 = opts.init.to(dev).contiguous()
    elif opts.init == "first":
        c0 = seed_rows[:n_codes].to(dev).contiguous()
    elif opts.init == "random":
        pick = torch.randperm(seed_rows.shape[0], generator=generator)[:n_codes]
        c0 = seed_rows[pick.to(seed_rows.device)].to(dev).contiguous()
    elif opts.init == "progressive":
        from .progressive import progressive_dims

        return progressive_dims(
            seed_rows,
            n_codes,
            generator=generator,
            engine=eng,
            memory_budget=opts.memory_budget,
            device=dev,
            metric=opts.metric,
            progress=progress,
        )
    else:
        seeding = kmeans_parallel if opts.init == "k-means||" else kmeans_plus_plus
        return seeding(
            seed_rows,
            n_codes,
            generator=generator,
            engine=eng,
            memory_budget=opts.memory_budget,
            device=dev,
            progress=progress,
        )
    _report_init(progress, n_codes, n_codes, t0)
    return c0
