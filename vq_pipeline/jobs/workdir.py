"""The scheduled pipeline's folder, its file formats and its refit rules; no Prefect here, so a
second orchestrator (cron, Airflow) can drive the same folder.

Layout under ``work_dir``::

    codebooks/<fingerprint[:12]>.safetensors   every codebook fitted (content-addressed)
    codebooks/current.json                     which one is current (written atomically)
    codebooks/usage-pending.json               code counts of new rows not yet judged by the usage
                                               rule (:func:`read_usage_pending`; written atomically)
    codes/<fingerprint[:12]>/                  that codebook's codes: one parquet per input file (a
                                               plain parquet dataset; its bookkeeping, manifest
                                               included, lies beside it)
    codes/current                              relative symlink to the current codebook's codes
                                               folder, switched atomically with current.json
    reports/<UTC time>-<run id>.md, .json      one report per run
    ids/registry/                              with unique + id_registry: the id registry, every semantic
                                               id ever issued, across codebooks (id versions)
    ids/prefix-v<N>.safetensors                the prefix table of id version N (constrained decoding)
    .vq/lock                                   one run per work_dir at a time (:func:`lock`)

Refit rules (:func:`refit_checks`): the schedule is due, the distortion ratio exceeds
``1 + drift_threshold``, or the code-usage divergence exceeds its finite-sample bias by more than
``usage_threshold`` bits. A run that fitted the codebook encodes the rows it was fitted on: the
report calls them the baseline, and no refit rule is evaluated on them.

Code-usage counts accumulate across runs: a run that brings fewer than :func:`usage_min_rows` new rows
leaves its counts in ``codebooks/usage-pending.json``, and the next runs add theirs until the pool is
large enough to judge. The pool starts again once the rule has judged it, and whenever the current
codebook changes (:func:`next_usage_pending`).

Stable code numbers (:func:`align_refit`): a codebook that replaces another (a refit, or a fit
after ``n_codes`` changed) has its codes renumbered to agree with the one it replaces, on a seeded
sample of at most :data:`ALIGN_SAMPLE_ROWS` of the rows it was fitted on, before it becomes current;
the report shows the share of rows that kept their code and the churn.

Nothing found in ``work_dir`` is trusted: :func:`read_current` refuses a pointer that is not one this
package wrote (a symlink, not JSON, a key missing or of the wrong type, a path that resolves outside
``work_dir``) with a :class:`PipelineStateError` that names the file, what is wrong and the fix (so does
:func:`read_usage_pending` a pending-counts file that is not one it wrote); the
``codes/current`` link is replaced, never followed, and only inside ``work_dir``; the lock is opened
without following symlinks (:func:`vq_pipeline.io.paths.folder_lock`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.align import MAX_ALIGN_PAIRS
from vq_pipeline.errors import PipelineStateError
from vq_pipeline.io import fileio, tables
from vq_pipeline.io.fileio import (
    atomic_symlink,
    atomic_write_bytes,
    canonical_json,
    remove_temporaries,
    resolves_inside,
)
from vq_pipeline.io.paths import folder_lock, resolved
from vq_pipeline.jobs.fit_file import codebook_file_path, save_codebook
from vq_pipeline.jobs.sources import validated_sample

CURRENT_NAME = "codebooks/current.json"
CURRENT_FORMAT = "vq-pipeline.current-codebook"
#: Code counts of new rows that the usage rule has not judged yet (:func:`read_usage_pending`).
PENDING_NAME = "codebooks/usage-pending.json"
PENDING_FORMAT = "vq-pipeline.usage-pending"
#: Relative symlink to the current codebook's codes folder: ``pl.scan_parquet(work_dir / CODES_LINK)``.
CODES_LINK = "codes/current"
#: The run's lock under work_dir: one run per work_dir at a time.
LOCK_FILE = ".vq/lock"
#: The usage rule waits for at least this many new rows, and this many per code: with fewer, the
#: bias estimate runs low and a batch of the training mixture can pass the threshold by chance.
USAGE_MIN_ROWS = 100
USAGE_MIN_ROWS_PER_CODE = 5
#: Rows a refit is renumbered on (:func:`align_refit`): a seeded uniform sample of its tables. At 100k
#: rows the kept share is known to within 0.3 percentage points (95%), and encoding them twice is cheap.
ALIGN_SAMPLE_ROWS = 100_000


def codebook_template(work_dir: str | Path) -> str:
    """The ``out`` template of the pipeline's fits: ``<work_dir>/codebooks/{fp12}.safetensors``."""
    return str(Path(work_dir) / "codebooks" / "{fp12}.safetensors")


def codebook_path(work_dir: str | Path, fingerprint: str) -> Path:
    """The file of the work directory's codebook of ``fingerprint`` (:func:`codebook_template`)."""
    return codebook_file_path(codebook_template(work_dir), fingerprint)


def codes_dir(work_dir: str | Path, fingerprint: str) -> Path:
    return Path(work_dir) / "codes" / fingerprint[:12]


def ids_dir(work_dir: str | Path) -> Path:
    """The folder of the work directory's semantic ids: the id registry (``ids/registry``) and the prefix
    table of each id version beside it."""
    return Path(work_dir) / "ids"


def report_path(work_dir: str | Path, started: dt.datetime, run_id: str | None) -> Path:
    """Where the report of the run that started at ``started`` goes (``.md``; its summary ``.json`` beside it):
    ``reports/<start, to the second>-<run id's first 8 characters, or "local">.md``, with ``_2``, ``_3``, ...
    before ``.md`` when a report of that name is already there (two runs of one second, without a flow run
    id: the second must not overwrite the first's; ``_`` sorts after ``.``, so the reports stay in the order
    of their runs, as the history of runs reads them). Call under the work_dir's lock."""
    stem = Path(work_dir) / "reports" / f"{started.strftime('%Y-%m-%dT%H-%M-%SZ')}-{(run_id or 'local')[:8]}"
    path, n = stem.with_suffix(".md"), 1
    while path.exists() or path.with_suffix(".json").exists():
        n += 1
        path = stem.with_name(f"{stem.name}_{n}.md")
    return path


@contextlib.contextmanager
def lock(work_dir: str | Path) -> Iterator[None]:
    """Hold ``work_dir``'s lock for a run: a slow run and the next scheduled one never overlap (the lock
    belongs to the resolved folder, so two names of one work_dir share it)."""
    with folder_lock(resolved(work_dir) / LOCK_FILE, folder=work_dir):  # every name of the folder: one lock
        yield


def usage_min_rows(n_codes: int) -> int:
    """New rows the code-usage rule needs before it is evaluated."""
    return max(USAGE_MIN_ROWS, USAGE_MIN_ROWS_PER_CODE * n_codes)


def link_current_codes(work_dir: str | Path, fingerprint: str) -> Path:
    """Point ``codes/current`` at ``codes/<fingerprint[:12]>`` with a relative symlink, replaced
    atomically (a temporary link in the same folder, then ``os.replace``): a reader sees the old
    folder or the new one, never no link. The folder may not exist yet (the codes come next)."""
    link = Path(work_dir) / CODES_LINK
    target = fingerprint[:12]
    if link.is_symlink() and os.readlink(link) == target:
        return link
    if link.exists() and not link.is_symlink():
        raise PipelineStateError(
            f"codes_link={str(link)!r} is not a symlink; expected the link to the current codes folder. "
            f"Fix: move it away; the next run recreates the link."
        )
    if not resolves_inside(link.parent, work_dir):
        raise PipelineStateError(
            f"codes={str(link.parent)!r} resolves to {os.path.realpath(link.parent)!r}, outside "
            f"work_dir={str(work_dir)!r}; expected the work_dir's own codes folder. Fix: replace the symlink by a "
            f"real folder (move the codes into it)."
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    # A crashed switch's temporary link (only ours: its name has the package's pattern and this link's
    # tag); the work_dir lock keeps other runs out.
    remove_temporaries(link.parent, target=link, links=True)
    return atomic_symlink(target, link)


def alignment_sample(
    inputs: list[str],
    *,
    column: str,
    metric: str,
    max_rows: int = ALIGN_SAMPLE_ROWS,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> torch.Tensor | None:
    """A seeded uniform sample of at most ``max_rows`` validated rows of the tables ``inputs``:
    (n_rows, dim) float32 CPU tensor, or None when the tables hold no rows."""
    sources = tables.discover(inputs, storage_options=storage_options)
    counts = [tables.inspect_source(s, column=column, storage_options=storage_options).n_rows for s in sources]
    n_total = sum(counts)
    if n_total == 0:
        return None
    positions = np.sort(np.random.default_rng(seed).choice(n_total, size=min(max_rows, n_total), replace=False))
    return validated_sample(sources, counts, positions, column=column, metric=metric, storage_options=storage_options)


def _unalignable(new: Codebook, reference: Codebook) -> str | None:
    """Why ``new`` cannot be renumbered after ``reference`` (see :func:`vq_pipeline.compute.align.check_alignable`)."""
    if new.metric != reference.metric:
        return f"the metric changed ({reference.metric} → {new.metric}): its codes are other cells"
    if (new.codec, new.levels) != (reference.codec, reference.levels):
        return (
            f"the codec changed ({reference.codec}, {reference.levels} levels → {new.codec}, {new.levels} levels): "
            f"levels are renumbered one by one"
        )
    if new.dim != reference.dim:
        return f"the embedding dim changed ({reference.dim} → {new.dim})"
    if new.codec in ("scalar", "binary"):
        return f"{new.codec} codes are positions on a per-dimension grid, not cells: their numbers keep their meaning"
    if new.rotation is not None or reference.rotation is not None:
        return "the rows are rotated before they are coded: codes of rotated levels are not renumbered"
    if new.n_codes * reference.n_codes > MAX_ALIGN_PAIRS:
        return f"{new.n_codes} x {reference.n_codes} codes exceed the {MAX_ALIGN_PAIRS} code pairs matched"
    return None


def align_refit(
    work_dir: str | Path,
    refit: str | Path,
    reference: str | Path,
    *,
    inputs: list[str],
    column: str,
    fresh: bool,
    max_rows: int = ALIGN_SAMPLE_ROWS,
    seed: int = 0,
    engine: str = "auto",
) -> dict[str, Any]:
    """Renumber the codes of the codebook file ``refit`` to agree with ``reference`` (the codebook it
    replaces) and save it, content-addressed, under ``codebooks/``.

    The renumbering keeps the most rows of a seeded sample of at most ``max_rows`` rows of ``inputs``
    (the tables the refit was fitted on) in their code (:meth:`Codebook.aligned_to`, by co-occurrence);
    the cells stay as fitted. The aligned codebook has its own fingerprint (its centroids are in
    another order) and records the alignment in ``stats["alignment"]``.

    Args:
        fresh: this run wrote ``refit``; it is then replaced by the aligned codebook (same
            fingerprint: nothing moved) or removed (it never became current). A file kept from an
            earlier run is left as it is.

    Returns:
        ``aligned`` (False when the codebooks cannot be matched: another metric or dim, too many
        codes; ``reason`` says why, and ``path``/``fingerprint`` are the refit's own), ``path``,
        ``fingerprint``, ``reference``, ``reference_path``, ``n_codes``, ``reference_n_codes``, and
        the alignment record without its mapping: ``method``, ``rows``, ``kept``, ``kept_unaligned``,
        ``churn``, ``renumbered``, ``unaligned_fingerprint``.
    """
    new, ref = Codebook.load(refit), Codebook.load(reference)
    base: dict[str, Any] = {
        "aligned": False,
        "reason": _unalignable(new, ref),
        "path": str(refit),
        "fingerprint": new.fingerprint,
        "reference": ref.fingerprint,
        "reference_path": str(reference),
        "n_codes": new.n_codes,
        "reference_n_codes": ref.n_codes,
    }
    if base["reason"] is not None:
        return base
    x = alignment_sample(inputs, column=column, metric=new.metric, max_rows=max_rows, seed=seed)
    aligned = new.aligned_to(ref, x, engine=engine)
    path = codebook_path(work_dir, aligned.fingerprint)
    same_file = os.path.realpath(path) == os.path.realpath(refit)
    if not same_file:
        save_codebook(aligned, codebook_template(work_dir))  # keeps an intact file of these centroids
    elif fresh:
        aligned.save(path)  # this run's refit, renumbered in place (an earlier run's file keeps its record)
    if fresh and not same_file and os.path.realpath(refit) != os.path.realpath(reference):
        Path(refit).unlink(missing_ok=True)
    record = {k: v for k, v in aligned.stats["alignment"].items() if k != "mapping"}
    return {**base, **record, "aligned": True, "path": str(path), "fingerprint": aligned.fingerprint}


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _check(rule: str, when: str, value: str, status: str, reason: str | None = None) -> dict[str, Any]:
    return {"rule": rule, "when": when, "value": value, "status": status, "fired": status == "fired", "reason": reason}


def _evaluated(rule: str, when: str, value: str, fired: bool, reason: str) -> dict[str, Any]:
    return _check(rule, when, value, "fired" if fired else "not fired", reason if fired else None)


def refit_checks(
    *,
    created_at: str,
    last_fit_at: str | None,
    now: dt.datetime,
    refit_every_hours: float | None,
    drift: dict[str, Any] | None,
    drift_threshold: float,
    usage_threshold: float | None,
) -> list[dict[str, Any]]:
    """Every refit rule, evaluated: one dict each with ``rule`` (schedule, distortion, usage),
    ``when`` (the rule in words), ``value`` (what this run measured), ``status`` (fired, not fired,
    off, not evaluated), ``fired`` and ``reason`` (why it asks for a refit, when it fired).

    Schedule: the codebook is older than ``refit_every_hours``; its age counts from its
    ``created_at``, or from the last refit attempt when that is later (a refit that reproduced the
    same centroids keeps the old file, and must not make every later run refit again).
    Distortion: the newly encoded rows' mean distance exceeds the training mean by more than
    ``drift_threshold`` (``distortion_ratio > 1 + drift_threshold``).
    Usage: the new rows' code-usage Jensen-Shannon divergence from the training usage exceeds the
    divergence a batch of that size drawn from the training distribution itself would show (its
    finite-sample bias) by more than ``usage_threshold`` bits; evaluated from
    :func:`usage_min_rows` new rows on, since below that the bias estimate is unreliable. The rows are
    the drift's ``usage_pool`` when it has one (this run's and those earlier runs left pending), else
    this run's; a rule not evaluated for too few rows has ``pending_rows``.
    ``drift`` is :func:`vq_pipeline.jobs.drift.drift_report`'s dict; a baseline one (the rows the
    codebook was fitted on) evaluates no rule.
    """
    drift = drift or {}
    schedule = f"the codebook is older than {refit_every_hours:g} h" if refit_every_hours is not None else "never (off)"
    distortion = f"distortion ratio > {1 + drift_threshold:g} (1 + drift_threshold)"
    if usage_threshold is None:
        usage = "never (off)"
    else:
        usage = f"code-usage JS divergence above its finite-sample bias > {usage_threshold:g} bits"
        if drift.get("n_codes"):
            usage += f" (from {usage_min_rows(drift['n_codes'])} new rows, pooled over runs)"
    if drift.get("baseline"):
        rules = [("schedule", schedule), ("distortion", distortion), ("usage", usage)]
        return [_check(rule, when, "baseline", "not evaluated") for rule, when in rules]

    checks = []
    if refit_every_hours is None:
        checks.append(_check("schedule", schedule, "—", "off"))
    else:
        times = [t for t in (_parse_time(created_at), _parse_time(last_fit_at)) if t is not None]
        age_h = (now - max(times)).total_seconds() / 3600 if times else float("inf")
        fired = age_h > refit_every_hours
        reason = f"schedule: the codebook is {age_h:.1f} h old (refit every {refit_every_hours:g} h)"
        checks.append(_evaluated("schedule", schedule, f"{age_h:.1f} h old", fired, reason))

    ratio, rows = drift.get("distortion_ratio"), drift.get("rows") or 0
    if ratio is None:
        checks.append(_check("distortion", distortion, "no new rows", "not evaluated"))
    else:
        fired = ratio > 1 + drift_threshold
        reason = f"drift: distortion ratio {ratio:.3f} > 1 + drift_threshold ({1 + drift_threshold:g})"
        checks.append(_evaluated("distortion", distortion, f"{ratio:.3f}", fired, reason))

    # The usage rule judges the pool (this run's counts and those earlier runs left pending) when the
    # drift has one, else this run's counts alone.
    pool = drift.get("usage_pool") or {}
    usage_rows = pool.get("rows", rows)
    pending = pool.get("pending_rows", 0)
    runs = pool.get("runs", 1)
    divergence = pool.get("usage_divergence", drift.get("usage_divergence"))
    expected = pool.get("usage_divergence_expected", drift.get("usage_divergence_expected"))
    needed = usage_min_rows(drift.get("n_codes") or 0)
    if usage_threshold is None:
        checks.append(_check("usage", usage, "—", "off"))
    elif divergence is None or expected is None:
        checks.append(_check("usage", usage, "no new rows", "not evaluated"))
    elif usage_rows < needed:
        value = f"{usage_rows} rows pending < {needed}"
        checks.append({**_check("usage", usage, value, "not evaluated"), "pending_rows": usage_rows})
    else:
        excess = divergence - expected
        fired = excess > usage_threshold
        pooled = f" over {runs} runs" if pending else ""
        value = f"{excess:.3f} bits over the bias ({usage_rows} rows{pooled})"
        reason = (
            f"usage: code-usage divergence {divergence:.3f} bits exceeds its finite-sample bias {expected:.3f} "
            f"by {excess:.3f} > usage_threshold ({usage_threshold:g})"
            + (f" on {usage_rows} rows pooled over {runs} runs" if pending else "")
        )
        checks.append(_evaluated("usage", usage, value, fired, reason))
    return checks


def refit_reason(**kwargs: Any) -> str | None:
    """Why the current codebook should be refitted now (the fired rules of :func:`refit_checks`,
    which takes the same keyword arguments), or None."""
    return "; ".join(c["reason"] for c in refit_checks(**kwargs) if c["fired"]) or None


#: What a fingerprint looks like (sha256 hex digits); whether it is the codebook's is checked on loading.
_FINGERPRINT = re.compile(r"[0-9a-f]{12,64}")
_MAX_POINTER_BYTES = 2**20


def _pointer_error(pointer: Path, problem: str) -> PipelineStateError:
    return PipelineStateError(
        f"current={str(pointer)!r} {problem}; expected the current-codebook pointer vq-pipeline writes: a JSON "
        f"object with 'codebook' (a path inside the work_dir, e.g. 'codebooks/<fingerprint[:12]>.safetensors') "
        f"and 'fingerprint' (the codebook's sha256, in hex). Fix: restore it from a backup, or delete it to start "
        f"over with a fresh fit (the next run fits a new codebook; the codebooks and codes already there are kept)."
    )


def _read_pointer(pointer: Path, error: Any = None, max_bytes: int = _MAX_POINTER_BYTES) -> dict[str, Any] | None:
    """The JSON object in ``pointer``, None when there is none; never follows a symlink. ``error(path,
    problem)`` builds the error that refuses it (default: the current-codebook pointer's)."""
    return fileio.read_json_object(pointer, error or _pointer_error, max_bytes)


def _inside_work_dir(work: Path, pointer: Path, name: str, value: Any) -> Path:
    """The path ``value`` (the pointer's field ``name``), refused unless it is relative and resolves,
    symlinks followed, inside ``work``."""
    if not isinstance(value, str) or not value:
        raise _pointer_error(pointer, f"has {name}={value!r}, not a path")
    path = work / value
    if Path(value).is_absolute() or ".." in Path(value).parts or not resolves_inside(path, work):
        raise _pointer_error(
            pointer,
            f"has {name}={value!r}, which resolves to {os.path.realpath(path)!r}, outside work_dir={str(work)!r}",
        )
    return path


def read_current(work_dir: str | Path) -> dict[str, Any] | None:
    """The current codebook's pointer and identity (with its metric, size, codec, levels and fit
    settings, read from the codebook file), or None when there is none yet.

    Raises:
        PipelineStateError: ``codebooks/current.json`` is not a pointer this package wrote (not JSON,
            not an object, a key missing or of the wrong type, a path that leads outside ``work_dir``,
            a symlink), or the codebook it names is missing or has another fingerprint; the message
            names the file, what is wrong and the fix.
        CodebookFileError: the codebook file it names is not a readable codebook.
    """
    work = Path(work_dir)
    pointer = work / CURRENT_NAME
    current = _read_pointer(pointer)
    if current is None:
        return None
    missing = [k for k in ("codebook", "fingerprint") if k not in current]
    if missing:
        raise _pointer_error(pointer, f"has no {' and no '.join(repr(k) for k in missing)}")
    if current.get("format", CURRENT_FORMAT) != CURRENT_FORMAT:
        raise _pointer_error(pointer, f"has format={current['format']!r}, not {CURRENT_FORMAT!r}")
    recorded = current["fingerprint"]
    if not isinstance(recorded, str) or not _FINGERPRINT.fullmatch(recorded):
        raise _pointer_error(pointer, f"has fingerprint={recorded!r}, not a string of hex digits")
    for name in ("since", "last_fit_at", "reason", "codes_link"):
        if current.get(name) is not None and not isinstance(current[name], str):
            raise _pointer_error(pointer, f"has {name}={current[name]!r}, not a string")
    relative = current["codebook"]
    path = _inside_work_dir(work, pointer, "codebook", relative)
    if "codes" in current:
        _inside_work_dir(work, pointer, "codes", current["codes"])
    if not path.is_file():
        raise PipelineStateError(
            f"codebook={relative!r} in {pointer} does not exist; expected the current codebook file. "
            f"Fix: restore it, or delete {pointer} to fit a new codebook."
        )
    cb = Codebook.load(path)
    if cb.fingerprint != recorded:
        raise PipelineStateError(
            f"{path} has fingerprint {cb.fingerprint[:12]}… but {pointer} records {recorded[:12]}…; "
            f"expected codebook files never to change. Fix: restore the file, or delete {pointer} to fit anew."
        )
    return {
        **current,
        "path": str(path),
        "created_at": cb.created_at,
        "metric": cb.metric,
        "n_codes": cb.n_codes,
        "dim": cb.dim,
        "parent_fingerprint": cb.parent_fingerprint,
        "codec": cb.codec,
        "levels": cb.levels,
        "fit_settings": dict(cb.settings),
    }


def set_current(
    work_dir: str,
    path: str,
    fingerprint: str,
    reason: str,
    now: str,
    since: str | None = None,
) -> dict[str, Any]:
    """Point ``codebooks/current.json`` and ``codes/current`` at a codebook (each atomically: readers
    see the old or the new)."""
    work = Path(work_dir)
    pointer = {
        "format": CURRENT_FORMAT,
        "codebook": Path(path).relative_to(work).as_posix(),
        "fingerprint": fingerprint,
        "codes": codes_dir(work, fingerprint).relative_to(work).as_posix(),
        "codes_link": CODES_LINK,
        "since": since or now,
        "last_fit_at": now,
        "reason": reason,
    }
    atomic_write_bytes(work / CURRENT_NAME, canonical_json(pointer))
    link_current_codes(work, fingerprint)
    return pointer


def _pending_error(path: Path, problem: str) -> PipelineStateError:
    return PipelineStateError(
        f"usage_pending={str(path)!r} {problem}; expected the pending code counts vq-pipeline writes: a JSON object "
        f"with 'format' {PENDING_FORMAT!r}, the current codebook's 'fingerprint', 'rows', 'runs' and 'code_counts' "
        f"(levels × n_codes counts that add up to rows on every level). Fix: delete it; the code-usage rule then "
        f"counts new rows afresh from the next run."
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**53


def read_usage_pending(work_dir: str | Path, fingerprint: str, *, levels: int, n_codes: int) -> dict[str, Any] | None:
    """The code counts of new rows that earlier runs left to the usage rule for the codebook
    ``fingerprint`` (of ``levels`` levels of ``n_codes`` codes): ``fingerprint``, ``rows``, ``runs``
    (the runs they came from), ``code_counts`` (``levels * n_codes`` ints), ``since``; None when there
    are none, or when they were counted for another codebook (the pool starts again when the codebook
    changes).

    Raises:
        PipelineStateError: ``codebooks/usage-pending.json`` is not a file this package wrote (a symlink,
            not JSON, a key missing or of the wrong type, counts of another size or that do not add up
            to ``rows``); the message names the file and the fix (delete it).
    """
    path = Path(work_dir) / PENDING_NAME
    size = levels * n_codes
    pending = _read_pointer(path, _pending_error, max_bytes=_MAX_POINTER_BYTES + 20 * size)
    if pending is None:
        return None
    if pending.get("format") != PENDING_FORMAT:
        raise _pending_error(path, f"has format={pending.get('format')!r}, not {PENDING_FORMAT!r}")
    recorded = pending.get("fingerprint")
    if not isinstance(recorded, str) or not _FINGERPRINT.fullmatch(recorded):
        raise _pending_error(path, f"has fingerprint={recorded!r}, not a string of hex digits")
    if recorded != fingerprint:
        return None  # counted for a codebook that is no longer current
    rows, runs, counts = pending.get("rows"), pending.get("runs"), pending.get("code_counts")
    if not _count(rows):
        raise _pending_error(path, f"has rows={rows!r}, not a count")
    if not _count(runs) or runs < 1:
        raise _pending_error(path, f"has runs={runs!r}, not a count of at least 1")
    if not isinstance(counts, list) or len(counts) != size or not all(_count(c) for c in counts):
        shown = f"{len(counts)} values" if isinstance(counts, list) else repr(counts)[:40]
        raise _pending_error(path, f"has code_counts of {shown}, not {size} counts ({levels} levels × {n_codes} codes)")
    for level in range(levels):
        total = sum(counts[level * n_codes : (level + 1) * n_codes])
        if total != rows:
            raise _pending_error(path, f"has {total} counts on level {level} for rows={rows}")
    since = pending.get("since")
    return {
        "fingerprint": recorded,
        "rows": rows,
        "runs": runs,
        "code_counts": counts,
        "since": since if isinstance(since, str) else None,
    }


def write_usage_pending(work_dir: str | Path, fingerprint: str, pool: dict[str, Any], since: str) -> Path:
    """Write the pool ``pool`` (``rows``, ``runs``, ``code_counts``; :func:`vq_pipeline.jobs.drift.pooled_counts`)
    as the codebook ``fingerprint``'s pending code counts, atomically; ``since``: when the pool began."""
    record = {
        "format": PENDING_FORMAT,
        "fingerprint": fingerprint,
        "rows": int(pool["rows"]),
        "runs": int(pool["runs"]),
        "code_counts": [int(c) for c in pool["code_counts"]],
        "since": since,
    }
    return atomic_write_bytes(Path(work_dir) / PENDING_NAME, canonical_json(record))


def clear_usage_pending(work_dir: str | Path) -> None:
    """Remove the pending code counts (the usage rule judged them, or the codebook changed); a symlink
    there is removed, never its target."""
    Path(work_dir, PENDING_NAME).unlink(missing_ok=True)


def next_usage_pending(
    pending: dict[str, Any] | None, pool: dict[str, Any], checks: list[dict[str, Any]], *, baseline: bool
) -> dict[str, Any] | None:
    """What the pending code counts become after a run: None (start again) when the run measured a
    baseline, when the usage rule judged the pool (fired or not) or is off; ``pending`` unchanged when
    the run brought no new rows; else the pool ``pool`` (this run's counts added to ``pending``), which
    the rule found too few rows to judge. ``checks``: :func:`refit_checks`."""
    usage = next((c for c in checks if c["rule"] == "usage"), None)
    if baseline or usage is None or usage["status"] != "not evaluated":
        return None
    return pool if "pending_rows" in usage else pending
