"""Prefect flow: fit a codebook on embedding tables and save it.

A thin wrapper over :func:`vq_pipeline.pipeline.fit_from_tables`: one task fits and saves, the flow
publishes a markdown artifact (settings, objective per iteration, cluster sizes, repairs, time) and
returns a small summary dict. Fitting gets no retries: a failure there is a data or settings problem,
and a rerun would only repeat it.
"""

import contextlib
import dataclasses
import itertools
import statistics
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from vq_pipeline import Codebook, CodebookFileError, IterationStats
from vq_pipeline import tables
from vq_pipeline.codebook_file import is_codebook_file
from vq_pipeline.paths import check_output_file, output_lock
from vq_pipeline.partitioned import Exchange
from vq_pipeline.pipeline import fit_from_tables, fit_partitioned, partition_stats_file
from vq_pipeline.tables import Source
from vq_pipeline.settings import FitSettings

from vq_flows.encode import retry_transient  # noqa: I001 - flows after the library

FIT_ARTIFACT_KEY = "vq-fit-codebook"
# The history table is shown in full up to this many rows, then as its head and tail.
_MAX_HISTORY_ROWS = 60


def _is_template(out: str) -> bool:
    return "{fingerprint}" in out or "{fp12}" in out


def _clamped_sample(inputs: list[str], column: str, sample: int | None) -> int | None:
    """``sample`` capped at the tables' row count (a scheduled job's data may still be small)."""
    if sample is None:
        return None
    n_rows = sum(tables.inspect_source(s, column=column).n_rows for s in tables.discover(inputs))
    return min(sample, n_rows) if n_rows else sample


def _size_summary(counts: list[int]) -> dict[str, Any]:
    """Min, quartiles and max of the cluster sizes, and how many codes are empty."""
    ordered = sorted(counts)
    if len(ordered) > 1:
        q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = median = q3 = float(ordered[0])
    return {
        "min": ordered[0],
        "q1": q1,
        "median": median,
        "q3": q3,
        "max": ordered[-1],
        "empty": sum(1 for c in ordered if c == 0),
    }


def log_progress(logger: Any) -> Callable[[Any], None]:
    """A fit ``progress`` callback that logs seeding and every iteration at INFO to the run's log."""

    def log(event: Any) -> None:
        if isinstance(event, IterationStats):
            logger.info(
                "iteration %d: objective %.6g, repairs %d, %d rows proven unchanged (%.2f s)",
                event.iteration,
                event.objective,
                event.n_repairs,
                event.pruned,
                event.seconds,
            )
        else:
            logger.info(
                "seeding: %d of %d initial centroids chosen (%.1f s)", event.chosen, event.n_codes, event.seconds
            )

    return log


# Results stay in memory (NO_CACHE): a cached result would skip writing the file.
@task(name="fit-codebook", cache_policy=NO_CACHE)
def fit_task(
    inputs: list[str],
    column: str,
    n_codes: int,
    out: str,
    settings: FitSettings,
    sample: int | None = None,
    warm_start: str | None = None,
) -> dict[str, Any]:
    """Fit, save and summarize a codebook; returns plain data (no tensors).

    ``out`` may hold ``{fingerprint}`` or ``{fp12}`` (its first 12 hex digits), filled in once the
    centroids are known. Such a content-addressed file that already exists with the same
    fingerprint is kept as is, so a refit that reproduces a codebook does not rewrite its lineage.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    sample_used = _clamped_sample(inputs, column, sample)
    if sample_used != sample:
        logger.info("sample=%s exceeds the tables' rows; fitting on all %s rows", sample, sample_used)
    codebook = fit_from_tables(
        inputs,
        column=column,
        n_codes=n_codes,
        sample=sample_used,
        progress=log_progress(logger),
        **_started(settings, warm_start).keywords(),
    )
    return save_and_summarize(codebook, out, init="warm start" if warm_start else settings.init, t0=t0)


def _started(settings: FitSettings, warm_start: str | None) -> FitSettings:
    """``settings`` starting from the codebook file ``warm_start``, when given."""
    if not warm_start:
        return settings
    return dataclasses.replace(settings, init=Codebook.load(warm_start, metric=settings.metric))


def _levels_summary(codebook: Codebook) -> dict[str, Any]:
    """``codec`` and ``levels``; for a residual or product codebook also its reconstruction ``mse``,
    ``collision_rate``, ``n_unique`` and ``level_stats`` (per level: mse, used codes, iterations, converged)."""
    summary: dict[str, Any] = {"codec": codebook.codec, "levels": codebook.levels}
    if codebook.codec == "flat":
        return summary
    stats = codebook.stats
    summary.update(
        mse=stats.get("mse"),
        collision_rate=stats.get("collision_rate"),
        n_unique=stats.get("n_unique"),
        level_mse=[level.get("mse") for level in stats.get("levels", [])],
        level_stats=[
            {k: level.get(k) for k in ("mse", "used_codes", "iterations", "converged", "n_repairs")}
            for level in stats.get("levels", [])
        ],
    )
    return summary


def save_and_summarize(codebook: Codebook, out: str, *, init: str, t0: float) -> dict[str, Any]:
    """Save the codebook to ``out`` (a path or template, see :func:`fit_task`) and summarize it."""
    fp = codebook.fingerprint
    path = Path(out.format(fingerprint=fp, fp12=fp[:12])) if _is_template(out) else Path(out)
    kept = False
    if _is_template(out) and path.is_file():
        try:
            kept = Codebook.load(path).fingerprint == fp
        except CodebookFileError:
            kept = False  # a damaged file under this name is replaced
    if not kept:
        codebook.save(path)
    stats = codebook.stats
    return {
        **_levels_summary(codebook),
        "path": str(path),
        "fingerprint": fp,
        "parent_fingerprint": codebook.parent_fingerprint,
        "kept_existing": kept,
        "n_codes": codebook.n_codes,
        "dim": codebook.dim,
        "metric": codebook.metric,
        "engine": codebook.settings.get("engine"),
        "init": init,
        "rows": stats.get("n_rows"),
        "rows_total": stats.get("rows_total"),
        "mode": stats.get("mode"),
        "iterations": stats.get("iterations"),
        "converged": stats.get("converged"),
        "inertia": stats.get("inertia"),
        "mean_distance": stats.get("inertia", 0.0) / max(int(stats.get("n_rows") or 1), 1),
        "n_repairs": stats.get("n_repairs"),
        # a multi-level fit: each level's iterations in turn, marked with their level
        "history": stats.get("history")
        or [{**h, "level": i} for i, level in enumerate(stats.get("levels", [])) for h in level.get("history", [])],
        "cluster_sizes": _size_summary(codebook.counts.flatten().tolist()),
        "fit_seconds": codebook.timings.get("fit_seconds"),
        "init_seconds": codebook.timings.get("init_seconds"),
        "task_seconds": time.perf_counter() - t0,
        "created_at": codebook.created_at,
    }


@task(
    name="partition-stats",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    task_run_name="stats-{key}",
)
def partition_stats_task(
    uri: str,
    key: str,
    centroids: str,
    stats: str,
    column: str,
    metric: str,
    engine: str = FitSettings.engine,
    device: str | None = FitSettings.device,
    row_map: str | None = None,
    bounds: str | None = None,
) -> dict[str, Any]:
    """One partition's E-step statistics against the centroids in file ``centroids`` (for one level
    of a multi-level fit, of the rows as the map in file ``row_map`` turns them), written to file
    ``stats``; returns the path, rows, objective and pruned rows. ``bounds``: the partition's pruning
    state file, read and rewritten (see ``partition_stats_file``). Safe to retry (files are written
    atomically, and a state records the centroids it holds for)."""
    return partition_stats_file(
        Source(uri=uri, key=key),
        centroids,
        stats,
        row_map,
        bounds,
        column=column,
        metric=metric,
        engine=engine,
        device=device,
    )


def fit_on_dask(
    dask: str,
    inputs: list[str],
    column: str,
    n_codes: int,
    out: str,
    settings: FitSettings,
    warm_start: str | None = None,
) -> dict[str, Any]:
    """Exact Lloyd on a Dask cluster, from inside a flow; returns :func:`fit_task`'s summary.

    Each iteration runs one ``partition-stats`` task per input file on the workers, which read
    their files themselves; centroids and statistics travel as files in the partitioned fit's
    scratch folder next to ``out`` (:class:`vq_pipeline.partitioned.Exchange`; that folder must be
    shared with the workers), and only paths and a few numbers pass through the scheduler.
    """
    from vq_flows.dask import dask_task_runner

    logger = get_run_logger()
    t0 = time.perf_counter()
    calls = itertools.count()
    with Exchange(out) as exchange, dask_task_runner(dask) as runner:
        logger.info("fitting on the Dask cluster %s", runner.client.scheduler.address)

        def map_e_step(c: Any, sources: Sequence[Source], row_map: Any = None) -> list[Any]:
            i = next(calls)
            cfile = exchange.publish(i, c)
            mfile = exchange.publish_map(i, row_map)
            futures = [
                runner.submit(
                    partition_stats_task,
                    parameters=dict(
                        uri=s.uri,
                        key=s.key,
                        centroids=str(cfile),
                        stats=str(exchange.stats_file(i, j)),
                        column=column,
                        metric=settings.metric,
                        engine=settings.engine,
                        device=settings.device,
                        row_map=mfile,
                        bounds=str(exchange.bounds_file(j, row_map)) if settings.prune else None,
                    ),
                )
                for j, s in enumerate(sources)
            ]
            # in source order: the reduction is deterministic
            return exchange.collect(cfile, [f.result()["stats"] for f in futures], mfile)

        codebook = fit_partitioned(
            inputs,
            map_e_step,
            column=column,
            n_codes=n_codes,
            progress=log_progress(logger),
            **_started(settings, warm_start).keywords(),
        )
    return save_and_summarize(codebook, out, init="warm start" if warm_start else settings.init, t0=t0)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None or value == "" else str(value)


def _level_lines(s: dict[str, Any]) -> list[str]:
    """The fit report's per-level table of a residual or product codebook (none for a flat one)."""
    if s.get("codec", "flat") == "flat":
        return []
    what = "error left after the level" if s["codec"] == "residual" else "error of the level's slice"
    lines = [
        "## Levels",
        "",
        f"| level | mse ({what}) | used codes | iterations | repairs |",
        "|---|---|---|---|---|",
    ]
    for i, level in enumerate(s.get("level_stats") or []):
        state = "converged" if level.get("converged") else "not converged"
        lines.append(
            f"| {i} | {_fmt(level.get('mse'))} | {_fmt(level.get('used_codes'))} of {s['n_codes']} "
            f"| {_fmt(level.get('iterations'))} ({state}) | {_fmt(level.get('n_repairs'))} |"
        )
    return [*lines, ""]


def fit_markdown(summary: dict[str, Any]) -> str:
    """The fit report as markdown (pure formatting of :func:`fit_task`'s summary)."""
    s = summary
    multilevel = s.get("codec", "flat") != "flat"
    sizes = s["cluster_sizes"]
    rows = (
        f"{s['rows']} ({s['mode']}"
        + (f", of {s['rows_total']}" if s.get("rows_total") not in (None, s["rows"]) else "")
        + ")"
    )
    lines = [
        "# Codebook fit",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{s['path']}`{' (kept: same centroids as the existing file)' if s['kept_existing'] else ''} |",
        f"| fingerprint | `{s['fingerprint']}` |",
        f"| parent (warm start) | `{s['parent_fingerprint']}` |"
        if s["parent_fingerprint"]
        else "| parent (warm start) | none |",
        f"| n_codes | {s['n_codes']}{' per level' if multilevel else ''} |",
        *([f"| codec | {s['codec']}, {s['levels']} levels |"] if multilevel else []),
        f"| dim | {s['dim']} |",
        f"| metric | {s['metric']} |",
        f"| engine | {_fmt(s['engine'])} |",
        f"| init | {s['init']} |",
        f"| rows | {rows} |",
        f"| iterations | {s['iterations']} ({'converged' if s['converged'] else 'not converged'}) |",
        f"| final objective | {_fmt(s['inertia'])} (mean distance {_fmt(s['mean_distance'])}) |",
        f"| empty-cluster repairs | {s['n_repairs']} |",
        *(
            [
                f"| reconstruction error (mse) | {_fmt(s.get('mse'))} |",
                f"| semantic ids | {_fmt(s.get('n_unique'))} unique tuples, collision rate "
                f"{_fmt(s.get('collision_rate'))} |",
            ]
            if multilevel
            else []
        ),
        f"| time | fit {_fmt(s['fit_seconds'])} s (init {_fmt(s['init_seconds'])} s); "
        f"task {_fmt(s['task_seconds'])} s |",
        "",
        "## Cluster sizes",
        "",
        "| min | q1 | median | q3 | max | empty codes |",
        "|---|---|---|---|---|---|",
        f"| {sizes['min']} | {_fmt(sizes['q1'])} | {_fmt(sizes['median'])} | {_fmt(sizes['q3'])} "
        f"| {sizes['max']} | {sizes['empty']} |",
        "",
        *_level_lines(s),
        "## Objective per iteration",
        "",
        "| iteration | objective | repairs | empty codes | imbalance |",
        "|---|---|---|---|---|",
    ]
    history = s["history"]
    half = _MAX_HISTORY_ROWS // 2
    shown = history if len(history) <= _MAX_HISTORY_ROWS else [*history[:half], None, *history[-half:]]
    for h in shown:
        if h is None:
            lines.append(f"| … | ({len(history) - 2 * half} more) | | | |")
        else:
            iteration = f"level {h['level']}, {h['iteration']}" if "level" in h else h["iteration"]
            lines.append(
                f"| {iteration} | {_fmt(h['objective'])} | {h['n_repairs']} | {h['n_empty']} | {_fmt(h['imbalance'])} |"
            )
    return "\n".join(lines) + "\n"


def _held_output(out: str, inputs: Sequence[str]) -> contextlib.AbstractContextManager[None]:
    """Check the codebook path ``out`` (or template) against the inputs before any work (the library's
    rule: :func:`vq_pipeline.paths.check_output_file`), and hold a plain path's lock for the fit."""
    template = _is_template(out)
    probe = out.format(fingerprint="0" * 64, fp12="0" * 12) if template else out
    check_output_file("out", probe, inputs, ours=is_codebook_file, what="codebook", suffix=".safetensors")
    return contextlib.nullcontext() if template else output_lock(out, what="codebook")


@flow(name="fit-codebook")
def fit_codebook_flow(
    inputs: list[str],
    column: str,
    n_codes: int,
    out: str,
    metric: str = FitSettings.metric,
    n_iter: int = FitSettings.n_iter,
    tol: float = FitSettings.tol,
    init: str = FitSettings.init,
    seed: int = FitSettings.seed,
    sample: int | None = None,
    engine: str = FitSettings.engine,
    device: str | None = FitSettings.device,
    warm_start: str | None = None,
    dask: str | None = None,
    codec: str = FitSettings.codec,
    levels: int = FitSettings.levels,
    train_beam: int = FitSettings.train_beam,
    prune: bool = FitSettings.prune,
) -> dict[str, Any]:
    """Fit a K-means codebook on the ``column`` embeddings of ``inputs`` and save it to ``out``.

    Args:
        inputs: table files, globs or folders. out: the codebook file (``{fingerprint}``/``{fp12}``
            placeholders allowed). warm_start: a codebook file to start from; its fingerprint is
            recorded as the new codebook's parent (flat codebooks only: a residual or product fit
            starts from its own seeding and records no parent). codec, levels: "flat", or
            "residual"/"product" with ``levels`` codes per row (``n_codes`` per level); train_beam:
            residual levels are fitted on the beam's residuals (see ``fit_codebook``). prune: skip
            the search of rows whose code the triangle inequality proves (the same codebook either
            way; on Dask each partition keeps its state in the scratch folder). Other arguments: see
            ``fit_from_tables``.
        dask: fit on a Dask cluster (``local:N`` or a scheduler address, see :mod:`vq_flows.dask`):
            exact Lloyd as map-reduce, one ``partition-stats`` task per input file and iteration;
            this process reduces, updates and saves (see :func:`fit_on_dask`). With ``sample``
            the fit runs here, as without ``dask`` (a sample is meant to fit one machine).

    Returns:
        A summary: ``path``, ``fingerprint``, ``parent_fingerprint``, ``n_codes``, ``dim``,
        ``metric``, ``codec``, ``levels`` (multi-level: ``mse``, ``collision_rate``, ``n_unique``,
        ``level_mse``, ``level_stats``), ``rows``, ``iterations``, ``n_repairs``, ``cluster_sizes``, timings and
        ``flow_run_id`` (the per-iteration ``history`` is left in the artifact).
    """
    settings = FitSettings(
        metric=metric,
        n_iter=n_iter,
        tol=tol,
        init=init,
        seed=seed,
        engine=engine,
        device=device,
        codec=codec,
        levels=levels,
        train_beam=train_beam,
        prune=prune,
    )
    if warm_start and codec != "flat":
        get_run_logger().info(
            "warm_start=%s not used: a %s codebook is fitted from its own seeding (warm starts are for flat codebooks)",
            warm_start,
            codec,
        )
        warm_start = None
    with _held_output(out, inputs):
        if dask and sample is None:
            summary = fit_on_dask(dask, inputs, column, n_codes, out, settings, warm_start)
        else:
            if dask:
                get_run_logger().info("sample=%s: fitting the sample in this process, not on the Dask cluster", sample)
            summary = fit_task(inputs, column, n_codes, out, settings, sample, warm_start)
    create_markdown_artifact(
        markdown=fit_markdown(summary),
        key=FIT_ARTIFACT_KEY,
        description=f"codebook {summary['fingerprint'][:12]}: {summary['n_codes']} codes × {summary['dim']}",
    )
    get_run_logger().info(
        "codebook %s: %d iterations, %d repairs, %s",
        summary["fingerprint"][:12],
        summary["iterations"],
        summary["n_repairs"],
        summary["path"],
    )
    return {**{k: v for k, v in summary.items() if k != "history"}, "flow_run_id": flow_run.get_id()}
