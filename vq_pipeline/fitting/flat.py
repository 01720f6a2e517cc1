"""One flat codebook fitted from a :class:`~vq_pipeline.compute.data.DataSource`, written as steps.

Seeding (k-means|| by default, exact k-means++, random, first rows, progressive dimensions) draws from
the source's sample; ``n_init`` seeded restarts of Lloyd (:mod:`vq_pipeline.compute.lloyd`) keep the
lowest objective; a checkpoint, when given, saves the state after every update. The result is a
:class:`~vq_pipeline.codebook.Codebook`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.balanced import BalancedEStep
from vq_pipeline.compute.data import SEED_ROWS_PER_CODE, DataSource, EStepStats, InMemoryRows
from vq_pipeline.compute.engines import Engine, get_engine
from vq_pipeline.compute.lloyd import (
    RUN_ONLY,
    FitProgress,
    LloydState,
    ProgressCallback,
    lloyd,
    lloyd_steps,
    run_steps,
    with_context,
)
from vq_pipeline.compute.progressive import progressive_dims
from vq_pipeline.compute.seeding import kmeans_parallel, kmeans_plus_plus, report_init
from vq_pipeline.fitting.options import FitOptions

if TYPE_CHECKING:
    from vq_pipeline.fitting.checkpoint import FitCheckpoint

log = logging.getLogger(__name__)


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
    subject: str = "x",
) -> Generator[torch.Tensor, EStepStats, Codebook]:
    """A flat :func:`fit_source` as :data:`Steps`: seeding reads ``source.sample``, and every E step
    is asked of the caller. ``subject`` names the rows in errors (a level of a multi-level fit).

    A balanced fit (``opts.balance``) answers its own E steps (:class:`~vq_pipeline.compute.balanced.BalancedEStep`
    over ``source``: a capped assignment, two passes over the rows) and asks the caller for none."""
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
        balanced = None
        if opts.balance is not None:
            balanced = BalancedEStep(
                source, opts.balance, opts.n_codes, engine=opts.engine, memory_budget=opts.memory_budget
            )
        for restart in range(done.restart, opts.n_init):
            resume = done.lloyd if restart == done.restart else None
            events = with_context(progress, restart=restart, n_init=opts.n_init, prune=opts.prune)
            save = None
            if checkpoint is not None:

                def save(state: LloydState, restart: int = restart, done: FitProgress = done) -> None:
                    checkpoint.save(
                        data_fingerprint, opts, restart=restart, inertias=done.inertias, best=done.best, lloyd=state
                    )

            t0 = time.perf_counter()
            c0 = resume.centroids if resume is not None else _initial_centroids(seed_rows, opts, restart, eng, events)
            init_seconds += time.perf_counter() - t0
            if resume is None and save is not None:
                # A checkpoint as soon as the initial centroids exist: a fit stopped before its first
                # update resumes without seeding again (k-means++ can take longer than an iteration).
                resume = LloydState.start(c0)
                save(resume)
            steps = lloyd_steps(
                source.n_rows,
                c0.to(opts.device),
                metric=opts.metric,
                n_iter=opts.n_iter,
                tol=opts.tol,
                resume=resume,
                on_event=events,
                on_update=save,
                subject=subject,
            )
            result = run_steps(steps, balanced) if balanced is not None else (yield from steps)
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
            **({"balance": best.balance} if best.balance is not None else {}),
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
        report_init(progress, 0, n_codes, t0, note=f"progressive from {seed_rows.shape[0]:,} rows")
        return progressive_dims(
            seed_rows,
            n_codes,
            tol=opts.tol,
            generator=generator,
            engine=eng,
            memory_budget=opts.memory_budget,
            device=dev,
            metric=opts.metric,
            progress=progress,
        )
    elif opts.init == "sample":
        return _sample_fit(seed_rows, opts, generator, eng, progress, t0)
    else:
        report_init(progress, 0, n_codes, t0, note=f"{opts.init} from {seed_rows.shape[0]:,} rows")
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
    report_init(progress, n_codes, n_codes, t0)
    return c0


def _sample_fit(
    seed_rows: torch.Tensor,
    opts: FitOptions,
    generator: torch.Generator,
    eng: Engine,
    progress: ProgressCallback | None,
    t0: float,
) -> torch.Tensor:
    """The "sample" init: a fit of its own on ``SEED_ROWS_PER_CODE * n_codes`` of the seeding rows (a seeded
    choice when there are more, as a source in memory gives all of its rows), seeded by k-means|| and run to
    the fit's ``tol`` and ``n_iter``; its centroids start Lloyd on every row. Most updates then read the
    sample, and the few on every row start near where they end."""
    n_codes, dev = opts.n_codes, opts.device
    rows = seed_rows
    if rows.shape[0] > SEED_ROWS_PER_CODE * n_codes:
        keep = torch.randperm(rows.shape[0], generator=generator)[: SEED_ROWS_PER_CODE * n_codes].sort().values
        rows = rows[keep.to(rows.device)]
    report_init(progress, 0, n_codes, t0, note=f"sample: k-means|| and Lloyd on {rows.shape[0]:,} rows")
    c0 = kmeans_parallel(
        rows, n_codes, generator=generator, engine=eng, memory_budget=opts.memory_budget, device=dev, progress=progress
    )
    source = InMemoryRows(rows.to(dev), engine=opts.engine, memory_budget=opts.memory_budget)
    fitted = lloyd(source, c0, metric=opts.metric, n_iter=opts.n_iter, tol=opts.tol).centroids.to(dev)
    report_init(progress, n_codes, n_codes, t0)
    return fitted.contiguous()


def _restart_seed(seed: int, restart: int) -> int:
    return (seed * 1_000_003 + restart) % (2**63)
