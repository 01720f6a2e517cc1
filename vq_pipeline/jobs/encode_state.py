"""The bookkeeping of an encode output folder: where outputs, receipts, the manifest and the lock go,
and how they are read (never trusted), inventoried, pruned and written.

Encoding writes ``out_dir`` as a plain parquet dataset (nothing but ``.parquet`` files, so
``pl.scan_parquet(out_dir)``, pyarrow datasets and duckdb read it as is), and keeps its
bookkeeping beside it in ``<out_dir>.vq/`` (:func:`state_dir`):

* one parquet file per input file, at the input's path relative to its root (so hive partitions
  keep their layout, :func:`output_path`), written atomically (temporary name in the same folder,
  fsync, rename);
* a receipt per output in ``<out_dir>.vq/receipts/`` once its output is in place (:func:`write_receipt`):
  input, input fingerprint (sha256 of its content), codebook fingerprint, settings, row count, sha256
  of the output, distance sum and code counts (a multi-level codebook's receipt also records ``codec``
  and ``levels``, and its ``code_counts`` hold one list per level; a scalar or binary codebook's, whose
  levels are its dimensions, also ``bits`` per dimension, and for scalar codes ``clipped``, the values
  outside the calibrated range);
* ``<out_dir>.vq/manifest.json`` last: every output file in the folder with its input and rows, and
  whether its input was part of the run (:func:`write_manifest`);
* ``<out_dir>.vq/lock`` (:data:`LOCK_NAME`), held while a run writes.
* with ``unique`` and ``id_registry``: ``<out_dir>.vq/registry/``, the id registry that issues the
  suffixes (:func:`registry_dir`, :mod:`vq_pipeline.jobs.registry`), and beside it
  ``<out_dir>.vq/prefix-v<N>.safetensors``, the prefix table of id version ``N`` (:func:`prefix_table_path`).

Nothing found in the folder is trusted. Every output path read from a receipt or a manifest must
resolve (symlinks followed) inside ``out_dir`` (:func:`checked_output`), or the run stops with a
:class:`StateError` before it deletes or writes anything; a receipt or manifest that is a symlink, not
a regular file or not a JSON object is refused; only outputs that a receipt records are ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vq_pipeline.codebook import Codebook
from vq_pipeline.errors import InvalidInputError, StateError
from vq_pipeline.io import fileio, tables
from vq_pipeline.io.discovery import Source
from vq_pipeline.io.fileio import atomic_write_bytes, canonical_json
from vq_pipeline.io.paths import refuse_symlinked_folder, resolved
from vq_pipeline.settings import PER_DIMENSION_CODECS, EncodeSettings

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vq-pipeline.encode-manifest"
#: Suffix of the bookkeeping folder beside an output folder: ``codes/`` keeps it in ``codes.vq/``.
STATE_SUFFIX = ".vq"
LOCK_NAME = "lock"
#: The id registry's folder in the bookkeeping folder (``unique`` runs with ``id_registry``).
REGISTRY_NAME = "registry"
#: A JSON file larger than this was not written by this package.
_MAX_STATE_FILE = 64 * 2**20
#: The fields every receipt holds, with their types (a receipt missing one was not written by this package).
_RECEIPT_FIELDS: dict[str, type] = {"key": str, "output": str, "rows": int, "sha256": str}

log = logging.getLogger(__name__)


def output_path(out_dir: str | os.PathLike[str], source: Source) -> Path:
    """Where ``source``'s codes go: its key under ``out_dir``, as parquet."""
    return Path(out_dir) / Path(source.key).with_suffix(".parquet")


def state_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The bookkeeping folder of the output folder ``out_dir``: ``<out_dir>.vq`` beside it (receipts,
    manifest, lock), so that ``out_dir`` itself holds nothing but parquet files.

    It is named after the folder's resolved path (absolute, symlinks followed), so every name of one
    folder (a symlink to it, ``codes/current``, a path with ``..``) has one bookkeeping folder, one lock
    and one history."""
    out = resolved(out_dir)
    if not out.name:
        raise InvalidInputError(
            f"out_dir={str(out_dir)!r} is a filesystem root; expected a folder of its own for the codes. "
            f"Fix: pass a subfolder such as {str(out / 'codes')!r}."
        )
    return out.with_name(out.name + STATE_SUFFIX)


def registry_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where the id registry of the output folder ``out_dir`` lives: ``<out_dir>.vq/registry``."""
    return state_dir(out_dir) / REGISTRY_NAME


def prefix_table_path(registry: str | os.PathLike[str], id_version: int) -> Path:
    """The prefix table of id version ``id_version`` of the registry in ``registry``: the file
    ``prefix-v<id_version>.safetensors`` beside the registry's folder."""
    return Path(registry).parent / f"prefix-v{id_version}.safetensors"


def typed_state_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where earlier versions kept the bookkeeping of ``out_dir``: beside the path as typed (not
    resolved), so a folder reached through a symlink kept it beside the link."""
    out = Path(os.path.abspath(os.fspath(out_dir) or "."))
    return out.with_name(out.name + STATE_SUFFIX)


def manifest_path(out_dir: str | os.PathLike[str]) -> Path:
    """Where the manifest of the output folder ``out_dir`` is written (last, after every output)."""
    return state_dir(out_dir) / MANIFEST_NAME


def receipt_path(out_dir: str | os.PathLike[str], key: str) -> Path:
    """Where the receipt of the output of the input ``key`` is written (a fixed-length name)."""
    return state_dir(out_dir) / "receipts" / f"{hashlib.sha256(os.fsencode(key)).hexdigest()[:32]}.json"


def receipt_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The receipt files of ``out_dir``, sorted (none when its receipts folder is missing)."""
    receipts = state_dir(out_dir) / "receipts"
    return sorted(receipts.glob("*.json")) if receipts.is_dir() else []


def write_receipt(out_dir: str | os.PathLike[str], receipt: dict[str, Any]) -> Path:
    """Write ``receipt`` (atomically, after the output it records is in place)."""
    return atomic_write_bytes(receipt_path(out_dir, receipt["key"]), canonical_json(receipt))


def is_regular(path: Path) -> bool:
    """A regular file, not a symlink to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_real_dir(path: Path) -> bool:
    """A folder, not a symlink to one."""
    return path.is_dir() and not path.is_symlink()


def read_state_json(path: Path, what: str) -> dict[str, Any] | None:
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


def checked_output(out: Path, rel: object, source: Path, what: str) -> Path:
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


def read_receipt(path: Path, out: Path) -> dict[str, Any] | None:
    """The receipt in ``path``, checked (fields, types, an output inside ``out``), or None when there is none."""
    receipt = read_state_json(path, "receipt")
    if receipt is None:
        return None
    for name, kind in _RECEIPT_FIELDS.items():
        value = receipt.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise StateError(
                f"{name}={value!r} in receipt {str(path)!r}; expected a receipt written by vq-pipeline, whose "
                f"{name} is a {kind.__name__}. Fix: delete {str(path)!r}; a rerun re-encodes the input it described."
            )
    checked_output(out, receipt["output"], path, "receipt")
    return receipt


def read_manifest(path: Path, out: Path) -> dict[str, Any] | None:
    """The manifest in ``path`` with every output it lists checked to lie inside ``out``, or None."""
    manifest = read_state_json(path, "manifest")
    if manifest is None:
        return None
    outputs = manifest.get("outputs", {})
    if not isinstance(outputs, dict) or not all(isinstance(e, dict) for e in outputs.values()):
        raise StateError(
            f"outputs in manifest {str(path)!r} is not a JSON object of entries; expected a manifest written by "
            f"vq-pipeline. Fix: delete {str(path)!r}; the next run writes it anew."
        )
    for entry in outputs.values():
        checked_output(out, entry.get("output"), path, "manifest")
    return manifest


def folder_records(out: Path) -> tuple[dict[str, Any] | None, list[tuple[Path, dict[str, Any]]]]:
    """The manifest and every receipt of ``out`` (with its file), all checked, to learn what the folder holds."""
    manifest = read_manifest(manifest_path(out), out)
    receipts = [(p, r) for p in receipt_files(out) if (r := read_receipt(p, out)) is not None]
    return manifest, receipts


def remove_recorded(out: Path, path: Path, receipt: dict[str, Any]) -> None:
    """Delete the output that the receipt ``receipt`` (in the file ``path``) records, checked to lie inside
    ``out`` and to hold the bytes the receipt records (:func:`is_recorded`), then the receipt. A file
    changed since vq-pipeline wrote it, or a folder under the output's name, is left alone."""
    output = checked_output(out, receipt["output"], path, "receipt")
    if is_recorded(output, receipt):
        output.unlink()
    path.unlink(missing_ok=True)


def migrate_state(out: Path) -> None:
    """Move the bookkeeping of a folder written by 0.1 (``_manifest.json`` and ``.vq/`` inside it)
    to :func:`state_dir`, so that its outputs are still recognized and the folder reads as a dataset.
    Only regular files in real folders are moved; a ``_manifest.json`` that is not this package's is
    left alone."""
    old = out / ".vq"
    state = state_dir(out)
    receipts = state / "receipts"
    if is_real_dir(old / "receipts") and is_real_dir(old):
        refuse_symlinked_folder(state)
        refuse_symlinked_folder(receipts)
        receipts.mkdir(parents=True, exist_ok=True)
        for p in sorted((old / "receipts").glob("*.json")):
            if not is_regular(p):
                continue  # not a receipt: not ours to move
            if not os.path.lexists(receipts / p.name):
                os.replace(p, receipts / p.name)
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (old / "receipts").rmdir()
    old_manifest = out / "_manifest.json"
    if is_regular(old_manifest):
        try:
            manifest = read_state_json(old_manifest, "manifest")
        except StateError:
            manifest = None  # not JSON: someone else's file
        if manifest is not None and manifest.get("format") == MANIFEST_FORMAT:
            read_manifest(old_manifest, out)  # refuses outputs outside the folder
            if os.path.lexists(manifest_path(out)):
                old_manifest.unlink()
            else:  # its header still tells which codebook wrote the folder; rewritten at the end of the run
                state.mkdir(parents=True, exist_ok=True)
                os.replace(old_manifest, manifest_path(out))
    if is_real_dir(old):
        with contextlib.suppress(OSError):
            if is_regular(old / LOCK_NAME):
                (old / LOCK_NAME).unlink()
            old.rmdir()


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


def intact_receipt(out: Path, receipt: dict[str, Any], output: Path, *, rewrite: bool = True) -> dict[str, Any] | None:
    """``receipt`` when ``output`` (the file it records) still holds the bytes it records, else None.

    A receipt with ``pending_sha256`` was written just before its output was replaced by new bytes
    (the suffix step, :func:`vq_pipeline.jobs.encode_folder.assign_suffixes`): either the old bytes or the
    new ones are then the output's, and the receipt is rewritten to record the bytes found (unless
    ``rewrite`` is false: the plan of a run reads before it writes anything).
    """
    if not is_regular(output):
        return None
    digest = tables.file_sha256(output)
    pending = receipt.get("pending_sha256")
    if digest != receipt["sha256"] and (pending is None or digest != pending):
        return None
    if pending is not None:
        receipt = {k: v for k, v in receipt.items() if k != "pending_sha256"}
        receipt["sha256"] = digest
        if rewrite:
            write_receipt(out, receipt)
    return receipt


def is_recorded(path: Path, receipt: dict[str, Any]) -> bool:
    """Whether the regular file ``path`` holds the bytes that ``receipt`` records for it (``sha256``, or
    the new bytes of an interrupted suffix rewrite, ``pending_sha256``): vq-pipeline's output, unchanged."""
    digests = {v for k in ("sha256", "pending_sha256") if isinstance(v := receipt.get(k), str)}
    return is_regular(path) and tables.file_sha256(path) in digests


def check_replaceable(out: Path, outputs: list[str], receipts: list[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse, before anything is written, to replace a file that vq-pipeline did not write: every one of
    ``outputs`` (relative paths) that exists must be a regular file under a name that a receipt of the
    folder records. (Receipts are written before their outputs, so a run killed in between leaves no
    output without one.) An output whose bytes changed since it was written is damaged: it is rebuilt,
    with a warning.

    Raises:
        StateError: naming the first file that no receipt records, a folder or a symlink, with the fix;
            the folder is left as it was.
    """
    by_output: dict[str, list[dict[str, Any]]] = {}
    for _, receipt in receipts:
        by_output.setdefault(receipt["output"], []).append(receipt)
    for rel in outputs:
        path = out / rel
        if not os.path.lexists(path):
            continue
        if is_regular(path) and rel in by_output:
            if not any(is_recorded(path, r) for r in by_output[rel]):
                log.warning("output %s changed since vq-pipeline wrote it (damaged?); it is encoded again", path)
            continue
        what = (
            "was not written by vq-pipeline (no receipt records it)"
            if is_regular(path)
            else "is not a regular file (a folder, a symlink or a device)"
        )
        raise StateError(
            f"output={str(path)!r} {what}, and this run would replace it with the codes of its input; expected "
            f"to replace only files that vq-pipeline wrote into the folder. Fix: move or delete {str(path)!r} "
            f"(nothing was written), or encode into another folder."
        )


def folder_inventory(
    out_dir: str | os.PathLike[str], records: dict[str, dict[str, Any]], *, dry: bool = False
) -> FolderInventory:
    """Sort what ``out_dir`` holds besides the run's outputs (``records``, keyed by input key, each with
    its ``output``) into stale outputs and unrecorded files. Call under
    :func:`vq_pipeline.jobs.encode_folder.encode_lock`, after the run's outputs are written.

    A receipt that no longer describes an output of its own (the file is gone, was changed, or now
    holds the codes of another input of the run) is deleted; the file, if any, is then unrecorded.
    ``dry``: write and delete nothing (the plan of a run, before its outputs are written, to learn
    which outputs will be stale).
    """
    out = Path(out_dir)
    run_outputs = {r["output"] for r in records.values()}
    inventory = FolderInventory()

    def drop(p: Path) -> None:
        if not dry:
            p.unlink(missing_ok=True)

    for p in receipt_files(out):
        receipt = read_receipt(p, out)
        if receipt is None or receipt["key"] in records:
            continue
        output = out / receipt["output"]
        if receipt["output"] in run_outputs or receipt["output"] in {r["output"] for r in inventory.stale.values()}:
            drop(p)
            continue
        receipt = intact_receipt(out, receipt, output, rewrite=not dry)
        if receipt is None:
            drop(p)
            continue
        inventory.stale[receipt["key"]] = receipt
        inventory.receipt_files[receipt["key"]] = p
    recorded = run_outputs | {r["output"] for r in inventory.stale.values()}
    inventory.unrecorded = [rel for rel in _parquet_files(out) if rel not in recorded]
    return inventory


def prune_stale(out_dir: str | os.PathLike[str], inventory: FolderInventory) -> list[str]:
    """Delete the stale outputs of ``inventory`` (each recorded by a receipt, checked to lie inside
    ``out_dir`` and to hold the bytes it recorded) and their receipts; return their keys. ``inventory``
    is left with no stale outputs. Call under :func:`vq_pipeline.jobs.encode_folder.encode_lock`."""
    out = Path(out_dir)
    pruned = sorted(inventory.stale)
    for key in pruned:
        remove_recorded(out, inventory.receipt_files[key], inventory.stale[key])
    inventory.stale.clear()
    inventory.receipt_files.clear()
    return pruned


def _manifest_entry(record: dict[str, Any], in_this_run: bool) -> dict[str, Any]:
    # input_stat is a cache hint of this machine (mtime, inode), not part of what the folder holds.
    left_out = ("codebook_fingerprint", "settings", "input_stat")
    if record.get("codec") in PER_DIMENSION_CODECS:
        # dim x 2**bits counts per file (98,304 for 8-bit codes of 384 dims) would soon make the manifest
        # larger than a state file may be; the receipts keep them for drift.
        left_out += ("code_counts",)
    entry = {k: v for k, v in record.items() if k not in left_out}
    return {**entry, "in_this_run": in_this_run}


def write_manifest(
    out_dir: str | os.PathLike[str],
    codebook: Codebook,
    settings: EncodeSettings,
    records: dict[str, dict[str, Any]],
    *,
    inventory: FolderInventory | None = None,
    semantic_ids: dict[str, Any] | None = None,
) -> Path:
    """Write the manifest (:func:`manifest_path`; atomically, after the outputs it lists): what the folder holds.

    It lists every output file in the folder, keyed by input key, each with its input, rows, checksum
    and ``in_this_run`` (false for a stale output, whose input was not part of this run, ``records``);
    ``rows`` counts them all, ``rows_in_this_run`` the run's, ``n_stale`` the stale outputs, and
    ``unrecorded`` names the parquet files no receipt records. ``inventory``: the run's
    :func:`folder_inventory`, taken here when not given. A multi-level codebook's manifest also records
    ``codec`` and ``levels`` (a scalar or binary codebook's leaves the code counts per dimension to the
    receipts); ``semantic_ids`` (the suffix step's statistics, ``unique`` runs) is recorded under that name.
    Call under :func:`vq_pipeline.jobs.encode_folder.encode_lock`.
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
        **({"codec": codebook.codec, "levels": codebook.levels} if codebook.codec != "flat" else {}),
        **({"semantic_ids": semantic_ids} if semantic_ids is not None else {}),
        "rows": sum(e["rows"] for e in outputs.values()),
        "rows_in_this_run": sum(r["rows"] for r in records.values()),
        "n_outputs": len(outputs),
        "n_stale": len(inventory.stale),
        "outputs": dict(sorted(outputs.items())),
        "unrecorded": list(inventory.unrecorded),
    }
    return atomic_write_bytes(manifest_path(out), canonical_json(manifest))


def mean_distance(record: dict[str, Any]) -> float | None:
    """A receipt's mean distance per row (None for a file without rows)."""
    return record["distance_sum"] / record["rows"] if record.get("rows") else None


def summary_rows(records: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per receipt in ``records``, sorted by key: ``key``, ``rows``, ``status`` (``encoded``
    when the key is in ``new``, the receipts of this run's files, else ``skipped``) and ``mean_distance``."""
    return [
        {"key": k, "rows": r["rows"], "status": "encoded" if k in new else "skipped", "mean_distance": mean_distance(r)}
        for k, r in sorted(records.items())
    ]


__all__ = [
    "LOCK_NAME",
    "MANIFEST_FORMAT",
    "REGISTRY_NAME",
    "MANIFEST_NAME",
    "STATE_SUFFIX",
    "FolderInventory",
    "check_replaceable",
    "checked_output",
    "folder_inventory",
    "folder_records",
    "intact_receipt",
    "is_real_dir",
    "is_recorded",
    "is_regular",
    "manifest_path",
    "mean_distance",
    "migrate_state",
    "output_path",
    "prefix_table_path",
    "prune_stale",
    "read_manifest",
    "read_receipt",
    "read_state_json",
    "receipt_files",
    "receipt_path",
    "registry_dir",
    "remove_recorded",
    "state_dir",
    "summary_rows",
    "typed_state_dir",
    "write_manifest",
    "write_receipt",
]
