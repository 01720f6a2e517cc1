"""vq-pipeline: K-means codebooks and nearest-code encoding for embedding tables.

    from vq_pipeline import fit_codebook, Codebook
    codebook = fit_codebook(x, 256, metric="cosine")
    codes = codebook.encode(new_x)
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait turn every small torch op into a stall when the CPU is
# shared (a scheduler's workers, a busy node): measured 15-140x slower Lloyd iterations and k-means++
# under load with spinning, against passive waits (benchmarks/RESULTS.md). It must be set before torch
# loads its OpenMP runtime, so it is set here, unless the user chose a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .codebook import Codebook  # noqa: E402
from .errors import (  # noqa: E402
    CodebookFileError,
    DimensionMismatchError,
    EngineUnavailableError,
    InvalidInputError,
    NonFiniteError,
    TooFewPointsError,
    UnsupportedFormatError,
    VQError,
)
from .kmeans import IterationStats, fit_codebook  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "CodebookFileError",
    "DimensionMismatchError",
    "EngineUnavailableError",
    "InvalidInputError",
    "IterationStats",
    "NonFiniteError",
    "TooFewPointsError",
    "UnsupportedFormatError",
    "VQError",
    "fit_codebook",
]
