"""Compute engines: the one seam between the algorithms and the kernels that run them.

An engine answers one question, for a chunk of rows: which ``k`` centroids are nearest, and at what
squared L2 distance. K-means (E step, k-means++), encoding and top-k search all go through
:meth:`Engine.nearest`. Neither engine ever builds the full (n_rows, n_codes) matrix for the whole
input: the caller hands them bounded chunks (see :mod:`vq_pipeline.compute.assign`), and KeOps does not
build it even for a chunk.

``auto`` picks by device and shape, following the measurements in the docs' Engines page (rule in
:func:`auto_engine_name`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from vq_pipeline.errors import EngineUnavailableError
from vq_pipeline.settings import ENGINES
from vq_pipeline.validate import check_choice


class Engine(Protocol):
    """Nearest-centroid search over one chunk of rows."""

    name: str

    def nearest(
        self, x: torch.Tensor, c: torch.Tensor, k: int, *, distances: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Find the ``k`` nearest centroids of every row.

        Args:
            x: (n, dim) float32, contiguous, on the compute device; finite.
            c: (m, dim) float32, contiguous, same device; ``1 <= k <= m``. Engines may cache terms
                derived from ``c`` between calls with the same, unmodified tensor.
            k: how many neighbours per row.
            distances: False when the caller needs only the indices; with ``k == 1`` an engine may
                then skip computing distances and return ``None`` for them. The indices are the same.

        Returns:
            ``(sqdist, idx)``: (n, k) float32 squared L2 distances, ascending along each row,
            computed in the direct ``sum((x - c)**2)`` form (or ``None``, see ``distances``); and
            (n, k) int64 centroid indices. Both on the compute device.
        """
        ...

    def sqdist(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances of every row to each of a *few* centroids (k-means++ candidates).

        Args:
            x: (n, dim) float32 on the compute device. c: (m, dim) float32, same device, m small.

        Returns:
            (n, m) float32, >= 0. Precise enough to sample by (the torch engine uses its centred
            GEMM form here, with no direct recomputation).
        """
        ...

    def bytes_per_row(self, n_codes: int, dim: int, k: int) -> int:
        """Peak temporary bytes one row of a chunk costs in :meth:`nearest`."""
        ...

    def preferred_chunk_rows(self, n_codes: int, dim: int) -> int:
        """The engine's fastest chunk size, used when the memory budget allows more."""
        ...


def auto_engine_name(device: torch.device, dim: int) -> str:
    """The engine ``auto`` resolves to on ``device`` for embeddings of width ``dim``.

    CPU: torch. KeOps, even with native flags, was faster only at the smallest widths and slower at
    embedding widths; where it wins, the time KeOps spends compiling each new width would need
    hundreds of iterations to pay back; torch needs no compiler and no cache (figures in the docs'
    Engines page, "KeOps on the CPU"). ``engine='keops'`` remains one argument away.
    CUDA: KeOps, the reference engine, when it is installed; torch otherwise. Not yet measured
    on a GPU by this project.
    """
    if device.type == "cuda":
        from vq_pipeline.compute.engines import keops

        return "keops" if keops.available() else "torch"
    return "torch"


def get_engine(name: str, device: torch.device, dim: int) -> Engine:
    """Return the engine called ``name`` ('auto', 'keops' or 'torch') for ``device`` and ``dim``.

    Raises:
        InvalidInputError: unknown name.
        EngineUnavailableError: 'keops' was asked for but pykeops cannot run here.
    """
    check_choice("engine", name, ENGINES)
    if name == "auto":
        name = auto_engine_name(device, dim)
    if name == "torch":
        from vq_pipeline.compute.engines.torch import TorchEngine

        return TorchEngine(device)
    from vq_pipeline.compute.engines import keops

    if not keops.available():
        raise EngineUnavailableError(
            f"engine='keops' cannot run here: {keops.unavailable_reason()}. "
            f"Fix: install pykeops and a C++ compiler (g++), or pass engine='torch'."
        )
    return keops.KeOpsEngine()
