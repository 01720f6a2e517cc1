"""The choices and defaults every layer shares: the library, the `vq` command, the flows, the deployment.

Plain constants, importing nothing heavy, so that ``vq --help`` can show them without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

METRICS = ("l2", "cosine")
#: The one default metric of the library, the `vq` command, the flows and the deployment (as in
#: FAISS and scikit-learn). Pass metric="cosine" for direction-only embeddings.
DEFAULT_METRIC = "l2"
ENGINES = ("auto", "keops", "torch")
INITS = ("k-means++", "random", "first")
#: Bytes of temporaries one chunk of a distance computation may use.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: Rows per streamed table batch.
DEFAULT_BATCH_ROWS = 65_536
#: Integer types the ``code`` column can be pinned to (``code_dtype``); the names are numpy's.
CODE_DTYPE_NAMES = ("uint8", "uint16", "uint32", "uint64", "int16", "int32", "int64")
#: File name endings of the tables vq reads (parquet, Arrow IPC).
TABLE_SUFFIXES = (".parquet", ".arrow", ".ipc", ".feather")


@dataclass(frozen=True)
class EncodeSettings:
    """What an encode run writes; a folder's outputs all share one codebook and one of these."""

    column: str
    id_column: str | None = None
    top_k: int = 1
    with_distance: bool = False
    keep: tuple[str, ...] = ()
    #: The ``code`` column's integer type (a ``tables.CODE_DTYPES`` name); None: the smallest that fits.
    code_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "keep": list(self.keep)}
        if self.code_dtype is None:  # folders written before the option existed keep matching
            del d["code_dtype"]
        return d


@dataclass(frozen=True)
class EncodeOptions:
    """How an encode run computes (does not change the codes away from near-ties)."""

    engine: str = "auto"
    device: str | None = None
    batch_rows: int = DEFAULT_BATCH_ROWS
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    storage_options: dict[str, Any] | None = None


__all__ = [
    "CODE_DTYPE_NAMES",
    "EncodeOptions",
    "EncodeSettings",
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_METRIC",
    "ENGINES",
    "INITS",
    "METRICS",
    "TABLE_SUFFIXES",
]
