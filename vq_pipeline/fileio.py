"""Atomic file writes: a file is either absent (or its old version) or complete, never partial.

Every file the package writes (codebooks, code tables, receipts, manifests, checkpoints, reports)
goes through :func:`atomic_write`: a temporary file in the same folder, fsynced, renamed into
place, then the folder fsynced so that the rename itself survives a crash. The file gets the mode
a plain ``open(path, "w")`` would give under the current umask (``mkstemp`` alone would make it
private, 0600, unreadable by the other users, containers and jobs that share the outputs).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere os.umask can only be read by setting it, and set back at once. (No module-level lock:
    # served flows pickle this module by value, and a lock cannot be pickled.)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_path(path: Path) -> str:
    """A fresh temporary file next to ``path`` (``.NAME.XXXX.tmp``), with the mode ``open()`` would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then make it ``path`` atomically."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def canonical_json(value: object) -> bytes:
    """The bytes of every JSON file the package writes (receipts, manifests, pointers, summaries):
    sorted keys, one-space indents, a final newline, so equal values give equal files. Values JSON
    cannot hold (a datetime, a path) are written as ``str(value)``."""
    return (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode()


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make renames and new entries in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = ["atomic_write", "atomic_write_bytes", "canonical_json", "current_umask", "fsync_folder", "temporary_path"]
