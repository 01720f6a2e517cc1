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

from . import errors as _errors  # light: the exception tree imports nothing (nor torch)

#: Spins an idle OpenMP thread of torch's runtime (GNU libgomp) makes before it sleeps, on a CPU that
#: nothing else is using (see :func:`_omp_wait_settings`).
_OMP_SPIN_COUNT = 100_000
#: CPU pressure (``/proc/pressure/cpu``, "some" over the last 10 s, in percent) from which the CPU counts
#: as shared.
_CONTENDED_PRESSURE = 10.0


def _omp_wait_settings(environ: Any, pressure: float | None, running: int | None, cpus: int) -> dict[str, str]:
    """The OpenMP wait settings to add to ``environ`` before torch loads its OpenMP runtime.

    Idle OpenMP threads either spin or sleep, and neither is right everywhere (measured with
    ``benchmarks/omp_wait_policy.py``, ``benchmarks/RESULTS.md``): threads that spin without end
    (``OMP_WAIT_POLICY=ACTIVE``) made Lloyd iterations and k-means++ 3-19x slower on a CPU shared with
    busy processes, and a spin of 10,000-100,000 turns 1.25-5.5x slower; threads that sleep at once
    (``PASSIVE``) pay a wake-up on every torch op, which made Lloyd 1.25-1.5x and k-means++ 1.4-1.85x
    slower on a quiet CPU. So: nothing when the user chose (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set);
    ``PASSIVE`` when the CPU is shared at import, by its pressure (PSI) from ``_CONTENDED_PRESSURE`` on
    or, without PSI, by at least ``cpus`` other runnable tasks; else a bounded spin of
    ``_OMP_SPIN_COUNT``.

    Args:
        environ: the environment (a mapping). pressure: PSI "some avg10", or None when unknown.
        running: runnable tasks other than this one (``/proc/loadavg``), or None. cpus: CPUs this
            process may run on.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    if pressure is not None:
        shared = pressure >= _CONTENDED_PRESSURE
    else:
        shared = running is None or running >= cpus
    return {"OMP_WAIT_POLICY": "PASSIVE"} if shared else {"GOMP_SPINCOUNT": str(_OMP_SPIN_COUNT)}


def _cpu_pressure() -> float | None:
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split("avg10=", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _other_runnable() -> int | None:
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


os.environ.update(_omp_wait_settings(os.environ, _cpu_pressure(), _other_runnable(), _cpus()))


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
