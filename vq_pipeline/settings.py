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
#: "k-means||": approximate seeding (Bahmani et al. 2012), faster than the exact greedy "k-means++".
#: "progressive": K-means grown over more and more principal directions (vq_pipeline.progressive).
#: "auto": "progressive" for residual codebooks, else "k-means||".
INITS = ("auto", "k-means++", "random", "first", "k-means||", "progressive")
#: Bytes of temporaries one chunk of a distance computation may use.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: Rows per streamed table batch.
DEFAULT_BATCH_ROWS = 65_536
#: Integer types the ``code`` column can be pinned to (``code_dtype``); the names are numpy's.
CODE_DTYPE_NAMES = ("uint8", "uint16", "uint32", "uint64", "int16", "int32", "int64")
#: File name endings of the tables vq reads (parquet, Arrow IPC).
TABLE_SUFFIXES = (".parquet", ".arrow", ".ipc", ".feather")
#: How a codebook turns a row into codes: "flat" (one K-means, one code per row), "residual" (level
#: ``l`` quantizes what levels ``0..l-1`` leave: coarse-to-fine semantic ids) or "product" (level
#: ``l`` quantizes its own contiguous slice of the dimensions: compression).
CODECS = ("flat", "residual", "product")


@dataclass(frozen=True)
class FitSettings:
    """How a codebook is fitted: the one source of the fit's defaults, validated at construction.

    The library's fit functions, the `vq fit` options, the flows' parameters and the deployment take
    their defaults from here (``FitSettings.n_iter`` is the default ``n_iter`` everywhere). The
    meaning of each field: see :func:`vq_pipeline.fit_codebook`. What depends on the data (``n_codes``
    against the row count, an init tensor's shape, the device) is checked when a fit resolves these
    against its rows (:func:`vq_pipeline.fit_options.fit_options`).
    """

    metric: str = DEFAULT_METRIC
    n_iter: int = 50
    tol: float = 1e-4
    #: A name from INITS, a (n_codes, dim) tensor of starting centroids, or a Codebook to warm-start from.
    init: Any = "auto"
    seed: int = 0
    n_init: int = 1
    engine: str = "auto"
    #: None: CUDA when available; 'cpu', 'cuda', 'cuda:N' or a torch.device.
    device: Any = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    #: A name from CODECS; "flat" is one K-means codebook.
    codec: str = "flat"
    #: Codes per row: 1 for "flat"; for "residual" and "product", the number of levels.
    levels: int = 1
    #: "residual": each level from the second on is fitted on what the ``train_beam`` best partial
    #: tuples of the levels before leave of every row (a beam search, as FAISS's residual quantizer
    #: trains); 1 (default): on the greedy residuals, which greedy encoding then matches. Larger
    #: beams pay off with many codes per level and beam-search encoding (benchmarks/RESULTS.md)
    #: and cost with few. Unused by other codecs.
    train_beam: int = 1
    #: Skip the search of rows whose code the triangle inequality proves (Hamerly's bounds, see
    #: :mod:`vq_pipeline.prune`); the codebook is the same either way, only the time differs. Off by
    #: default: measured on 2 threads (benchmarks/RESULTS.md), 20-iteration fits took 0.70-1.22x the
    #: unpruned time (benchmarks/fair.py) and fits at the defaults 1.03-1.09x (benchmarks/prune.py):
    #: the bounds prove little until the centroids settle, and a searched row costs more than before.
    prune: bool = False

    def __post_init__(self) -> None:
        from .errors import InvalidInputError
        from .validate import check_choice, check_float, check_int

        check_choice("metric", self.metric, METRICS)
        check_choice("codec", self.codec, CODECS)
        object.__setattr__(self, "levels", check_int("levels", self.levels, minimum=1))
        object.__setattr__(self, "train_beam", check_int("train_beam", self.train_beam, minimum=1))
        if not isinstance(self.prune, bool):
            raise InvalidInputError(
                f"prune={self.prune!r}; expected True or False. Fix: pass prune=True or prune=False (the default)."
            )
        if self.codec == "flat" and self.levels != 1:
            raise InvalidInputError(
                f"levels={self.levels} with codec='flat'; a flat codebook has one level. "
                f"Fix: pass codec='residual' or codec='product' for {self.levels} levels, or levels=1."
            )
        object.__setattr__(self, "n_iter", check_int("n_iter", self.n_iter, minimum=0))
        object.__setattr__(self, "tol", check_float("tol", self.tol))
        object.__setattr__(self, "seed", check_int("seed", self.seed, minimum=0))
        object.__setattr__(self, "n_init", check_int("n_init", self.n_init, minimum=1))
        object.__setattr__(self, "memory_budget", check_int("memory_budget", self.memory_budget, minimum=1))
        check_choice("engine", self.engine, ENGINES)
        init = self.init
        if isinstance(init, str):
            check_choice("init", init, INITS)
            return
        init_metric = getattr(init, "metric", None)  # a Codebook to warm-start from
        if init_metric is not None and init_metric != self.metric:
            raise InvalidInputError(
                f"init codebook metric={init_metric!r} but metric={self.metric!r}; expected the same metric. "
                f"Fix: pass metric={init_metric!r}, or start from a k-means++ init."
            )
        if self.codec != "flat":
            raise InvalidInputError(
                f"init={type(init).__name__} with codec={self.codec!r}; a given init is supported for flat "
                f"codebooks only. Fix: use init='k-means++' (or another name from {INITS}), or codec='flat'."
            )
        if self.n_init != 1:
            raise InvalidInputError(
                f"n_init={self.n_init} with a given init tensor would repeat the same run; expected n_init=1. "
                f"Fix: pass n_init=1, or use init='k-means++' for seeded restarts."
            )

    @classmethod
    def from_keywords(cls, values: dict[str, Any]) -> FitSettings:
        """The settings among ``values`` (a fit function's ``locals()``: its keyword arguments of the
        same names as the fields), validated; other entries are ignored."""
        return cls(**{f: values[f] for f in cls.__dataclass_fields__})

    def keywords(self) -> dict[str, Any]:
        """These settings as the keyword arguments of the fit functions."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


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
    #: Residual codebooks: partial tuples kept per row by the beam search (1: greedy).
    beam: int = 1
    #: Multi-level codebooks: add a ``suffix`` that makes every row's tuple unique in the folder.
    unique: bool = False

    def __post_init__(self) -> None:
        from .validate import check_int

        # code_dtype is checked against the codebook's n_codes when a run plans (tables.code_dtype).
        object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "top_k", check_int("top_k", self.top_k, minimum=1))
        object.__setattr__(self, "beam", check_int("beam", self.beam, minimum=1))
        if not isinstance(self.unique, bool):
            from .errors import InvalidInputError

            raise InvalidInputError(f"unique={self.unique!r}; expected True or False.")

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "keep": list(self.keep)}
        # Folders written before these options existed keep matching while they are at their defaults.
        for key, default in (("code_dtype", None), ("beam", 1), ("unique", False)):
            if d[key] == default:
                del d[key]
        return d


@dataclass(frozen=True)
class EncodeOptions:
    """How an encode run computes (does not change the codes away from near-ties)."""

    engine: str = "auto"
    device: str | None = None
    batch_rows: int = DEFAULT_BATCH_ROWS
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from .validate import check_choice, check_int

        check_choice("engine", self.engine, ENGINES)
        object.__setattr__(self, "batch_rows", check_int("batch_rows", self.batch_rows, minimum=1))
        object.__setattr__(self, "memory_budget", check_int("memory_budget", self.memory_budget, minimum=1))


__all__ = [
    "CODECS",
    "CODE_DTYPE_NAMES",
    "EncodeOptions",
    "EncodeSettings",
    "FitSettings",
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_METRIC",
    "ENGINES",
    "INITS",
    "METRICS",
    "TABLE_SUFFIXES",
]
