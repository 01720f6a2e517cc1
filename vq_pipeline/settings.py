"""The choices and defaults every layer shares: the library, the `vq` command, the flows, the deployment.

Plain constants, importing nothing heavy, so that ``vq --help`` can show them without loading torch.
"""

from __future__ import annotations

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

__all__ = [
    "CODE_DTYPE_NAMES",
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_METRIC",
    "ENGINES",
    "INITS",
    "METRICS",
    "TABLE_SUFFIXES",
]
