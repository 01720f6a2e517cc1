"""Fit settings: validate what a fit was asked for once, at the public edge, into a frozen
:class:`FitOptions`; and where the training rows live (device placement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .assign import DEFAULT_MEMORY_BUDGET
from .codebook import Codebook
from .errors import InvalidInputError, TooFewPointsError
from .settings import DEFAULT_METRIC, ENGINES, INITS, METRICS
from .validate import (
    as_embeddings,
    check_choice,
    check_float,
    check_int,
    check_nonzero_rows,
    normalize_rows,
    resolve_device,
)


@dataclass(frozen=True)
class FitOptions:
    """Validated fit settings (see :func:`fit_codebook` for their meaning)."""

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
        }


def fit_options(
    n_codes: Any,
    *,
    dim: int,
    n_rows: int,
    metric: str = DEFAULT_METRIC,
    n_iter: int = 50,
    tol: float = 1e-4,
    init: str | torch.Tensor | Codebook = "k-means++",
    seed: int = 0,
    n_init: int = 1,
    engine: str = "auto",
    device: str | torch.device | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    x_device: torch.Tensor | None = None,
) -> FitOptions:
    """Validate fit settings for data of ``n_rows`` rows of width ``dim``; raise clear errors."""
    metric = check_choice("metric", metric, METRICS)
    n_codes = check_int("n_codes", n_codes, minimum=1, hint="n_codes is the number of centroids to fit.")
    if n_codes > n_rows:
        raise TooFewPointsError(
            f"n_codes={n_codes} exceeds the n_rows={n_rows} rows of x; expected n_codes <= n_rows. "
            f"Fix: lower n_codes to at most {n_rows}, or train on more rows."
        )
    n_iter = check_int("n_iter", n_iter, minimum=0)
    tol = check_float("tol", tol)
    seed = check_int("seed", seed, minimum=0)
    n_init = check_int("n_init", n_init, minimum=1)
    budget = check_int("memory_budget", memory_budget, minimum=1)
    check_choice("engine", engine, ENGINES)
    parent = ""
    if isinstance(init, Codebook):
        if init.metric != metric:
            raise InvalidInputError(
                f"init codebook metric={init.metric!r} but metric={metric!r}; expected the same metric. "
                f"Fix: pass metric={init.metric!r}, or start from a k-means++ init."
            )
        parent, init = init.fingerprint, init.centroids
    if isinstance(init, torch.Tensor):
        init = _check_init_tensor(init, n_codes, dim, metric)
        if n_init != 1:
            raise InvalidInputError(
                f"n_init={n_init} with a given init tensor would repeat the same run; expected n_init=1. "
                f"Fix: pass n_init=1, or use init='k-means++' for seeded restarts."
            )
    else:
        check_choice("init", init, INITS)
    return FitOptions(
        n_codes=n_codes,
        metric=metric,
        n_iter=n_iter,
        tol=tol,
        init=init,
        parent_fingerprint=parent,
        seed=seed,
        n_init=n_init,
        engine=engine,
        device=resolve_device(device, x_device),
        memory_budget=budget,
    )


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
