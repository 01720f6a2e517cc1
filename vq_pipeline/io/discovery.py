"""Find embedding tables: expand files, globs and folders, local or remote, into sorted :class:`Source` files.

* Sources: parquet and Arrow IPC files (``.parquet``, ``.arrow``, ``.ipc``, ``.feather``), given as
  files, globs, folders (searched recursively, through symlinked folders; hive-partitioned
  ``key=value/`` folders included), on local disk or object storage (``s3://``, ``gs://``, ``az://``
  with polars' ``storage_options``; polars lists remote prefixes and globs).
* A source's key, its path under the folder it was found in, names its output, so partitions keep
  their layout. :mod:`vq_pipeline.io.tables` reads the sources.
"""

from __future__ import annotations

import fnmatch
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.settings import TABLE_SUFFIXES

_REMOTE_PREFIXES = (
    "s3://",
    "s3a://",
    "gs://",
    "gcs://",
    "az://",
    "abfs://",
    "abfss://",
    "http://",
    "https://",
    "hf://",
)
_WILDCARDS = "*?["


@dataclass(frozen=True)
class Source:
    """One input table file.

    Attributes:
        uri: local path or object-storage URI of the file.
        key: its path relative to the root it was found under (``date=2026-11-01/part-0.parquet``);
            names its output, so partitions keep their layout.
    """

    uri: str
    key: str

    @property
    def is_remote(self) -> bool:
        return self.uri.startswith(_REMOTE_PREFIXES)

    @property
    def format(self) -> str:
        return "parquet" if self.uri.endswith(".parquet") else "ipc"


def _is_remote(path: str) -> bool:
    return str(path).startswith(_REMOTE_PREFIXES)


def _has_wildcard(path: str) -> bool:
    return any(ch in path for ch in _WILDCARDS)


def discover(paths: Sequence[str | os.PathLike[str]], *, storage_options: dict[str, Any] | None = None) -> list[Source]:
    """Expand files, globs and folders into a sorted list of table files.

    A path that exists is taken literally (a file named ``emb[1].parquet`` is that file); only a
    path that does not exist and contains a wildcard (``*``, ``?`` or ``[``) is expanded as a glob,
    where ``**`` spans folders. Folders are searched recursively, following symbolic links to
    folders; each folder is read once, so a link cycle ends and a folder reached twice is read
    under its path in the tree when it has one. Names starting with ``.`` or ``_`` are skipped
    inside folders and globs. A file's key, which names its output, is its path under the folder
    (or the glob's folder part) as given, symlinked folders included.

    Raises:
        InvalidInputError: no paths, a path that does not exist, a folder or glob with no table
            files, a folder that cannot be listed, or two files that would write the same output name.
    """
    if not paths:
        raise InvalidInputError("paths=[] is empty; expected at least one table file, glob or folder.")
    sources: list[Source] = []
    for raw in paths:
        path = str(raw)
        if _is_remote(path):
            sources.extend(_discover_remote(path, storage_options))
            continue
        named = Path(path)
        if named.is_dir():
            root, files = named, _walk(named)
        elif named.is_file():
            root, files = named.parent, [named]
        elif named.exists():
            raise InvalidInputError(
                f"path={path!r} is neither a file nor a folder; expected a table file, a glob or a folder. "
                f"Fix: point at the table files."
            )
        elif _has_wildcard(path):
            parts = named.parts
            first = next(i for i, part in enumerate(parts) if _has_wildcard(part))
            root = Path(*parts[:first]) if first else Path(".")
            files = _glob(root, parts[first:])
        else:
            raise InvalidInputError(
                f"path={path!r} does not exist; expected a table file, a glob or a folder. Fix: check the path."
            )
        # A file named on its own is read whatever its name; inside folders and globs, hidden names are skipped.
        files = sorted(
            p for p in files if p.suffix in TABLE_SUFFIXES and (p is named or not _hidden(p.relative_to(root)))
        )
        if not files:
            raise InvalidInputError(
                f"path={path!r} holds no table files; expected files ending in {', '.join(TABLE_SUFFIXES)}. "
                f"Fix: point at the folder or files that hold the embeddings."
            )
        sources.extend(Source(str(p), p.relative_to(root).as_posix()) for p in files)
    seen: dict[str, str] = {}
    for s in sources:
        if s.key in seen and seen[s.key] != s.uri:
            raise InvalidInputError(
                f"{s.uri!r} and {seen[s.key]!r} would both write output {s.key!r}; expected distinct names. "
                f"Fix: encode them in separate runs, or give their common parent folder instead."
            )
        seen[s.key] = s.uri
    return sorted({s.uri: s for s in sources}.values(), key=lambda s: s.key)


def _hidden(rel: Path) -> bool:
    return any(part.startswith((".", "_")) for part in rel.parts)


def _folder_id(folder: Path) -> tuple[int, int] | None:
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise InvalidInputError(
            f"folder {str(folder)!r} cannot be listed ({exc.strerror}); expected a readable folder. "
            f"Fix: make it readable, or leave it out of the inputs."
        ) from None


def _tree(root: Path) -> list[tuple[Path, list[Path]]]:
    """Every folder under ``root`` (itself first) with the files in it, following symlinked folders
    and skipping hidden names.

    The folders of the tree itself are read first, then the folders that links lead to (in sorted
    order), each once by (st_dev, st_ino): a link cycle ends, and a folder both in the tree and
    linked to is read under its own path.
    """
    out: list[tuple[Path, list[Path]]] = []
    seen: set[tuple[int, int]] = set()
    folders, links = [root], deque[Path]()
    while folders or links:
        folder = folders.pop() if folders else links.popleft()
        ident = _folder_id(folder)
        if ident is None or ident in seen:
            continue
        seen.add(ident)
        files, subfolders = [], []
        for entry in _entries(folder):
            if entry.name.startswith((".", "_")):
                continue
            if entry.is_dir():
                (links if entry.is_symlink() else subfolders).append(Path(entry.path))
            elif entry.is_file():
                files.append(Path(entry.path))
        out.append((folder, files))
        folders.extend(reversed(subfolders))
    return out


def _walk(root: Path) -> list[Path]:
    """Every file under ``root`` (see :func:`_tree`)."""
    return [f for _, files in _tree(root) for f in files]


def _glob(root: Path, pattern: Sequence[str]) -> list[Path]:
    """Files under ``root`` matching ``pattern`` (path components; ``**`` spans the folders of
    :func:`_tree`, so symlinked folders too, each once)."""
    files: list[Path] = []

    def match(folder: Path, rest: Sequence[str]) -> None:
        head = rest[0]
        if head == "**":
            for sub, in_sub in _tree(folder):
                if len(rest) > 1:
                    match(sub, rest[1:])
                else:
                    files.extend(in_sub)
            return
        if _has_wildcard(head):
            names = [e.name for e in _entries(folder) if fnmatch.fnmatchcase(e.name, head)]
            names = [n for n in names if head.startswith(".") or not n.startswith(".")]
        else:
            names = [head]
        for name in names:
            path = folder / name
            if len(rest) > 1:
                if path.is_dir():
                    match(path, rest[1:])
            elif path.is_file():
                files.append(path)

    if root.is_dir():
        match(root, pattern)
    return files


def _discover_remote(path: str, storage_options: dict[str, Any] | None) -> list[Source]:
    if path.endswith(TABLE_SUFFIXES) and not _has_wildcard(path):
        return [Source(path, path.rsplit("/", 1)[-1])]
    pattern = path if _has_wildcard(path) else path.rstrip("/") + "/**/*.parquet"
    root = pattern.split("*")[0].rsplit("/", 1)[0]
    try:
        files = (
            pl.scan_parquet(
                pattern, storage_options=storage_options, hive_partitioning=False, include_file_paths="__file"
            )
            .select("__file")
            .unique()
            .collect()["__file"]
            .to_list()
        )
    except (Exception, pl.exceptions.PanicException) as exc:
        raise InvalidInputError(
            f"path={path!r} cannot be listed ({type(exc).__name__}: {first_line(exc)}); expected a prefix or glob "
            f"of parquet files. Fix: check the URI and the storage options (credentials, region)."
        ) from None
    if not files:
        raise InvalidInputError(f"path={path!r} holds no parquet files. Fix: check the prefix or glob.")
    return [Source(f, f[len(root) + 1 :] if f.startswith(root + "/") else f.rsplit("/", 1)[-1]) for f in sorted(files)]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (200 characters at most), to quote in an error message."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


__all__ = ["Source", "discover"]
