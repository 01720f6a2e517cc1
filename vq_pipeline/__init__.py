"""vq-pipeline: K-means codebooks and nearest-code encoding for embedding tables.

    from vq_pipeline import fit_codebook, Codebook
    codebook = fit_codebook(x, 256, metric="cosine")
    codes = codebook.encode(new_x)

The public names are imported on first use (:pep:`562`): ``import vq_pipeline`` alone does not
load torch, so that ``vq --help``, ``vq --version`` and other light commands start at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vq_pipeline import errors as _errors  # light: the exception tree imports nothing (nor torch)

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "Codebook": "codebook",
    **{name: "errors" for name in _errors.__all__},
    "InitProgress": "compute.seeding",
    "IterationStats": "compute.lloyd",
    "fit_codebook": "fitting.kmeans",
    "EncodeOptions": "settings",
    "EncodeSettings": "settings",
    "FitSettings": "settings",
    "PipelineSettings": "settings",
    "TableSettings": "settings",
    "encode_tables": "jobs.encode_folder",
    "fit_from_tables": "jobs.fit_tables",
    "run_once": "jobs.scheduled",
    "MiniBatchState": "fitting.minibatch",
    "fit_minibatch": "fitting.minibatch",
    "collision_stats": "compute.semantic_ids",
    "collision_stats_table": "jobs.semantic_ids",
    "suffix_table": "jobs.semantic_ids",
    "unique_suffix": "compute.semantic_ids",
    "hamming": "compute.codecs",
    "hamming_topk": "compute.codecs",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from vq_pipeline.codebook import Codebook
    from vq_pipeline.compute.codecs import hamming, hamming_topk
    from vq_pipeline.compute.lloyd import IterationStats
    from vq_pipeline.compute.seeding import InitProgress
    from vq_pipeline.compute.semantic_ids import collision_stats, unique_suffix
    from vq_pipeline.errors import (
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
    from vq_pipeline.fitting.kmeans import fit_codebook
    from vq_pipeline.fitting.minibatch import MiniBatchState, fit_minibatch
    from vq_pipeline.jobs.semantic_ids import collision_stats_table, suffix_table
    from vq_pipeline.jobs.encode_folder import encode_tables
    from vq_pipeline.jobs.fit_tables import fit_from_tables
    from vq_pipeline.jobs.scheduled import run_once
    from vq_pipeline.settings import EncodeOptions, EncodeSettings, FitSettings, PipelineSettings, TableSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module != "errors":
        # Before the first heavy module loads torch (and its OpenMP runtime): the OpenMP wait policy.
        from vq_pipeline.runtime import apply_omp_waits

        apply_omp_waits()
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
    "EncodeOptions",
    "EncodeSettings",
    "EngineUnavailableError",
    "FitSettings",
    "InitProgress",
    "InvalidInputError",
    "IterationStats",
    "MiniBatchState",
    "NonFiniteError",
    "OutputLockedError",
    "PipelineSettings",
    "PipelineStateError",
    "StateError",
    "TableSettings",
    "TooFewPointsError",
    "UnsupportedFormatError",
    "VQError",
    "collision_stats",
    "collision_stats_table",
    "encode_tables",
    "fit_codebook",
    "fit_from_tables",
    "fit_minibatch",
    "hamming",
    "hamming_topk",
    "run_once",
    "suffix_table",
    "unique_suffix",
]
