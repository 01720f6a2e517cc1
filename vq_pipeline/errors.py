"""One exception tree for vq-pipeline.

::

    VQError                          every error this package raises on purpose
    ├── InvalidInputError            bad data or options from the caller (also a ValueError)
    │   ├── NonFiniteError           NaN / ±Inf values, or squared norms that overflow float32
    │   ├── DimensionMismatchError   embedding dim differs from the codebook's
    │   └── TooFewPointsError        fewer (distinct) rows than codes
    ├── CodebookFileError            a codebook file that is missing, corrupt or hostile (also a ValueError)
    │   └── UnsupportedFormatError   a codebook file of an unknown format or major version
    ├── ConfigurationError           settings of the environment that cannot work (also a ValueError)
    │   └── DaskAddressError         a Dask address that is neither local:N nor a scheduler address
    ├── StateError                   files on disk that contradict what a run needs (also a RuntimeError)
    │   ├── EncodeLockedError        another run holds the output folder's lock
    │   ├── OutputLockedError        another fit is writing the same codebook or checkpoint file
    │   └── PipelineStateError       a work_dir whose current-codebook pointer is unreadable or wrong
    ├── EncodeFailedError            some files of an encode run failed; the others are done (also a RuntimeError)
    └── EngineUnavailableError       the requested compute engine cannot run here (also a RuntimeError)

None of these is retried by the flows: a retry would meet the same data, settings or files. The
flows retry only what a retry can fix (I/O errors, a lost Dask worker).

Every message names the offending value as ``name=value``, says what was expected and how
to fix it, so that a person reading a scheduler log can act on it without the source.
"""

from __future__ import annotations


class VQError(Exception):
    """Base class of every error raised on purpose by vq-pipeline."""


class InvalidInputError(VQError, ValueError):
    """The caller passed data or options that cannot be used."""


class NonFiniteError(InvalidInputError):
    """The embeddings hold NaN or ±Inf, or values so large their squared norm overflows."""


class DimensionMismatchError(InvalidInputError):
    """The embeddings' dimension is not the codebook's."""


class TooFewPointsError(InvalidInputError):
    """There are fewer rows (or distinct rows) than codes to fit."""


class CodebookFileError(VQError, ValueError):
    """A codebook file is missing, truncated, corrupt, or not a codebook at all."""


class UnsupportedFormatError(CodebookFileError):
    """A codebook file declares a format or major version this release cannot read."""


class EngineUnavailableError(VQError, RuntimeError):
    """The requested compute engine cannot run on this machine."""


class ConfigurationError(VQError, ValueError):
    """The environment's settings cannot work: a bad Dask address, no Prefect API the workers can
    reach, a cluster or server that will not start."""


class DaskAddressError(ConfigurationError):
    """A ``dask=`` address that is neither ``local:N`` nor a scheduler address."""


class StateError(VQError, RuntimeError):
    """Files on disk contradict what the run needs (a lock held, a pointer to a missing file)."""


class EncodeLockedError(StateError):
    """Another run is writing into the same folder."""


class OutputLockedError(StateError):
    """Another run is writing the same output file (a fit's codebook or checkpoint)."""


class PipelineStateError(StateError):
    """A work_dir's ``codebooks/current.json`` is unreadable or points at a missing or different
    codebook, or ``codes/current`` is not a symlink."""


class EncodeFailedError(VQError, RuntimeError):
    """Some files could not be encoded (after retries); the others are done and kept, and a rerun
    retries only the failed ones."""


__all__ = [
    "CodebookFileError",
    "ConfigurationError",
    "DaskAddressError",
    "DimensionMismatchError",
    "EncodeFailedError",
    "EncodeLockedError",
    "EngineUnavailableError",
    "InvalidInputError",
    "NonFiniteError",
    "OutputLockedError",
    "PipelineStateError",
    "StateError",
    "TooFewPointsError",
    "UnsupportedFormatError",
    "VQError",
]
