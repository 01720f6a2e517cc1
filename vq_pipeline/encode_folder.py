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
* ``<out_dir>.vq/manifest.json`` last: every output file in the folder with its input and rows, and
  whether its input was part of the run (:func:`write_manifest`);
* ``<out_dir>.vq/lock``, held while a run writes.

A rerun skips every input whose receipt matches its content, the codebook and the settings and
whose output still has the recorded checksum, so a crashed run resumes where it stopped, a finished
run is a no-op, and a file that was only touched or copied is not encoded again. Encoding is
deterministic, so a re-encoded output is byte-identical.
A folder that holds another codebook's (or other settings') codes is refused unless ``overwrite``.
One exclusive lock per ``out_dir`` keeps two runs from writing into it at once.

Nothing found in the folder is trusted. Every output path read from a receipt or a manifest must
resolve (symlinks followed) inside ``out_dir``, or the run stops with a :class:`StateError` before it
deletes or writes anything; the lock is opened without following symlinks and only a lock file of
this package is ever truncated; temporary files have the package's own name pattern
(:data:`vq_pipeline.fileio.TEMPORARY_PATTERN`) and only those, directly in the folders a run writes
to, are cleaned up; ``overwrite`` and ``prune`` delete only outputs that a receipt records.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import tables
from .assign import DEFAULT_MEMORY_BUDGET, encode as encode_tensor
from .codebook import Codebook
from . import fileio
from .fileio import atomic_write_bytes, canonical_json
from .errors import DimensionMismatchError, EncodeLockedError, InvalidInputError, StateError
from .paths import check_output_folder, check_output_folder_against_tables
from .settings import DEFAULT_BATCH_ROWS, EncodeOptions, EncodeSettings
from .tables import Source
from .validate import check_int

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vq-pipeline.encode-manifest"
#: Suffix of the bookkeeping folder beside an output folder: ``codes/`` keeps it in ``codes.vq/``.
STATE_SUFFIX = ".vq"
LOCK_NAME = "lock"
#: What a lock file holds while a run holds it (empty between runs): ``pid 123 on host``.
_LOCK_NOTE = re.compile(r"pid \d+ on [^\n]*")
#: A lock file or JSON file larger than this was not written by this package.
_MAX_STATE_FILE = 64 * 2**20

log = logging.getLogger(__name__)

#: Called as progress(key, rows_done, rows_total) while a file is encoded.
RowProgress = Callable[[str, int, int], None]
#: Called once as on_plan(rows_to_encode_by_key, skipped_keys) before any file is encoded.
PlanCallback = Callable[[dict[str, int], list[str]], None]


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
    #: Keys of the outputs in the folder whose input was not part of this run (kept; see ``prune``).
    stale: list[str] = field(default_factory=list)
    #: Keys of the stale outputs this run removed (``prune=True``).
    pruned: list[str] = field(default_factory=list)
    #: Parquet files in the folder (relative paths) that no receipt records: left alone.
    unrecorded: list[str] = field(default_factory=list)

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


def _is_regular(path: Path) -> bool:
    """A regular file, not a symlink to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_real_dir(path: Path) -> bool:
    """A folder, not a symlink to one."""
    return path.is_dir() and not path.is_symlink()


def _refuse_symlinked_folder(folder: Path) -> None:
    if folder.is_symlink():
        raise StateError(
            f"folder={str(folder)!r} is a symlink (to {os.readlink(folder)!r}); expected the folder vq-pipeline "
            f"creates for its lock and bookkeeping (never followed). Fix: remove the symlink; the next run "
            f"creates the folder."
        )


def _read_state_json(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in the bookkeeping file ``path`` (``what``: receipt, manifest), or None when there
    is none. A symlink, anything but a regular file, or a file that is not a JSON object is refused:
    this package writes each of them atomically, so it did not write such a file."""
    fix = f"Fix: delete {str(path)!r} (vq-pipeline did not write it); a rerun re-encodes what it described."
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise StateError(
            f"{what}={str(path)!r} is a symlink (to {os.readlink(path)!r}); expected a regular file written by "
            f"vq-pipeline (a symlink is never followed). {fix}"
        ) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_STATE_FILE:
            raise StateError(
                f"{what}={str(path)!r} is not a regular file of at most {_MAX_STATE_FILE} bytes; expected a JSON "
                f"file written by vq-pipeline. {fix}"
            )
        data = f.read()
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise StateError(f"{what}={str(path)!r} is not valid JSON ({e}); expected a JSON object. {fix}") from None
    if not isinstance(value, dict):
        raise StateError(f"{what}={str(path)!r} holds a JSON {type(value).__name__}; expected a JSON object. {fix}")
    return value


def _checked_output(out: Path, rel: object, source: Path, what: str) -> Path:
    """The output path ``rel`` that the ``what`` file ``source`` records, refused unless it is a relative
    ``.parquet`` path that resolves (symlinks followed) inside ``out``."""
    path = out / rel if isinstance(rel, str) and rel else None
    if (
        path is None
        or not rel.endswith(".parquet")
        or Path(rel).is_absolute()
        or ".." in Path(rel).parts
        or not fileio.resolves_inside(path, out)
        or os.path.realpath(path) == os.path.realpath(out)
    ):
        raise StateError(
            f"output={rel!r} in {what} {str(source)!r} is not a file inside out_dir={str(out)!r}; expected the "
            f"relative path of a .parquet file that resolves (symlinks followed) inside the folder. Fix: delete "
            f"{str(source)!r}, which vq-pipeline did not write for this folder, or a symlink in the folder that "
            f"leads out of it."
        )
    return path


#: The fields every receipt holds, with their types (a receipt missing one was not written by this package).
_RECEIPT_FIELDS: dict[str, type] = {"key": str, "output": str, "rows": int, "sha256": str}


def _read_receipt(path: Path, out: Path) -> dict[str, Any] | None:
    """The receipt in ``path``, checked (fields, types, an output inside ``out``), or None when there is none."""
    receipt = _read_state_json(path, "receipt")
    if receipt is None:
        return None
    for name, kind in _RECEIPT_FIELDS.items():
        value = receipt.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise StateError(
                f"{name}={value!r} in receipt {str(path)!r}; expected a receipt written by vq-pipeline, whose "
                f"{name} is a {kind.__name__}. Fix: delete {str(path)!r}; a rerun re-encodes the input it described."
            )
    _checked_output(out, receipt["output"], path, "receipt")
    return receipt


def _receipt_files(out: Path) -> list[Path]:
    receipts = state_dir(out) / "receipts"
    return sorted(receipts.glob("*.json")) if receipts.is_dir() else []


def _read_manifest(path: Path, out: Path) -> dict[str, Any] | None:
    """The manifest in ``path`` with every output it lists checked to lie inside ``out``, or None."""
    manifest = _read_state_json(path, "manifest")
    if manifest is None:
        return None
    outputs = manifest.get("outputs", {})
    if not isinstance(outputs, dict) or not all(isinstance(e, dict) for e in outputs.values()):
        raise StateError(
            f"outputs in manifest {str(path)!r} is not a JSON object of entries; expected a manifest written by "
            f"vq-pipeline. Fix: delete {str(path)!r}; the next run writes it anew."
        )
    for entry in outputs.values():
        _checked_output(out, entry.get("output"), path, "manifest")
    return manifest


def _migrate_state(out: Path) -> None:
    """Move the bookkeeping of a folder written by 0.1 (``_manifest.json`` and ``.vq/`` inside it)
    to :func:`state_dir`, so that its outputs are still recognized and the folder reads as a dataset.
    Only regular files in real folders are moved; a ``_manifest.json`` that is not this package's is
    left alone."""
    old = out / ".vq"
    state = state_dir(out)
    receipts = state / "receipts"
    if _is_real_dir(old / "receipts") and _is_real_dir(old):
        _refuse_symlinked_folder(state)
        _refuse_symlinked_folder(receipts)
        receipts.mkdir(parents=True, exist_ok=True)
        for p in sorted((old / "receipts").glob("*.json")):
            if not _is_regular(p):
                continue  # not a receipt: not ours to move
            if not os.path.lexists(receipts / p.name):
                os.replace(p, receipts / p.name)
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (old / "receipts").rmdir()
    old_manifest = out / "_manifest.json"
    if _is_regular(old_manifest):
        try:
            manifest = _read_state_json(old_manifest, "manifest")
        except StateError:
            manifest = None  # not JSON: someone else's file
        if manifest is not None and manifest.get("format") == MANIFEST_FORMAT:
            _read_manifest(old_manifest, out)  # refuses outputs outside the folder
            if os.path.lexists(manifest_path(out)):
                old_manifest.unlink()
            else:  # its header still tells which codebook wrote the folder; rewritten at the end of the run
                state.mkdir(parents=True, exist_ok=True)
                os.replace(old_manifest, manifest_path(out))
    if _is_real_dir(old):
        with contextlib.suppress(OSError):
            if _is_regular(old / "lock"):
                (old / "lock").unlink()
            old.rmdir()


@contextlib.contextmanager
def folder_lock(lock_file: str | os.PathLike[str], *, folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock ``lock_file`` for ``folder``, or fail at once if another run holds it.

    The lock file notes its holder (pid and host), which the error message of a second run quotes. It
    is opened without following symlinks, and only a lock file (empty, or holding such a note) is ever
    written: anything else under its name is refused with a :class:`StateError`.
    """
    path = Path(lock_file)
    _refuse_symlinked_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(fileio.open_lock(path), "r+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read(4096).decode(errors="replace").strip() or "unknown"
            raise EncodeLockedError(
                f"folder={str(folder)!r} is locked by another run ({holder}); expected one run per "
                f"folder at a time. Fix: wait for it to finish, or write to another folder."
            ) from None
        found = f.read(4097).decode(errors="replace").strip()
        if found and not _LOCK_NOTE.fullmatch(found):
            raise StateError(
                f"lock={str(path)!r} holds {found[:80]!r}; expected the lock file of vq-pipeline (empty, or "
                f"'pid N on HOST'). Fix: move it away (vq never writes into a file it did not create); the next "
                f"run creates the lock."
            )
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}".encode())
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def encode_lock(out_dir: str | os.PathLike[str], *, inputs: Sequence[str | os.PathLike[str]]) -> Iterator[None]:
    """Hold the exclusive lock on the output folder ``out_dir`` (``<out_dir>.vq/lock``) for a run that
    encodes ``inputs``.

    First, before anything is created, the folder and its bookkeeping folder are checked against the
    inputs (:func:`vq_pipeline.paths.check_output_folder`): neither may be, contain or lie inside an
    input. Folders that the lock itself created are removed again if the run fails before writing to them.
    """
    out = Path(out_dir)
    state = state_dir(out)
    check_output_folder("out_dir", out, inputs)
    check_output_folder("out_dir", state, inputs)
    _refuse_symlinked_folder(state)
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


def _check_outputs(out: Path, sources: Sequence[Source]) -> None:
    """Refuse, before any work, two inputs that would write one output (``a.parquet`` and ``a.arrow``
    both write ``a.parquet``), and an output that a symlinked folder inside ``out`` would put outside it."""
    writers: dict[Path, Source] = {}
    for s in sources:
        path = output_path(out, s)
        if path in writers:
            other = writers[path]
            raise InvalidInputError(
                f"inputs {other.uri!r} and {s.uri!r} would both write output "
                f"{path.relative_to(out).as_posix()!r} (an output is named after its input, with the extension "
                f".parquet); expected one output per input. Fix: rename or convert one of them, or encode them "
                f"into separate folders."
            )
        writers[path] = s
        if not fileio.resolves_inside(path, out):
            raise StateError(
                f"output={str(path)!r} resolves to {os.path.realpath(path)!r}, outside out_dir={str(out)!r} (a "
                f"symlink in the folder leads out of it); expected every output inside the folder. Fix: replace "
                f"the symlink by a real folder, or write to another folder."
            )


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

    Refuses two inputs that would write one output, validates every input's schema and dim, refuses
    duplicate ids across the run, refuses receipts and manifests that record outputs outside the
    folder, refuses a folder holding another codebook's or other settings' codes unless ``overwrite``
    (which then removes the outputs their receipts record), and deletes the temporary files a crashed
    run left behind (:func:`remove_temporaries`).

    Returns:
        (todo sources, done sources, records of the done ones keyed by source key).
    """
    out = Path(out_dir)
    check_int(
        "top_k", settings.top_k, minimum=1, maximum=codebook.n_codes, hint=f"the codebook has {codebook.n_codes} codes."
    )
    tables.code_dtype(codebook.n_codes, settings.code_dtype)  # refuses an unknown or too narrow type up front
    sources = tables.discover(inputs, storage_options=storage_options)
    check_output_folder_against_tables("out_dir", out, inputs, [s.uri for s in sources])
    _check_outputs(out, sources)
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
    _refuse_symlinked_folder(state_dir(out) / "receipts")
    _migrate_state(out)
    _check_folder(out, codebook, settings, overwrite=overwrite)
    remove_temporaries(out, sources)
    todo, done, records = [], [], {}
    for s in sources:
        record = _completed_record(out, s, codebook, settings, storage_options)
        if record is None:
            todo.append(s)
        else:
            done.append(s)
            records[s.key] = record
    return todo, done, records


def remove_temporaries(out_dir: str | os.PathLike[str], sources: Sequence[Source] = ()) -> list[Path]:
    """Delete the temporary files that interrupted writes left behind (a crashed run, a killed worker),
    and only those: regular files named like this package's temporaries
    (:data:`vq_pipeline.fileio.TEMPORARY_PATTERN`), directly in the folders runs write to (``out_dir``,
    the folders of the outputs of ``sources`` and of the outputs the receipts record, the bookkeeping
    folder). Another program's ``*.tmp`` files, and anything below other folders, are left alone.
    Returns what was deleted. Call under :func:`encode_lock`, when no write into the folder is in flight.
    """
    out = Path(out_dir)
    state = state_dir(out)
    folders = {out, *(output_path(out, s).parent for s in sources)}
    for p in _receipt_files(out):
        receipt = _read_receipt(p, out)
        if receipt is not None:
            folders.add((out / receipt["output"]).parent)
    removed = []
    for folder in sorted(f for f in folders if fileio.resolves_inside(f, out)):
        removed += fileio.remove_temporaries(folder)
    for folder in (state, state / "receipts"):
        if _is_real_dir(folder):
            removed += fileio.remove_temporaries(folder)
    return removed


def _folder_records(out: Path) -> tuple[dict[str, Any] | None, list[tuple[Path, dict[str, Any]]]]:
    """The manifest and every receipt of ``out`` (with its file), all checked, to learn what the folder holds."""
    manifest = _read_manifest(manifest_path(out), out)
    receipts = [(p, r) for p in _receipt_files(out) if (r := _read_receipt(p, out)) is not None]
    return manifest, receipts


def _check_folder(out: Path, codebook: Codebook, settings: EncodeSettings, *, overwrite: bool) -> None:
    manifest, receipts = _folder_records(out)  # every record is checked before anything is deleted
    foreign = [
        r
        for r in ([manifest] if manifest is not None else []) + [r for _, r in receipts]
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
    # Only the outputs that receipts record are ours to delete (checked above to lie inside the folder).
    for path, receipt in receipts:
        _remove_output(out / receipt["output"])
        path.unlink(missing_ok=True)
    manifest_path(out).unlink(missing_ok=True)


def _remove_output(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            path.unlink()


def _completed_record(
    out: Path, source: Source, codebook: Codebook, settings: EncodeSettings, storage_options: Any
) -> dict[str, Any] | None:
    receipt = _read_receipt(_receipt_path(out, source.key), out)
    if (
        not receipt
        or receipt["key"] != source.key
        or receipt["output"] != output_path(out, source).relative_to(out).as_posix()
        or receipt.get("codebook_fingerprint") != codebook.fingerprint
        or receipt.get("settings") != settings.to_dict()
    ):
        return None
    input_stat = tables.file_stat(source)
    # Unchanged size, mtime, inode, device and ctime: the content hashed for the receipt is still there. Otherwise
    # hash the content again; a file that was only touched or copied keeps its receipt.
    if input_stat is None or input_stat != receipt.get("input_stat"):
        if receipt.get("input_fingerprint") != tables.fingerprint(source, storage_options=storage_options):
            return None
    output = out / receipt["output"]
    if not _is_regular(output) or tables.file_sha256(output) != receipt["sha256"]:
        return None
    if input_stat != receipt.get("input_stat"):
        atomic_write_bytes(_receipt_path(out, source.key), canonical_json({**receipt, "input_stat": input_stat}))
        receipt = {**receipt, "input_stat": input_stat}
    return receipt


def encode_source(
    source: Source,
    codebook: Codebook,
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    options: EncodeOptions | None = None,
    *,
    progress: RowProgress | None = None,
) -> dict[str, Any]:
    """Encode one input file into its output file, then write its receipt; return the receipt.

    Safe to run concurrently for different sources of one folder (each writes its own files).
    """
    options = EncodeOptions() if options is None else options
    out = Path(out_dir)
    input_stat = tables.file_stat(source)
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
        "input_stat": input_stat,
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


@dataclass
class FolderInventory:
    """What an output folder holds besides the outputs of the current run (:func:`folder_inventory`).

    Attributes:
        stale: receipts of the outputs whose input is not part of the run, keyed by input key (kept
            unless pruned: encoding day2 into a folder that holds day1 keeps day1).
        unrecorded: parquet files in the folder (relative paths) that no receipt records: another
            program's files, or outputs changed since they were written; never deleted.
    """

    stale: dict[str, dict[str, Any]] = field(default_factory=dict)
    unrecorded: list[str] = field(default_factory=list)
    receipt_files: dict[str, Path] = field(default_factory=dict, repr=False)


def _parquet_files(out: Path) -> list[str]:
    """Relative paths of the ``.parquet`` files (and links) under ``out``; symlinked folders are not entered."""
    found = []
    for root, _, files in os.walk(out):
        for name in files:
            if name.endswith(".parquet") and not fileio.is_temporary_name(name):
                found.append((Path(root) / name).relative_to(out).as_posix())
    return sorted(found)


def folder_inventory(out_dir: str | os.PathLike[str], records: dict[str, dict[str, Any]]) -> FolderInventory:
    """Sort what ``out_dir`` holds besides the run's outputs (``records``, keyed by input key) into
    stale outputs and unrecorded files. Call under :func:`encode_lock`, after the run's outputs are written.

    A receipt that no longer describes an output of its own (the file is gone, was changed, or now
    holds the codes of another input of the run) is deleted; the file, if any, is then unrecorded.
    """
    out = Path(out_dir)
    run_outputs = {r["output"] for r in records.values()}
    inventory = FolderInventory()
    for p in _receipt_files(out):
        receipt = _read_receipt(p, out)
        if receipt is None or receipt["key"] in records:
            continue
        output = out / receipt["output"]
        if (
            receipt["output"] in run_outputs
            or receipt["output"] in {r["output"] for r in inventory.stale.values()}
            or not _is_regular(output)
            or tables.file_sha256(output) != receipt["sha256"]
        ):
            p.unlink(missing_ok=True)
            continue
        inventory.stale[receipt["key"]] = receipt
        inventory.receipt_files[receipt["key"]] = p
    recorded = run_outputs | {r["output"] for r in inventory.stale.values()}
    inventory.unrecorded = [rel for rel in _parquet_files(out) if rel not in recorded]
    return inventory


def prune_stale(out_dir: str | os.PathLike[str], inventory: FolderInventory) -> list[str]:
    """Delete the stale outputs of ``inventory`` (each recorded by a receipt, checked to lie inside
    ``out_dir`` and to hold the bytes it recorded) and their receipts; return their keys. ``inventory``
    is left with no stale outputs. Call under :func:`encode_lock`."""
    out = Path(out_dir)
    pruned = sorted(inventory.stale)
    for key in pruned:
        _remove_output(_checked_output(out, inventory.stale[key]["output"], inventory.receipt_files[key], "receipt"))
        inventory.receipt_files[key].unlink(missing_ok=True)
    inventory.stale.clear()
    inventory.receipt_files.clear()
    return pruned


def _manifest_entry(record: dict[str, Any], in_this_run: bool) -> dict[str, Any]:
    # input_stat is a cache hint of this machine (mtime, inode), not part of what the folder holds.
    entry = {k: v for k, v in record.items() if k not in ("codebook_fingerprint", "settings", "input_stat")}
    return {**entry, "in_this_run": in_this_run}


def write_manifest(
    out_dir: str | os.PathLike[str],
    codebook: Codebook,
    settings: EncodeSettings,
    records: dict[str, dict[str, Any]],
    *,
    inventory: FolderInventory | None = None,
) -> Path:
    """Write the manifest (:func:`manifest_path`; atomically, after the outputs it lists): what the folder holds.

    It lists every output file in the folder, keyed by input key, each with its input, rows, checksum
    and ``in_this_run`` (false for a stale output, whose input was not part of this run, ``records``);
    ``rows`` counts them all, ``rows_in_this_run`` the run's, ``n_stale`` the stale outputs, and
    ``unrecorded`` names the parquet files no receipt records. ``inventory``: the run's
    :func:`folder_inventory`, taken here when not given. Call under :func:`encode_lock`.
    """
    out = Path(out_dir)
    if inventory is None:
        inventory = folder_inventory(out, records)
    if inventory.unrecorded:
        log.warning(
            "%d parquet files in %s were not written by vq-pipeline for this folder (or changed since) and are left "
            "alone: %s",
            len(inventory.unrecorded),
            out,
            ", ".join(inventory.unrecorded[:10]) + (" …" if len(inventory.unrecorded) > 10 else ""),
        )
    outputs = {key: _manifest_entry(r, True) for key, r in records.items()}
    outputs.update({key: _manifest_entry(r, False) for key, r in inventory.stale.items()})
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": "1.1",
        "codebook_fingerprint": codebook.fingerprint,
        "settings": settings.to_dict(),
        "rows": sum(e["rows"] for e in outputs.values()),
        "rows_in_this_run": sum(r["rows"] for r in records.values()),
        "n_outputs": len(outputs),
        "n_stale": len(inventory.stale),
        "outputs": dict(sorted(outputs.items())),
        "unrecorded": list(inventory.unrecorded),
    }
    return atomic_write_bytes(manifest_path(out), canonical_json(manifest))


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
    prune: bool = False,
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
        keep: columns copied through to the outputs. overwrite: replace another codebook's codes
            (deletes only the outputs its receipts record).
        prune: once every input is encoded, delete the stale outputs (see below) and their receipts;
            ``result.pruned`` names them.
        code_dtype: the ``code`` column's type, e.g. ``"uint32"`` or ``"int64"`` (default: the smallest
            unsigned type that holds ``n_codes``, which can change with a refit's ``n_codes``).
        progress: called as ``progress(key, rows_done, rows_in_file)`` after every batch.
        on_plan: called once, before encoding, as ``on_plan({key: rows} of the files to encode,
            [keys of the files skipped as already complete])``.

    What the folder keeps: the outputs of this run's inputs, and the outputs of earlier runs whose
    input is not part of this run (a renamed or removed input, or simply another day's files: encoding
    day2 into a folder holding day1 keeps day1). Those are *stale*: they are kept (never destroyed
    unasked), listed in the manifest with ``"in_this_run": false`` and counted in ``n_stale``, and
    named in ``result.stale``; ``prune=True`` deletes them. The manifest lists every output file in
    the folder. Parquet files that no receipt records (another program's files) are never deleted:
    they are named in ``result.unrecorded``, in the manifest's ``unrecorded`` and in a logged warning.

    Raises:
        InvalidInputError: bad inputs or options, two inputs that would write one output, a folder
            holding another codebook's codes without ``overwrite``.
        StateError: the folder's bookkeeping records an output outside the folder, or its lock,
            receipts or manifest are not files this package wrote (a symlink, another file).
        EncodeLockedError: another run holds the folder's lock.
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
    with encode_lock(out, inputs=inputs):
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
        inventory = folder_inventory(out, records)
        if prune:
            result.pruned = prune_stale(out, inventory)
        write_manifest(out, codebook, settings, records, inventory=inventory)
    result.stale = sorted(inventory.stale)
    result.unrecorded = list(inventory.unrecorded)
    result.records = records
    result.rows_total = sum(r["rows"] for r in records.values())
    result.seconds = time.perf_counter() - t0
    return result
