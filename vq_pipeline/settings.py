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
#: "progressive": K-means grown over more and more principal directions (vq_pipeline.compute.progressive).
#: "sample": k-means|| and Lloyd on a seeded sample of 256 rows a code; Lloyd on every row goes on from there.
#: "auto": "progressive" for residual codebooks; "sample" for large tables; else "k-means||".
INITS = ("auto", "k-means++", "random", "first", "k-means||", "progressive", "sample")
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
#: ``l`` quantizes its own contiguous slice of the dimensions: compression), "scalar" (``bits`` per
#: dimension on a calibrated per-dimension grid) or "binary" (one bit per dimension: the sign after
#: centring). Scalar and binary codebooks have one level per dimension.
CODECS = ("flat", "residual", "product", "scalar", "binary")
#: The orthogonal rotation applied to rows before they are coded: "none"; "random" (a seeded random
#: rotation: residual, product, binary); "opq" (learned with product codes: product, residual); "itq"
#: (iterative quantization of the signs: binary).
ROTATIONS = ("none", "random", "opq", "itq")
#: The rotations each codec takes.
CODEC_ROTATIONS = {
    "flat": ("none",),
    "residual": ("none", "random", "opq"),
    "product": ("none", "random", "opq"),
    "scalar": ("none",),
    "binary": ("none", "random", "itq"),
}
#: Bits per dimension of scalar codes (``n_codes = 2**bits``).
SCALAR_BITS = (8, 4)
#: How a scalar codebook calibrates each dimension's range on the training rows: "minmax", "quantile"
#: (the 0.001 and 0.999 quantiles of a seeded sample of at most 65,536 rows), or "mse" (per dimension,
#: the range of least squared error on that sample among the min/max and trimmed quantile ranges).
SCALAR_RANGES = ("minmax", "quantile", "mse")
#: Codecs with one level per dimension and a fixed grid of values per dimension.
PER_DIMENSION_CODECS = ("scalar", "binary")
#: What a refit of the scheduled pipeline does to issued semantic ids (``PipelineSettings.id_policy``):
#: "keep" the current id version (new items go on being encoded with the codebook that issued it), or
#: "publish" a new id version (every item re-encoded with the new codebook, with old->new tables).
ID_POLICY_NAMES = ("keep", "publish")


def check_codec_settings(codec: str, rotation: str, bits: int, scalar_range: str) -> None:
    """Refuse a ``rotation``, ``bits`` or ``scalar_range`` that ``codec`` does not take (see
    CODEC_ROTATIONS, SCALAR_BITS, SCALAR_RANGES)."""
    from vq_pipeline.errors import InvalidInputError
    from vq_pipeline.validate import check_choice

    check_choice("rotation", rotation, ROTATIONS)
    allowed = CODEC_ROTATIONS.get(codec, ("none",))
    if rotation not in allowed:
        takers = [c for c, r in CODEC_ROTATIONS.items() if rotation in r]
        raise InvalidInputError(
            f"rotation={rotation!r} with codec={codec!r}; the {codec} codec takes rotation in {allowed}. "
            f"Fix: pass rotation='none', or a codec that takes {rotation!r} ({', '.join(takers)})."
        )
    if isinstance(bits, bool) or bits not in SCALAR_BITS:
        raise InvalidInputError(
            f"bits={bits!r}; expected one of {SCALAR_BITS} (bits per dimension of scalar codes). "
            f"Fix: pass bits=8 or bits=4."
        )
    if codec != "scalar" and bits != 8:
        raise InvalidInputError(
            f"bits={bits} with codec={codec!r}; bits are set for codec='scalar' only. "
            f"Fix: pass codec='scalar', or leave bits at its default (8)."
        )
    check_choice("scalar_range", scalar_range, SCALAR_RANGES)
    if codec != "scalar" and scalar_range != "minmax":
        raise InvalidInputError(
            f"scalar_range={scalar_range!r} with codec={codec!r}; a range is calibrated for codec='scalar' only. "
            f"Fix: pass codec='scalar', or leave scalar_range at its default ('minmax')."
        )


@dataclass(frozen=True)
class FitSettings:
    """How a codebook is fitted: the one source of the fit's defaults, validated at construction.

    The library's fit functions, the `vq fit` options, the flows' parameters and the deployment take
    their defaults from here (``FitSettings.n_iter`` is the default ``n_iter`` everywhere). The
    meaning of each field: see :func:`vq_pipeline.fit_codebook`. What depends on the data (``n_codes``
    against the row count, an init tensor's shape, the device) is checked when a fit resolves these
    against its rows (:func:`vq_pipeline.fitting.options.fit_options`).
    """

    metric: str = DEFAULT_METRIC
    n_iter: int = 50
    #: Stop once an update lowers the objective by at most this share of it. 1e-3 reaches a lower
    #: held-out objective than FAISS's default fit in about its time (the docs' Benchmarks page, "Every
    #: library at its defaults"); 1e-4 runs on to within about 0.4% of where Lloyd converges, in about
    #: twice the iterations, and 0 runs all ``n_iter``.
    tol: float = 1e-3
    #: A name from INITS, a (n_codes, dim) tensor of starting centroids, or a Codebook to warm-start from.
    #: "auto": "progressive" for residual codebooks; "sample" (a fit on 256 rows a code starts the fit on every
    #: row) for large tables; else "k-means||" (:func:`vq_pipeline.fitting.options.resolve_init`).
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
    #: beams pay off with many codes per level and beam-search encoding, and cost with few (figures in
    #: the docs' Benchmarks page, "Multi-level codes against FAISS"). Unused by other codecs.
    train_beam: int = 1
    #: Skip the search of rows whose code the triangle inequality proves (Hamerly's bounds, see
    #: :mod:`vq_pipeline.compute.prune`); the codebook is the same either way, only the time differs. Off by
    #: default: it did not save time reliably, in fixed-iteration fits or at the defaults (figures in
    #: the docs' Benchmarks page, "Exact pruned Lloyd"): the bounds prove little until the centroids
    #: settle, and a searched row costs more than before.
    prune: bool = False
    #: Keep this share of the training rows out of the fit (0: none): a seeded choice of rows
    #: (:func:`vq_pipeline.fitting.options.holdout_rows`), whose mean distance to their codes the
    #: codebook records as ``stats["holdout"]`` (the error on rows the fit did not see).
    holdout: float = 0.0
    #: Balanced codes: every code (of every level) holds at most ``ceil((1 + balance) * n_rows / n_codes)``
    #: training rows, the E step a capped assignment (:mod:`vq_pipeline.compute.balanced`); None: off.
    balance: float | None = None
    #: A name from ROTATIONS: the orthogonal rotation applied to rows before coding (see CODEC_ROTATIONS).
    rotation: str = "none"
    #: "scalar": bits per dimension, 8 or 4 (SCALAR_BITS); the codebook has ``2**bits`` codes per dimension.
    bits: int = 8
    #: "scalar": a name from SCALAR_RANGES, how each dimension's range is calibrated.
    scalar_range: str = "minmax"
    #: Outer iterations of a learned rotation ("opq", "itq"); unused otherwise.
    rotation_iters: int = 20

    def __post_init__(self) -> None:
        from vq_pipeline.errors import InvalidInputError
        from vq_pipeline.validate import check_choice, check_float, check_int

        check_choice("metric", self.metric, METRICS)
        holdout = self.holdout
        if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 <= holdout < 1:
            raise InvalidInputError(
                f"holdout={holdout!r}; expected the share of rows kept out of the fit, a number >= 0 and < 1 "
                f"(0: none). Fix: pass e.g. holdout=0.1 to hold out 10% of the rows, or 0."
            )
        object.__setattr__(self, "holdout", float(holdout))
        balance = self.balance
        if balance is not None:
            if isinstance(balance, bool) or not isinstance(balance, int | float) or not 0 <= balance < float("inf"):
                raise InvalidInputError(
                    f"balance={balance!r}; expected None (off) or a number >= 0: every code then holds at most "
                    f"ceil((1 + balance) * n_rows / n_codes) rows. Fix: pass e.g. balance=0.05 (codes at most 5% over "
                    f"an equal share), or None."
                )
            object.__setattr__(self, "balance", float(balance))
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
        check_codec_settings(self.codec, self.rotation, self.bits, self.scalar_range)
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "rotation_iters", check_int("rotation_iters", self.rotation_iters, minimum=1))
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
        same names as the fields), validated; other entries are ignored, absent fields take their defaults."""
        return cls(**{f: values[f] for f in cls.__dataclass_fields__ if f in values})

    def keywords(self) -> dict[str, Any]:
        """These settings as the keyword arguments of the fit functions."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


#: The scheduled pipeline refits on schedule when the current codebook is older than this (a week).
DEFAULT_REFIT_EVERY_HOURS = 24.0 * 7
#: ... and when new rows' mean distance exceeds the training one by this fraction.
DEFAULT_DRIFT_THRESHOLD = 0.25
#: ... and when new rows' code-usage Jensen-Shannon divergence from the training usage exceeds its
#: finite-sample bias by this many bits (the measurement behind it: the docs' Benchmarks page).
DEFAULT_USAGE_THRESHOLD = 0.1
#: The pipeline's encode settings: one code per row plus its distance (lets readers filter rows the
#: codebook represents badly). Changing them would make every codes folder refuse the next run.
PIPELINE_TOP_K = 1
PIPELINE_WITH_DISTANCE = True

#: A fit from tables holds all rows in memory when they take at most this many bytes; it streams them otherwise.
DEFAULT_DATA_BUDGET = 2 * 2**30


@dataclass(frozen=True)
class TableSettings:
    """Which rows of a set of tables a fit reads, and how it reads them."""

    #: The embedding column: ``Array(Float32, dim)`` or a list column of floats.
    column: str
    #: Fit on a seeded uniform sample of this many rows (None: every row).
    sample: int | None = None
    #: Hold the rows in memory when they take at most this many bytes; stream them otherwise.
    data_budget: int = DEFAULT_DATA_BUDGET
    #: Rows per batch read.
    batch_rows: int = DEFAULT_BATCH_ROWS
    #: polars' options for object storage.
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from vq_pipeline.errors import InvalidInputError
        from vq_pipeline.validate import check_int

        if not isinstance(self.column, str) or not self.column:
            raise InvalidInputError(
                f"column={self.column!r}; expected the name of the embedding column. Fix: pass column='embedding' "
                f"(or your column's name)."
            )
        if self.sample is not None:
            object.__setattr__(self, "sample", check_int("sample", self.sample, minimum=1))
        object.__setattr__(self, "data_budget", check_int("data_budget", self.data_budget, minimum=0))
        object.__setattr__(self, "batch_rows", check_int("batch_rows", self.batch_rows, minimum=1))


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
    #: With ``unique``: issue the suffixes through the output's id registry (append-only: an issued id
    #: never changes, :mod:`vq_pipeline.jobs.registry`) instead of ranking the folder's rows again on
    #: every run. Needs ``id_column``. Not part of what the codes are (``to_dict`` leaves it out): a
    #: folder written with ``unique`` alone takes the registry on, adopting its suffixes.
    id_registry: bool = False

    def __post_init__(self) -> None:
        from vq_pipeline.errors import InvalidInputError
        from vq_pipeline.validate import check_int

        # code_dtype is checked against the codebook's n_codes when a run plans (tables.code_dtype).
        object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "top_k", check_int("top_k", self.top_k, minimum=1))
        object.__setattr__(self, "beam", check_int("beam", self.beam, minimum=1))
        for name in ("unique", "id_registry"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name}={getattr(self, name)!r}; expected True or False.")
        if self.id_registry and not self.unique:
            raise InvalidInputError(
                "id_registry=True with unique=False; expected unique=True (the registry issues the suffixes that "
                "make semantic ids unique). Fix: pass unique=True (--unique) with id_registry (--id-registry)."
            )
        if self.id_registry and not self.id_column:
            raise InvalidInputError(
                f"id_registry=True with id_column={self.id_column!r}; expected an id column: the registry keys "
                f"every issued id by its item, and row positions name no item across runs. Fix: pass "
                f"id_column= the column of item ids (--id-column ID)."
            )

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "keep": list(self.keep)}
        d.pop("id_registry")  # how suffixes are issued, not what the codes are: see the field
        # Folders written before these options existed keep matching while they are at their defaults.
        for key, default in (("code_dtype", None), ("beam", 1), ("unique", False)):
            if d[key] == default:
                del d[key]
        return d


@dataclass(frozen=True)
class EncodeOptions:
    """How an encode run computes (which does not change the codes away from near-ties) and what it
    may do to its output folder."""

    engine: str = "auto"
    device: str | None = None
    batch_rows: int = DEFAULT_BATCH_ROWS
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    storage_options: dict[str, Any] | None = None
    #: Replace another codebook's (or other settings') codes in the folder, deleting only the outputs
    #: its receipts record.
    overwrite: bool = False
    #: Once every input is encoded, delete the stale outputs (of inputs not in this run) and their receipts.
    prune: bool = False

    def __post_init__(self) -> None:
        from vq_pipeline.errors import InvalidInputError
        from vq_pipeline.validate import check_choice, check_int

        check_choice("engine", self.engine, ENGINES)
        for name in ("overwrite", "prune"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name}={getattr(self, name)!r}; expected True or False.")
        object.__setattr__(self, "batch_rows", check_int("batch_rows", self.batch_rows, minimum=1))
        object.__setattr__(self, "memory_budget", check_int("memory_budget", self.memory_budget, minimum=1))


@dataclass(frozen=True)
class PipelineSettings:
    """What every run of the scheduled pipeline does (:func:`vq_pipeline.jobs.scheduled.run_once`):
    the codebook it fits, how it encodes, and when it refits. Validated at construction, so a
    deployment refuses on registration what every scheduled run would refuse."""

    #: The embedding column of every table under the input root.
    column: str
    #: Codes of the codebook (per level for a multi-level codec).
    n_codes: int
    #: The id column written beside the codes (None: row positions, written as ``row``).
    id_column: str | None = None
    metric: str = DEFAULT_METRIC
    #: Fit on a seeded uniform sample of this many rows (None: every row).
    sample: int | None = None
    seed: int = 0
    engine: str = "auto"
    #: The ``code`` column's integer type, e.g. "uint32" (None: the smallest for ``n_codes``); pin it so
    #: that a table schema survives a refit with another ``n_codes``.
    code_dtype: str | None = None
    #: "flat", or "residual"/"product" codebooks of ``levels`` levels; a change refits.
    codec: str = "flat"
    levels: int = 1
    #: A name from ROTATIONS applied before coding (residual, product, binary; see CODEC_ROTATIONS).
    rotation: str = "none"
    #: "scalar" codebooks: bits per dimension (8 or 4).
    bits: int = 8
    #: Balanced codes (:attr:`FitSettings.balance`): every code of every level holds at most
    #: ``ceil((1 + balance) * n_rows / n_codes)`` training rows; None: off. A change refits.
    balance: float | None = None
    #: Refit when the codebook is older than this many hours (None: never on schedule).
    refit_every_hours: float | None = DEFAULT_REFIT_EVERY_HOURS
    #: Refit when new rows' mean distance exceeds the training one by this fraction.
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    #: Refit when new rows' code-usage divergence exceeds its finite-sample bias by this many bits
    #: (evaluated from ``max(100, 5 * n_codes)`` new rows on; None: never).
    usage_threshold: float | None = DEFAULT_USAGE_THRESHOLD
    #: Multi-level codebooks: write a ``suffix`` beside the codes that makes every row's tuple unique
    #: in its codes folder (semantic ids; :attr:`EncodeSettings.unique`).
    unique: bool = False
    #: With ``unique``: issue the suffixes through the work_dir's id registry (``ids/registry``), so
    #: that an issued id never changes; needs ``id_column``.
    id_registry: bool = False
    #: With ``id_registry``, what a refit does to issued ids (a name from ID_POLICY_NAMES): "keep" the
    #: current id version (new items go on being encoded with the codebook that issued it; the refit
    #: becomes the current codebook but issues no ids), or "publish" a new id version (every item
    #: re-encoded with the refit, with old->new tables; the previous version stays readable).
    id_policy: str = "keep"

    def __post_init__(self) -> None:
        from vq_pipeline.errors import InvalidInputError
        from vq_pipeline.validate import check_int

        object.__setattr__(self, "n_codes", check_int("n_codes", self.n_codes, minimum=1))
        if not self.drift_threshold >= 0:
            raise InvalidInputError(
                f"drift_threshold={self.drift_threshold!r}; expected a fraction >= 0 (refit when the distortion "
                f"ratio exceeds 1 + drift_threshold). Fix: pass e.g. {DEFAULT_DRIFT_THRESHOLD}."
            )
        if self.usage_threshold is not None and not 0 <= self.usage_threshold < 1:
            raise InvalidInputError(
                f"usage_threshold={self.usage_threshold!r}; expected bits of Jensen-Shannon divergence in [0, 1). "
                f"Fix: pass e.g. {DEFAULT_USAGE_THRESHOLD}, or None to turn the code-usage rule off."
            )
        if self.refit_every_hours is not None and not self.refit_every_hours >= 0:
            raise InvalidInputError(
                f"refit_every_hours={self.refit_every_hours!r}; expected hours >= 0 (0: refit on every run). "
                f"Fix: pass e.g. {DEFAULT_REFIT_EVERY_HOURS}, or None to refit only on drift."
            )
        from vq_pipeline.validate import check_choice

        check_choice("id_policy", self.id_policy, ID_POLICY_NAMES)
        if self.id_policy != "keep" and not self.id_registry:
            raise InvalidInputError(
                f"id_policy={self.id_policy!r} with id_registry=False; expected an id registry, whose id versions "
                f"the policy decides. Fix: pass id_registry=True (--id-registry) with unique=True and an id_column, "
                f"or leave id_policy at 'keep'."
            )
        self.fit_settings(), self.reading(), self.encode_settings()  # refused here, not on the first run

    def fit_settings(self) -> FitSettings:
        return FitSettings(
            metric=self.metric,
            seed=self.seed,
            engine=self.engine,
            codec=self.codec,
            levels=self.levels,
            rotation=self.rotation,
            bits=self.bits,
            balance=self.balance,
        )

    def reading(self) -> TableSettings:
        return TableSettings(self.column, sample=self.sample)

    def encode_settings(self) -> EncodeSettings:
        return EncodeSettings(
            self.column,
            id_column=self.id_column,
            top_k=PIPELINE_TOP_K,
            with_distance=PIPELINE_WITH_DISTANCE,
            code_dtype=self.code_dtype,
            unique=self.unique,
            id_registry=self.id_registry,
        )

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(engine=self.engine)

    def rules(self) -> dict[str, Any]:
        """The refit rules, as :func:`vq_pipeline.jobs.workdir.refit_checks` takes them."""
        return dict(
            refit_every_hours=self.refit_every_hours,
            drift_threshold=self.drift_threshold,
            usage_threshold=self.usage_threshold,
        )


__all__ = [
    "CODECS",
    "CODEC_ROTATIONS",
    "ID_POLICY_NAMES",
    "PER_DIMENSION_CODECS",
    "ROTATIONS",
    "SCALAR_BITS",
    "SCALAR_RANGES",
    "check_codec_settings",
    "CODE_DTYPE_NAMES",
    "EncodeOptions",
    "EncodeSettings",
    "FitSettings",
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_DATA_BUDGET",
    "DEFAULT_DRIFT_THRESHOLD",
    "DEFAULT_REFIT_EVERY_HOURS",
    "DEFAULT_USAGE_THRESHOLD",
    "PIPELINE_TOP_K",
    "PIPELINE_WITH_DISTANCE",
    "PipelineSettings",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_METRIC",
    "ENGINES",
    "INITS",
    "METRICS",
    "TABLE_SUFFIXES",
    "TableSettings",
]
