"""Fitting and encoding multi-level codebooks (codec 'residual' or 'product'; see :mod:`vq_pipeline.compute.levels`).

Every level is an ordinary flat fit (:func:`vq_pipeline.fitting.flat.fit_steps`: seeding, restarts, exact
Lloyd, repairs, checkpoints) over the level's view of the rows (:meth:`DataSource.mapped`):

* residual: levels one after the other; level ``l`` sees what the fitted levels ``0..l-1`` leave,
  computed per batch and never written out: for each row, the residuals of the ``train_beam`` best
  partial tuples of a beam search (:func:`vq_pipeline.compute.levels.beam_residuals`; the greedy residual
  when ``train_beam=1``). Level 0 is the flat codebook of the same settings.
* product: all levels in lockstep; each iteration is one pass over the data that serves every level
  still running (:func:`vq_pipeline.compute.data.e_steps`). Each level stops at its own tolerance, so level
  ``l`` is the flat codebook of slice ``l`` with the same settings.

A final pass encodes the training rows once (greedy, as encode does by default) for the counts and
the statistics: reconstruction error (in total and per level), code usage per level and the
collision rate (the share of rows whose whole tuple of codes another row shares).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.codecs import rotate_rows
from vq_pipeline.compute.data import DataSource, InMemoryRows, e_steps
from vq_pipeline.compute.levels import RowMap, decode, encode_levels, reconstruction_error
from vq_pipeline.compute.lloyd import ProgressCallback, run_steps, with_context
from vq_pipeline.errors import TooFewPointsError
from vq_pipeline.fitting.flat import fit_steps
from vq_pipeline.fitting.options import FitOptions
from vq_pipeline.fitting.rotation import source_rotation
from vq_pipeline.validate import check_beam

log = logging.getLogger(__name__)


#: ``stats['objective']`` of a multi-level cosine codebook: its inertia is the sum of ``1 - cos``.
OBJECTIVE_COSINE = "1 - cos"


def level_metric(codec: str, metric: str, level: int) -> str:
    """The metric level ``level`` is fitted with: the codebook's for residual level 0, else 'l2'."""
    return metric if codec == "residual" and level == 0 else "l2"


def fit_levels(
    source: DataSource,
    opts: FitOptions,
    *,
    data_fingerprint: str,
    sources: Any = (),
    column: str = "",
    extra_stats: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    t_start: float | None = None,
    checkpoint: Any = None,
) -> Codebook:
    """Fit a residual or product codebook over ``source`` (validated rows, unit rows under cosine).

    ``checkpoint`` (a :class:`vq_pipeline.fitting.checkpoint.FitCheckpoint`) holds the finished levels and the
    running ones' progress: a killed fit resumes where it stopped and gives the same codebook.

    ``opts.rotation`` ('random', 'opq'): the rotation R is made first (OPQ: learned on a seeded sample,
    :func:`vq_pipeline.fitting.rotation.source_rotation`), then the levels are fitted over all rows
    rotated (``x @ R``, per batch through the levels' row maps; once, for rows in memory), and the
    statistics pass encodes the rotated rows. A product fit with OPQ starts each level from OPQ's last
    centroids of that slice (``stats['level_init'] = 'opq'``) when ``n_init == 1``.
    """
    from vq_pipeline.fitting.checkpoint import LevelCheckpoints

    t_start = time.perf_counter() if t_start is None else t_start
    n_levels = opts.levels
    t_rotation = time.perf_counter()
    rotation, learned, rotation_stats = source_rotation(source, opts)
    rotation_seconds = time.perf_counter() - t_rotation
    level_init = None
    if learned is not None and learned.centroids is not None and opts.codec == "product" and opts.n_init == 1:
        level_init = learned.centroids
        rotation_stats["level_init"] = "opq"
    extra_stats = {**rotation_stats, **(extra_stats or {})}
    source, map_rotation = _rotated_source(source, rotation)
    rotation_key = "" if rotation is None else f"|rotation {_tensor_hash(rotation)}"
    if opts.codec == "residual":
        check_beam("train_beam", opts.train_beam, n_codes=opts.n_codes, levels=n_levels)
    with checkpoint.locked() if checkpoint is not None else contextlib.nullcontext():
        store = LevelCheckpoints(checkpoint, _fit_key(data_fingerprint, opts)) if checkpoint is not None else None
        books: list[Codebook | None] = [store.finished(level) if store else None for level in range(n_levels)]
        resumed = sum(b is not None for b in books)
        if resumed:
            log.info("resuming a %s fit: %d of %d levels already fitted", opts.codec, resumed, n_levels)

        def steps(level: int, src: DataSource, prefix: str) -> Any:
            level_opts = replace(
                opts, codec="flat", levels=1, metric=level_metric(opts.codec, opts.metric, level), rotation="none"
            )
            if level_init is not None:
                level_opts = replace(level_opts, init=level_init[level])
            subject = _level_subject(opts, level, source.n_rows, source.dim, column)
            return _named(
                fit_steps(
                    src,
                    level_opts,
                    data_fingerprint=f"{data_fingerprint}|{opts.codec}|level {level}|{prefix}{rotation_key}",
                    progress=with_context(progress, level=level, n_levels=n_levels),
                    checkpoint=store.view(level) if store else None,
                    subject=subject,
                ),
                subject,
                f"fit levels={level} (what the levels before leave has too few distinct rows), or "
                if opts.codec == "residual" and level
                else "",
            )

        if opts.codec == "residual":
            for level in range(n_levels):
                if books[level] is not None:
                    continue
                prefix = torch.stack([b.centroids for b in books[:level]]) if level else None
                if prefix is not None:
                    src = source.mapped(_residual_map(prefix, opts, map_rotation))
                elif map_rotation is not None:
                    src = source.mapped(RowMap.columns(0, source.dim, source.dim, rotation=map_rotation))
                else:
                    src = source
                log.debug("level %d/%d: fitting the residual level", level + 1, n_levels)
                books[level] = run_steps(steps(level, src, _tensor_hash(prefix)), src.e_step)
                if store:
                    store.finish(level, books[level])
        else:
            sub = source.dim // n_levels
            srcs = {
                lv: source.mapped(RowMap.columns(lv * sub, (lv + 1) * sub, source.dim, rotation=map_rotation))
                for lv in range(n_levels)
            }
            todo = {lv: steps(lv, srcs[lv], "") for lv in range(n_levels) if books[lv] is None}

            def finished(level: int, book: Codebook) -> None:
                books[level] = book
                if store:  # saved at once: a stop later in the lockstep must not lose this level
                    store.finish(level, book)

            _run_together(todo, srcs, finished)
        done = [b for b in books if b is not None]
        centroids = torch.stack([b.centroids for b in done])  # (levels, n_codes, sub_dim)
        t_stats = time.perf_counter()
        pass_stats = training_stats(source, centroids, opts, rotation=map_rotation)
        _warn_if_error_rises(opts, pass_stats["level_mse"])
        codebook = Codebook(
            centroids=centroids,
            counts=pass_stats.pop("counts"),  # (levels, n_codes): the training rows' codes, as encode gives them
            metric=opts.metric,
            codec=opts.codec,
            settings=opts.settings(done[0].settings.get("engine", opts.engine)),
            stats=_codebook_stats(done, pass_stats, source.n_rows, extra_stats, opts.metric),
            data_fingerprint=data_fingerprint,
            sources=tuple(sources),
            column=column,
            parent_fingerprint=opts.parent_fingerprint,
            rotation=rotation,
            timings={
                "fit_seconds": time.perf_counter() - t_start,
                **({"rotation_seconds": rotation_seconds} if rotation is not None else {}),
                "init_seconds": sum(b.timings.get("init_seconds", 0.0) for b in done),
                "iteration_seconds": [s for b in done for s in b.timings.get("iteration_seconds", [])],
                **(
                    {"iteration_pruned": [p for b in done for p in b.timings.get("iteration_pruned", [])]}
                    if opts.prune
                    else {}
                ),
                "level_seconds": [b.timings.get("fit_seconds", 0.0) for b in done],
                "stats_seconds": time.perf_counter() - t_stats,
            },
        )
        if store:
            store.clear()
    return codebook


def _level_subject(opts: FitOptions, level: int, n_rows: int, dim: int, column: str) -> str:
    """How errors name the rows level ``level`` is fitted on: the user's column (or ``x``), which
    level, and for a residual level what it is the residual of."""
    name = column or "x"
    if opts.codec == "residual":
        if level == 0:
            return name
        before = "level 0" if level == 1 else f"levels 0..{level - 1}"
        tuples = f"the train_beam={opts.train_beam} best tuples of {before}" if opts.train_beam > 1 else before
        verb = "leave" if opts.train_beam > 1 or level > 1 else "leaves"
        return f"residual level {level} (what {tuples} {verb} of the {n_rows} rows of {name})"
    sub = dim // opts.levels
    return f"product level {level} (columns {level * sub}:{(level + 1) * sub} of the {n_rows} rows of {name})"


def _named(steps: Any, subject: str, fix: str) -> Any:
    """``steps`` with a "x has only ... distinct rows" error (seeding's) naming ``subject`` instead, and
    ``fix`` put first among the fixes of a "too few distinct rows" error."""
    try:
        return (yield from steps)
    except TooFewPointsError as exc:
        message = str(exc)
        if message.startswith("x has only"):
            message = subject + message[1:]
        if "distinct rows" in message and "Fix: " in message:
            message = message.replace("Fix: ", f"Fix: {fix}", 1)
        if message == str(exc):
            raise
        raise TooFewPointsError(message) from None


def _warn_if_error_rises(opts: FitOptions, level_mse: list[float]) -> None:
    """Warn (a logged warning) when a residual level leaves the training rows farther
    from their reconstruction than the levels before it did: that level makes the codes worse (e.g. a
    ``train_beam`` as wide as ``n_codes``, whose level is fitted on residuals greedy encoding never sees)."""
    if opts.codec != "residual":
        return
    for level in range(1, len(level_mse)):
        before, after = level_mse[level - 1], level_mse[level]
        if after > before * (1 + 1e-6):
            message = (
                f"residual level {level} raises the training rows' mean reconstruction error from {before:.6g} "
                f"(levels 0..{level - 1}) to {after:.6g} ({'1 - cos' if opts.metric == 'cosine' else 'squared L2'}, "
                f"greedy encoding); that level makes the codes worse. Fix: fit with a smaller train_beam "
                f"(now {opts.train_beam}; 1 fits each level on the greedy residuals), more n_codes, or fewer levels."
            )
            log.warning("%s", message)  # shown once: by the vq command, in the flow's log, or on stderr


def _residual_map(prefix: torch.Tensor, opts: FitOptions, rotation: torch.Tensor | None = None) -> RowMap:
    return RowMap.residual(
        prefix, beam=opts.train_beam, engine=opts.engine, memory_budget=opts.memory_budget, rotation=rotation
    )


def _rotated_source(source: DataSource, rotation: torch.Tensor | None) -> tuple[DataSource, torch.Tensor | None]:
    """(the source the levels are mapped from, the rotation their row maps apply first): rows in memory
    are rotated once (a source of the rotated rows, no rotation left to apply); streamed and
    partitioned rows are rotated per batch by every level's row map."""
    if rotation is None:
        return source, None
    if isinstance(source, InMemoryRows):
        return source.mapped(RowMap.columns(0, source.dim, source.dim, rotation=rotation)), None
    return source, rotation


def _run_together(
    steps: dict[int, Any], srcs: dict[int, DataSource], finished: Callable[[int, Codebook], None]
) -> None:
    """Run level fits written as :data:`vq_pipeline.compute.lloyd.Steps` in lockstep: every round, one
    :func:`~vq_pipeline.compute.data.e_steps` call answers all levels still running; ``finished(level,
    codebook)`` is called as each level ends."""
    pending: dict[int, torch.Tensor] = {}
    for level, gen in steps.items():
        try:
            pending[level] = next(gen)
        except StopIteration as stop:
            finished(level, stop.value)
    while pending:
        order = sorted(pending)
        stats = e_steps([(srcs[lv], pending[lv]) for lv in order])
        for level, p in zip(order, stats):
            try:
                pending[level] = steps[level].send(p)
            except StopIteration as stop:
                finished(level, stop.value)
                del pending[level]


def _tensor_hash(t: torch.Tensor | None) -> str:
    if t is None:
        return ""
    return hashlib.sha256(np.ascontiguousarray(t.cpu().numpy(), dtype="<f4").tobytes()).hexdigest()[:16]


def _fit_key(data_fingerprint: str, opts: FitOptions) -> str:
    init = opts.init_name
    return hashlib.sha256(f"{data_fingerprint}|{opts.settings(opts.engine)}|{init}".encode()).hexdigest()


def training_stats(
    source: DataSource, centroids: torch.Tensor, opts: FitOptions, *, rotation: torch.Tensor | None = None
) -> dict[str, Any]:
    """One pass over the training rows with the final codebook, encoding them as :meth:`Codebook.encode`
    does by default (greedy): the (levels, n_codes) ``counts`` of every code, error per level and in
    total, code usage per level, and collisions of whole tuples.

    The errors are means over the rows of the distance :meth:`Codebook.encode` returns (squared L2,
    ``1 - cos`` under cosine: :func:`~vq_pipeline.compute.levels.reconstruction_error`), so ``mse *
    n_rows`` is the sum of encode's distances, as a flat codebook's inertia is. Residual: ``level_mse[l]``
    is the error of the reconstruction by levels ``0..l`` (the last one is ``mse``); product: the squared
    L2 error of slice ``l`` (under cosine, of the unit row's slice). ``rotation``: the rows are rotated
    first (``x @ rotation``), as encode rotates them; the errors are those of the rotated rows."""
    from vq_pipeline.compute.semantic_ids import collision_stats

    n_levels, n_codes, sub = centroids.shape
    dev = opts.device
    c = centroids.to(dev)
    used = torch.zeros((n_levels, n_codes), dtype=torch.int64)
    level_err = torch.zeros(n_levels, dtype=torch.float64)  # residual: after each level; product: each slice
    total_err = 0.0
    code_parts: list[np.ndarray] = []
    dtype = np.uint8 if n_codes <= 256 else np.uint16 if n_codes <= 65_536 else np.int64
    r = None if rotation is None else rotation.to(dev, torch.float32)
    for xb in source.batches():
        xb = rotate_rows(xb.to(dev, torch.float32), r)
        codes = encode_levels(xb, c, opts.codec, engine=opts.engine, memory_budget=opts.memory_budget)
        code_parts.append(codes.cpu().numpy().astype(dtype))
        for level in range(n_levels):
            used[level] += torch.bincount(codes[:, level].cpu(), minlength=n_codes)
        x64 = xb.double()
        if opts.codec == "residual":
            for level in range(n_levels):
                partial = decode(c[: level + 1], "residual", codes[:, : level + 1], metric=opts.metric)
                level_err[level] += float(reconstruction_error(x64, partial.double(), opts.metric).sum())
        else:
            for level in range(n_levels):
                diff = xb[:, level * sub : (level + 1) * sub] - c[level][codes[:, level]]
                level_err[level] += float(diff.double().square().sum())
        decoded = decode(c, opts.codec, codes, metric=opts.metric).double()
        total_err += float(reconstruction_error(x64, decoded, opts.metric).sum())
    n_rows = max(1, source.n_rows)
    all_codes = np.concatenate(code_parts) if code_parts else np.zeros((0, n_levels), dtype)
    return {
        "counts": used,
        "mse": total_err / n_rows,
        "level_mse": (level_err / n_rows).tolist(),
        "used_codes": (used > 0).sum(dim=1).tolist(),
        **collision_stats(all_codes),
    }


def objective_name(metric: str) -> str:
    """What a multi-level codebook's ``stats['inertia']`` and ``stats['mse']`` sum (``stats['objective']``):
    the distance encode returns, as a flat codebook's inertia does."""
    return OBJECTIVE_COSINE if metric == "cosine" else "squared L2"


def stated_objective(codebook: Codebook, key: str = "inertia") -> float | None:
    """``codebook.stats[key]`` (``'inertia'`` or ``'mse'``) as the sum (mean) of the distance encode
    returns: ``1 - cos`` under cosine. Multi-level cosine codebooks written before ``stats['objective']``
    existed recorded the squared distance of the unit rows to their reconstruction, twice ``1 - cos``:
    theirs is halved. None when absent."""
    value = codebook.stats.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    legacy = codebook.codec != "flat" and codebook.metric == "cosine" and "objective" not in codebook.stats
    return float(value) * 0.5 if legacy else float(value)


def _codebook_stats(
    books: list[Codebook], pass_stats: dict[str, Any], n_rows: int, extra: dict[str, Any] | None, metric: str
) -> dict[str, Any]:
    """The multi-level codebook's ``stats``: totals, and each level's fit statistics."""
    levels = []
    for level, b in enumerate(books):
        s = b.stats
        levels.append(
            {
                "inertia": s["inertia"],
                "iterations": s["iterations"],
                "converged": s["converged"],
                "n_repairs": s["n_repairs"],
                "empty_codes": s["empty_codes"],
                "used_codes": pass_stats["used_codes"][level],
                "mse": pass_stats["level_mse"][level],
                "restart_inertias": s.get("restart_inertias", []),
                "history": s.get("history", []),
                **({"balance": s["balance"]} if "balance" in s else {}),
            }
        )
    collisions = {
        k: pass_stats[k] for k in ("n_unique", "collision_rate", "largest_group", "max_suffix") if k in pass_stats
    }
    return {
        "n_rows": n_rows,
        "objective": objective_name(metric),
        "inertia": pass_stats["mse"] * n_rows,
        "mse": pass_stats["mse"],
        "iterations": sum(lv["iterations"] for lv in levels),
        "converged": all(lv["converged"] for lv in levels),
        "n_repairs": sum(lv["n_repairs"] for lv in levels),
        "empty_codes": sum(lv["empty_codes"] for lv in levels),
        **collisions,
        "levels": levels,
        **(extra or {}),
    }


__all__ = [
    "OBJECTIVE_COSINE",
    "fit_levels",
    "level_metric",
    "objective_name",
    "stated_objective",
    "training_stats",
]
