"""The fit job: fit a codebook from tables and save it as one file, with a summary a person can read.

What ``vq fit``, the fit flow and the scheduled run share: the output path is checked against the
inputs before any work (and held locked while the fit runs), a ``sample`` larger than the tables is
capped, a warm start is read from a codebook file, a content-addressed path (``{fingerprint}`` or
``{fp12}`` in ``out``) that already holds the same codebook is kept as is, and the result is a
:class:`FitSummary`. Where the work runs is the caller's ``mapper`` (:func:`fit_from_tables`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.lloyd import ProgressCallback
from vq_pipeline.errors import CodebookFileError
from vq_pipeline.fitting.multilevel import stated_objective
from vq_pipeline.io import tables
from vq_pipeline.io.codebook_file import is_codebook_file
from vq_pipeline.io.paths import check_output_file, output_lock
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.jobs.mappers import Mapper
from vq_pipeline.settings import PER_DIMENSION_CODECS, FitSettings, TableSettings
from vq_pipeline.validate import check_beam, check_int

#: The placeholders a codebook path may hold, filled in once the centroids are known.
TEMPLATE_FIELDS = ("{fingerprint}", "{fp12}")


def is_template(out: str | os.PathLike[str]) -> bool:
    """Whether ``out`` names its file by the codebook's fingerprint (``{fingerprint}`` or ``{fp12}``)."""
    return any(field in os.fspath(out) for field in TEMPLATE_FIELDS)


def codebook_file_path(out: str | os.PathLike[str], fingerprint: str) -> Path:
    """The file ``out`` names for a codebook of ``fingerprint``: the path itself, or the template
    filled in (``{fingerprint}``: all 64 hex digits, ``{fp12}``: the first 12)."""
    out = os.fspath(out)
    return Path(out.format(fingerprint=fingerprint, fp12=fingerprint[:12])) if is_template(out) else Path(out)


@dataclass(frozen=True)
class FitSummary:
    """A saved fit, as plain data: the file, the codebook's shape and provenance, how the fit went."""

    path: str
    fingerprint: str
    parent_fingerprint: str | None
    #: A content-addressed file that already held this very codebook was kept, not rewritten.
    kept_existing: bool
    n_codes: int
    dim: int
    metric: str
    codec: str
    levels: int
    engine: str | None
    #: The init as asked ("warm start" when the fit started from a codebook file).
    init: str
    rows: int | None
    rows_total: int | None
    mode: str | None
    iterations: int | None
    converged: bool | None
    inertia: float | None
    mean_distance: float
    n_repairs: int | None
    #: The objective per iteration (a multi-level fit: each level's in turn, marked with ``level``).
    history: list[dict[str, Any]]
    #: Min, quartiles and max of the training rows per code, and the number of empty codes.
    cluster_sizes: dict[str, Any]
    fit_seconds: float | None
    init_seconds: float | None
    #: The whole job: reading, fitting and saving.
    task_seconds: float
    created_at: str
    #: Multi-level codebooks: reconstruction error, collisions and each level's statistics (else None).
    mse: float | None = None
    collision_rate: float | None = None
    n_unique: int | None = None
    level_mse: list[float] | None = None
    level_stats: list[dict[str, Any]] | None = None
    #: A fit that kept rows out (``FitSettings.holdout``): ``fraction``, ``rows``, ``seed`` and
    #: ``mean_distance`` of the held-out rows to their codes (the codebook's ``stats["holdout"]``); else None.
    holdout: dict[str, Any] | None = None
    #: The codes' scorecard (the codebook's ``stats["scorecard"]``: error, recall@10, prefix coherence,
    #: effective size, collision rate on a held-out or training sample), or None for a codebook without one.
    scorecard: dict[str, Any] | None = None
    #: The rotation applied before coding ("none", "random", "opq", "itq"; listed by to_dict when not "none").
    rotation: str = "none"
    #: Scalar and binary codebooks (else None): bits per dimension, the share of training values outside
    #: the scalar range (``stats["clipped"]``), the binary codes' share of ones (``stats["bit_balance"]``).
    bits: int | None = None
    clipped: float | None = None
    bit_balance: Any = None

    @classmethod
    def of(cls, codebook: Codebook, path: Path, *, kept: bool, init: str, seconds: float) -> FitSummary:
        """The summary of ``codebook``, saved at ``path``."""
        stats, timings = codebook.stats, codebook.timings
        levels = stats.get("levels", [])
        multi: dict[str, Any] = {}
        inertia = stated_objective(codebook)  # 1 - cos under cosine, as encode's distances
        if codebook.codec != "flat":
            multi = dict(
                mse=stated_objective(codebook, "mse"),
                collision_rate=stats.get("collision_rate"),
                n_unique=stats.get("n_unique"),
                level_mse=[level.get("mse") for level in levels],
                level_stats=[
                    {k: level.get(k) for k in ("mse", "used_codes", "iterations", "converged", "n_repairs")}
                    for level in levels
                ],
            )
        per_dimension: dict[str, Any] = {}
        if codebook.codec in PER_DIMENSION_CODECS:
            per_dimension = dict(
                bits=int(codebook.n_codes).bit_length() - 1,  # n_codes is 2**bits
                clipped=stats.get("clipped"),
                bit_balance=stats.get("bit_balance"),
            )
        return cls(
            path=str(path),
            fingerprint=codebook.fingerprint,
            parent_fingerprint=codebook.parent_fingerprint,
            kept_existing=kept,
            n_codes=codebook.n_codes,
            dim=codebook.dim,
            metric=codebook.metric,
            codec=codebook.codec,
            levels=codebook.levels,
            engine=codebook.settings.get("engine"),
            init=init,
            rows=stats.get("n_rows"),
            rows_total=stats.get("rows_total"),
            mode=stats.get("mode"),
            iterations=stats.get("iterations"),
            converged=stats.get("converged"),
            inertia=inertia,
            mean_distance=(inertia or 0.0) / max(int(stats.get("n_rows") or 1), 1),
            n_repairs=stats.get("n_repairs"),
            history=stats.get("history")
            or [{**h, "level": i} for i, level in enumerate(levels) for h in level.get("history", [])],
            cluster_sizes=size_summary(codebook.counts.flatten().tolist()),
            fit_seconds=timings.get("fit_seconds"),
            init_seconds=timings.get("init_seconds"),
            task_seconds=seconds,
            created_at=codebook.created_at,
            holdout=dict(stats["holdout"]) if isinstance(stats.get("holdout"), dict) else None,
            scorecard=dict(stats["scorecard"]) if isinstance(stats.get("scorecard"), dict) else None,
            rotation=str(codebook.settings.get("rotation", "none")),
            **multi,
            **per_dimension,
        )

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain data; a flat codebook's leaves out the multi-level keys."""
        d = dataclasses.asdict(self)
        if self.codec == "flat":
            for key in ("mse", "collision_rate", "n_unique", "level_mse", "level_stats"):
                del d[key]
        if self.codec not in PER_DIMENSION_CODECS:  # earlier codecs' summaries keep their keys
            for key in ("bits", "clipped", "bit_balance"):
                del d[key]
        if self.rotation == "none":
            del d["rotation"]
        return d


def size_summary(counts: list[int]) -> dict[str, Any]:
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
        "empty": sum(c == 0 for c in ordered),
    }


def held_output(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]
) -> contextlib.AbstractContextManager[None]:
    """Check the codebook path ``out`` (or template) against the inputs before any work
    (:func:`vq_pipeline.io.paths.check_output_file`), and hold a plain path's lock for the fit."""
    probe = codebook_file_path(out, "0" * 64)
    check_output_file("out", probe, inputs, ours=is_codebook_file, what="codebook", suffix=".safetensors")
    return contextlib.nullcontext() if is_template(out) else output_lock(out, what="codebook")


def capped_sample(inputs: Sequence[str | os.PathLike[str]], reading: TableSettings) -> TableSettings:
    """``reading`` with its sample capped at the tables' row count (a scheduled job's data may still be small)."""
    if reading.sample is None:
        return reading
    found = tables.discover(inputs, storage_options=reading.storage_options)
    n_rows = sum(
        tables.inspect_source(s, column=reading.column, storage_options=reading.storage_options).n_rows for s in found
    )
    return dataclasses.replace(reading, sample=min(reading.sample, n_rows)) if n_rows else reading


def save_codebook(codebook: Codebook, out: str | os.PathLike[str]) -> tuple[Path, bool]:
    """Save ``codebook`` to ``out`` (a path or template); (the path, whether an identical
    content-addressed file was kept instead of rewritten, so a refit that reproduces a codebook does not
    rewrite its lineage)."""
    path = codebook_file_path(out, codebook.fingerprint)
    kept = False
    if is_template(out) and path.is_file():
        try:
            kept = Codebook.load(path).fingerprint == codebook.fingerprint
        except CodebookFileError:
            kept = False  # a damaged file under this name is replaced
    if not kept:
        codebook.save(path)
    return path, kept


@dataclass(frozen=True)
class FitJob:
    """What to fit and where to save it: the inputs, the output path (or template), the codes, how
    the tables are read, how the fit runs, and an optional codebook file to warm-start from (flat
    codebooks only: a multi-level fit starts from its own seeding)."""

    inputs: tuple[str, ...]
    out: str
    n_codes: int
    reading: TableSettings
    settings: FitSettings = FitSettings()
    warm_start: str | None = None

    def __post_init__(self) -> None:
        # Refused here, before any table is read: a train_beam wider than the beam can ever be.
        if self.settings.codec == "residual":
            n_codes = check_int("n_codes", self.n_codes, minimum=1, hint="n_codes is the number of codes per level.")
            check_beam("train_beam", self.settings.train_beam, n_codes=n_codes, levels=self.settings.levels)


def fit_to_file(
    job: FitJob, *, mapper: Mapper | None = None, progress: ProgressCallback | None = None, log: Any = None
) -> FitSummary:
    """Run the fit job: fit (:func:`~vq_pipeline.jobs.fit_tables.fit_from_tables`, through ``mapper``
    when given), save, summarize. ``log``: a logger for what the job decided (a capped sample, a warm
    start left out)."""
    t0 = time.perf_counter()
    settings, warm_start = job.settings, job.warm_start
    if warm_start and settings.codec != "flat":
        if log is not None:
            log.info(
                "warm_start=%s not used: a %s codebook is fitted from its own seeding (warm starts are for flat "
                "codebooks)",
                warm_start,
                settings.codec,
            )
        warm_start = None
    with held_output(job.out, job.inputs):
        if mapper is not None and job.reading.sample is not None:  # a sample is meant to fit one machine
            if log is not None:
                log.info("sample=%s: fitting the sample in this process, not through the mapper", job.reading.sample)
            mapper = None
        reading = capped_sample(job.inputs, job.reading)
        if reading.sample != job.reading.sample and log is not None:
            log.info("sample=%s exceeds the tables' rows; fitting on all %s rows", job.reading.sample, reading.sample)
        if warm_start:
            settings = dataclasses.replace(settings, init=Codebook.load(warm_start, metric=settings.metric))
        scratch = codebook_file_path(job.out, "0" * 64).parent
        codebook = fit_from_tables(
            job.inputs, job.n_codes, reading, settings, mapper=mapper, scratch=scratch, progress=progress
        )
        path, kept = save_codebook(codebook, job.out)
    init = "warm start" if warm_start else str(job.settings.init)
    return FitSummary.of(codebook, path, kept=kept, init=init, seconds=time.perf_counter() - t0)


__all__ = [
    "FitJob",
    "FitSummary",
    "capped_sample",
    "codebook_file_path",
    "fit_to_file",
    "held_output",
    "is_template",
    "save_codebook",
    "size_summary",
]
