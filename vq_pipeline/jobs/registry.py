"""The id registry of an output: every semantic id ever issued, append-only, per id version.

A registry maps each item key (the id column) to its full id ``(codes..., suffix)`` and the id version
that issued it. Issued ids never change:

* :meth:`Registry.issue` gives new items the next free suffix of their tuple of codes (one more than
  the largest suffix issued for that tuple under the version), ordered by id within one call; an item
  already issued keeps its suffix whatever arrives later, and re-issuing it with other codes under the
  same version is refused. The suffixes depend only on the order of the calls and, within a call, on
  the set of ``(id, codes)`` pairs, never on row order.
* An id version is one codebook (its fingerprint) and the suffixes issued with it. A refit never
  renumbers: either new items keep being encoded with the codebook of the current version (policy
  "keep"), or :meth:`Registry.new_version` publishes a new version (policy "publish") with an old->new
  table per item and per prefix; every earlier version stays readable.
* :meth:`Registry.adopt` takes the suffixes an output already has (``--unique`` tables) as version 1.

The folder (:meth:`Registry.open`) holds:

* ``ids-v<version>-b<batch>.parquet``: one file per append (columns: the id column, ``codes``
  ``Array(UInt32, levels)``, ``suffix`` UInt32, ``id_version`` UInt32), never rewritten. One file per
  batch rather than one table rewritten: an append costs the new rows only, and the rows of issued ids
  are never written again, so no bug or crash in a later run can touch them;
* ``map-v<version>-items.parquet`` and ``map-v<version>-prefixes.parquet`` for a published version;
* ``registry.json`` (:data:`MANIFEST_NAME`), written last and atomically: the versions with their
  codebook fingerprints, and every file with its rows and sha256. A file it does not list is the
  leftover of an interrupted write, removed by the next writer; so a crash at any point leaves the
  previous state readable, and a rerun issues the same suffixes;
* ``lock``, held by the one writer (a second one is refused with :class:`EncodeLockedError`).

Nothing in the folder is trusted: the manifest's fields, every file's sha256, schema and row count,
and the uniqueness of ids and of full ids within each version are checked on open.

The prefix table of a version (:meth:`Registry.prefix_table`, :func:`write_prefix_table`,
:func:`load_prefix_table`) maps leaves to item rows: row ``i`` is the ``i``-th item issued under the
version (:meth:`Registry.frame` lists them in that order), a position that never changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vq_pipeline.compute.prefix_table import PrefixTable
from vq_pipeline.errors import EncodeLockedError, InvalidInputError, StateError
from vq_pipeline.io.fileio import (
    atomic_write_bytes,
    canonical_json,
    hold_lock,
    polars_path,
    read_json_object,
    remove_temporaries,
)
from vq_pipeline.io.prefix_file import read_prefix_file, write_prefix_file
from vq_pipeline.io.table_writer import file_sha256, write_parquet_atomic

FORMAT_NAME = "vq-pipeline.id-registry"
FORMAT_VERSION = "1.0"
MANIFEST_NAME = "registry.json"
LOCK_NAME = "lock"
#: Policies of a refit (wired by the scheduled run): keep the current id version, or publish a new one.
POLICIES = ("keep", "publish")
CODES_COLUMN, SUFFIX_COLUMN, VERSION_COLUMN = "codes", "suffix", "id_version"
_FILE = re.compile(r"(ids-v\d{6}-b\d{6}|map-v\d{6}-(items|prefixes))\.parquet")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID_TYPES = {
    str(t): t for t in (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64, pl.String)
}
_MAX_MANIFEST = 64 * 2**20
_MAX_LEVELS = 256


def _fix_folder(path: Path) -> str:
    return (
        f"Fix: restore {str(path)!r} from a backup of the registry (issued ids live there), or move the folder "
        f"away and adopt the output's current suffixes again."
    )


def _refuse(path: Path, text: str) -> StateError:
    return StateError(f"registry file {str(path)!r} {text}; expected the file the registry wrote. {_fix_folder(path)}")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest's JSON object (None when there is none); a symlink or another kind of file is refused."""
    return read_json_object(path, _refuse, _MAX_MANIFEST)


def _is_count(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _check_manifest(m: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose fields this module did not write."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _refuse(path, f"has {what}")

    need(m.get("format") == FORMAT_NAME, f"format={str(m.get('format'))[:80]!r}, not {FORMAT_NAME!r}")
    need(str(m.get("format_version", "")).split(".")[0] == "1", f"format_version={m.get('format_version')!r}")
    need(isinstance(m.get("id_column"), str) and m["id_column"] != "", "no id_column")
    need(m.get("id_dtype") in _ID_TYPES, f"id_dtype={str(m.get('id_dtype'))[:40]!r}")
    need(_is_count(m.get("levels"), 1) and m["levels"] <= _MAX_LEVELS, f"levels={m.get('levels')!r}")
    versions, batches, maps = m.get("versions"), m.get("batches"), m.get("maps")
    need(isinstance(versions, list) and isinstance(batches, list) and isinstance(maps, list), "no versions list")
    for i, v in enumerate(versions):
        need(
            isinstance(v, dict)
            and v.get("id_version") == i + 1
            and isinstance(v.get("codebook_fingerprint"), str)
            and _HEX64.fullmatch(v["codebook_fingerprint"]) is not None,
            f"versions[{i}]={str(v)[:120]}",
        )
    need(m.get("current_version") == len(versions) and len(versions) >= 1, "a current_version that is not the last")
    entries = [*batches, *(e[k] for e in maps if isinstance(e, dict) for k in ("items", "prefixes") if k in e)]
    for e in entries:
        need(
            isinstance(e, dict)
            and isinstance(e.get("file"), str)
            and _FILE.fullmatch(e["file"]) is not None
            and _is_count(e.get("rows"))
            and isinstance(e.get("sha256"), str)
            and _HEX64.fullmatch(e["sha256"]) is not None,
            f"a file entry {str(e)[:120]}",
        )
    for b in batches:
        need(_is_count(b.get("id_version"), 1) and b["id_version"] <= len(versions), f"batch {b['file']!r} version")
    for e in maps:
        need(isinstance(e, dict) and {"items", "prefixes"} <= set(e) and _is_count(e.get("id_version"), 2), "a map")


def _as_ids(ids: Any, name: str) -> pl.Series:
    s = ids if isinstance(ids, pl.Series) else pl.Series(name, np.asarray(ids) if not isinstance(ids, list) else ids)
    s = s.rename(name)
    if s.dtype == pl.Null and s.len() == 0:
        s = s.cast(pl.Int64)  # no ids at all: any key type would do
    if s.dtype not in _ID_TYPES.values():
        raise InvalidInputError(
            f"ids.dtype={s.dtype}; expected integer or string item keys. "
            f"Fix: pass the id column, e.g. ids.cast(pl.Int64)."
        )
    if s.null_count():
        raise InvalidInputError(
            f"ids holds {s.null_count()} nulls; expected a key on every item. Fix: drop the rows without ids."
        )
    if s.n_unique() < s.len():
        dup = s.filter(s.is_duplicated()).first()
        raise InvalidInputError(
            f"{name}={dup!r} occurs more than once ({s.len() - s.n_unique()} repeated rows); expected each item "
            f"once per call. Fix: deduplicate the rows by {name!r}."
        )
    return s


def _as_codes(codes: Any, n: int, levels: int | None) -> pl.Series:
    """``codes`` ((n, levels) integers >= 0; numpy, torch, lists, or a polars Array/List Series) as Array(UInt32)."""
    if isinstance(codes, pl.Series):
        if isinstance(codes.dtype, pl.List):
            codes = codes.list.to_array(int(codes.list.len().max() or 0)) if codes.len() else codes
        arr = codes.to_numpy() if codes.len() else np.zeros((0, levels or 1), dtype=np.int64)
    else:
        arr = np.asarray(codes.cpu() if hasattr(codes, "cpu") else codes)
    if arr.ndim == 1 and arr.size == n and arr.dtype != object:
        arr = arr[:, None]  # one level
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
        raise InvalidInputError(
            f"codes.shape={arr.shape}; expected ({n}, levels), one row of codes per id. "
            f"Fix: pass the codes the codebook returned for these ids, in the same order."
        )
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= 2**32)):
        raise InvalidInputError(
            f"codes (dtype={arr.dtype}) hold values outside the integers 0..2**32-1; expected codes. "
            f"Fix: pass the codes the codebook returned."
        )
    if levels is not None and arr.shape[1] != levels:
        raise InvalidInputError(
            f"codes.shape={arr.shape} has levels={arr.shape[1]}; the registry holds ids of levels={levels}. "
            f"Fix: encode with a codebook of {levels} levels, or use another registry folder."
        )
    if arr.shape[1] > _MAX_LEVELS:
        raise InvalidInputError(f"codes.shape={arr.shape}; expected at most {_MAX_LEVELS} levels. Fix: pass codes.")
    return pl.Series(CODES_COLUMN, arr.astype(np.uint32)).cast(pl.Array(pl.UInt32, arr.shape[1]))


def _check_fingerprint(value: Any) -> str:
    if not (isinstance(value, str) and _HEX64.fullmatch(value)):
        raise InvalidInputError(
            f"codebook_fingerprint={value!r}; expected the 64 hex digits of a codebook's fingerprint. "
            f"Fix: pass codebook.fingerprint of the codebook that encoded the codes."
        )
    return value


class Registry:
    """The id registry in one folder; see the module docstring. Use :meth:`open` (as a context manager
    when writing: the lock is held until :meth:`close`)."""

    def __init__(self, folder: Path, manifest: dict[str, Any] | None, rows: pl.DataFrame, id_column: str) -> None:
        self.folder = folder
        self.manifest = manifest
        self.id_column = id_column
        self._rows = rows  # every version's rows, in issue order
        self._lock: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, folder: str | os.PathLike[str], *, id_column: str = "id", write: bool = True) -> Registry:
        """Open (with ``write``: create, and lock) the registry in ``folder``.

        Raises:
            EncodeLockedError: another writer holds the registry.
            StateError: a manifest or file that the registry did not write (or that changed since).
            InvalidInputError: an ``id_column`` other than the registry's.
        """
        root = Path(folder)
        stack = contextlib.ExitStack()
        if write:
            root.mkdir(parents=True, exist_ok=True)

            def busy(holder: str) -> EncodeLockedError:
                return EncodeLockedError(
                    f"registry={str(root)!r} is being written by {holder}; expected one writer at a time. Fix: wait "
                    f"for that run to finish, or open the registry with write=False to read it."
                )

            stack.enter_context(hold_lock(root / LOCK_NAME, busy=busy))
        try:
            manifest = _read_manifest(root / MANIFEST_NAME)
            if manifest is not None:
                _check_manifest(manifest, root / MANIFEST_NAME)
                if manifest["id_column"] != id_column:
                    raise InvalidInputError(
                        f"id_column={id_column!r} but the registry in {str(root)!r} keys items by "
                        f"{manifest['id_column']!r}; expected the registry's id column. "
                        f"Fix: pass id_column={manifest['id_column']!r}."
                    )
            if write:
                listed = set() if manifest is None else {e["file"] for e in cls._files(manifest)}
                remove_temporaries(root)
                for entry in os.scandir(root):
                    if (
                        _FILE.fullmatch(entry.name)
                        and entry.name not in listed
                        and entry.is_file(follow_symlinks=False)
                    ):
                        os.unlink(entry.path)  # written by a run that stopped before its manifest
            rows = cls._read_rows(root, manifest, id_column)
        except BaseException:
            stack.close()
            raise
        registry = cls(root, manifest, rows, id_column)
        registry._lock = stack if write else None
        return registry

    @staticmethod
    def _files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
        return [*manifest["batches"], *(e[k] for e in manifest["maps"] for k in ("items", "prefixes"))]

    @classmethod
    def _read_rows(cls, root: Path, manifest: dict[str, Any] | None, id_column: str) -> pl.DataFrame:
        if manifest is None:
            return pl.DataFrame(
                schema={
                    id_column: pl.Int64,
                    CODES_COLUMN: pl.Array(pl.UInt32, 1),
                    SUFFIX_COLUMN: pl.UInt32,
                    VERSION_COLUMN: pl.UInt32,
                }
            )
        schema = {
            id_column: _ID_TYPES[manifest["id_dtype"]],
            CODES_COLUMN: pl.Array(pl.UInt32, manifest["levels"]),
            SUFFIX_COLUMN: pl.UInt32,
            VERSION_COLUMN: pl.UInt32,
        }
        for entry in cls._files(manifest):
            path = root / entry["file"]
            if not path.is_file() or path.is_symlink():
                raise _refuse(path, "is missing (or not a regular file) but the manifest lists it")
            if file_sha256(path) != entry["sha256"]:
                raise _refuse(path, "does not hash to the sha256 the manifest records")
        frames = []
        for entry in manifest["batches"]:
            path = root / entry["file"]
            try:
                frame = pl.read_parquet(polars_path(path))
            except (Exception, pl.exceptions.PanicException) as exc:  # noqa: BLE001 - polars raises many kinds
                raise _refuse(path, f"cannot be read as parquet ({type(exc).__name__})") from None
            version = frame[VERSION_COLUMN] if VERSION_COLUMN in frame.columns else None
            if (
                dict(frame.schema) != schema
                or frame.height != entry["rows"]
                or sum(frame.null_count().row(0))
                or (frame.height and (version.min() != entry["id_version"] or version.max() != entry["id_version"]))
            ):
                raise _refuse(path, f"does not hold {entry['rows']} rows of {schema} issued by its id version")
            frames.append(frame)
        rows = pl.concat(frames) if frames else pl.DataFrame(schema=schema)
        per_version = rows.group_by(VERSION_COLUMN).agg(
            pl.len().alias("n"),
            pl.col(id_column).n_unique().alias("ids"),
            pl.struct(CODES_COLUMN, SUFFIX_COLUMN).n_unique().alias("full_ids"),
        )
        bad = per_version.filter((pl.col("ids") < pl.col("n")) | (pl.col("full_ids") < pl.col("n")))
        if bad.height:
            raise _refuse(
                root / MANIFEST_NAME, f"lists id version {bad[VERSION_COLUMN][0]} with a repeated id or full id"
            )
        return rows

    def close(self) -> None:
        """Release the lock (a registry opened for reading holds none)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    @property
    def current_version(self) -> int | None:
        """The id version new items are issued under (None before the first issue or adopt)."""
        return None if self.manifest is None else int(self.manifest["current_version"])

    @property
    def levels(self) -> int | None:
        return None if self.manifest is None else int(self.manifest["levels"])

    def fingerprint(self, version: int | None = None) -> str:
        """The fingerprint of the codebook that issued ``version`` (default: the current one)."""
        return self._version_entry(version)["codebook_fingerprint"]

    def version_of(self, codebook_fingerprint: str) -> int | None:
        """The latest id version issued by the codebook ``codebook_fingerprint``, or None."""
        versions = (self.manifest or {}).get("versions", [])
        found = [v["id_version"] for v in versions if v["codebook_fingerprint"] == codebook_fingerprint]
        return found[-1] if found else None

    def _version_entry(self, version: int | None) -> dict[str, Any]:
        current = self.current_version
        if current is None:
            raise StateError(
                f"registry={str(self.folder)!r} holds no id version yet; expected one. Fix: issue ids (Registry.issue) "
                f"or adopt the output's suffixes (Registry.adopt) first."
            )
        v = current if version is None else version
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= current:
            raise InvalidInputError(
                f"version={version!r}; expected an id version in 1..{current}. Fix: pass one the registry issued."
            )
        return self.manifest["versions"][v - 1]  # type: ignore[index]

    def frame(self, version: int | None = None) -> pl.DataFrame:
        """The items of ``version`` (default: current) in issue order: the id column, ``codes``, ``suffix``,
        ``id_version``. Row ``i`` is item row ``i`` of the version's prefix table."""
        v = self._version_entry(version)["id_version"]
        return self._rows.filter(pl.col(VERSION_COLUMN) == v)

    def lookup(self, ids: Any, version: int | None = None) -> pl.DataFrame:
        """The full ids of ``ids`` under ``version`` (default: current), one row per id in the order
        given; ``codes``, ``suffix`` and ``id_version`` are null for an item not issued under it."""
        s = self._ids(ids)
        if self.manifest is None:
            found = self._rows.cast({self.id_column: s.dtype})  # empty: nothing issued yet
        else:
            found = self.frame(version)
        return s.to_frame().join(found, on=self.id_column, how="left", maintain_order="left")

    def _ids(self, ids: Any) -> pl.Series:
        s = _as_ids(ids, self.id_column)
        if self.manifest is None:
            return s
        stored = _ID_TYPES[self.manifest["id_dtype"]]
        if (s.dtype == pl.String) != (stored == pl.String):
            raise InvalidInputError(
                f"ids.dtype={s.dtype} but the registry keys items by {stored} ids; expected one kind of key. "
                f"Fix: cast the ids to {stored}."
            )
        try:
            return s.cast(stored, strict=True)
        except pl.exceptions.InvalidOperationError:
            raise InvalidInputError(
                f"ids hold values that {stored} cannot hold; expected keys of the registry's type {stored}. "
                f"Fix: use another registry folder for these items."
            ) from None

    # ------------------------------------------------------------------ writing

    def _need_writer(self) -> None:
        if self._lock is None:
            raise StateError(
                f"registry={str(self.folder)!r} was opened for reading; expected a writer. "
                f"Fix: open it with Registry.open(folder) (write=True), which takes its lock."
            )

    def _new_manifest(self, ids: pl.Series, levels: int) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "id_column": self.id_column,
            "id_dtype": str(ids.dtype),
            "levels": levels,
            "current_version": 0,
            "versions": [],
            "batches": [],
            "maps": [],
        }

    def _write(self, name: str, frame: pl.DataFrame) -> dict[str, Any]:
        sha = write_parquet_atomic(frame.rechunk(), self.folder / name)
        return {"file": name, "rows": frame.height, "sha256": sha}

    def _commit(self, manifest: dict[str, Any], rows: pl.DataFrame | None) -> None:
        """Write the manifest (last: it makes the new files part of the registry) and adopt it in memory."""
        atomic_write_bytes(self.folder / MANIFEST_NAME, canonical_json(manifest))
        self.manifest = manifest
        if rows is not None:
            self._rows = rows if self._rows.height == 0 else pl.concat([self._rows, rows])

    def _batch_frame(self, ids: pl.Series, codes: pl.Series, suffix: pl.Series, version: int) -> pl.DataFrame:
        return pl.DataFrame([ids, codes, suffix.cast(pl.UInt32).rename(SUFFIX_COLUMN)]).with_columns(
            pl.lit(version, dtype=pl.UInt32).alias(VERSION_COLUMN)
        )

    def _append_batch(self, manifest: dict[str, Any], batch: pl.DataFrame, version: int) -> None:
        name = f"ids-v{version:06d}-b{len(manifest['batches']) + 1:06d}.parquet"
        manifest["batches"].append({**self._write(name, batch), "id_version": version})

    def issue(self, ids: Any, codes: Any, codebook_fingerprint: str) -> np.ndarray:
        """Full ids for ``ids``: the suffix each already has, and the next free suffix of its tuple for a new one.

        Args:
            ids: (n,) unique item keys (polars Series, numpy array or list; integers or strings).
            codes: (n, levels) non-negative integer codes of the items, in the order of ``ids``.
            codebook_fingerprint: the codebook that encoded ``codes``; it must have issued the current
                id version (the first call opens version 1 with it).

        Returns:
            (n,) uint32 suffixes in the order of ``ids``.

        Raises:
            StateError: a codebook other than the current version's (keep its codebook, or publish a
                new version with :meth:`new_version`); a registry opened for reading.
            InvalidInputError: repeated or null ids, bad codes, or an issued item with other codes.
        """
        self._need_writer()
        fingerprint = _check_fingerprint(codebook_fingerprint)
        s = self._ids(ids)
        c = _as_codes(codes, s.len(), self.levels)
        manifest = json.loads(json.dumps(self.manifest)) if self.manifest else self._new_manifest(s, c.dtype.size)
        if manifest["versions"] and fingerprint != manifest["versions"][-1]["codebook_fingerprint"]:
            v = manifest["current_version"]
            raise StateError(
                f"codebook_fingerprint={fingerprint[:16]}... did not issue the current id version {v} of registry="
                f"{str(self.folder)!r} (issued by {manifest['versions'][-1]['codebook_fingerprint'][:16]}...); "
                f"expected new items to be encoded with the codebook of the current version. Fix: encode with that "
                f"codebook (policy 'keep'), or publish a new id version with Registry.new_version (policy 'publish')."
            )
        if not manifest["versions"]:
            manifest["versions"].append({"id_version": 1, "codebook_fingerprint": fingerprint, "origin": "issue"})
            manifest["current_version"] = 1
        version = manifest["current_version"]
        if self.manifest is None:  # the first batch fixes the id type and the levels
            self._rows = self._batch_frame(s.clear(), c.clear(), pl.Series(SUFFIX_COLUMN, [], pl.UInt32), 1)
        current = self._rows.filter(pl.col(VERSION_COLUMN) == version)
        given = pl.DataFrame([s, c]).with_row_index("__row")
        joined = given.join(
            current.select(self.id_column, pl.col(CODES_COLUMN).alias("__old"), SUFFIX_COLUMN),
            on=self.id_column,
            how="left",
            maintain_order="left",
        )
        known = joined.filter(pl.col(SUFFIX_COLUMN).is_not_null())
        changed = known.filter(pl.col(CODES_COLUMN) != pl.col("__old"))
        if changed.height:
            row = changed.row(0, named=True)
            raise InvalidInputError(
                f"{self.id_column}={row[self.id_column]!r} was issued codes={list(row['__old'])} "
                f"suffix={row[SUFFIX_COLUMN]} under id version {version}, now codes={list(row[CODES_COLUMN])} "
                f"({changed.height} items differ); expected an issued item's codes never to change under one id "
                f"version. Fix: encode these items with the codebook of id version {version}, or publish a new id "
                f"version (Registry.new_version)."
            )
        new = joined.filter(pl.col(SUFFIX_COLUMN).is_null()).sort(self.id_column)
        if new.height:
            top = current.group_by(CODES_COLUMN).agg((pl.col(SUFFIX_COLUMN).max().cast(pl.Int64) + 1).alias("__next"))
            rank = pl.col(self.id_column).rank("ordinal").over(CODES_COLUMN).cast(pl.Int64) - 1
            new = new.join(top, on=CODES_COLUMN, how="left", maintain_order="left").with_columns(
                (pl.col("__next").fill_null(0) + rank).alias("__suffix")
            )
            if new["__suffix"].max() >= 2**32:
                raise InvalidInputError(
                    "suffix would reach 2**32 for one tuple of codes; expected fewer items per tuple. "
                    "Fix: encode with more levels or more codes per level."
                )
            batch = self._batch_frame(new[self.id_column], new[CODES_COLUMN], new["__suffix"], version)
            self._append_batch(manifest, batch, version)
            self._commit(manifest, batch)
            joined = joined.join(
                new.select("__row", "__suffix"), on="__row", how="left", maintain_order="left"
            ).with_columns(pl.coalesce(SUFFIX_COLUMN, "__suffix").alias(SUFFIX_COLUMN))
        elif self.manifest is None:
            self._commit(manifest, None)
        return joined[SUFFIX_COLUMN].cast(pl.UInt32).to_numpy()

    def adopt(self, table: pl.DataFrame | pl.LazyFrame, codebook_fingerprint: str) -> int:
        """Take the suffixes an output already has as id version 1 (a first run with the registry on).

        Args:
            table: the id column, ``codes`` (Array or List of integers) and ``suffix`` of every row of the
                output (e.g. ``pl.scan_parquet(out_dir)``); full ids must be unique.
            codebook_fingerprint: the codebook that encoded them.

        Returns:
            The items adopted.

        Raises:
            StateError: the registry already holds an id version.
            InvalidInputError: missing columns, repeated or null ids or suffixes, repeated full ids.
        """
        self._need_writer()
        fingerprint = _check_fingerprint(codebook_fingerprint)
        if self.manifest is not None:
            raise StateError(
                f"registry={str(self.folder)!r} already holds id version {self.current_version}; expected an empty "
                f"registry to adopt suffixes into. Fix: issue new items with Registry.issue instead."
            )
        frame = table.collect() if isinstance(table, pl.LazyFrame) else table
        missing = [c for c in (self.id_column, CODES_COLUMN, SUFFIX_COLUMN) if c not in frame.columns]
        if missing:
            raise InvalidInputError(
                f"table lacks columns {missing} (columns: {frame.columns}); expected {self.id_column!r}, 'codes' and "
                f"'suffix'. Fix: pass the output's code tables, encoded with unique suffixes."
            )
        s = _as_ids(frame[self.id_column], self.id_column)
        suffix = frame[SUFFIX_COLUMN]
        if suffix.null_count() or not suffix.dtype.is_integer() or (suffix.len() and suffix.min() < 0):
            raise InvalidInputError(
                f"suffix holds nulls or values that are not integers >= 0 (dtype={suffix.dtype}); expected every "
                f"row's suffix. Fix: finish the encode run (its last step fills the suffixes), then adopt."
            )
        c = _as_codes(frame[CODES_COLUMN], s.len(), None)
        batch = self._batch_frame(s, c, suffix, 1).sort(self.id_column)
        if batch.select(pl.struct(CODES_COLUMN, SUFFIX_COLUMN).n_unique()).item() < batch.height:
            raise InvalidInputError(
                "table holds a full id (codes, suffix) on more than one row; expected unique full ids. "
                "Fix: encode with unique suffixes (vq encode --unique) before adopting."
            )
        manifest = self._new_manifest(s, c.dtype.size)
        manifest["versions"].append({"id_version": 1, "codebook_fingerprint": fingerprint, "origin": "adopt"})
        manifest["current_version"] = 1
        self._append_batch(manifest, batch, 1)
        self._commit(manifest, batch)
        return batch.height

    def new_version(self, ids: Any, codes: Any, codebook_fingerprint: str) -> dict[str, Any]:
        """Publish a new id version: every item re-encoded by a refitted codebook gets a new full id.

        Suffixes of the new version follow issue order: the items of the current version in the order
        they were issued, then new items by id. Writes the new version's ids, the old->new table per item
        (``map-v<new>-items.parquet``: id, ``old_codes``, ``old_suffix``, ``new_codes``, ``new_suffix``)
        and per prefix (``map-v<new>-prefixes.parquet``: ``level`` (prefix length 1..levels), ``old_prefix``,
        ``new_prefix`` (List(UInt32)), ``n_items``: how many items moved from one to the other). Earlier
        versions stay readable (:meth:`frame`, :meth:`lookup` with ``version=``).

        Args:
            ids, codes: every item of the current version (and any new ones), with its codes under the new codebook.
            codebook_fingerprint: the new codebook.

        Returns:
            ``{"id_version", "previous", "n_items", "n_new", "n_moved" (items whose full id changed),
            "items_map", "prefixes_map" (paths)}``.

        Raises:
            StateError: no current version, or ``codebook_fingerprint`` issued it already.
            InvalidInputError: an item of the current version missing from ``ids``; bad ids or codes.
        """
        self._need_writer()
        fingerprint = _check_fingerprint(codebook_fingerprint)
        previous = self._version_entry(None)["id_version"]
        if fingerprint == self.fingerprint(previous):
            raise StateError(
                f"codebook_fingerprint={fingerprint[:16]}... already issued the current id version {previous}; "
                f"expected a refitted codebook. Fix: issue new items with Registry.issue (policy 'keep')."
            )
        s = self._ids(ids)
        c = _as_codes(codes, s.len(), None)
        given = pl.DataFrame([s, c])
        old = self.frame(previous).select(self.id_column, CODES_COLUMN, SUFFIX_COLUMN).with_row_index("__order")
        missing = old.join(given, on=self.id_column, how="anti")
        if missing.height:
            raise InvalidInputError(
                f"{self.id_column}={missing[self.id_column][0]!r} ({missing.height} items) of id version {previous} "
                f"is missing from ids; expected every issued item with its codes under the new codebook. Fix: encode "
                f"every item of the registry (Registry.frame()) with the new codebook."
            )
        if c.dtype.size != self.levels:
            raise InvalidInputError(
                f"codes have levels={c.dtype.size}; the registry holds ids of levels={self.levels}. "
                f"Fix: publish codes of {self.levels} levels, or use another registry folder."
            )
        n_old = old.height
        ordered = given.join(old.select(self.id_column, "__order"), on=self.id_column, how="left").with_columns(
            pl.col("__order").fill_null(n_old).cast(pl.Int64)
        )
        ordered = ordered.sort("__order", self.id_column)
        ordered = ordered.with_columns((pl.int_range(pl.len()).over(CODES_COLUMN)).cast(pl.UInt32).alias(SUFFIX_COLUMN))
        version = previous + 1
        manifest = json.loads(json.dumps(self.manifest))
        batch = self._batch_frame(ordered[self.id_column], ordered[CODES_COLUMN], ordered[SUFFIX_COLUMN], version)
        items = old.join(
            batch.select(
                self.id_column, pl.col(CODES_COLUMN).alias("new_codes"), pl.col(SUFFIX_COLUMN).alias("new_suffix")
            ),
            on=self.id_column,
            how="left",
            maintain_order="left",
        ).select(
            self.id_column,
            pl.col(CODES_COLUMN).alias("old_codes"),
            pl.col(SUFFIX_COLUMN).alias("old_suffix"),
            "new_codes",
            "new_suffix",
        )
        levels = self.levels or 1
        prefixes = pl.concat(
            [
                items.group_by(
                    pl.col("old_codes").arr.to_list().list.head(level).alias("old_prefix"),
                    pl.col("new_codes").arr.to_list().list.head(level).alias("new_prefix"),
                )
                .agg(pl.len().cast(pl.UInt64).alias("n_items"))
                .select(pl.lit(level, dtype=pl.UInt32).alias("level"), "old_prefix", "new_prefix", "n_items")
                for level in range(1, levels + 1)
            ]
        ).sort("level", "old_prefix", "new_prefix")
        self._append_batch(manifest, batch, version)
        manifest["maps"].append(
            {
                "id_version": version,
                "items": self._write(f"map-v{version:06d}-items.parquet", items),
                "prefixes": self._write(f"map-v{version:06d}-prefixes.parquet", prefixes),
            }
        )
        manifest["versions"].append({"id_version": version, "codebook_fingerprint": fingerprint, "origin": "publish"})
        manifest["current_version"] = version
        self._commit(manifest, batch)
        moved = items.filter(
            (pl.col("old_codes") != pl.col("new_codes")) | (pl.col("old_suffix") != pl.col("new_suffix"))
        )
        return {
            "id_version": version,
            "previous": previous,
            "n_items": batch.height,
            "n_new": batch.height - n_old,
            "n_moved": moved.height,
            "items_map": str(self.folder / manifest["maps"][-1]["items"]["file"]),
            "prefixes_map": str(self.folder / manifest["maps"][-1]["prefixes"]["file"]),
        }

    def version_map(self, version: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The old->new tables (per item, per prefix) that published ``version`` (see :meth:`new_version`)."""
        self._version_entry(version)
        entry = next((e for e in (self.manifest or {}).get("maps", []) if e["id_version"] == version), None)
        if entry is None:
            raise InvalidInputError(
                f"version={version!r} was not published by Registry.new_version (it has no old->new table); "
                f"expected a version >= 2 that was. Fix: pass a published version."
            )
        return tuple(pl.read_parquet(polars_path(self.folder / entry[k]["file"])) for k in ("items", "prefixes"))  # type: ignore[return-value]

    # ------------------------------------------------------------------ prefix tables

    def prefix_table(self, *, n_codes: int, version: int | None = None) -> PrefixTable:
        """The prefix table of ``version``'s full ids (default: current); item row ``i`` is row ``i`` of
        :meth:`frame` (the ``i``-th item issued under the version).

        Args:
            n_codes: the codes per level of the codebook that issued the version.
        """
        frame = self.frame(version)
        codes = frame[CODES_COLUMN].to_numpy().reshape(frame.height, self.levels or 1)
        return PrefixTable.build(codes, frame[SUFFIX_COLUMN].to_numpy(), n_codes=n_codes)

    def write_prefix_table(self, path: str | os.PathLike[str], *, n_codes: int, version: int | None = None) -> Path:
        """Build the prefix table of ``version`` (default: current) and write it to ``path``, fingerprinted
        to the version's codebook and number."""
        entry = self._version_entry(version)
        table = self.prefix_table(n_codes=n_codes, version=entry["id_version"])
        return write_prefix_table(
            path, table, codebook_fingerprint=entry["codebook_fingerprint"], id_version=entry["id_version"]
        )


def write_prefix_table(
    path: str | os.PathLike[str], table: PrefixTable, *, codebook_fingerprint: str, id_version: int
) -> Path:
    """Write ``table`` to ``path`` atomically as a prefix-table file (:mod:`vq_pipeline.io.prefix_file`)."""
    return write_prefix_file(path, table.to_arrays(), codebook_fingerprint=codebook_fingerprint, id_version=id_version)


def load_prefix_table(
    path: str | os.PathLike[str], *, codebook_fingerprint: str | None = None, id_version: int | None = None
) -> PrefixTable:
    """Read and check a prefix-table file; with ``codebook_fingerprint`` / ``id_version``, refuse one built
    for another codebook or version (:func:`vq_pipeline.io.prefix_file.read_prefix_file`)."""
    arrays, _ = read_prefix_file(path, codebook_fingerprint=codebook_fingerprint, id_version=id_version)
    return PrefixTable.from_arrays(arrays)


__all__ = ["FORMAT_NAME", "MANIFEST_NAME", "POLICIES", "Registry", "load_prefix_table", "write_prefix_table"]
