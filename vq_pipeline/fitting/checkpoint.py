"""The fit checkpoint: a fit's progress in one file, so that a killed fit resumes where it stopped.

The file is a ``torch.save`` of plain values (read back with ``weights_only=True``, which never
runs code), written atomically after seeding and after every centroid update.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.lloyd import FitProgress, IterationStats, LloydResult, LloydState
from vq_pipeline.fitting.options import FitOptions
from vq_pipeline.io.fileio import atomic_write, remove_temporaries
from vq_pipeline.io.paths import check_output_file, output_lock

log = logging.getLogger(__name__)

FORMAT_NAME = "vq-pipeline.fit-checkpoint"
_KEYS = {"key", "restart", "inertias", "best", "lloyd"}


class FitCheckpoint:
    """A fit's progress in one file, so that a killed fit resumes instead of starting over.

    Saved atomically after every centroid update (a temporary file, fsync, rename) with
    ``torch.save``; read back with ``torch.load(weights_only=True)``, which never runs code. A
    checkpoint of another fit (other data or settings) is ignored, not resumed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @staticmethod
    def _key(data_fingerprint: str, opts: FitOptions) -> str:
        h = hashlib.sha256(f"{data_fingerprint}|{json.dumps(opts.settings(opts.engine), sort_keys=True)}".encode())
        if isinstance(opts.init, torch.Tensor):
            h.update(opts.init.cpu().numpy().tobytes())
        return h.hexdigest()

    @staticmethod
    def _read(path: Path) -> dict | None:
        """The checkpoint's contents, or None for a file that is no checkpoint (or a damaged one).

        ``torch.save`` writes a zip archive: any other file is refused from its first 4 bytes, before
        ``torch.load`` (``weights_only=True``, which never runs code) reads it.
        """
        try:
            with open(path, "rb") as f:
                if f.read(4) != b"PK\x03\x04":
                    return None
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs the work it saved
            log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
            return None
        if not isinstance(state, dict) or not _KEYS <= set(state) or state.get("format", FORMAT_NAME) != FORMAT_NAME:
            return None
        return state

    @classmethod
    def is_checkpoint(cls, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a fit checkpoint (which a fit may replace), not some other file."""
        return cls._read(Path(path)) is not None

    @classmethod
    def for_inputs(
        cls, path: str | os.PathLike[str] | None, inputs: Sequence[str | os.PathLike[str]]
    ) -> FitCheckpoint | None:
        """The checkpoint at ``path`` (None for None) of a fit of ``inputs``, refused up front when it
        is an input, lies inside an input folder, or is an existing file that is no checkpoint
        (see :func:`vq_pipeline.io.paths.check_output_file`)."""
        if path is None:
            return None
        check_output_file("checkpoint", path, inputs, ours=cls.is_checkpoint, what="fit checkpoint", suffix=".ckpt")
        return cls(path)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the checkpoint for one fit: a second fit with the same checkpoint fails at once."""
        return output_lock(self.path, what="fit checkpoint")

    def load(self, data_fingerprint: str, opts: FitOptions) -> FitProgress | None:
        """The progress saved by this very fit (same data fingerprint and settings), else None."""
        if not self.path.is_file():
            return None
        state = self._read(self.path)
        if state is None:
            return None
        if state["key"] != self._key(data_fingerprint, opts):
            log.warning("ignoring checkpoint %s: it belongs to another fit", self.path)
            return None
        return self._progress(state)

    @staticmethod
    def _progress(state: dict) -> FitProgress:
        best = state["best"]
        if best is not None:
            best = LloydResult(**{**best, "history": [IterationStats(**h) for h in best["history"]]})
        lloyd = None if state["lloyd"] is None else LloydState.from_dict(state["lloyd"])
        return FitProgress(state["restart"], tuple(state["inertias"]), best, lloyd)

    def save(
        self,
        data_fingerprint: str,
        opts: FitOptions,
        *,
        restart: int,
        inertias: Sequence[float],
        best: LloydResult | None,
        lloyd: LloydState | None,
    ) -> None:
        state = self._state(data_fingerprint, opts, restart=restart, inertias=inertias, best=best, lloyd=lloyd)
        atomic_write(self.path, lambda f: torch.save(state, f))

    @classmethod
    def _state(
        cls,
        data_fingerprint: str,
        opts: FitOptions,
        *,
        restart: int,
        inertias: Sequence[float],
        best: LloydResult | None,
        lloyd: LloydState | None,
    ) -> dict:
        return {
            "format": FORMAT_NAME,
            "key": cls._key(data_fingerprint, opts),
            "restart": restart,
            "inertias": list(inertias),
            "best": None if best is None else {**asdict(best), "history": [asdict(h) for h in best.history]},
            "lloyd": None if lloyd is None else lloyd.to_dict(),
        }

    def clear(self) -> None:
        """Remove the checkpoint, and temporary files of saves that a crash interrupted."""
        self.path.unlink(missing_ok=True)
        remove_temporaries(self.path.parent, target=self.path)


class LevelCheckpoints:
    """The checkpoint of a multi-level fit, in the one checkpoint file: the finished levels (as
    codebook bytes) and the progress of each running level, rewritten after every update of any
    level. A file of another multi-level fit (``key``: its data and settings) is ignored."""

    def __init__(self, checkpoint: FitCheckpoint, key: str) -> None:
        self.checkpoint, self.key = checkpoint, key
        state = FitCheckpoint._read(checkpoint.path) if checkpoint.path.is_file() else None
        if state is not None and state.get("levels_key") == key:
            self.done = {int(k): bytes(v.numpy().tobytes()) for k, v in state["done"].items()}
            self.running = {int(k): v for k, v in state["running"].items()}
        else:
            if state is not None:
                log.warning("ignoring checkpoint %s: it belongs to another fit", checkpoint.path)
            self.done, self.running = {}, {}

    def finished(self, level: int) -> Codebook | None:
        """Level ``level`` as fitted before a stop, or None."""
        if level not in self.done:
            return None
        return Codebook.from_bytes(self.done[level], source=f"{self.checkpoint.path} (level {level})")

    def finish(self, level: int, codebook: Codebook) -> None:
        self.done[level] = codebook.to_bytes()
        self.running.pop(level, None)
        self._write()

    def view(self, level: int) -> _LevelCheckpoint:
        """What :func:`vq_pipeline.fitting.flat.fit_steps` of level ``level`` saves to and resumes from."""
        return _LevelCheckpoint(self, level)

    def clear(self) -> None:
        self.checkpoint.clear()

    def _write(self) -> None:
        state = {
            "format": FORMAT_NAME,
            "key": "",
            "restart": 0,
            "inertias": [],
            "best": None,
            "lloyd": None,
            "levels_key": self.key,
            "done": {str(k): torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in self.done.items()},
            "running": {str(k): v for k, v in self.running.items()},
        }
        atomic_write(self.checkpoint.path, lambda f: torch.save(state, f))


class _LevelCheckpoint:
    """One level's part of a :class:`LevelCheckpoints`, with the methods a flat fit calls."""

    def __init__(self, store: LevelCheckpoints, level: int) -> None:
        self.store, self.level, self.path = store, level, store.checkpoint.path

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the multi-level fit holds the file's lock

    def load(self, data_fingerprint: str, opts: FitOptions) -> FitProgress | None:
        state = self.store.running.get(self.level)
        if state is None or state["key"] != FitCheckpoint._key(data_fingerprint, opts):
            return None
        return FitCheckpoint._progress(state)

    def save(self, data_fingerprint: str, opts: FitOptions, **progress: Any) -> None:
        self.store.running[self.level] = FitCheckpoint._state(data_fingerprint, opts, **progress)
        self.store._write()

    def clear(self) -> None:
        self.store.running.pop(self.level, None)


__all__ = ["FitCheckpoint", "LevelCheckpoints"]
