"""Atomic file writes and lock files: a file is either absent (or its old version) or complete, never
partial, and a lock file is never a way to reach another file.

Every file the package writes (codebooks, code tables, receipts, manifests, checkpoints, reports)
goes through :func:`atomic_write`: a temporary file in the same folder, fsynced, renamed into
place, then the folder fsynced so that the rename itself survives a crash. The file gets the mode
a plain ``open(path, "w")`` would give under the current umask (``mkstemp`` alone would make it
private, 0600, unreadable by the other users, containers and jobs that share the outputs).

Temporary files are named ``.vq-<16 hex>.tmp`` (:data:`TEMPORARY_PATTERN`), whatever the final
name: a final name as long as the filesystem allows still gets a temporary name that fits, and
cleaning up after a crash (:func:`remove_temporaries`) deletes only files of that exact pattern,
never another program's ``*.tmp``. The first 8 hex digits are a tag of the final name
(:func:`temporary_tag`), so the leftovers of the writes to one file can be told apart; the last 8 are
random. A temporary file is created with ``O_EXCL | O_NOFOLLOW`` and written through the descriptor
that created it, so a file or symlink planted under its name is never opened, let alone written.

Every lock the package takes (an output file's, an encode folder's, a work_dir's) is one
:func:`hold_lock`: an exclusive ``flock`` on a lock file that is opened without following a
symlink and that is written, and removed, only when it is a lock file of this package.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from vq_pipeline.errors import StateError

#: Every temporary file or link the package creates is named so: ``.vq-`` + 16 hex digits + ``.tmp``.
TEMPORARY_PATTERN = re.compile(r"\.vq-[0-9a-f]{16}\.tmp")
_TEMPORARY_PREFIX, _TEMPORARY_SUFFIX = ".vq-", ".tmp"
#: What a lock file holds while a run holds it (empty between runs): ``pid 123 on host``.
LOCK_NOTE = re.compile(r"pid \d+ on [^\n]*")
#: A lock file larger than this was not written by this package.
_MAX_LOCK_FILE = 4096
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


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


def temporary_tag(name: str) -> str:
    """The 8 hex digits that start the temporary names of writes to a file called ``name``."""
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def temporary_name(path: str | os.PathLike[str]) -> str:
    """A fresh temporary name for a write to ``path``: ``.vq-<tag of its name><8 random hex>.tmp``
    (24 bytes, whatever the length of ``path``'s name)."""
    return f"{_TEMPORARY_PREFIX}{temporary_tag(Path(path).name)}{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is a temporary name this package gives (:data:`TEMPORARY_PATTERN`)."""
    return TEMPORARY_PATTERN.fullmatch(name) is not None


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create a new temporary file next to ``path``, exclusively and without following symlinks;
    return its open descriptor and its path. Its mode is what ``open()`` gives (0o666 minus the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / temporary_name(path)
        try:
            return os.open(tmp, _CREATE_FLAGS, 0o666), tmp
        except FileExistsError:
            continue  # a name taken (by a leftover, or by chance): draw another
    raise FileExistsError(errno.EEXIST, "no free temporary name after 100 tries", str(path.parent))


def temporary_path(path: Path) -> str:
    """A fresh, empty temporary file next to ``path`` (``.vq-<16 hex>.tmp``), with the mode ``open()`` would give."""
    fd, tmp = _create_temporary(Path(path))
    os.close(fd)
    return str(tmp)


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    before_replace: Callable[[Path], object] | None = None,
) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then make it ``path`` atomically.

    ``before_replace(temporary)``: called once the temporary file is complete and synced, before it
    becomes ``path`` (to record what is about to be written: a receipt written first)."""
    path = Path(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_symlink(target: str, link: str | os.PathLike[str]) -> Path:
    """Make ``link`` a symlink to ``target``, replacing what is there atomically (a new link under a
    temporary name in the same folder, then ``os.replace``): a reader sees the old link or the new one."""
    link = Path(link)
    for _ in range(100):
        tmp = link.parent / temporary_name(link)
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name after 100 tries", str(link.parent))
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(link.parent)
    return link


def remove_temporaries(
    folder: str | os.PathLike[str], *, target: str | os.PathLike[str] | None = None, links: bool = False
) -> list[Path]:
    """Delete the temporary files that interrupted writes left directly in ``folder`` (not below it);
    return what was deleted.

    Only names of :data:`TEMPORARY_PATTERN` are candidates, and of those only regular files (or, with
    ``links``, symlinks: deleting a link never touches its target); with ``target``, only the
    leftovers of writes to that file. Call only when no write into ``folder`` is in flight (under the
    lock of the folder's owner).
    """
    tag = None if target is None else temporary_tag(Path(target).name)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if not is_temporary_name(entry.name) or (tag is not None and entry.name[4:12] != tag):
            continue
        try:
            mode = os.lstat(entry.path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode) or (links and stat.S_ISLNK(mode)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def resolves_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path``, every symlink followed, is ``folder`` (also resolved) or lies below it."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


#: Descriptors held open for :func:`polars_path`, by path: (descriptor, (device, inode)).
_HELD_FOR_POLARS: dict[str, tuple[int, tuple[int, int]]] = {}


def polars_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string that polars can open (it takes paths as UTF-8 text).

    A file name is bytes on disk; one that is not UTF-8 reaches Python as text with surrogate escapes,
    which polars cannot take. Such a local file is opened once and handed to polars as
    ``/proc/self/fd/N``, the same file under a name polars can read (Linux); the descriptor is held for
    the process and opened again when the name comes to mean another file (a replaced output).
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    now = os.stat(text)
    held = _HELD_FOR_POLARS.get(text)
    if held is not None and held[1] != (now.st_dev, now.st_ino):
        os.close(held[0])
        held = None
    if held is None:
        fd = os.open(text, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        info = os.fstat(fd)
        held = _HELD_FOR_POLARS[text] = (fd, (info.st_dev, info.st_ino))
    proc = f"/proc/self/fd/{held[0]}"
    if not os.path.exists(proc):
        raise OSError(
            errno.ENOENT, "the file name is not UTF-8 and this system has no /proc/self/fd to reach it by", text
        )
    return proc


def canonical_json(value: object) -> bytes:
    """The bytes of every JSON file the package writes (receipts, manifests, pointers, summaries):
    sorted keys, one-space indents, a final newline, so equal values give equal files. Values JSON
    cannot hold (a datetime, a path) are written as ``str(value)``."""
    return (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode()


def read_json_object(
    path: str | os.PathLike[str], error: Callable[[Path, str], Exception], max_bytes: int
) -> dict | None:
    """The JSON object in the small state file ``path`` (a pointer, a manifest), None when there is none.

    Never follows a symlink; ``error(path, problem)`` builds the exception that refuses a symlink, a
    folder, anything that is not a regular file of at most ``max_bytes``, invalid JSON, or JSON that is
    not an object."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(p, f"is a symlink (never followed) to {os.readlink(p)!r}") from None
        if e.errno == errno.EISDIR:
            raise error(p, "is a folder") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise error(p, f"is not a regular file of at most {max_bytes} bytes")
        data = f.read()
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise error(p, f"is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(p, f"holds a JSON {type(value).__name__}, not an object")
    return value


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make renames and new entries in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_lock(path: Path) -> int:
    """Open (or create) the lock file ``path`` read-write without following a symlink; refuse anything
    but a regular file with one link (a hard link would make it another file's name)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fix = "Fix: move it away (vq never follows or writes into a file it did not create); the next run creates the lock."
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateError(
                f"lock={str(path)!r} is a symlink (to {os.readlink(path)!r}); expected the lock file that "
                f"vq-pipeline creates, a regular file. {fix}"
            ) from None
        if e.errno == errno.EISDIR:
            raise StateError(f"lock={str(path)!r} is a folder; expected the lock file of vq-pipeline. {fix}") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(info.st_mode) else f"has {info.st_nlink} hard links"
        raise StateError(f"lock={str(path)!r} {what}; expected the lock file of vq-pipeline. {fix}")
    return fd


def _lock_note(fd: int) -> str:
    """What the lock file open at ``fd`` holds (at most one byte more than a lock file of this package may)."""
    return os.pread(fd, _MAX_LOCK_FILE + 1, 0).decode(errors="replace").strip()


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (a finishing run may have removed it meanwhile)."""
    held = os.fstat(fd)
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def hold_lock(
    path: str | os.PathLike[str], *, busy: Callable[[str], BaseException], remove: bool = False
) -> Iterator[None]:
    """Hold the exclusive lock file ``path`` for a run, or raise ``busy(holder)`` at once if another run
    holds it (``holder``: the note of the run that holds it, ``pid N on HOST``, or ``unknown``).

    The one lock of the package, with these guarantees:

    - the file is opened without following a symlink, and refused unless it is a regular file with
      one link (:func:`open_lock`), so a symlink, hard link or FIFO planted under its name never
      leads to another file;
    - it is written, and removed, only when it is a lock file of this package: empty, or holding a
      holder note (:data:`LOCK_NOTE`); anything else is refused with a :class:`StateError` and left
      as it is;
    - while held, it holds the note ``pid N on HOST``, which ``busy`` quotes; it is emptied on release,
      and with ``remove`` deleted (while still locked), so that nothing is left behind;
    - a run that locked the file checks that ``path`` still names the file it locked, and starts
      over if a finishing run removed it in between, so removing it is safe.

    Not the ``filelock`` package: its 3.x ``UnixFileLock`` opens the lock with ``O_TRUNC`` (and
    before ``O_NOFOLLOW`` was added followed a symlink), so a hard link planted under the lock's name
    empties another file, and 4.3 refuses a symlink but still locks a hard-linked file or a FIFO and
    records no holder.
    """
    path = Path(path)
    while True:
        fd = open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_note(fd) or "unknown"
            os.close(fd)
            raise busy(holder) from None
        except BaseException:
            os.close(fd)
            raise
        if _still_named(fd, path):
            break
        os.close(fd)  # removed (and maybe recreated) by the run that just finished: lock the new one
    try:
        found = _lock_note(fd)
        if os.fstat(fd).st_size > _MAX_LOCK_FILE or (found and not LOCK_NOTE.fullmatch(found)):
            raise StateError(
                f"lock={str(path)!r} holds {found[:80]!r}; expected the lock file of vq-pipeline (empty, or "
                f"'pid N on HOST'). Fix: move it away (vq never writes into a file it did not create); the next "
                f"run creates the lock."
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # while still locked: no other run holds this file
    finally:
        os.close(fd)


__all__ = [
    "LOCK_NOTE",
    "TEMPORARY_PATTERN",
    "atomic_symlink",
    "atomic_write",
    "atomic_write_bytes",
    "canonical_json",
    "current_umask",
    "fsync_folder",
    "hold_lock",
    "is_temporary_name",
    "open_lock",
    "read_json_object",
    "remove_temporaries",
    "resolves_inside",
    "temporary_name",
    "temporary_path",
    "temporary_tag",
]
