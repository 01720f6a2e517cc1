"""A fit's plan: :class:`~vq_pipeline.settings.FitSettings` resolved against the training rows
(n_codes against the row count, the init's shape, the device) into a frozen :class:`FitOptions`;
and where the training rows live (device placement).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vq_pipeline.codebook import Codebook
from vq_pipeline.errors import InvalidInputError, TooFewPointsError
from vq_pipeline.io.codebook_file import MAX_LEVELS
from vq_pipeline.settings import FitSettings
from vq_pipeline.validate import as_embeddings, check_int, check_nonzero_rows, normalize_rows, resolve_device


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

    @property
    def init_name(self) -> str:
        return self.init if isinstance(self.init, str) else "tensor"

    def settings(self, engine_name: str) -> dict[str, Any]:
        """The settings recorded in the codebook file."""
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
            # Only when rows were held out: other fits record exactly what they recorded before.
            **({"holdout": self.holdout} if self.holdout else {}),
        }


def fit_options(
    n_codes: Any,
    settings: FitSettings,
    *,
    dim: int,
    n_rows: int,
    x_device: torch.Tensor | None = None,
) -> FitOptions:
    """Resolve validated ``settings`` against data of ``n_rows`` rows of width ``dim``; raise clear errors."""
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
    init, parent = resolve_init(settings.init, settings.codec), ""
    if isinstance(init, Codebook):
        parent, init = init.fingerprint, init.centroids
    if not isinstance(init, str):  # starting centroids: a tensor or an array
        init = _check_init_tensor(init, n_codes, dim, settings.metric)
    return FitOptions(
        n_codes=n_codes,
        metric=settings.metric,
        n_iter=settings.n_iter,
        tol=settings.tol,
        init=init,
        parent_fingerprint=parent,
        seed=settings.seed,
        n_init=settings.n_init,
        engine=settings.engine,
        device=resolve_device(settings.device, x_device),
        memory_budget=settings.memory_budget,
        codec=settings.codec,
        levels=settings.levels,
        train_beam=settings.train_beam if settings.codec == "residual" else 1,
        prune=settings.prune,
        holdout=settings.holdout,
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
    held = holdout_rows(x.shape[0], opts.holdout, opts.seed, n_codes=opts.n_codes)
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


def resolve_init(init: Any, codec: str) -> Any:
    """The init ``"auto"`` stands for: "progressive" for residual codebooks, else "k-means||".

    k-means|| rather than exact k-means++: whole fits at the defaults take clearly less time with it
    on real embeddings and mixtures, at the same or a slightly lower objective on new rows; on small
    data (digits) the two are about even (figures in the docs' Benchmarks page, "Seeding").
    """
    if isinstance(init, str) and init == "auto":
        return "progressive" if codec == "residual" else "k-means||"
    return init


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
