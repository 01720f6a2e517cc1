"""Mini-batch K-means for streams: seed on the first batch, then one exact assignment and a running mean per batch.

Sculley's mini-batch K-means (what scikit-learn's ``MiniBatchKMeans.partial_fit`` runs), with the
library's exact nearest-code assignment: every batch goes through one E step of Lloyd
(:func:`vq_pipeline.data.e_step`, an engine in bounded chunks), and every code that received rows
moves to the running mean of all the rows it has been assigned so far::

    counts_new = counts + n_b
    centroid  += (batch_sum - n_b * centroid) / counts_new        (float64, codes with n_b > 0)

Under ``cosine`` the rows are L2-normalized and an updated centroid is normalized again, so the
state stays a valid codebook. The first batch seeds the codes (k-means++ by default, as a fit does)
and is then absorbed like every later batch, so it needs at least ``n_codes`` rows.

Empty codes: a code that has still received no row once a batch is absorbed (an init tensor or
codebook far from the data, or duplicate rows under ``init='random'``/``'first'``) is moved to the
farthest row of that batch not taken yet, and keeps its count of 0, so the next rows it receives
replace it entirely. Codes that received rows once are never moved.

The state is what a codebook file holds (centroids, counts, metric), so a stream can continue from
a saved codebook (:meth:`MiniBatchState.from_codebook`). Same batches, same settings and the same
device kind give the same state.

    state = start_minibatch(first_batch, 256, metric="cosine", seed=0)
    for batch in batches:
        state = update_minibatch(state, batch)
    codebook = state.to_codebook()
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .codebook import Codebook, tensor_fingerprint
from .data import EStepStats, InMemoryRows
from .errors import DimensionMismatchError, InvalidInputError, TooFewPointsError
from .kmeans import fit_codebook
from .settings import FitSettings
from .validate import as_embeddings, check_int, check_nonzero_rows, normalize_rows, resolve_device

#: The fit's defaults (metric, n_iter, tol, init, seed, n_init, engine, device, memory_budget), from
#: the one source of defaults, :class:`vq_pipeline.FitSettings`.
FIT_DEFAULTS = FitSettings().keywords()


@dataclass(frozen=True, eq=False)
class MiniBatchState:
    """Where a mini-batch fit stands after its last batch.

    Attributes:
        centroids: (n_codes, dim) float32 CPU tensor; unit rows under 'cosine'.
        counts: (n_codes,) int64 CPU tensor: rows assigned to each code over every batch absorbed.
        metric: 'l2' or 'cosine'.
        settings: how it was seeded (n_codes, metric, init, seed, engine, device), recorded in the codebook.
        n_batches, n_rows: batches and rows absorbed. n_repairs: empty codes moved to a far row.
        batch_inertia: the last batch's objective (sum of squared L2, or of ``1 - cos``) against the
            centroids it was assigned to, before its update.
        streamed_inertia: the sum of every batch's ``batch_inertia`` (a progressive estimate: each row
            is measured before the codes learn from it).
        data_fingerprint: sha256 chained over the batches' fingerprints, in order.
        parent_fingerprint: the codebook the stream continued from, or "".
    """

    centroids: torch.Tensor
    counts: torch.Tensor
    metric: str
    settings: dict[str, Any] = field(default_factory=dict)
    n_batches: int = 0
    n_rows: int = 0
    n_repairs: int = 0
    batch_inertia: float = 0.0
    streamed_inertia: float = 0.0
    data_fingerprint: str = ""
    parent_fingerprint: str = ""

    @property
    def n_codes(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @classmethod
    def from_codebook(cls, codebook: Codebook) -> MiniBatchState:
        """Continue a stream from ``codebook``: its centroids, with its counts as the rows they already hold."""
        stats = codebook.stats
        return cls(
            centroids=codebook.centroids.clone(),
            counts=codebook.counts.clone(),
            metric=codebook.metric,
            settings=dict(codebook.settings),
            n_batches=int(stats.get("n_batches", 0)),
            n_rows=int(codebook.counts.sum()),
            n_repairs=int(stats.get("n_repairs", 0)),
            data_fingerprint=codebook.data_fingerprint,
            parent_fingerprint=codebook.fingerprint,
        )

    def to_codebook(self, *, sources: tuple[str, ...] = (), column: str = "") -> Codebook:
        """The codebook of this state, with its streaming statistics (``stats['mode'] == 'minibatch'``).

        There is no ``stats['inertia']``: no pass over all the rows with the final centroids was made.
        """
        return Codebook(
            centroids=self.centroids,
            counts=self.counts,
            metric=self.metric,
            settings={**self.settings, "algorithm": "minibatch"},
            stats={
                "mode": "minibatch",
                "n_rows": self.n_rows,
                "n_batches": self.n_batches,
                "n_repairs": self.n_repairs,
                "empty_codes": int((self.counts == 0).sum()),
                "batch_inertia": self.batch_inertia,
                "streamed_inertia": self.streamed_inertia,
            },
            data_fingerprint=self.data_fingerprint,
            sources=tuple(sources),
            column=column,
            parent_fingerprint=self.parent_fingerprint,
        )


def start_minibatch(
    x: Any,
    n_codes: int,
    *,
    metric: str = FIT_DEFAULTS["metric"],
    init: Any = FIT_DEFAULTS["init"],
    seed: int = FIT_DEFAULTS["seed"],
    engine: str = FIT_DEFAULTS["engine"],
    device: str | torch.device | None = FIT_DEFAULTS["device"],
    memory_budget: int = FIT_DEFAULTS["memory_budget"],
) -> MiniBatchState:
    """Seed ``n_codes`` codes from the first batch ``x``, then absorb it (one assignment and mean update).

    The seeding is the fit's own (:func:`vq_pipeline.fit_codebook` with ``n_iter=0``): the same
    ``init`` and ``seed`` pick the same initial centroids from the same rows.

    Args:
        x: (n_rows, dim) first batch, torch tensor (any device) or numpy array, ``n_rows >= n_codes``.
        n_codes: number of codes.
        metric: 'l2' or 'cosine'.
        init: a named init of :func:`vq_pipeline.fit_codebook` ('k-means++': greedy k-means++ on the
            batch), a (n_codes, dim) tensor, or a Codebook to continue from (its counts are kept).
        seed: seed of the seeding's random choices.
        engine, device, memory_budget: as in :func:`vq_pipeline.fit_codebook`.

    Raises:
        TooFewPointsError: fewer than ``n_codes`` rows, or fewer distinct rows than codes.
    """
    n_codes = check_int("n_codes", n_codes, minimum=1, hint="n_codes is the number of centroids to fit.")
    opts = {"engine": engine, "device": device, "memory_budget": memory_budget}
    if isinstance(init, Codebook):
        if init.metric != metric or init.n_codes != n_codes:
            raise InvalidInputError(
                f"init codebook has metric={init.metric!r} and n_codes={init.n_codes}, but metric={metric!r} and "
                f"n_codes={n_codes} were asked for; expected the same. Fix: pass metric={init.metric!r} and "
                f"n_codes={init.n_codes}, or start from init='k-means++'."
            )
        return update_minibatch(MiniBatchState.from_codebook(init), x, **opts)
    n_rows = _n_rows(x)
    if n_rows is not None and n_rows < n_codes:
        raise TooFewPointsError(
            f"the first batch has n_rows={n_rows} rows but n_codes={n_codes}; the codes are seeded from the first "
            f"batch, so it needs at least n_codes rows. Fix: make the first batch at least {n_codes} rows (e.g. "
            f"join the first few batches), or lower n_codes to at most {n_rows}."
        )
    seeded = fit_codebook(x, n_codes, metric=metric, n_iter=0, init=init, seed=seed, **opts)
    dropped = ("n_iter", "tol", "n_init")  # Lloyd's loop settings; a stream has none
    state = MiniBatchState(
        centroids=seeded.centroids,
        counts=torch.zeros(n_codes, dtype=torch.int64),
        metric=seeded.metric,
        settings={k: v for k, v in seeded.settings.items() if k not in dropped},
        parent_fingerprint=seeded.parent_fingerprint,
    )
    return update_minibatch(state, x, **opts)


def _n_rows(x: Any) -> int | None:
    """The row count of a 2-d array or tensor (None for anything else: validation explains it)."""
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def update_minibatch(
    state: MiniBatchState,
    x: Any,
    *,
    engine: str = FIT_DEFAULTS["engine"],
    device: str | torch.device | None = FIT_DEFAULTS["device"],
    memory_budget: int = FIT_DEFAULTS["memory_budget"],
) -> MiniBatchState:
    """Absorb one more batch: assign every row of ``x`` its exact nearest code, move the codes to
    their running means, repair codes that still have no row. Returns the new state.

    Args:
        state: from :func:`start_minibatch`, :func:`update_minibatch` or :meth:`MiniBatchState.from_codebook`.
        x: (n_rows, dim) batch, torch tensor (any device) or numpy array; any number of rows >= 1.
    """
    budget = check_int("memory_budget", memory_budget, minimum=1)
    x, fingerprint = _batch(x, state.metric, dim=state.dim)
    return _absorb(state, x, fingerprint, engine=engine, device=resolve_device(device, x), memory_budget=budget)


def fit_minibatch(
    batches: Iterable[Any],
    n_codes: int,
    *,
    metric: str = FIT_DEFAULTS["metric"],
    init: Any = FIT_DEFAULTS["init"],
    seed: int = FIT_DEFAULTS["seed"],
    engine: str = FIT_DEFAULTS["engine"],
    device: str | torch.device | None = FIT_DEFAULTS["device"],
    memory_budget: int = FIT_DEFAULTS["memory_budget"],
) -> Codebook:
    """One pass of mini-batch K-means over ``batches`` ((n_rows, dim) arrays or tensors, the first
    with at least ``n_codes`` rows); the codebook of the final state. See :func:`start_minibatch`."""
    state: MiniBatchState | None = None
    opts = {"engine": engine, "device": device, "memory_budget": memory_budget}
    for x in batches:
        if state is None:
            state = start_minibatch(x, n_codes, metric=metric, init=init, seed=seed, **opts)
        else:
            state = update_minibatch(state, x, **opts)
    if state is None:
        raise InvalidInputError(
            "batches yielded no batch; expected at least one (n_rows, dim) batch. Fix: check the stream is not empty."
        )
    return state.to_codebook()


def _batch(x: Any, metric: str, *, dim: int | None) -> tuple[torch.Tensor, str]:
    """(rows, fingerprint): validated (n_rows, dim) float32 rows (unit rows under cosine) and the
    fingerprint of the rows as given."""
    x = as_embeddings(x)
    if dim is not None and x.shape[1] != dim:
        raise DimensionMismatchError(
            f"x.shape[1]={x.shape[1]} but the codes have dim={dim}; expected batches of width {dim}. "
            f"Fix: pass batches of the same embedding model as the first one."
        )
    fingerprint = tensor_fingerprint(x)
    if metric == "cosine":
        check_nonzero_rows(x)
        x = normalize_rows(x)
    return x, fingerprint


def _absorb(
    state: MiniBatchState,
    x: torch.Tensor,
    fingerprint: str,
    *,
    engine: str,
    device: torch.device,
    memory_budget: int,
) -> MiniBatchState:
    """One mini-batch step on validated (n_rows, dim) float32 rows ``x`` (unit rows under cosine) whose
    input had ``fingerprint``; see the module docstring."""
    c = state.centroids.to(device, torch.float32).contiguous()  # (n_codes, dim)
    p = InMemoryRows(x, engine=engine, memory_budget=memory_budget).e_step(c).to("cpu")
    n_b = p.counts  # (n_codes,) int64
    counts = state.counts + n_b  # (n_codes,)
    hit = n_b > 0  # (n_codes,)
    c64 = state.centroids.double()  # (n_codes, dim)
    # The running mean of every row a code has received: Sculley's per-code rate 1 / count, per batch.
    step = (p.sums[hit] - n_b[hit, None] * c64[hit]) / counts[hit, None]  # (n_hit, dim) float64
    moved = c64[hit] + step  # (n_hit, dim)
    if state.metric == "cosine":
        norms = torch.linalg.vector_norm(moved, dim=1, keepdim=True)  # (n_hit, 1)
        # Opposite unit rows can cancel to ~0: keep the old direction rather than divide by it.
        moved = torch.where(norms > 1e-12, moved / norms.clamp_min(1e-300), c64[hit])
    c64[hit] = moved
    centroids = c64.to(torch.float32)  # (n_codes, dim)
    n_repairs = _repair_empty(centroids, counts, p, state.metric)
    inertia = p.objective * (0.5 if state.metric == "cosine" else 1.0)  # |a - b|^2 = 2 (1 - cos) for unit rows
    chained = hashlib.sha256(f"{state.data_fingerprint}|{fingerprint}".encode()).hexdigest()
    return replace(
        state,
        centroids=centroids,
        counts=counts,
        n_batches=state.n_batches + 1,
        n_rows=state.n_rows + x.shape[0],
        n_repairs=state.n_repairs + n_repairs,
        batch_inertia=inertia,
        streamed_inertia=state.streamed_inertia + inertia,
        data_fingerprint=chained,
    )


def _repair_empty(centroids: torch.Tensor, counts: torch.Tensor, p: EStepStats, metric: str) -> int:
    """Move codes that have never received a row to the batch's farthest distinct rows (in place).

    Args:
        centroids: (n_codes, dim) float32 CPU, updated in place. counts: (n_codes,) int64 after the batch.
        p: the batch's E step on the CPU: ``far_rows`` (n_far, dim), ``far_sqdist`` (n_far,) descending.

    Returns:
        How many codes were moved; codes left empty (too few far rows) wait for the next batch.
    """
    empty = (counts == 0).nonzero()[:, 0].tolist()
    picked: list[torch.Tensor] = []
    for d, row in zip(p.far_sqdist.tolist(), p.far_rows):
        if len(picked) == len(empty) or d <= 0:  # a row on its centroid adds nothing new
            break
        if not any(torch.equal(row, q) for q in picked):
            picked.append(row)
    for code, row in zip(empty, picked):
        centroids[code] = row
    if metric == "cosine" and picked:
        moved = empty[: len(picked)]
        centroids[moved] = normalize_rows(centroids[moved])
    return len(picked)


__all__ = ["MiniBatchState", "fit_minibatch", "start_minibatch", "update_minibatch"]
