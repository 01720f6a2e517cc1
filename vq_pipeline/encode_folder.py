"""Encode tables into a folder of code tables, resumably and exactly once: plan, lock, per-file
encode, receipts, manifest.

Encoding writes ``out_dir`` as a plain parquet dataset (nothing but ``.parquet`` files, so
``pl.scan_parquet(out_dir)``, pyarrow datasets and duckdb read it as is), and keeps its
bookkeeping beside it in ``<out_dir>.vq/`` (:func:`state_dir`):

* one parquet file per input file, at the input's path relative to its root (so hive partitions
  keep their layout), written atomically (temporary name in the same folder, fsync, rename);
* a receipt per output in ``<out_dir>.vq/receipts/`` once its output is in place: input, input
  fingerprint (sha256 of its content), codebook fingerprint, settings, row count, sha256 of the
  output, distance sum and code counts;
* ``<out_dir>.vq/manifest.json`` last, gathering every receipt of the run;
* ``<out_dir>.vq/lock``, held while a run writes.

A rerun skips every input whose receipt matches its content, the codebook and the settings and
whose output still has the recorded checksum, so a crashed run resumes where it stopped, a finished
run is a no-op, and a file that was only touched or copied is not encoded again. Encoding is
deterministic, so a re-encoded output is byte-identical.
A folder that holds another codebook's (or other settings') codes is refused unless ``overwrite``.
One exclusive lock per ``out_dir`` keeps two runs from writing into it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import tables
from .assign import DEFAULT_MEMORY_BUDGET, encode as encode_tensor
from .codebook import Codebook
from .fileio import atomic_write_bytes, canonical_json
from .errors import DimensionMismatchError, EncodeLockedError, InvalidInputError
from .settings import DEFAULT_BATCH_ROWS
from .tables import Source
from .validate import check_int

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vq-pipeline.encode-manifest"
#: Suffix of the bookkeeping folder beside an output folder: ``codes/`` keeps it in ``codes.vq/``.
STATE_SUFFIX = ".vq"
LOCK_NAME = "lock"

#: Called as progress(key, rows_done, rows_total) while a file is encoded.
RowProgress = Callable[[str, int, int], None]
#: Called once as on_plan(rows_to_encode_by_key, skipped_keys) before any file is encoded.
PlanCallback = Callable[[dict[str, int], list[str]], None]


@dataclass(frozen=True)
class EncodeSettings:
    """What an encode run writes; a folder's outputs all share one codebook and one of these."""

    column: str
    id_column: str | None = None
    top_k: int = 1
    with_distance: bool = False
    keep: tuple[str, ...] = ()
    #: The ``code`` column's integer type (a ``tables.CODE_DTYPES`` name); None: the smallest that fits.
    code_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "keep": list(self.keep)}
        if self.code_dtype is None:  # folders written before the option existed keep matching
            del d["code_dtype"]
        return d


@dataclass(frozen=True)
class EncodeOptions:
    """How an encode run computes (does not change the codes away from near-ties)."""

    engine: str = "auto"
    device: str | None = None
    batch_rows: int = DEFAULT_BATCH_ROWS
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    storage_options: dict[str, Any] | None = None


@dataclass
class EncodeResult:
    """Summary of an encode run."""

    out_dir: str
    manifest: str
    codebook_fingerprint: str
    encoded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows_encoded: int = 0
    rows_total: int = 0
    seconds: float = 0.0
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("records")
        return d


def output_path(out_dir: str | os.PathLike[str], source: Source) -> Path:
    """Where ``source``'s codes go: its key under ``out_dir``, as parquet."""
    return Path(out_dir) / Path(source.key).with_suffix(".parquet")


def state_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The bookkeeping folder of the output folder ``out_dir``: ``<out_dir>.vq`` beside it (receipts,
    manifest, lock), so that ``out_dir`` itself holds nothing but parquet files."""
    out = Path(out_dir)
    if not out.name or out.name == "..":
        out = Path(os.path.abspath(out))
    if not out.name:
        raise InvalidInputError(
            f"out_dir={str(out_dir)!r} is a filesystem root; expected a folder of its own for the codes. "
            f"Fix: pass a subfolder such as {str(out / 'codes')!r}."
        )
    return out.with_name(out.name + STATE_SUFFIX)


def manifest_path(out_dir: str | os.PathLike[str]) -> Path:
    """Where the manifest of the output folder ``out_dir`` is written (last, after every output)."""
    return state_dir(out_dir) / MANIFEST_NAME


def _receipt_path(out_dir: Path, key: str) -> Path:
    return state_dir(out_dir) / "receipts" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _migrate_state(out: Path) -> None:
    """Move the bookkeeping of a folder written by 0.1 (``_manifest.json`` and ``.vq/`` inside it)
    to :func:`state_dir`, so that its outputs are still recognized and the folder reads as a dataset."""
    old = out / ".vq"
    receipts = state_dir(out) / "receipts"
    if (old / "receipts").is_dir():
        receipts.mkdir(parents=True, exist_ok=True)
        for p in sorted((old / "receipts").glob("*.json")):
            if not (receipts / p.name).exists():
                os.replace(p, receipts / p.name)
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (old / "receipts").rmdir()
    (out / "_manifest.json").unlink(missing_ok=True)  # rewritten in the state folder at the end of the run
    with contextlib.suppress(OSError):
        (old / "lock").unlink(missing_ok=True)
        old.rmdir()


@contextlib.contextmanager
def folder_lock(lock_file: str | os.PathLike[str], *, folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock ``lock_file`` for ``folder``, or fail at once if another run holds it.

    The lock file notes its holder (pid and host), which the error message of a second run quotes.
    """
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise EncodeLockedError(
                f"folder={str(folder)!r} is locked by another run ({holder}); expected one run per "
                f"folder at a time. Fix: wait for it to finish, or write to another folder."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def encode_lock(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock on the output folder ``out_dir`` (``<out_dir>.vq/lock``).

    Folders that the lock itself created are removed again if the run fails before writing to them.
    """
    out = Path(out_dir)
    state = state_dir(out)
    created = [p for p in (out, state) if not p.exists()]
    lock = state / LOCK_NAME
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(lock, folder=out_dir):
        try:
            yield
        except BaseException:
            untouched = not any(p.is_file() for p in out.rglob("*")) and [
                p for p in state.rglob("*") if p.is_file()
            ] == [lock]
            if created and untouched:
                lock.unlink()
                for folder in created:
                    shutil.rmtree(folder, ignore_errors=True)
            raise


def plan_encode(
    inputs: Sequence[str | os.PathLike[str]],
    codebook: Codebook,
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[Source], list[Source], dict[str, dict[str, Any]]]:
    """Check inputs and the output folder; split sources into (todo, done). Call under :func:`encode_lock`.

    Validates every input's schema and dim, refuses duplicate ids across the run, refuses a folder
    holding another codebook's or other settings' codes unless ``overwrite`` (which then removes
    them), and deletes temporary files a crashed run left behind.

    Returns:
        (todo sources, done sources, records of the done ones keyed by source key).
    """
    out = Path(out_dir)
    check_int(
        "top_k", settings.top_k, minimum=1, maximum=codebook.n_codes, hint=f"the codebook has {codebook.n_codes} codes."
    )
    tables.code_dtype(codebook.n_codes, settings.code_dtype)  # refuses an unknown or too narrow type up front
    sources = tables.discover(inputs, storage_options=storage_options)
    for s in sources:
        info = tables.inspect_source(
            s, column=settings.column, id_column=settings.id_column, keep=settings.keep, storage_options=storage_options
        )
        if info.n_rows == 0:
            raise InvalidInputError(f"table {s.uri!r} has no rows; expected at least one. Fix: remove the empty file.")
        if info.dim is not None and info.dim != codebook.dim:
            raise DimensionMismatchError(
                f"column={settings.column!r} of {s.uri!r} has dim={info.dim} but the codebook has dim={codebook.dim}; "
                f"expected embeddings of width {codebook.dim}. Fix: encode with the codebook of this embedding model."
            )
    if settings.id_column:
        dups = tables.duplicate_ids(sources, settings.id_column, storage_options=storage_options)
        if dups:
            raise InvalidInputError(
                f"id_column={settings.id_column!r} has duplicate ids "
                f"across the inputs, e.g. {dups}; expected unique ids "
                f"in one encode run. Fix: deduplicate the tables, or encode them in separate runs."
            )
    _migrate_state(out)
    _check_folder(out, codebook, settings, overwrite=overwrite)
    remove_temporaries(out)
    todo, done, records = [], [], {}
    for s in sources:
        record = _completed_record(out, s, codebook, settings, storage_options)
        if record is None:
            todo.append(s)
        else:
            done.append(s)
            records[s.key] = record
    return todo, done, records


def remove_temporaries(out_dir: str | os.PathLike[str]) -> None:
    """Delete the temporary files that interrupted writes left in ``out_dir`` (a crashed run, a killed
    worker). Call under :func:`encode_lock`, when no write into the folder is in flight."""
    for folder in (Path(out_dir), state_dir(out_dir)):
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _folder_records(out: Path) -> list[dict[str, Any]]:
    """Every receipt in ``out`` plus the manifest's header, to learn what the folder holds."""
    found = []
    manifest = manifest_path(out)
    if manifest.is_file():
        found.append(_read_json(manifest))
    receipts = state_dir(out) / "receipts"
    if receipts.is_dir():
        found.extend(_read_json(p) for p in sorted(receipts.glob("*.json")))
    return found


def _check_folder(out: Path, codebook: Codebook, settings: EncodeSettings, *, overwrite: bool) -> None:
    foreign = [
        r
        for r in _folder_records(out)
        if r.get("codebook_fingerprint") != codebook.fingerprint or r.get("settings") != settings.to_dict()
    ]
    if not foreign:
        return
    if not overwrite:
        other = foreign[0]
        what = (
            f"codebook {str(other.get('codebook_fingerprint'))[:12]}…"
            if other.get("codebook_fingerprint") != codebook.fingerprint
            else f"settings {json.dumps(other.get('settings'), sort_keys=True)}"
        )
        raise InvalidInputError(
            f"out_dir={str(out)!r} holds codes written with {what}; this run uses codebook "
            f"{codebook.fingerprint[:12]}… with settings "
            f"{json.dumps(settings.to_dict(), sort_keys=True)}. Expected a folder holding only this "
            f"codebook's codes. Fix: pass --overwrite (overwrite=True) to replace them, or write to another folder."
        )
    for record in _folder_records(out):
        for entry in (record.get("outputs") or {record.get("key"): record}).values():
            if entry and entry.get("output"):
                (out / entry["output"]).unlink(missing_ok=True)
    manifest_path(out).unlink(missing_ok=True)
    for p in (state_dir(out) / "receipts").glob("*.json"):
        p.unlink()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _completed_record(
    out: Path, source: Source, codebook: Codebook, settings: EncodeSettings, storage_options: Any
) -> dict[str, Any] | None:
    receipt = _read_json(_receipt_path(out, source.key))
    if (
        not receipt
        or receipt.get("codebook_fingerprint") != codebook.fingerprint
        or receipt.get("settings") != settings.to_dict()
    ):
        return None
    stat = tables.file_stat(source)
    # Unchanged size, mtime and inode: the content hashed for the receipt is still there. Otherwise
    # hash the content again; a file that was only touched or copied keeps its receipt.
    if stat is None or stat != receipt.get("input_stat"):
        if receipt.get("input_fingerprint") != tables.fingerprint(source, storage_options=storage_options):
            return None
    output = out / receipt["output"]
    if not output.is_file() or tables.file_sha256(output) != receipt.get("sha256"):
        return None
    if stat != receipt.get("input_stat"):
        atomic_write_bytes(_receipt_path(out, source.key), canonical_json({**receipt, "input_stat": stat}))
        receipt = {**receipt, "input_stat": stat}
    return receipt


def encode_source(
    source: Source,
    codebook: Codebook,
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    options: EncodeOptions = EncodeOptions(),
    *,
    progress: RowProgress | None = None,
) -> dict[str, Any]:
    """Encode one input file into its output file, then write its receipt; return the receipt.

    Safe to run concurrently for different sources of one folder (each writes its own files).
    """
    out = Path(out_dir)
    stat = tables.file_stat(source)
    fingerprint = tables.fingerprint(source, storage_options=options.storage_options)
    info = tables.inspect_source(
        source,
        column=settings.column,
        id_column=settings.id_column,
        keep=settings.keep,
        storage_options=options.storage_options,
    )
    frames = []
    code_counts = torch.zeros(codebook.n_codes, dtype=torch.int64)  # (n_codes,)
    distance_sum = 0.0
    done = 0
    for batch in tables.iter_batches(
        source,
        column=settings.column,
        batch_rows=options.batch_rows,
        id_column=settings.id_column,
        keep=settings.keep,
        storage_options=options.storage_options,
    ):
        try:
            codes, distances = encode_tensor(
                codebook.centroids,
                codebook.metric,
                batch.x,
                top_k=settings.top_k,
                return_distances=True,
                engine=options.engine,
                device=options.device,
                memory_budget=options.memory_budget,
                name=settings.column,
                row_offset=batch.offset,
            )
        except InvalidInputError as exc:
            raise type(exc)(f"{source.uri}: {exc}") from None
        nearest = codes if codes.ndim == 1 else codes[:, 0]  # (n,)
        code_counts += torch.bincount(nearest, minlength=codebook.n_codes)
        distance_sum += float((distances if distances.ndim == 1 else distances[:, 0]).double().sum())
        ids = batch.ids if batch.ids is not None else tables.row_positions(batch)
        frames.append(
            tables.codes_frame(
                ids,
                codes,
                n_codes=codebook.n_codes,
                id_column=settings.id_column or "row",
                distances=distances if settings.with_distance else None,
                keep=batch.keep,
                pinned_dtype=settings.code_dtype,
            )
        )
        done += len(batch)
        if progress is not None:
            progress(source.key, done, info.n_rows)
    if done == 0:
        raise InvalidInputError(f"table {source.uri!r} has no rows; expected at least one. Fix: remove the empty file.")
    path = output_path(out, source)
    digest = tables.write_parquet_atomic(tables.concat_frames(frames), path)
    receipt = {
        "key": source.key,
        "input": source.uri,
        "input_fingerprint": fingerprint,
        "input_stat": stat,
        "output": path.relative_to(out).as_posix(),
        "rows": done,
        "sha256": digest,
        "codebook_fingerprint": codebook.fingerprint,
        "settings": settings.to_dict(),
        "distance_sum": distance_sum,
        "code_counts": code_counts.tolist(),
    }
    atomic_write_bytes(_receipt_path(out, source.key), canonical_json(receipt))
    return receipt


def write_manifest(
    out_dir: str | os.PathLike[str], codebook: Codebook, settings: EncodeSettings, records: dict[str, dict[str, Any]]
) -> Path:
    """Write the manifest (:func:`manifest_path`; atomically, after the outputs it lists): what the folder holds."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": "1.0",
        "codebook_fingerprint": codebook.fingerprint,
        "settings": settings.to_dict(),
        "rows": sum(r["rows"] for r in records.values()),
        # input_stat is a cache hint of this machine (mtime, inode), not part of what the folder holds.
        "outputs": {
            key: {k: v for k, v in records[key].items() if k not in ("codebook_fingerprint", "settings", "input_stat")}
            for key in sorted(records)
        },
    }
    return atomic_write_bytes(manifest_path(out_dir), canonical_json(manifest))


def encode_tables(
    inputs: Sequence[str | os.PathLike[str]],
    codebook: Codebook | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    column: str,
    id_column: str | None = None,
    top_k: int = 1,
    with_distance: bool = False,
    keep: Sequence[str] = (),
    code_dtype: str | None = None,
    overwrite: bool = False,
    engine: str = "auto",
    device: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    storage_options: dict[str, Any] | None = None,
    progress: RowProgress | None = None,
    on_plan: PlanCallback | None = None,
) -> EncodeResult:
    """Encode every input table into ``out_dir``, resumably and exactly once (see the module doc).

    Args:
        inputs: table files, globs or folders (local or object storage).
        codebook: a Codebook or the path of its file.
        column: the embedding column. id_column: the id column (default: row positions, written
            as ``row``). top_k: codes per row. with_distance: also write distances.
        keep: columns copied through to the outputs. overwrite: replace another codebook's codes.
        code_dtype: the ``code`` column's type, e.g. ``"uint32"`` or ``"int64"`` (default: the smallest
            unsigned type that holds ``n_codes``, which can change with a refit's ``n_codes``).
        progress: called as ``progress(key, rows_done, rows_in_file)`` after every batch.
        on_plan: called once, before encoding, as ``on_plan({key: rows} of the files to encode,
            [keys of the files skipped as already complete])``.
    """
    t0 = time.perf_counter()
    if not isinstance(codebook, Codebook):
        codebook = Codebook.load(codebook)
    settings = EncodeSettings(
        column=column,
        id_column=id_column,
        top_k=top_k,
        with_distance=with_distance,
        keep=tuple(keep),
        code_dtype=code_dtype,
    )
    options = EncodeOptions(
        engine=engine,
        device=device,
        batch_rows=check_int("batch_rows", batch_rows, minimum=1),
        memory_budget=memory_budget,
        storage_options=storage_options,
    )
    out = Path(out_dir)
    with encode_lock(out):
        todo, done, records = plan_encode(
            inputs, codebook, out, settings, overwrite=overwrite, storage_options=storage_options
        )
        result = EncodeResult(
            out_dir=str(out), manifest=str(manifest_path(out)), codebook_fingerprint=codebook.fingerprint
        )
        result.skipped = [s.key for s in done]
        if on_plan is not None:
            on_plan(
                {s.key: tables.inspect_source(s, column=column, storage_options=storage_options).n_rows for s in todo},
                list(result.skipped),
            )
        for s in todo:
            records[s.key] = encode_source(s, codebook, out, settings, options, progress=progress)
            result.encoded.append(s.key)
            result.rows_encoded += records[s.key]["rows"]
        write_manifest(out, codebook, settings, records)
    result.records = records
    result.rows_total = sum(r["rows"] for r in records.values())
    result.seconds = time.perf_counter() - t0
    return result
