"""A fit's plan: :class:`~vq_pipeline.settings.FitSettings` resolved against the training rows
(n_codes against the row count, the init's shape, the device) into a frozen :class:`FitOptions`;
and where the training rows live (device placement).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.compute.data import SEED_ROWS_PER_CODE
from vq_pipeline.compute.levels import decode as decode_levels
from vq_pipeline.compute.scorecard import DEFAULT_SAMPLE_ROWS, sample_rows, scorecard
from vq_pipeline.errors import InvalidInputError, TooFewPointsError
from vq_pipeline.io.codebook_file import MAX_LEVELS
from vq_pipeline.settings import PER_DIMENSION_CODECS, FitSettings
from vq_pipeline.validate import as_embeddings, check_int, check_nonzero_rows, normalize_rows, resolve_device

if TYPE_CHECKING:
    from vq_pipeline.compute.data import DataSource

#: Rotations learned on the training rows (their rounds, ``rotation_iters``, are recorded).
LEARNED_ROTATIONS = ("opq", "itq")


@dataclass(frozen=True)
class FitOptions:
    """Fit settings resolved against the data (see :func:`fit_codebook` for their meaning)."""

    n_codes: int
    metric: str
    n_iter: int
    tol: float
    init: str | torch.Tensor  # a name from INITS, or (n_codes, dim) float32 starting centroids
    parent_fingerprint: str
    seed: int
    n_init: int
    engine: str
    device: torch.device
    memory_budget: int
    codec: str = "flat"
    levels: int = 1
    train_beam: int = 1
    prune: bool = False
    #: The share of the rows held out of the fit (0: none; see :func:`holdout_rows`).
    holdout: float = 0.0
    #: Balanced codes: at most ``ceil((1 + balance) * n_rows / n_codes)`` rows per code (None: off).
    balance: float | None = None
    #: The rotation applied to rows before they are coded: a name from ROTATIONS.
    rotation: str = "none"
    #: "scalar": bits per dimension (``n_codes == 2**bits``).
    bits: int = 8
    #: "scalar": how each dimension's range is calibrated (a name from SCALAR_RANGES).
    scalar_range: str = "minmax"
    #: Rounds of a learned rotation ("opq", "itq").
    rotation_iters: int = 20

    @property
    def per_dimension(self) -> bool:
        """Whether the codec codes each dimension on its own grid (scalar, binary: ``levels == dim``)."""
        return self.codec in PER_DIMENSION_CODECS

    @property
    def min_rows(self) -> int:
        """The fewest training rows the fit needs: ``n_codes`` for K-means codecs, 1 for scalar and binary."""
        return 1 if self.per_dimension else self.n_codes

    @property
    def init_name(self) -> str:
        return self.init if isinstance(self.init, str) else "tensor"

    def settings(self, engine_name: str) -> dict[str, Any]:
        """The settings recorded in the codebook file. Codecs and fits without a rotation, bits or a
        scalar range record exactly what they recorded before those existed."""
        rotation = {
            **({"rotation": self.rotation} if self.rotation != "none" else {}),
            **({"rotation_iters": self.rotation_iters} if self.rotation in LEARNED_ROTATIONS else {}),
        }
        if self.per_dimension:  # no Lloyd: no init, iterations, tolerance or restarts to record
            return {
                "n_codes": self.n_codes,
                "metric": self.metric,
                "seed": self.seed,
                "device": self.device.type,
                "codec": self.codec,
                "levels": self.levels,
                **({"bits": self.bits, "scalar_range": self.scalar_range} if self.codec == "scalar" else {}),
                **rotation,
                **({"holdout": self.holdout} if self.holdout else {}),
            }
        return {
            "n_codes": self.n_codes,
            "metric": self.metric,
            "init": self.init_name,
            "seed": self.seed,
            "n_iter": self.n_iter,
            "tol": self.tol,
            "n_init": self.n_init,
            "engine": engine_name,
            "device": self.device.type,
            # Flat codebooks record exactly what they recorded before multi-level codecs existed.
            **({} if self.codec == "flat" else {"codec": self.codec, "levels": self.levels}),
            **({"train_beam": self.train_beam} if self.codec == "residual" else {}),
            **rotation,
            # Only when rows were held out: other fits record exactly what they recorded before.
            **({"holdout": self.holdout} if self.holdout else {}),
            **({"balance": self.balance} if self.balance is not None else {}),
        }


def fit_options(
    n_codes: Any,
    settings: FitSettings,
    *,
    dim: int,
    n_rows: int,
    x_device: torch.Tensor | None = None,
) -> FitOptions:
    """Resolve validated ``settings`` against data of ``n_rows`` rows of width ``dim``; raise clear errors.

    ``n_codes`` may be None for the scalar and binary codecs only (their codes per dimension are fixed:
    ``2**bits`` and 2); their ``levels`` (1 or ``dim`` given) become ``dim``."""
    if settings.codec in PER_DIMENSION_CODECS:
        return _per_dimension_options(n_codes, settings, dim=dim, n_rows=n_rows, x_device=x_device)
    if n_codes is None:
        raise InvalidInputError(
            f"n_codes=None with codec={settings.codec!r}; expected the number of codes to fit (per level for a "
            f"multi-level codec). Fix: pass n_codes, e.g. n_codes=256; only codec='scalar' and codec='binary' "
            f"take n_codes=None."
        )
    n_codes = check_int("n_codes", n_codes, minimum=1, hint="n_codes is the number of centroids to fit.")
    if n_codes > n_rows:
        raise TooFewPointsError(
            f"n_codes={n_codes} exceeds the n_rows={n_rows} rows of x; expected n_codes <= n_rows. "
            f"Fix: lower n_codes to at most {n_rows}, or train on more rows."
        )
    if settings.levels > MAX_LEVELS:  # what a codebook file may hold: every codebook fitted loads
        raise InvalidInputError(
            f"levels={settings.levels} exceeds MAX_LEVELS={MAX_LEVELS}, the most levels a codebook file holds; "
            f"expected levels between 1 and {MAX_LEVELS}. Fix: pass levels={MAX_LEVELS} or fewer (more codes per "
            f"level refine every level instead)."
        )
    if settings.codec == "product":
        from vq_pipeline.compute.levels import check_product_dim

        check_product_dim(dim, settings.levels)
    init, parent = resolve_init(settings.init, settings.codec, n_rows, n_codes), ""
    if isinstance(init, Codebook):
        parent, init = init.fingerprint, init.centroids
    if not isinstance(init, str):  # starting centroids: a tensor or an array
        init = _check_init_tensor(init, n_codes, dim, settings.metric)
    return FitOptions(
        n_codes=n_codes,
        init=init,
        parent_fingerprint=parent,
        codec=settings.codec,
        levels=settings.levels,
        train_beam=settings.train_beam if settings.codec == "residual" else 1,
        prune=settings.prune,
        balance=settings.balance,
        **_shared_options(settings, x_device),
    )


def _shared_options(settings: FitSettings, x_device: torch.Tensor | None) -> dict[str, Any]:
    """The :class:`FitOptions` fields every codec takes from ``settings`` as they are."""
    return dict(
        metric=settings.metric,
        n_iter=settings.n_iter,
        tol=settings.tol,
        seed=settings.seed,
        n_init=settings.n_init,
        engine=settings.engine,
        device=resolve_device(settings.device, x_device),
        memory_budget=settings.memory_budget,
        holdout=settings.holdout,
        rotation=settings.rotation,
        rotation_iters=settings.rotation_iters,
    )


def _per_dimension_options(
    n_codes: Any, settings: FitSettings, *, dim: int, n_rows: int, x_device: torch.Tensor | None
) -> FitOptions:
    """:func:`fit_options` of a scalar or binary codebook: ``n_codes`` None or the codec's own (2**bits
    for scalar, 2 for binary), ``levels`` 1 or ``dim`` (it becomes ``dim``); MAX_LEVELS does not apply
    (each level is one value per code, bounded by the bytes of the file)."""
    codec = settings.codec
    expected = 2**settings.bits if codec == "scalar" else 2
    what = f"codec='scalar' and bits={settings.bits}" if codec == "scalar" else "codec='binary'"
    if n_codes is not None:
        n_codes = check_int("n_codes", n_codes, minimum=1, hint=f"{what} codes each dimension in {expected} codes.")
    if n_codes is not None and n_codes != expected:
        other = {256: "bits=8", 16: "bits=4"}.get(n_codes) if codec == "scalar" else None
        raise InvalidInputError(
            f"n_codes={n_codes} with {what}; a {codec} codebook has {expected} codes per dimension"
            f"{' (2**bits)' if codec == 'scalar' else ' (one bit)'}. Fix: pass n_codes=None (or {expected})"
            f"{f', or {other} for {n_codes} codes' if other else ''}."
        )
    if settings.levels not in (1, dim):
        raise InvalidInputError(
            f"levels={settings.levels} with codec={codec!r} and dim={dim}; a {codec} codebook has one level per "
            f"dimension. Fix: pass levels=1 (the default) or levels={dim}."
        )
    if settings.balance is not None:
        raise InvalidInputError(
            f"balance={settings.balance} with codec={codec!r}; balanced codes are for K-means codecs (flat, residual, "
            f"product): a {codec} code is each value's place on a fixed grid. Fix: pass balance=None."
        )
    if n_rows < 1:
        raise TooFewPointsError(f"n_rows={n_rows}; a {codec} codebook is calibrated on at least 1 row. Fix: pass rows.")
    return FitOptions(
        n_codes=expected,
        init="auto",
        parent_fingerprint="",
        codec=codec,
        levels=dim,
        bits=settings.bits,
        scalar_range=settings.scalar_range,
        **_shared_options(settings, x_device),
    )


#: Mixed into the seed of the held-out rows' choice, so that it is not the stream a sample draws from.
HOLDOUT_STREAM = 0x686F6C64


def holdout_rows(n_rows: int, holdout: float, seed: int, *, n_codes: int) -> np.ndarray:
    """The sorted positions, among ``n_rows`` training rows, of the ``round(holdout * n_rows)`` rows a
    fit with ``holdout`` and ``seed`` keeps out: a uniform choice without replacement by
    ``numpy.random.default_rng([seed, HOLDOUT_STREAM])``. Refuses a share that holds out no row, or
    leaves fewer than ``n_codes`` rows to fit.

    Returns:
        (n_held,) int64 positions, increasing.
    """
    n_held = round(holdout * n_rows)
    if n_held < 1 or n_rows - n_held < n_codes:
        why = "holds out no row" if n_held < 1 else f"leaves {n_rows - n_held} rows to fit n_codes={n_codes} codes"
        need = f"between {1 / n_rows:.3g} and {(n_rows - n_codes) / n_rows:.3g}" if n_rows > n_codes else "none"
        raise TooFewPointsError(
            f"holdout={holdout} of n_rows={n_rows} rows {why}; expected at least 1 held-out row and n_codes rows to "
            f"fit (holdout {need}). Fix: pass a holdout in that range, holdout=0, or fit on more rows."
        )
    rng = np.random.default_rng([seed, HOLDOUT_STREAM])
    return np.sort(rng.choice(n_rows, size=n_held, replace=False)).astype(np.int64)


def split_holdout(x: torch.Tensor, opts: FitOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the rows to fit, the held-out rows or None) of the training rows ``x`` (n_rows, dim) under
    ``opts.holdout``; both keep ``x``'s order, dtype and device."""
    if not opts.holdout:
        return x, None
    held = holdout_rows(x.shape[0], opts.holdout, opts.seed, n_codes=opts.min_rows)
    keep = np.ones(x.shape[0], dtype=bool)
    keep[held] = False
    index = torch.from_numpy(keep).to(x.device)
    return x[index], x[~index]


def with_holdout_stats(codebook: Codebook, held: torch.Tensor | None, opts: FitOptions) -> Codebook:
    """``codebook`` with ``stats["holdout"]``: the share held out, the rows, their seed, and their mean
    distance to their codes (squared L2, or ``1 - cos``; to the reconstruction for a multi-level
    codebook), as :meth:`Codebook.encode` computes it; ``codebook`` itself when no rows were held out."""
    if held is None:
        return codebook
    _, dist = codebook.encode(
        held, return_distances=True, engine=opts.engine, device=opts.device, memory_budget=opts.memory_budget
    )
    mean = float(dist.to(torch.float64).mean())
    stats = {
        "fraction": opts.holdout,
        "rows": int(held.shape[0]),
        "seed": opts.seed,
        "mean_distance": mean,
    }
    return dataclasses.replace(codebook, stats={**codebook.stats, "holdout": stats})


#: Mixed into the seed of a scorecard's sample, so that it is not the stream seeding or the holdout draws from.
SCORECARD_STREAM = 0x73636F72


def scorecard_rows(source: DataSource, held: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, str]:
    """The rows a fit's scorecard looks at and which rows they are: at most
    :data:`~vq_pipeline.compute.scorecard.DEFAULT_SAMPLE_ROWS` of the held-out rows ("holdout") when rows were
    held out, else of the training rows ("training"); the training rows through ``source.sample`` with
    ``numpy.random.default_rng([seed, SCORECARD_STREAM])``, then (a source that returns all its rows) the
    positions :func:`~vq_pipeline.compute.scorecard.sample_rows` draws with ``[seed, SCORECARD_STREAM]``."""
    stream = [seed, SCORECARD_STREAM]
    if held is not None:
        rows, which = held, "holdout"
    else:
        rows, which = source.sample(DEFAULT_SAMPLE_ROWS, np.random.default_rng(stream)), "training"
    if rows.shape[0] > DEFAULT_SAMPLE_ROWS:
        rows = rows[torch.from_numpy(sample_rows(rows.shape[0], DEFAULT_SAMPLE_ROWS, stream)).to(rows.device)]
    return rows, which


def codebook_scorecard(
    codebook: Codebook,
    rows: torch.Tensor,
    *,
    reference: Codebook | None = None,
    engine: str = "auto",
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """The scorecard (:func:`vq_pipeline.compute.scorecard.scorecard`) of ``codebook``'s codes of ``rows``
    (n, dim), encoded greedily as ``vq encode`` does by default, with the codec; for residual codes the
    error and recall by levels ``0..l``; with ``reference`` (the published codebook, same codec and levels),
    the churn of the rows' codes against its codes. Rows are L2-normalized under cosine."""
    x = as_embeddings(rows).cpu()
    if codebook.metric == "cosine":
        x = normalize_rows(x)
    kw = dict(engine=engine, device=device, memory_budget=memory_budget)
    codes = codebook.encode(x, **kw)  # (n,) or (n, levels) int64
    decoded = codebook.decode(codes)
    prefix = None
    if codebook.codec == "residual" and codebook.levels > 1:
        prefix = [
            decode_levels(
                codebook.centroids[: level + 1],
                "residual",
                codes[:, : level + 1],
                metric=codebook.metric,
                rotation=codebook.rotation,
            )
            for level in range(codebook.levels)
        ]
    comparable = reference is not None and (reference.codec, reference.levels) == (codebook.codec, codebook.levels)
    card = scorecard(
        x,
        codes,
        decoded,
        metric=codebook.metric,
        codec=codebook.codec,
        reference_codes=reference.encode(x, **kw) if comparable else None,
        prefix_decoded=prefix,
    )
    return {"codec": codebook.codec, **card}


def with_scorecard_stats(
    codebook: Codebook, source: DataSource, held: torch.Tensor | None, opts: FitOptions
) -> Codebook:
    """``codebook`` with ``stats["scorecard"]``: :func:`codebook_scorecard` on :func:`scorecard_rows` (the
    held-out rows when there are any, else a seeded sample of the training rows; ``"sample"`` says which),
    and ``timings["scorecard_seconds"]``. The centroids are untouched; ``codebook`` itself when fewer than
    2 rows are there to score."""
    t0 = time.perf_counter()
    rows, which = scorecard_rows(source, held, opts.seed)
    if rows.shape[0] < 2:
        return codebook
    card = codebook_scorecard(codebook, rows, engine=opts.engine, device=opts.device, memory_budget=opts.memory_budget)
    return dataclasses.replace(
        codebook,
        stats={**codebook.stats, "scorecard": {"sample": which, **card}},
        timings={**codebook.timings, "scorecard_seconds": time.perf_counter() - t0},
    )


#: ``init="auto"`` fits flat and product codebooks of at least this many rows, and at least
#: ``SAMPLE_INIT_FACTOR * SEED_ROWS_PER_CODE`` rows a code, from a fit on a sample ("sample").
SAMPLE_INIT_MIN_ROWS = 131_072
SAMPLE_INIT_FACTOR = 4


def resolve_init(init: Any, codec: str, n_rows: int | None = None, n_codes: int | None = None) -> Any:
    """The init ``"auto"`` stands for: "progressive" for residual codebooks; for flat and product ones,
    "sample" on large tables (at least :data:`SAMPLE_INIT_MIN_ROWS` rows and ``SAMPLE_INIT_FACTOR`` times
    the sample's ``SEED_ROWS_PER_CODE`` rows a code; ``n_rows``/``n_codes`` None: not large), else "k-means||".

    k-means|| rather than exact k-means++: whole fits at the defaults take clearly less time with it
    on real embeddings and mixtures, at the same or a slightly lower objective on new rows; on small
    data (digits) the two are about even (figures in the docs' Benchmarks page, "Seeding"). "sample"
    (k-means|| and Lloyd on 256 rows a code, then Lloyd on every row from there) on large tables: most
    of the updates then run on the sample (figures in the docs' Benchmarks page, "Every library at its
    defaults").
    """
    if isinstance(init, str) and init == "auto":
        if codec == "residual":
            return "progressive"
        return "sample" if large_table(n_rows, n_codes) else "k-means||"
    return init


def auto_inits(codec: str) -> tuple[str, ...]:
    """Every init ``"auto"`` may stand for with ``codec``."""
    return ("progressive",) if codec == "residual" else ("k-means||", "sample")


def large_table(n_rows: int | None, n_codes: int | None) -> bool:
    """Whether ``init="auto"`` fits ``n_rows`` rows for ``n_codes`` codes from a sample (:func:`resolve_init`)."""
    if n_rows is None or n_codes is None:
        return False
    return n_rows >= max(SAMPLE_INIT_MIN_ROWS, SAMPLE_INIT_FACTOR * SEED_ROWS_PER_CODE * n_codes)


def _check_init_tensor(init: torch.Tensor, n_codes: int, dim: int, metric: str) -> torch.Tensor:
    c = as_embeddings(init, name="init")
    if tuple(c.shape) != (n_codes, dim):
        raise InvalidInputError(
            f"init.shape={tuple(c.shape)}; expected (n_codes, dim)=({n_codes}, {dim}). "
            f"Fix: pass one starting centroid per code, with the data's width."
        )
    if metric == "cosine":
        check_nonzero_rows(c, name="init")
        c = normalize_rows(c)
    return c


def maybe_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the training rows to a GPU once when they take at most half its free memory."""
    if device.type != "cuda" or x.device == device:
        return x
    free, _ = torch.cuda.mem_get_info(device)
    return x.to(device) if x.numel() * 4 <= free // 2 else x
