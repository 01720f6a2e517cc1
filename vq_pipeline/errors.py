"""One exception tree for vq-pipeline.

::

    VQError                          every error this package raises on purpose
    ├── InvalidInputError            bad data or options from the caller (also a ValueError)
    │   ├── NonFiniteError           NaN / ±Inf values, or squared norms that overflow float32
    │   ├── DimensionMismatchError   embedding dim differs from the codebook's
    │   └── TooFewPointsError        fewer (distinct) rows than codes
    ├── CodebookFileError            a codebook file that is missing, corrupt or hostile (also a ValueError)
    │   └── UnsupportedFormatError   a codebook file of an unknown format or major version
    └── EngineUnavailableError       the requested compute engine cannot run here (also a RuntimeError)

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
