"""The fit checkpoint: a fit's progress in one file, so that a killed fit resumes where it stopped.

The file is a ``torch.save`` of plain values (read back with ``weights_only=True``, which never
runs code), written atomically after seeding and after every centroid update.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .fileio import atomic_write
from .fit_options import FitOptions
from .kmeans import FitProgress, IterationStats, LloydResult, LloydState

log = logging.getLogger(__name__)


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

    def load(self, data_fingerprint: str, opts: FitOptions) -> FitProgress | None:
        """The progress saved by this very fit (same data fingerprint and settings), else None."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs the work it saved
            log.warning("ignoring unreadable checkpoint %s (%s)", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("key") != self._key(data_fingerprint, opts):
            log.warning("ignoring checkpoint %s: it belongs to another fit", self.path)
            return None
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
        state = {
            "key": self._key(data_fingerprint, opts),
            "restart": restart,
            "inertias": list(inertias),
            "best": None if best is None else {**asdict(best), "history": [asdict(h) for h in best.history]},
            "lloyd": None if lloyd is None else lloyd.to_dict(),
        }
        atomic_write(self.path, lambda f: torch.save(state, f))

    def clear(self) -> None:
        """Remove the checkpoint, and temporary files of saves that a crash interrupted."""
        self.path.unlink(missing_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


__all__ = ["FitCheckpoint"]
