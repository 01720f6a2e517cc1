"""vq-pipeline: K-means codebooks and nearest-code encoding for embedding tables.

    from vq_pipeline import fit_codebook, Codebook
    codebook = fit_codebook(x, 256, metric="cosine")
    codes = codebook.encode(new_x)
"""

from __future__ import annotations

from .codebook import Codebook
from .errors import (
    CodebookFileError,
    DimensionMismatchError,
    EngineUnavailableError,
    InvalidInputError,
    NonFiniteError,
    TooFewPointsError,
    UnsupportedFormatError,
    VQError,
)
from .kmeans import IterationStats, fit_codebook

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
