"""vq-pipeline: K-means codebooks and nearest-code encoding for embedding tables.

    from vq_pipeline import fit_codebook, Codebook
    codebook = fit_codebook(x, 256, metric="cosine")
    codes = codebook.encode(new_x)

The public names are imported on first use (:pep:`562`): ``import vq_pipeline`` alone does not
load torch, so that ``vq --help``, ``vq --version`` and other light commands start at once.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while they wait turn every small torch op into a stall when the CPU is
# shared (a scheduler's workers, a busy node): measured 15-140x slower Lloyd iterations and k-means++
# under load with spinning, against passive waits (benchmarks/RESULTS.md). It must be set before torch
# loads its OpenMP runtime, so it is set here, unless the user chose a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import errors as _errors  # light: the exception tree imports nothing

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "Codebook": "codebook",
    **{name: "errors" for name in _errors.__all__},
    "InitProgress": "kmeans",
    "IterationStats": "kmeans",
    "fit_codebook": "kmeans",
    "EncodeSettings": "settings",
    "FitSettings": "settings",
    "MiniBatchState": "minibatch",
    "fit_minibatch": "minibatch",
    "collision_stats": "semantic_ids",
    "collision_stats_table": "semantic_ids",
    "suffix_table": "semantic_ids",
    "unique_suffix": "semantic_ids",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from .codebook import Codebook
    from .errors import (
        CodebookFileError,
        ConfigurationError,
        DaskAddressError,
        DimensionMismatchError,
        EncodeFailedError,
        EncodeLockedError,
        EngineUnavailableError,
        InvalidInputError,
        NonFiniteError,
        OutputLockedError,
        PipelineStateError,
        StateError,
        TooFewPointsError,
        UnsupportedFormatError,
        VQError,
    )
    from .kmeans import InitProgress, IterationStats, fit_codebook
    from .minibatch import MiniBatchState, fit_minibatch
    from .semantic_ids import collision_stats, collision_stats_table, suffix_table, unique_suffix
    from .settings import EncodeSettings, FitSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "Codebook",
    "CodebookFileError",
    "ConfigurationError",
    "DaskAddressError",
    "DimensionMismatchError",
    "EncodeFailedError",
    "EncodeLockedError",
    "EncodeSettings",
    "EngineUnavailableError",
    "FitSettings",
    "InitProgress",
    "InvalidInputError",
    "IterationStats",
    "MiniBatchState",
    "NonFiniteError",
    "OutputLockedError",
    "PipelineStateError",
    "StateError",
    "TooFewPointsError",
    "UnsupportedFormatError",
    "VQError",
    "collision_stats",
    "collision_stats_table",
    "fit_codebook",
    "fit_minibatch",
    "suffix_table",
    "unique_suffix",
]
