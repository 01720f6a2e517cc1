"""Encode tables into a folder of code tables, resumably and exactly once: plan, lock, per-file encode.

The folder's layout and bookkeeping (outputs, receipts, manifest, lock; how each is read without
trusting it) are :mod:`vq_pipeline.jobs.encode_state`'s; this module runs an encode over them:
:func:`encode_lock`, then :func:`plan_encode`, :func:`encode_source` per input file, and the manifest
last (:func:`encode_tables` does it all in one process; the encode flow spreads the files over workers).

A rerun skips every input whose receipt matches its content, the codebook and the settings and
whose output still has the recorded checksum, so a crashed run resumes where it stopped, a finished
run is a no-op, and a file that was only touched or copied is not encoded again. Encoding is
deterministic, so a re-encoded output is byte-identical.
A folder that holds another codebook's (or other settings') codes is refused unless ``overwrite``.
One exclusive lock per ``out_dir`` keeps two runs from writing into it at once.

A multi-level codebook (codec ``residual`` or ``product``) writes a ``codes`` column (``Array(integer,
levels)``) instead of ``code``; its receipts record ``codec``, ``levels`` and code counts per level.
With ``unique``, a finishing step (:func:`assign_suffixes`) then gives every row of the folder a
``suffix`` that makes its ``(codes, suffix)`` unique in the folder; with ``id_registry`` too, the
suffixes are issued through the folder's id registry instead (:func:`issue_suffixes`): append-only, an
issued id never changes. A scalar or binary codebook writes
its codes packed (:func:`vq_pipeline.io.table_writer.packed_codes_frame`: ``Array(UInt8, dim)`` for 8-bit
scalar codes, ``Array(UInt8, ceil(dim / 2))`` for 4-bit ones, a fixed-size binary column of ``ceil(dim /
8)`` bytes for binary codes); its receipts also record ``bits`` (per dimension), code counts per
dimension and, for scalar codes, ``clipped``: the values outside the calibrated range.

Nothing found in the folder is trusted (:mod:`vq_pipeline.jobs.encode_state`); the lock is opened without
following symlinks and only a lock file of this package is ever written
(:func:`vq_pipeline.io.fileio.hold_lock`); temporary files have the package's own name pattern
(:data:`vq_pipeline.io.fileio.TEMPORARY_PATTERN`) and only those, directly in the folders a run writes
to, are cleaned up; ``overwrite`` and ``prune`` delete only outputs that a receipt records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.assign import DEFAULT_MEMORY_BUDGET
from vq_pipeline.compute.assign import encode as encode_tensor
from vq_pipeline.compute.levels import encode_multilevel
from vq_pipeline.errors import (
    DimensionMismatchError,
    EncodeFailedError,
    EncodeLockedError,
    InvalidInputError,
    StateError,
    VQError,
)
from vq_pipeline.io import fileio, tables
from vq_pipeline.io.discovery import Source
from vq_pipeline.io.table_writer import BITS_KEY, CODEC_KEY, packed_codes_frame
from vq_pipeline.io.paths import (
    check_output_folder,
    check_output_folder_against_tables,
    folder_lock,
    refuse_symlinked_folder,
    resolved,
)
from vq_pipeline.jobs.encode_state import (
    LOCK_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    STATE_SUFFIX,
    FolderInventory,
    check_replaceable,
    folder_inventory,
    folder_records,
    intact_receipt,
    is_real_dir,
    manifest_path,
    migrate_state,
    output_path,
    prune_stale,
    read_receipt,
    receipt_files,
    receipt_path,
    registry_dir,
    remove_recorded,
    state_dir,
    summary_rows,
    typed_state_dir,
    write_manifest,
    write_receipt,
)
from vq_pipeline.jobs.mappers import Mapper, serial
from vq_pipeline.jobs.registry import Registry
from vq_pipeline.jobs.semantic_ids import folder_suffixes, other_codebook_error, registry_suffixes
from vq_pipeline.settings import DEFAULT_BATCH_ROWS, PER_DIMENSION_CODECS, EncodeOptions, EncodeSettings
from vq_pipeline.validate import check_beam, check_int

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
    #: The codebook's file, when the run was given a path ("" for a Codebook in memory).
    codebook: str = ""
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
    #: The codebook's codec and levels (``flat`` and 1: one ``code`` per row).
    codec: str = "flat"
    levels: int = 1
    #: ``unique`` runs: the suffix step's statistics (:func:`assign_suffixes`), else None.
    semantic_ids: dict[str, Any] | None = None

    @property
    def new_receipts(self) -> dict[str, dict[str, Any]]:
        """The receipts of the files this run encoded (rows, distance sum and code counts: for drift)."""
        return {k: self.records[k] for k in self.encoded}

    def files(self) -> list[dict[str, Any]]:
        """One row per input file, sorted by key: ``key``, ``rows``, ``status`` (encoded or skipped) and
        ``mean_distance``."""
        return summary_rows(self.records, self.new_receipts)

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain data (JSON, Prefect): every field but ``records``, with ``files`` and
        ``new_receipts``; a flat run leaves out ``codec``, ``levels`` and ``semantic_ids``."""
        d = asdict(self)
        d.pop("records")
        if self.codec == "flat":  # a flat run's summary keeps its keys
            for key in ("codec", "levels", "semantic_ids"):
                d.pop(key)
        return {**d, "files": self.files(), "new_receipts": self.new_receipts}


@contextlib.contextmanager
def encode_lock(out_dir: str | os.PathLike[str], *, inputs: Sequence[str | os.PathLike[str]]) -> Iterator[None]:
    """Hold the exclusive lock on the output folder ``out_dir`` (``<out_dir>.vq/lock``) for a run that
    encodes ``inputs``.

    First, before anything is created, the folder and its bookkeeping folder are checked against the
    inputs (:func:`vq_pipeline.io.paths.check_output_folder`): neither may be, contain or lie inside an
    input. The lock, like the bookkeeping, belongs to the folder's resolved path, so two names of one
    folder (a symlink and its target) share it. Folders that the lock itself created are removed again
    if the run fails before writing to them.
    """
    out = resolved(out_dir)
    state = state_dir(out)
    check_output_folder("out_dir", out, inputs)
    check_output_folder("out_dir", state, inputs)
    _refuse_typed_state(out_dir, state)
    refuse_symlinked_folder(state)
    created = [p for p in (out, state) if not p.exists()]
    lock = state / LOCK_NAME
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(lock, folder=out_dir):
        try:
            yield
        except BaseException:
            # A folder this run created and left holding nothing (the bookkeeping folder: nothing but its lock)
            # is removed, so a refused run leaves the place as it found it.
            if state in created and [p for p in state.rglob("*") if p.is_file()] == [lock]:
                lock.unlink()
                shutil.rmtree(state, ignore_errors=True)
            if out in created and not any(p.is_file() for p in out.rglob("*")):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _refuse_typed_state(out_dir: str | os.PathLike[str], state: Path) -> None:
    """Refuse a folder whose bookkeeping an earlier version kept beside another of its names (a symlink
    to it, :func:`vq_pipeline.jobs.encode_state.typed_state_dir`): its receipts would be missed, and its
    outputs taken for another program's."""
    typed = typed_state_dir(out_dir)
    if typed != state and is_real_dir(typed) and os.path.lexists(typed / "receipts"):
        raise StateError(
            f"out_dir={os.fspath(out_dir)!r} is {str(resolved(out_dir))!r} under another name, and its bookkeeping "
            f"from an earlier version is in {str(typed)!r}; expected it in {str(state)!r}, beside the folder's "
            f"real path, where every name of the folder finds it. Fix: "
            + (
                f"move {str(typed)!r} to {str(state)!r}, then rerun."
                if not os.path.lexists(state)
                else f"delete {str(typed)!r} (the folder's bookkeeping is already in {str(state)!r}), then rerun."
            )
        )


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


def check_codec_settings(codebook: Codebook, settings: EncodeSettings) -> None:
    """Refuse, before any work, settings the codebook's codec cannot honour: ``top_k > 1`` with a
    multi-level codebook, ``beam > 1`` with a codebook that is not residual (or wider than a residual
    codebook's beam search can keep, :func:`vq_pipeline.validate.max_beam`), ``unique`` with a flat one,
    and (with ``unique``) an id or kept column named ``suffix``."""
    if codebook.codec != "flat" and settings.top_k != 1:
        raise InvalidInputError(
            f"top_k={settings.top_k} with a {codebook.codec} codebook; expected top_k=1 (one tuple of codes per "
            f"row). Fix: pass top_k=1, or encode with a flat codebook for the k nearest codes."
        )
    if settings.beam > 1 and codebook.codec != "residual":
        raise InvalidInputError(
            f"beam={settings.beam} with a {codebook.codec} codebook; expected beam=1 (beam search is for residual "
            f"codebooks: a flat or product level is already searched exactly). Fix: pass beam=1."
        )
    if codebook.codec == "residual":
        check_beam("beam", settings.beam, n_codes=codebook.n_codes, levels=codebook.levels)
    if settings.unique and codebook.codec == "flat":
        raise InvalidInputError(
            "unique=True with a flat codebook; expected a multi-level (residual or product) codebook, whose "
            "tuples of codes are semantic ids. Fix: drop unique, or encode with a multi-level codebook."
        )
    if codebook.codec in PER_DIMENSION_CODECS:
        if settings.unique:
            raise InvalidInputError(
                f"unique=True with a {codebook.codec} codebook; expected a residual or product codebook, whose "
                f"tuples of codes are semantic ids ({codebook.codec} codes are one value per dimension: compression, "
                f"not ids). Fix: drop unique (--unique), or encode with a residual or product codebook."
            )
        if settings.code_dtype is not None:
            raise InvalidInputError(
                f"code_dtype={settings.code_dtype!r} with a {codebook.codec} codebook; its codes are written "
                f"packed as bytes (Array(UInt8, ...) or fixed-size binary), expected code_dtype=None. Fix: drop "
                f"code_dtype (--code-dtype)."
            )
    if settings.unique:
        clash = [name for name in (settings.id_column, *settings.keep) if name == tables.SUFFIX_COLUMN]
        if clash:
            raise InvalidInputError(
                f"unique=True writes a {tables.SUFFIX_COLUMN!r} column, but id_column={settings.id_column!r} "
                f"keep={list(settings.keep)!r} names one too; expected distinct column names. Fix: rename that "
                f"column in the input, or drop it from keep."
            )


def plan_encode(
    inputs: Sequence[str | os.PathLike[str]],
    codebook: Codebook,
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    *,
    overwrite: bool = False,
    prune: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[Source], list[Source], dict[str, dict[str, Any]]]:
    """Check inputs and the output folder; split sources into (todo, done). Call under :func:`encode_lock`.

    Every check that can fail runs before the first byte is written, so a refused run leaves the
    folder as it was: it refuses two inputs that would write one output, validates every input's
    schema and dim, refuses duplicate ids across the run, refuses receipts and manifests that record
    outputs outside the folder, refuses a folder holding another codebook's or other settings' codes
    unless ``overwrite``, refuses to replace a file that vq-pipeline did not write
    (:func:`vq_pipeline.jobs.encode_state.check_replaceable`), and, with ``unique``, ids that the outputs
    kept in the folder already hold (:func:`check_suffix_ids`; ``prune`` drops those outputs). Then it
    writes: ``overwrite`` removes the outputs the other receipts record, the temporary files a crashed run
    left behind are deleted (:func:`remove_temporaries`), and receipts learn their inputs' file stats.

    Returns:
        (todo sources, done sources, records of the done ones keyed by source key).
    """
    out = resolved(out_dir)
    check_codec_settings(codebook, settings)
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
    refuse_symlinked_folder(state_dir(out) / "receipts")
    migrate_state(out)
    # Read and check; nothing below writes until every check has passed.
    manifest, receipts = folder_records(out)  # every record is checked before anything is deleted
    replace = _check_folder(out, manifest, receipts, codebook, settings, overwrite=overwrite)
    todo, done, records, dirty = [], [], {}, []
    for s in sources:
        record, changed = (None, False) if replace else _completed_record(out, s, codebook, settings, storage_options)
        if record is None:
            todo.append(s)
        else:
            done.append(s)
            records[s.key] = record
            if changed:
                dirty.append(record)
    check_replaceable(out, [output_path(out, s).relative_to(out).as_posix() for s in todo], receipts)
    if settings.unique and not settings.id_registry and os.path.lexists(registry_dir(out)):
        raise InvalidInputError(
            f"out_dir={str(out)!r} has an id registry ({str(registry_dir(out))!r}) that issued its semantic ids, "
            f"but id_registry=False: the suffixes would be ranked over the folder again, and issued ids could "
            f"change; expected id_registry=True. Fix: pass --id-registry (id_registry=True), or move the registry "
            f"folder away to rank the folder's rows again (issued ids may then change). Nothing was written."
        )
    if settings.unique and settings.id_column and not replace and not prune:
        planned = {s.key: {"output": output_path(out, s).relative_to(out).as_posix()} for s in sources}
        stale = folder_inventory(out, planned, dry=True).stale
        check_suffix_ids(out, sources, stale, settings.id_column, storage_options=storage_options)
    # Writes.
    if replace:  # only the outputs that receipts record are ours to delete (checked above to lie inside the folder)
        for path, receipt in receipts:
            remove_recorded(out, path, receipt)
        manifest_path(out).unlink(missing_ok=True)
    remove_temporaries(out, sources)
    for record in dirty:
        write_receipt(out, record)
    return todo, done, records


def check_suffix_ids(
    out: Path,
    sources: Sequence[Source],
    stale: dict[str, dict[str, Any]],
    id_column: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Refuse, before a ``unique`` run writes anything, inputs whose ids the folder's kept (stale) outputs
    already hold, or hold as another type: the suffix step ranks the rows of the whole folder by id, so
    ids must be unique over it (:func:`assign_suffixes`)."""
    fix = (
        "Fix: pass --prune (prune=True) to drop the outputs of inputs not in this run, leave the clashing rows "
        "out of the input, or encode into another folder. Nothing was written."
    )
    kept_outputs = sorted(stale.items())
    found = tables.shared_ids(
        [out / r["output"] for _, r in kept_outputs], sources, id_column, storage_options=storage_options
    )
    for key, receipt in kept_outputs:
        kept = out / receipt["output"]
        try:
            kept_type, wanted_type, clash = next(found)
        except InvalidInputError as exc:
            raise StateError(
                f"{exc} (output kept from an earlier run of input {key!r}; unique=True ranks its ids "
                f"with this run's). {fix}"
            ) from None
        if kept_type != wanted_type:
            raise InvalidInputError(
                f"id_column={id_column!r} is {wanted_type} in the inputs but {kept_type} in output {str(kept)!r}, "
                f"kept from an earlier run of input {key!r}; expected one id type over the folder, whose ids "
                f"unique=True ranks together. {fix}"
            )
        if clash:
            raise InvalidInputError(
                f"id_column={id_column!r} values {clash} of this run's inputs are already in output {str(kept)!r}, "
                f"kept from an earlier run of input {key!r}; expected ids unique over the folder, which unique=True "
                f"ranks together to give suffixes. {fix}"
            )


def remove_temporaries(out_dir: str | os.PathLike[str], sources: Sequence[Source] = ()) -> list[Path]:
    """Delete the temporary files that interrupted writes left behind (a crashed run, a killed worker),
    and only those: regular files named like this package's temporaries
    (:data:`vq_pipeline.io.fileio.TEMPORARY_PATTERN`), directly in the folders runs write to (``out_dir``,
    the folders of the outputs of ``sources`` and of the outputs the receipts record, the bookkeeping
    folder). Another program's ``*.tmp`` files, and anything below other folders, are left alone.
    Returns what was deleted. Call under :func:`encode_lock`, when no write into the folder is in flight.
    """
    out = resolved(out_dir)
    state = state_dir(out)
    folders = {out, *(output_path(out, s).parent for s in sources)}
    for p in receipt_files(out):
        receipt = read_receipt(p, out)
        if receipt is not None:
            folders.add((out / receipt["output"]).parent)
    removed = []
    for folder in sorted(f for f in folders if fileio.resolves_inside(f, out)):
        removed += fileio.remove_temporaries(folder)
    for folder in (state, state / "receipts"):
        if is_real_dir(folder):
            removed += fileio.remove_temporaries(folder)
    return removed


def _check_folder(
    out: Path,
    manifest: dict[str, Any] | None,
    receipts: list[tuple[Path, dict[str, Any]]],
    codebook: Codebook,
    settings: EncodeSettings,
    *,
    overwrite: bool,
) -> bool:
    """Whether the folder holds another codebook's (or other settings') codes that ``overwrite`` is to
    replace; refused without ``overwrite``. Reads only."""
    foreign = [
        r
        for r in ([manifest] if manifest is not None else []) + [r for _, r in receipts]
        if r.get("codebook_fingerprint") != codebook.fingerprint or r.get("settings") != settings.to_dict()
    ]
    if not foreign:
        return False
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
    return True


def _completed_record(
    out: Path, source: Source, codebook: Codebook, settings: EncodeSettings, storage_options: Any
) -> tuple[dict[str, Any] | None, bool]:
    """The receipt of ``source``'s output when it is done (same input, codebook and settings, output
    intact), else None; and whether the receipt is to be written again (it learns the input's file stat,
    or records the bytes of a finished suffix rewrite). Reads only."""
    receipt = read_receipt(receipt_path(out, source.key), out)
    if (
        not receipt
        or receipt["key"] != source.key
        or receipt["output"] != output_path(out, source).relative_to(out).as_posix()
        or receipt.get("codebook_fingerprint") != codebook.fingerprint
        or receipt.get("settings") != settings.to_dict()
    ):
        return None, False
    input_stat = tables.file_stat(source)
    # Unchanged size, mtime, inode, device and ctime: the content hashed for the receipt is still there. Otherwise
    # hash the content again; a file that was only touched or copied keeps its receipt.
    if input_stat is None or input_stat != receipt.get("input_stat"):
        if receipt.get("input_fingerprint") != tables.fingerprint(source, storage_options=storage_options):
            return None, False
    found = intact_receipt(out, receipt, out / receipt["output"], rewrite=False)
    if found is None:
        return None, False
    changed = found is not receipt or input_stat != receipt.get("input_stat")
    return ({**found, "input_stat": input_stat} if changed else found), changed


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
    out = resolved(out_dir)
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
    multi = codebook.codec != "flat"
    packed = codebook.codec in PER_DIMENSION_CODECS
    code_counts = torch.zeros(
        (codebook.levels, codebook.n_codes) if multi else codebook.n_codes, dtype=torch.int64
    )  # (levels, n_codes) or (n_codes,)
    distance_sum = 0.0
    clipped = 0
    done = 0
    for batch in tables.iter_batches(
        source,
        column=settings.column,
        batch_rows=options.batch_rows,
        id_column=settings.id_column,
        keep=settings.keep,
        storage_options=options.storage_options,
    ):
        ids = batch.ids if batch.ids is not None else tables.row_positions(batch)
        codes, distances = _encode_batch(source, batch, codebook, settings, options)
        shared = dict(
            n_codes=codebook.n_codes,
            id_column=settings.id_column or "row",
            distances=distances if settings.with_distance else None,
            keep=batch.keep,
            pinned_dtype=settings.code_dtype,
        )
        if multi:  # (n, levels) codes, (n,) distances to the reconstruction
            code_counts += level_counts(codes, codebook.n_codes)
            nearest_distances = distances
            if packed:  # one code per dimension, packed into bytes: no integer type to pick
                del shared["n_codes"], shared["pinned_dtype"]
                frames.append(packed_codes_frame(ids, _pack(codebook, codes), codec=codebook.codec, **shared))
                if codebook.codec == "scalar":
                    clipped += clipped_values(codebook, batch.x)
            else:
                frames.append(tables.level_codes_frame(ids, codes, suffix=settings.unique, **shared))
        else:  # (n,) or (n, top_k)
            code_counts += torch.bincount(codes if codes.ndim == 1 else codes[:, 0], minlength=codebook.n_codes)
            nearest_distances = distances if distances.ndim == 1 else distances[:, 0]
            frames.append(tables.codes_frame(ids, codes, **shared))
        distance_sum += float(nearest_distances.double().sum())
        done += len(batch)
        if progress is not None:
            progress(source.key, done, info.n_rows)
    if done == 0:
        raise InvalidInputError(f"table {source.uri!r} has no rows; expected at least one. Fix: remove the empty file.")
    path = output_path(out, source)
    receipt = {
        "key": source.key,
        "input": source.uri,
        "input_fingerprint": fingerprint,
        "input_stat": input_stat,
        "output": path.relative_to(out).as_posix(),
        "rows": done,
        "sha256": "",
        "codebook_fingerprint": codebook.fingerprint,
        "settings": settings.to_dict(),
        "distance_sum": distance_sum,
        "code_counts": code_counts.tolist(),
        **({"codec": codebook.codec, "levels": codebook.levels} if multi else {}),
        **({"bits": codec_bits(codebook)} if packed else {}),
        **({"clipped": clipped} if codebook.codec == "scalar" else {}),
    }
    # The receipt is written before its output (once the new bytes are on disk under a temporary name): a run
    # killed in between leaves a receipt that does not match the output, which is encoded again, and never an
    # output that no receipt records, which a rerun would take for another program's file.

    def record(digest: str) -> None:
        receipt["sha256"] = digest
        write_receipt(out, receipt)

    fixed_size = {"codes": -(-codebook.dim // 8)} if codebook.codec == "binary" else None
    metadata = {CODEC_KEY: codebook.codec, BITS_KEY: str(codec_bits(codebook))} if packed else None
    tables.write_parquet_atomic(
        tables.concat_frames(frames), path, before_replace=record, fixed_size=fixed_size, metadata=metadata
    )
    return receipt


def level_counts(codes: torch.Tensor, n_codes: int) -> torch.Tensor:
    """(levels, n_codes) int64 counts of each code at each level of (n, levels) int64 ``codes``."""
    levels = codes.shape[1]
    offsets = torch.arange(levels, dtype=torch.int64) * n_codes  # (levels,)
    return torch.bincount((codes + offsets).reshape(-1), minlength=levels * n_codes).reshape(levels, n_codes)


def codec_bits(codebook: Codebook) -> int:
    """Bits per dimension of a scalar (8 or 4: ``log2(n_codes)``) or binary (1) codebook's codes."""
    return int(codebook.n_codes).bit_length() - 1


def clipped_values(codebook: Codebook, x: torch.Tensor) -> int:
    """How many values of (n, dim) rows ``x`` lie outside a scalar codebook's calibrated range (its grid's
    first and last values per dimension; under cosine, of the L2-normalized rows, as encode sees them)."""
    grid = codebook.centroids  # (dim, n_codes, 1)
    lo, hi = grid[:, 0, 0], grid[:, -1, 0]  # (dim,), (dim,)
    x = x.to(torch.float32)
    if codebook.metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)  # (n, dim)
    return int(((x < lo) | (x > hi)).sum())


def _pack(codebook: Codebook, codes: torch.Tensor) -> Any:
    """The (n, width) uint8 file form of a scalar or binary codebook's (n, dim) uint8 ``codes``."""
    packed = codebook.pack(codes)
    return packed.numpy() if isinstance(packed, torch.Tensor) else packed


def _encode_batch(
    source: Source, batch: tables.Batch, codebook: Codebook, settings: EncodeSettings, options: EncodeOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's int64 codes and float32 distances (CPU): (n, levels) codes and (n,) distances to the
    reconstruction for a multi-level codebook, else (n,) or (n, top_k) of each. Errors name the file."""
    common: dict[str, Any] = dict(
        return_distances=True,
        engine=options.engine,
        device=options.device,
        memory_budget=options.memory_budget,
        name=settings.column,
        row_offset=batch.offset,
    )
    try:
        if codebook.codec != "flat":
            codes, distances = encode_multilevel(
                codebook.centroids,
                codebook.codec,
                codebook.metric,
                batch.x,
                beam=settings.beam,
                rotation=codebook.rotation,
                **common,
            )
        else:
            codes, distances = encode_tensor(
                codebook.centroids, codebook.metric, batch.x, top_k=settings.top_k, **common
            )
    except InvalidInputError as exc:
        raise type(exc)(f"{source.uri}: {exc}") from None
    assert distances is not None  # asked for
    return codes, distances


def assign_suffixes(
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    records: dict[str, dict[str, Any]],
    inventory: FolderInventory,
) -> tuple[dict[str, Any], list[str]]:
    """The finishing step of a ``unique`` run: give every row of the folder a semantic-id suffix.

    Every output the folder holds (this run's, ``records``, and the stale ones of earlier runs that
    ``inventory`` keeps) gets a ``suffix`` (UInt32): the row's rank among the rows of the folder that
    share its tuple of codes, ordered by id (:func:`vq_pipeline.jobs.semantic_ids.folder_suffixes`). The id is the
    ``id_column`` value, which must then be unique over the whole folder (a stale output sharing an id
    with this run's is refused: prune it, or write to another folder); without an id column it is the
    pair (input key, ``row``): outputs in the order of their input keys, then row positions. So
    ``(codes, suffix)`` is unique over the folder, and the suffixes depend only on what the folder holds.
    When a later run adds files, the suffixes are computed again over the folder's current outputs,
    and every output whose suffixes change is rewritten (an earlier output may thus change).

    Each rewrite is atomic and resumable: its receipt first records the new bytes as
    ``pending_sha256``, then the output is replaced (temporary name, fsync, rename), then the receipt
    records them as ``sha256`` (:func:`vq_pipeline.jobs.encode_state.intact_receipt` accepts either in
    between). A rerun after a crash computes the same suffixes and ends with the same bytes; an output
    whose suffixes are already right is not written. ``records`` and ``inventory.stale`` are updated in
    place. Call under :func:`encode_lock`, after every input is encoded (and stale outputs pruned).

    Returns:
        (statistics: :func:`vq_pipeline.compute.semantic_ids.collision_stats` of the folder's codes before
        suffixes, plus ``rows_with_suffix``, the rows whose suffix is above 0; keys of the outputs rewritten).
    """
    out = resolved(out_dir)
    owned = {**inventory.stale, **records}
    keys = sorted(owned)
    paths = [out / owned[k]["output"] for k in keys]
    parts, stats = folder_suffixes(paths, id_column=settings.id_column)
    rewritten = _write_suffixes(out, keys, paths, parts, records, inventory)
    stats = {k: stats[k] for k in ("n_rows", "n_unique", "collision_rate", "largest_group", "max_suffix", "usage")}
    stats["rows_with_suffix"] = stats["n_rows"] - stats["n_unique"]
    return stats, rewritten


def _write_suffixes(
    out: Path,
    keys: list[str],
    paths: list[Path],
    parts: Sequence[Any],
    records: dict[str, dict[str, Any]],
    inventory: FolderInventory,
) -> list[str]:
    """Give the outputs ``paths`` (of the inputs ``keys``) their ``suffix`` ``parts`` (one (n_rows,) polars Series
    per output, in row order): each output whose suffixes differ is rewritten, atomically and resumably
    (receipt with ``pending_sha256``, output, receipt with ``sha256``); its receipt is updated in ``records``
    or ``inventory.stale``. Returns the keys rewritten."""
    owned = {**inventory.stale, **records}
    rewritten = []
    for key, path, suffix in zip(keys, paths, parts):
        frame = tables.read_table(path)
        found = frame.get_column(tables.SUFFIX_COLUMN)
        if found.null_count() == 0 and bool((found == suffix).all()):
            continue
        data = tables.parquet_bytes(tables.with_suffix(frame, suffix))
        digest = hashlib.sha256(data).hexdigest()
        receipt = owned[key]
        write_receipt(out, {**receipt, "pending_sha256": digest})
        fileio.atomic_write_bytes(path, data)
        receipt = {**receipt, "sha256": digest}
        write_receipt(out, receipt)
        (records if key in records else inventory.stale)[key] = receipt
        rewritten.append(key)
    return rewritten


def check_registry(
    settings: EncodeSettings, codebook: Codebook, registry: str | os.PathLike[str], *, publish: bool = False
) -> None:
    """Refuse, before any work, an ``id_registry`` run whose registry (read, never written here) another
    codebook issued the current id version of (unless ``publish``), or that keys items by another column."""
    if not os.path.lexists(Path(registry) / "registry.json"):
        return
    with Registry.open(registry, id_column=settings.id_column or "", write=False) as reg:
        if reg.current_version is not None and not publish and reg.fingerprint() != codebook.fingerprint:
            raise other_codebook_error(Path(registry), reg.current_version, reg.fingerprint(), codebook.fingerprint)


def issue_suffixes(
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    records: dict[str, dict[str, Any]],
    inventory: FolderInventory,
    codebook: Codebook,
    *,
    registry: str | os.PathLike[str] | None = None,
    publish: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """The finishing step of a ``unique`` run with ``id_registry``: the suffixes of every row of the
    folder, issued through the id registry (:class:`vq_pipeline.jobs.registry.Registry`) so that an
    issued id never changes.

    Every output the folder holds (this run's ``records`` and the stale ones ``inventory`` keeps) is read
    (the id column, ``codes``, ``suffix``), then, under the registry's lock:

    * a registry that holds no id version yet adopts the suffixes the outputs already have (a folder
      written with ``unique`` alone) as id version 1 (:meth:`~vq_pipeline.jobs.registry.Registry.adopt`);
    * when another codebook issued the current id version: with ``publish``, every row of the folder
      (which must hold every item of that version) is published as a new id version, with its old->new
      tables (:meth:`~vq_pipeline.jobs.registry.Registry.new_version`); without, the run is refused;
    * one :meth:`~vq_pipeline.jobs.registry.Registry.issue` of every row: an item already issued keeps its
      suffix, a new one takes the next free suffix of its tuple (new items ordered by id);
    * the prefix table of the current id version is written beside the registry
      (:func:`vq_pipeline.jobs.encode_state.prefix_table_path`).

    Then every output whose suffixes differ is rewritten as :func:`assign_suffixes` does. Exactly once:
    the registry commits each append atomically before any output is rewritten, so a run killed at any
    point issues the same suffixes when rerun (the items are then known) and ends with the same bytes.

    Args:
        registry: the registry's folder (default: ``<out_dir>.vq/registry``, :func:`registry_dir`).
        publish: publish a new id version when another codebook issued the current one.

    Returns:
        (statistics: those of :func:`assign_suffixes` (``max_suffix`` the largest suffix written) and
        ``id_registry``: ``registry``, ``id_version``, ``items`` (of the version), ``issued`` (items new
        to the registry in this step), ``kept`` (items it already held), ``adopted``, ``prefix_table`` and
        ``published`` (:meth:`~vq_pipeline.jobs.registry.Registry.new_version`'s record, or None);
        keys of the outputs rewritten).

    Raises:
        StateError: another codebook issued the current id version (without ``publish``); a registry
            that is not one this package wrote. EncodeLockedError: another writer holds the registry.
        InvalidInputError: an issued item arrives with other codes; ``publish`` without every item of
            the current version in the folder.
    """
    out = resolved(out_dir)
    folder = Path(registry) if registry is not None else registry_dir(out)
    id_column = settings.id_column
    if not settings.id_registry or not id_column:
        raise InvalidInputError(
            f"id_registry={settings.id_registry!r} id_column={id_column!r}; expected id_registry=True with an id "
            f"column. Fix: pass EncodeSettings(..., unique=True, id_registry=True, id_column=...)."
        )
    owned = {**inventory.stale, **records}
    keys = sorted(owned)
    paths = [out / owned[k]["output"] for k in keys]
    parts, stats = registry_suffixes(paths, id_column=id_column, registry=folder, codebook=codebook, publish=publish)
    rewritten = _write_suffixes(out, keys, paths, parts, records, inventory)
    return stats, rewritten


@dataclass(frozen=True)
class EncodeEvents:
    """What an encode run tells its caller as it goes; every callback is optional.

    ``plan(rows_to_encode_by_key, skipped_keys)``: once, before any file is encoded. ``rows(key,
    rows_done, rows_in_file)``: after every batch, where the files are encoded in this process.
    ``file_done(key, receipt_or_exception)``: as each file finishes (an exception only from a
    mapper that hands failures back).
    """

    plan: PlanCallback | None = None
    rows: RowProgress | None = None
    file_done: Callable[[str, Any], None] | None = None


@dataclass(frozen=True)
class EncodeFile:
    """One input file's encode as plain data: what a mapper ships to where the work runs.

    ``codebook`` is the Codebook itself for work in this process, or the path of its file (read and
    checked against ``fingerprint`` where the work runs)."""

    source: Source
    codebook: Codebook | str
    fingerprint: str
    out_dir: str
    settings: EncodeSettings
    options: EncodeOptions
    progress: RowProgress | None = None


def load_codebook(path: str | os.PathLike[str], fingerprint: str | None = None) -> Codebook:
    """The codebook file at ``path``, checked to still be the one a run was planned with."""
    codebook = Codebook.load(path)
    if fingerprint is not None and codebook.fingerprint != fingerprint:
        raise VQError(
            f"codebook={os.fspath(path)!r} changed during the run (fingerprint {codebook.fingerprint[:12]}…, planned "
            f"with {fingerprint[:12]}…); expected the file to stay put while encoding. Fix: rerun."
        )
    return codebook


def encode_file(work: EncodeFile) -> dict[str, Any]:
    """Encode one input file and return its receipt (:func:`encode_source`). Safe to retry: the output
    and the receipt are each written atomically, and a re-encoded output is byte-identical."""
    codebook = work.codebook
    if not isinstance(codebook, Codebook):
        codebook = load_codebook(codebook, work.fingerprint)
    return encode_source(work.source, codebook, work.out_dir, work.settings, work.options, progress=work.progress)


def encode_tables(
    inputs: Sequence[str | os.PathLike[str]],
    codebook: Codebook | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: EncodeSettings,
    options: EncodeOptions | None = None,
    *,
    mapper: Mapper = serial,
    events: EncodeEvents | None = None,
    registry: str | os.PathLike[str] | None = None,
    publish_ids: bool = False,
) -> EncodeResult:
    """Encode every input table into ``out_dir``, resumably and exactly once (see the module doc): the
    one encode job, which the ``vq`` command, the flows and Dask run with their own ``mapper``.

    Args:
        inputs: table files, globs or folders (local or object storage).
        codebook: a Codebook, or the path of its file (which a mapper then ships to the workers).
        settings: what the outputs hold (:class:`~vq_pipeline.settings.EncodeSettings`: the embedding
            and id columns, ``top_k``, distances, kept columns, ``code_dtype``, ``beam``, ``unique``).
        options: how the run computes and treats the folder (:class:`~vq_pipeline.settings.EncodeOptions`:
            engine, device, batches, ``overwrite``, ``prune``).
        mapper: where the per-file work runs (:mod:`vq_pipeline.jobs.mappers`; default: here, in order).
        events: progress callbacks (:class:`EncodeEvents`).
        registry: with ``settings.id_registry``, the id registry's folder (default: ``<out_dir>.vq/registry``;
            the scheduled pipeline keeps one per work_dir).
        publish_ids: with ``settings.id_registry``, publish a new id version when another codebook issued
            the current one (:func:`issue_suffixes`); refused otherwise.

    ``overwrite`` replaces another codebook's codes (deleting only the outputs its receipts record).
    ``prune``: once every input is encoded, delete the stale outputs (see below) and their receipts;
    ``result.pruned`` names them. ``unique`` (multi-level codebooks): once every input is encoded,
    give every row of the folder a ``suffix`` making its ``(codes, suffix)`` unique in the folder
    (:func:`assign_suffixes`); ``result.semantic_ids`` and the manifest's ``semantic_ids`` give the
    collision rate before suffixes, ``max_suffix`` and ``rows_with_suffix``. With ``id_registry`` too,
    the suffixes are issued through the id registry instead (:func:`issue_suffixes`: an issued id never
    changes; a folder's existing suffixes are adopted on the first such run), the prefix table of the
    current id version is written beside the registry, and ``semantic_ids["id_registry"]`` says how many
    ids were issued and kept, and the id version. Row positions are no item keys: ``id_registry`` needs
    an ``id_column``.

    A multi-level codebook (codec residual or product) writes, per row, ``codes``: an ``Array(UInt8 |
    UInt16 | ..., levels)`` of one code per level (``top_k`` must be 1), and with ``with_distance`` one
    ``distance`` (float32, to the reconstruction). A scalar or binary codebook writes ``codes`` packed
    (``Array(UInt8, dim)``, 4-bit: ``Array(UInt8, ceil(dim / 2))``, binary: ``ceil(dim / 8)`` bytes), and
    refuses ``unique``, ``top_k > 1``, ``beam > 1`` and ``code_dtype``. A flat codebook writes ``code``.

    What the folder keeps: the outputs of this run's inputs, and the outputs of earlier runs whose
    input is not part of this run (a renamed or removed input, or simply another day's files: encoding
    day2 into a folder holding day1 keeps day1). Those are *stale*: they are kept (never destroyed
    unasked), listed in the manifest with ``"in_this_run": false`` and counted in ``n_stale``, and
    named in ``result.stale``; ``prune`` deletes them. The manifest lists every output file in
    the folder. Parquet files that no receipt records (another program's files) are never deleted:
    they are named in ``result.unrecorded``, in the manifest's ``unrecorded`` and in a logged warning.

    Raises:
        InvalidInputError: bad inputs or options, two inputs that would write one output, a folder
            holding another codebook's codes without ``overwrite``.
        StateError: the folder's bookkeeping records an output outside the folder, or its lock,
            receipts or manifest are not files this package wrote (a symlink, another file).
        EncodeLockedError: another run holds the folder's lock.
        EncodeFailedError: some files failed under a mapper that hands failures back; every other
            file is encoded and receipted (a rerun picks up only the failed ones), and no manifest is
            written. A fail-fast mapper (the default) raises the file's own error instead.
    """
    t0 = time.perf_counter()
    options = EncodeOptions() if options is None else options
    events = EncodeEvents() if events is None else events
    path = None if isinstance(codebook, Codebook) else os.fspath(codebook)
    codebook = codebook if path is None else load_codebook(path)
    check_codec_settings(codebook, settings)  # settings the codec cannot honour are refused before any work
    out = resolved(out_dir)
    if (registry is not None or publish_ids) and not settings.id_registry:
        raise InvalidInputError(
            f"registry={None if registry is None else os.fspath(registry)!r} publish_ids={publish_ids!r} with "
            f"id_registry=False; expected them only with an id registry. Fix: pass EncodeSettings(..., unique=True, "
            f"id_registry=True), or drop them."
        )
    registry = registry_dir(out) if settings.id_registry and registry is None else registry
    if registry is not None:
        check_registry(settings, codebook, registry, publish=publish_ids)
    with encode_lock(out_dir, inputs=inputs):
        todo, done, records = plan_encode(
            inputs,
            codebook,
            out,
            settings,
            overwrite=options.overwrite,
            prune=options.prune,
            storage_options=options.storage_options,
        )
        result = EncodeResult(
            out_dir=str(out),
            manifest=str(manifest_path(out)),
            codebook_fingerprint=codebook.fingerprint,
            codebook=path or "",
            codec=codebook.codec,
            levels=codebook.levels,
            skipped=[s.key for s in done],
        )
        if events.plan is not None:
            rows = {
                s.key: tables.inspect_source(s, column=settings.column, storage_options=options.storage_options)
                for s in todo
            }
            events.plan({k: info.n_rows for k, info in rows.items()}, list(result.skipped))
        work = [
            EncodeFile(s, path or codebook, codebook.fingerprint, str(out), settings, options, events.rows)
            for s in todo
        ]
        new, failed = _run_files(work, mapper, events)
        if failed:
            raise encode_failure(failed, len(todo)) from next(iter(failed.values()))
        remove_temporaries(out)  # a worker killed mid-write leaves one; its file was encoded again
        records.update(new)
        result.encoded = [s.key for s in todo]
        inventory = folder_inventory(out, records)
        if options.prune:
            result.pruned = prune_stale(out, inventory)
        if settings.id_registry:
            result.semantic_ids, _ = issue_suffixes(
                out, settings, records, inventory, codebook, registry=registry, publish=publish_ids
            )
        elif settings.unique:
            result.semantic_ids, _ = assign_suffixes(out, settings, records, inventory)
        write_manifest(
            out, codebook, settings, records, inventory=inventory, semantic_ids=_portable(result.semantic_ids)
        )
    result.stale = sorted(inventory.stale)
    result.unrecorded = list(inventory.unrecorded)
    result.records = records
    result.rows_encoded = sum(records[k]["rows"] for k in result.encoded)
    result.rows_total = sum(r["rows"] for r in records.values())
    result.seconds = time.perf_counter() - t0
    return result


def _portable(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The suffix step's statistics as the manifest records them: of the registry, only the id version and
    its items, which a rerun after a crash reaches too (what one run issued, kept or adopted depends on
    where the previous run stopped; the paths on where the folder is)."""
    if not stats or "id_registry" not in stats:
        return stats
    reg = stats["id_registry"]
    return {**stats, "id_registry": {"id_version": reg["id_version"], "items": reg["items"]}}


def _run_files(
    work: list[EncodeFile], mapper: Mapper, events: EncodeEvents
) -> tuple[dict[str, dict[str, Any]], dict[str, BaseException]]:
    """The receipts of the files encoded through ``mapper`` and the errors of those that failed, by key."""
    new: dict[str, dict[str, Any]] = {}
    failed: dict[str, BaseException] = {}
    for i, outcome in mapper(encode_file, work):
        key = work[i].source.key
        if isinstance(outcome, BaseException):
            failed[key] = outcome
        else:
            new[key] = outcome
        if events.file_done is not None:
            events.file_done(key, outcome)
    return new, failed


def encode_failure(failed: dict[str, BaseException], n_todo: int) -> EncodeFailedError:
    """The error of an encode run whose files ``failed`` (key: exception) out of ``n_todo``; raise it
    ``from`` the first exception. The other files are encoded and receipted."""
    first = next(iter(failed.values()))
    return EncodeFailedError(
        f"{len(failed)} of {n_todo} files could not be encoded ({', '.join(sorted(failed))}); first error: "
        f"{type(first).__name__}: {first}. The other files are encoded; a rerun retries only these."
    )


__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_MEMORY_BUDGET",
    "LOCK_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "STATE_SUFFIX",
    "EncodeLockedError",
    "EncodeOptions",
    "EncodeEvents",
    "EncodeFile",
    "EncodeResult",
    "EncodeSettings",
    "FolderInventory",
    "PlanCallback",
    "RowProgress",
    "assign_suffixes",
    "check_codec_settings",
    "check_registry",
    "check_suffix_ids",
    "clipped_values",
    "codec_bits",
    "encode_failure",
    "encode_file",
    "encode_lock",
    "encode_source",
    "encode_tables",
    "folder_inventory",
    "folder_lock",
    "issue_suffixes",
    "level_counts",
    "load_codebook",
    "manifest_path",
    "output_path",
    "plan_encode",
    "prune_stale",
    "remove_temporaries",
    "state_dir",
    "write_manifest",
]
