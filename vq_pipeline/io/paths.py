"""Where outputs may go: the one check, shared by the library, the CLI and the flows, that an output
never touches an input or a file that vq did not write, and the locks that give one writer per output.

Every path is resolved first, following symlinks (``os.path.realpath``), so that ``data``,
``./data/`` and a symlink to it are one and the same folder (an empty ``--out ""`` is refused).

The rule (:func:`check_output_folder`, :func:`check_output_file`):

- An output **folder** (the codes of ``vq encode``, its ``<out>.vq`` bookkeeping, a pipeline's
  ``work_dir``) must neither be, contain, nor lie inside an input folder (or a glob's root), and must
  not contain an input file.
- An output **file** (a codebook, a fit checkpoint) must not be an input file, nor lie inside an
  input folder. An existing file is replaced only when it is one vq wrote (a codebook's header names
  its format; a checkpoint is recognized by its content), and its folder must be a folder, or one
  that can be created (no part of the path is a regular file).
- A file name longer than the filesystem allows is refused before any work.

Remote inputs and outputs (``s3://`` …) are not checked: their stores have no symlinks and no folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vq_pipeline.errors import EncodeLockedError, InvalidInputError, OutputLockedError, StateError
from vq_pipeline.io.fileio import hold_lock
from vq_pipeline.settings import TABLE_SUFFIXES

_WILDCARDS = "*?["


def is_local(path: str | os.PathLike[str]) -> bool:
    """False for URIs (``s3://…``, ``gs://…``, ``file://…`` included): their paths are not checked here."""
    return "://" not in str(path)


def resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute with every symlink followed (parts that do not exist yet are kept)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path) or ".")))


@dataclass(frozen=True)
class InputPlace:
    """A place inputs are read from: a folder (searched below, so nothing may be written inside it)
    or a single file. ``given`` is the path as the user wrote it, for messages."""

    path: Path
    is_folder: bool
    given: str


def input_places(inputs: Sequence[str | os.PathLike[str]]) -> list[InputPlace]:
    """The resolved folders and files the local ``inputs`` read from.

    A path that exists is taken literally. A missing path with wildcards is a glob: its place is the
    folder before the first wildcard. A missing path is skipped (reading it reports it).
    """
    places = []
    for raw in inputs:
        given = os.fspath(raw)
        if not is_local(given):
            continue
        if os.path.isdir(given):
            places.append(InputPlace(resolved(given), True, given))
        elif os.path.exists(given):
            places.append(InputPlace(resolved(given), False, given))
        elif any(ch in given for ch in _WILDCARDS):
            first = min(i for i, ch in enumerate(given) if ch in _WILDCARDS)
            root = given[:first].rpartition(os.sep)[0] or ("/" if given.startswith("/") else ".")
            places.append(InputPlace(resolved(root), True, given))
    return places


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_folder(name: str, out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> Path:
    """Refuse an output folder ``out`` (the argument ``name``) that is, contains or lies inside an
    input folder, or that contains an input file; return it resolved.

    Raises:
        InvalidInputError: names the input, the problem and a folder that would do.
    """
    raw = os.fspath(out)
    if raw.strip() == "":
        raise InvalidInputError(
            f"{name}={raw!r} is empty; expected an output folder. (An unset shell variable gives an empty "
            f"argument, which would mean the current folder.) Fix: pass the folder explicitly, such as {name} codes."
        )
    if not is_local(raw):
        return Path(raw)
    folder = resolved(raw)
    check_name_length(name, folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InvalidInputError(
            f"{name}={raw!r} is a file; expected a folder for the outputs (created if missing). "
            f"Fix: pass a folder such as {name} {folder.parent / 'codes'}."
        )
    _check_parents_are_folders(name, raw, folder)
    for place in input_places(inputs):
        if place.is_folder and folder == place.path:
            problem = f"is the input folder {place.given!r}: the outputs would be written among (and over) the inputs"
        elif place.is_folder and _inside(folder, place.path):
            problem = f"is inside the input folder {place.given!r}: the next run would read the outputs as inputs"
        elif not place.is_folder and folder == place.path.parent:
            problem = f"is the folder of the input {place.given!r}: its codes would replace it"
        elif _inside(place.path, folder):
            what = "input folder" if place.is_folder else "input"
            problem = f"contains the {what} {place.given!r}: outputs and inputs would mix"
        else:
            continue
        base = place.path if place.is_folder else place.path.parent
        fixed = base.parent / f"{base.name}-codes"
        if _inside(fixed, folder):
            fixed = folder.parent / f"{folder.name}-codes"
        raise InvalidInputError(
            f"{name}={raw!r} {problem}; expected an output folder outside every input folder. "
            f"Fix: pass a {name} outside {str(base)!r}, such as {name} {fixed}."
        )
    return folder


def check_output_folder_against_tables(
    name: str, out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], tables: Sequence[str]
) -> None:
    """Refuse an output folder inside a folder that the search of ``inputs`` reached: the folder of
    any discovered table ``tables`` that was not named on its own (a folder search follows symlinked
    folders, which may lead anywhere, so :func:`check_output_folder` cannot see them all)."""
    if not is_local(out):
        return
    folder = resolved(out)
    named = {resolved(raw) for raw in inputs if is_local(raw) and os.path.isfile(raw)}
    for table in tables:
        if not is_local(table) or resolved(table) in named:
            continue
        searched = resolved(table).parent
        if _inside(folder, searched):
            raise InvalidInputError(
                f"{name}={os.fspath(out)!r} lies in {str(searched)!r}, a folder the inputs reach (it holds the input "
                f"{table!r}, found through a symlinked folder); expected an output folder outside every input "
                f"folder, or the next run would read the outputs as inputs. Fix: pass a {name} outside it, such as "
                f"{name} {searched.parent / (searched.name + '-codes')}."
            )


def check_output_file(
    name: str,
    path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    ours: Callable[[Path], bool],
    what: str,
    suffix: str,
) -> Path:
    """Refuse an output file ``path`` (the argument ``name``) that is an input, lies inside an input
    folder, cannot be created, or exists and is not ours (``ours(path)`` is False); return it resolved.

    ``what`` names the kind of file for messages ("codebook", "fit checkpoint"), ``suffix`` its usual
    ending, used in the suggested fix.
    """
    raw = os.fspath(path)
    if not is_local(raw):
        return Path(raw)
    target = resolved(raw)
    check_name_length(name, target)
    for place in input_places(inputs):
        if target == place.path or (place.is_folder and os.path.isfile(target) and target.suffix in TABLE_SUFFIXES):
            problem = f"is the input table {str(target)!r}: writing it would destroy the input"
        elif place.is_folder and _inside(target, place.path):
            problem = f"lies inside the input folder {place.given!r}, where outputs would mix with the inputs"
        else:
            continue
        base = place.path if place.is_folder else place.path.parent
        fixed = base.parent / target.with_suffix(suffix).name
        raise InvalidInputError(
            f"{name}={raw!r} {problem}; expected a new {what} file outside every input. "
            f"Fix: pass {name} {fixed} (or another path outside the inputs)."
        )
    _check_parents_are_folders(name, raw, target.parent)
    if os.path.lexists(raw) and not os.path.isfile(raw):
        raise InvalidInputError(
            f"{name}={raw!r} exists and is not a regular file; expected a path for the {what} file. "
            f"Fix: pass a new file name."
        )
    if os.path.isfile(raw) and not ours(target):
        raise InvalidInputError(
            f"{name}={raw!r} is an existing file that is not a {what} written by vq; expected a new file or one "
            f"vq wrote, so that nothing else is overwritten. Fix: pass another path, or move the file away."
        )
    return target


def _check_parents_are_folders(name: str, raw: str, folder: Path) -> None:
    """Refuse a path whose folder (or one above it) exists as something other than a folder."""
    for p in (folder, *folder.parents):
        if os.path.exists(p):
            if not os.path.isdir(p):
                raise InvalidInputError(
                    f"{name}={raw!r} lies under {str(p)!r}, which is a file, not a folder; expected a path whose "
                    f"folders exist or can be created. Fix: choose a path in a folder."
                )
            return


def check_name_length(name: str, path: Path) -> None:
    """Refuse a file name longer than the filesystem of its (nearest existing) folder allows."""
    existing = next((p for p in (path.parent, *path.parent.parents) if os.path.isdir(p)), Path("/"))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > limit:
        raise InvalidInputError(
            f"{name}={str(path)!r} has a name of {longest} bytes; expected at most {limit} bytes per name on this "
            f"filesystem. Fix: choose a shorter name."
        )


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The hidden lock file beside the output file ``path``: ``.vq-<16 hex digits of its name>.lock``, a
    fixed length, so that any name that fits the filesystem has a lock that fits too."""
    p = Path(path)
    return p.with_name(f".vq-{hashlib.sha256(os.fsencode(p.name)).hexdigest()[:16]}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str], *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the output file ``path`` for a whole run, or fail at once if another
    run holds it.

    The lock is the hidden file :func:`lock_path` beside ``path`` (:func:`vq_pipeline.io.fileio.hold_lock`:
    never followed, written only when it is a lock file of vq), removed when the run ends, so a finished
    fit leaves nothing but its output.
    """
    given = Path(path)
    lock = lock_path(resolved(given.parent) / given.name)  # one lock whichever name the folder is reached by
    lock.parent.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> OutputLockedError:
        return OutputLockedError(
            f"{what} {str(path)!r} is being written by another run ({holder}); expected one run per output at a "
            f"time. Fix: wait for it to finish, or write to another path."
        )

    with hold_lock(lock, busy=busy, remove=True):
        yield


def refuse_symlinked_folder(folder: str | os.PathLike[str]) -> None:
    """Refuse a symlink where vq keeps a folder of its own (a lock's, an output folder's bookkeeping):
    it is never followed."""
    if os.path.islink(folder):
        raise StateError(
            f"folder={str(folder)!r} is a symlink (to {os.readlink(folder)!r}); expected the folder vq-pipeline "
            f"creates for its lock and bookkeeping (never followed). Fix: remove the symlink; the next run "
            f"creates the folder."
        )


@contextlib.contextmanager
def folder_lock(lock_file: str | os.PathLike[str], *, folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock ``lock_file`` for ``folder`` (an encode output folder, a work_dir), or
    fail at once if another run holds it.

    The lock file stays between runs, empty; while a run holds it, it notes the run (pid and host),
    which the error message of a second run quotes (:func:`vq_pipeline.io.fileio.hold_lock`: never
    followed, written only when it is a lock file of vq). The folder of the lock is created, unless
    it is a symlink, which is refused.
    """
    path = Path(lock_file)
    refuse_symlinked_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> EncodeLockedError:
        return EncodeLockedError(
            f"folder={str(folder)!r} is locked by another run ({holder}); expected one run per "
            f"folder at a time. Fix: wait for it to finish, or write to another folder."
        )

    with hold_lock(path, busy=busy):
        yield


__all__ = [
    "InputPlace",
    "check_name_length",
    "check_output_file",
    "check_output_folder",
    "check_output_folder_against_tables",
    "folder_lock",
    "input_places",
    "is_local",
    "lock_path",
    "output_lock",
    "refuse_symlinked_folder",
    "resolved",
]
