"""Mini-batch K-means for streams: Lloyd on the first batch, then per batch exact assignments, running means, splits.

Sculley's mini-batch K-means (what scikit-learn's ``MiniBatchKMeans.partial_fit`` runs), with the
library's exact nearest-code assignment and three additions that one pass over a stream needs:

1. **Start**: the first batch is seeded as a fit seeds (k-means|| by default), then ``init_iter``
   Lloyd iterations run on it (:func:`vq_pipeline.fit_codebook` with ``n_iter=init_iter``) before it
   is absorbed like every later batch, so it needs at least ``n_codes`` rows.
2. **Running means, refined per batch**: every batch is assigned its exact nearest codes
   (:func:`vq_pipeline.compute.assign.nearest_in_chunks`, an engine in bounded chunks), and every code that
   received rows moves to the running mean of all the rows it has been assigned so far::

       counts_new = counts + n_b
       centroid   = old + (batch_sum - n_b * old) / counts_new        (float64, codes with n_b > 0)

   With ``batch_iter > 1`` the batch is assigned again to the moved codes and the update is redone
   from the old centroids and counts (a weighted Lloyd step on the batch plus the old codes, each
   weighing its count): the batch's rows go to codes that have already learnt from it.
3. **Splits of under-used codes**: a code that received no row of the batch and holds fewer than
   ``split_ratio`` times the rows of an average code (``counts * n_codes < split_ratio * n_rows``)
   may move to split a crowded code (at least ``max(2, batch rows / n_codes)`` rows in the batch),
   largest batch error first: the two take the crowded code's centroid plus and minus half the mean
   absolute offset of its batch rows along their principal axis (power iteration), and share its
   count and the moved code's. A split is made only where it pays: the median gain of the crowded
   code's batch rows, times the rows it stands for, must exceed what the moved code's rows lose by
   going to the nearest other code (``counts * squared distance``). Codes that cover lone far rows
   stay; a lone far row cannot pay for a split along its own direction.

Why: k-means++ seeding (k-means|| too) on one batch spends many codes on that batch's far rows;
later batches rarely reach them (they end with one or two rows each), while the dense regions stay
under-coded, and a running mean cannot move a code that receives nothing. On real token embeddings
each of the three additions brings a one-pass fit's inertia closer to a full Lloyd fit's, the splits
most, and together they do best, at some extra time. On data where no code is under-used
(scikit-learn's digits) the gain comes from the Lloyd iterations on the first batch and the second
assignment. Figures in the docs' Benchmarks page, "Mini-batch K-means".

Under ``cosine`` the rows are L2-normalized and an updated or split centroid is normalized again,
so the state stays a valid codebook.

Empty codes: a code that has still received no row once a batch is absorbed (an init tensor or
codebook far from the data, or duplicate rows under ``init='random'``/``'first'``) is moved to the
farthest row of that batch not taken yet, and keeps its count of 0, so the next rows it receives
replace it entirely.

Counts sum to the rows absorbed (a split shares counts, it neither adds nor drops any). The state is
what a codebook file holds (centroids, counts, metric, and the settings above), so a stream can
continue from a saved codebook (:meth:`MiniBatchState.from_codebook`) with the settings it started
with. Same batches, same settings and the same device kind give the same state.

    state = start_minibatch(first_batch, 256, FitSettings(metric="cosine", seed=0))
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

from vq_pipeline.codebook import Codebook, tensor_fingerprint
from vq_pipeline.compute.assign import nearest_in_chunks, plan_chunk_rows
from vq_pipeline.compute.data import farthest
from vq_pipeline.compute.engines import get_engine
from vq_pipeline.errors import DimensionMismatchError, InvalidInputError, TooFewPointsError
from vq_pipeline.fitting.kmeans import fit_codebook
from vq_pipeline.io.codebook_file import MAX_TRAINING_ROWS
from vq_pipeline.settings import FitSettings
from vq_pipeline.validate import (
    as_embeddings,
    check_float,
    check_int,
    check_nonzero_rows,
    normalize_rows,
    resolve_device,
)

#: The fit's defaults (metric, n_iter, tol, init, seed, n_init, engine, device, memory_budget), from
#: the one source of defaults, :class:`vq_pipeline.FitSettings`.
FIT_DEFAULTS = FitSettings().keywords()

#: The stream's own settings (see the module docstring), recorded in the state's and the codebook's
#: settings; a stream continued from a state or codebook uses the ones recorded there.
STREAM_DEFAULTS: dict[str, Any] = {"init_iter": 5, "batch_iter": 2, "split_ratio": 0.05}


@dataclass(frozen=True)
class StreamSettings:
    """The stream's own settings: a field left None takes the value a continued state or codebook
    recorded, else its default (:data:`STREAM_DEFAULTS`)."""

    #: Lloyd iterations on the first batch (default 5; 0: the seeds as they are).
    init_iter: int | None = None
    #: Assignments per batch (default 2; 1: plain Sculley), for the first and every later batch.
    batch_iter: int | None = None
    #: Codes with no row in a batch and fewer than ``split_ratio`` times an average code's rows may
    #: move to split a crowded code, where that pays (default 0.05; 0: never).
    split_ratio: float | None = None

    def resolved(self, recorded: dict[str, Any]) -> dict[str, Any]:
        """Each setting: given, else ``recorded``, else the default; validated."""
        return _stream_settings(recorded, **{k: getattr(self, k) for k in STREAM_DEFAULTS})


#: FitSettings fields a stream does not use: its loop is the stream's (``StreamSettings``).
_UNUSED_FIT_FIELDS = ("n_iter", "tol", "n_init", "prune")

#: Power iterations for a split code's principal axis: enough to find a direction of large spread.
_AXIS_ITERATIONS = 12


@dataclass(frozen=True, eq=False)
class MiniBatchState:
    """Where a mini-batch fit stands after its last batch.

    Attributes:
        centroids: (n_codes, dim) float32 CPU tensor; unit rows under 'cosine'.
        counts: (n_codes,) int64 CPU tensor: the rows each code stands for (the rows assigned to it over
            every batch absorbed; a split code and the code moved to split it share theirs).
        metric: 'l2' or 'cosine'.
        settings: how it was seeded (n_codes, metric, init, seed, engine, device) and the stream's
            settings (init_iter, batch_iter, split_ratio), recorded in the codebook.
        n_batches, n_rows: batches and rows absorbed. n_repairs: empty codes moved to a far row.
        n_splits: under-used codes moved to split a code with a large error.
        batch_inertia: the last batch's objective (sum of squared L2, or of ``1 - cos``) against the
            centroids it was first assigned to, before its update.
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
    n_splits: int = 0
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
            n_splits=int(stats.get("n_splits", 0)),
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
                "n_splits": self.n_splits,
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
    x: Any, n_codes: int, settings: FitSettings | None = None, stream: StreamSettings | None = None
) -> MiniBatchState:
    """Seed ``n_codes`` codes from the first batch ``x``, run ``init_iter`` Lloyd iterations on it, then
    absorb it as :func:`update_minibatch` absorbs every batch.

    The start is the fit's own: the codes before the batch is absorbed are those of
    :func:`vq_pipeline.fit_codebook` on ``x`` with ``n_iter=init_iter`` and the same ``init`` and ``seed``.

    Args:
        x: (n_rows, dim) first batch, torch tensor (any device) or numpy array, ``n_rows >= n_codes``.
        n_codes: number of codes.
        settings: the fit's :class:`~vq_pipeline.settings.FitSettings` (default: the defaults), of which
            a stream uses ``metric``, ``init``, ``seed``, ``engine``, ``device`` and ``memory_budget``
            (a flat codec; ``n_iter``, ``tol``, ``n_init`` and ``prune`` are refused unless left at their
            defaults: the stream's loop is ``stream``'s). ``init``: a named init of
            :func:`vq_pipeline.fit_codebook` (default 'auto': k-means|| on the batch; 'k-means++': exact
            greedy k-means++ on it), a (n_codes, dim) tensor, or a Codebook to continue from (its counts
            are kept and no Lloyd iteration runs; ``stream``'s ``batch_iter`` and ``split_ratio``, when
            given, replace the ones it records).
        stream: :class:`StreamSettings` (``init_iter``, ``batch_iter``, ``split_ratio``).

    Raises:
        TooFewPointsError: fewer than ``n_codes`` rows, or fewer distinct rows than codes.
    """
    n_codes = check_int("n_codes", n_codes, minimum=1, hint="n_codes is the number of centroids to fit.")
    settings, stream_given = _stream_fit_settings(settings), stream or StreamSettings()
    metric, init, seed = settings.metric, settings.init, settings.seed
    opts = {"engine": settings.engine, "device": settings.device, "memory_budget": settings.memory_budget}
    stream = stream_given.resolved({})
    if isinstance(init, Codebook):
        if init.metric != metric or init.n_codes != n_codes:
            raise InvalidInputError(
                f"init codebook has metric={init.metric!r} and n_codes={init.n_codes}, but metric={metric!r} and "
                f"n_codes={n_codes} were asked for; expected the same. Fix: pass metric={init.metric!r} and "
                f"n_codes={init.n_codes}, or start from init='k-means++'."
            )
        resumed = MiniBatchState.from_codebook(init)
        given = {"batch_iter": stream_given.batch_iter, "split_ratio": stream_given.split_ratio}
        return update_minibatch(resumed, x, **given, **opts)
    n_rows = _n_rows(x)
    if n_rows is not None and n_rows < n_codes:
        raise TooFewPointsError(
            f"the first batch has n_rows={n_rows} rows but n_codes={n_codes}; the codes are seeded from the first "
            f"batch, so it needs at least n_codes rows. Fix: make the first batch at least {n_codes} rows (e.g. "
            f"join the first few batches), or lower n_codes to at most {n_rows}."
        )
    seeded = fit_codebook(x, n_codes, metric=metric, n_iter=stream["init_iter"], init=init, seed=seed, **opts)
    dropped = ("n_iter", "tol", "n_init")  # Lloyd's loop settings; init_iter records the first batch's
    state = MiniBatchState(
        centroids=seeded.centroids,
        counts=torch.zeros(n_codes, dtype=torch.int64),
        metric=seeded.metric,
        settings={**{k: v for k, v in seeded.settings.items() if k not in dropped}, **stream},
        parent_fingerprint=seeded.parent_fingerprint,
    )
    return update_minibatch(state, x, **opts)


def _stream_fit_settings(settings: FitSettings | None) -> FitSettings:
    """``settings`` (default: the defaults), refused when they ask for what a stream does not do."""
    settings = FitSettings() if settings is None else settings
    unused = {k: getattr(settings, k) for k in _UNUSED_FIT_FIELDS if getattr(settings, k) != getattr(FitSettings, k)}
    if settings.codec != "flat":
        unused["codec"] = settings.codec
    if unused:
        raise InvalidInputError(
            f"{', '.join(f'{k}={v!r}' for k, v in unused.items())} in the settings of a mini-batch stream; expected "
            f"the defaults: a stream runs its own loop (StreamSettings: init_iter, batch_iter, split_ratio) and fits "
            f"flat codebooks. Fix: leave them at their defaults, or fit all rows with fit_codebook."
        )
    return settings


def _stream_settings(recorded: dict[str, Any], **given: Any) -> dict[str, Any]:
    """The stream settings: each one given (not None), else the one ``recorded``, else the default; validated."""
    out = {k: given[k] if given.get(k) is not None else recorded.get(k, d) for k, d in STREAM_DEFAULTS.items()}
    out["init_iter"] = check_int("init_iter", out["init_iter"], minimum=0, hint="0 keeps the seeds as they are.")
    out["batch_iter"] = check_int("batch_iter", out["batch_iter"], minimum=1, hint="1 is plain mini-batch K-means.")
    out["split_ratio"] = check_float("split_ratio", out["split_ratio"])
    return out


def _n_rows(x: Any) -> int | None:
    """The row count of a 2-d array or tensor (None for anything else: validation explains it)."""
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def update_minibatch(
    state: MiniBatchState,
    x: Any,
    *,
    batch_iter: int | None = None,
    split_ratio: float | None = None,
    engine: str = FIT_DEFAULTS["engine"],
    device: str | torch.device | None = FIT_DEFAULTS["device"],
    memory_budget: int = FIT_DEFAULTS["memory_budget"],
) -> MiniBatchState:
    """Absorb one more batch: assign every row of ``x`` its exact nearest code and move the codes to
    their running means (``batch_iter`` times), repair codes that still have no row, split the codes
    with the largest errors with under-used codes. Returns the new state.

    Args:
        state: from :func:`start_minibatch`, :func:`update_minibatch` or :meth:`MiniBatchState.from_codebook`.
        x: (n_rows, dim) batch, torch tensor (any device) or numpy array; any number of rows >= 1.
        batch_iter, split_ratio: as in :func:`start_minibatch`; None (default): the ones recorded in
            ``state.settings`` (the defaults for a codebook that records none). Given ones are recorded.
    """
    budget = check_int("memory_budget", memory_budget, minimum=1)
    stream = _stream_settings(state.settings, batch_iter=batch_iter, split_ratio=split_ratio)
    stream.pop("init_iter")  # recorded by start_minibatch only: a stream from a fitted codebook had no first batch
    x, fingerprint = _batch(x, state.metric, dim=state.dim)
    _check_room(state, x.shape[0])
    state = replace(state, settings={**state.settings, **stream})
    return _absorb(state, x, fingerprint, engine=engine, device=resolve_device(device, x), memory_budget=budget)


def _check_room(state: MiniBatchState, n_rows: int) -> None:
    """Refuse a batch of ``n_rows`` rows that would take the stream's counts beyond what int64 counts hold
    in a mini-batch step (their sum times n_codes, when under-used codes are found), or beyond
    ``MAX_TRAINING_ROWS``, which a codebook's counts may sum to."""
    counts = state.counts.to(torch.int64)  # (n_codes,), never negative in a Codebook
    # Exact sum without int64 wrap-around: the high and low 32 bits of each count summed apart.
    total = (int((counts >> 32).sum()) << 32) + int((counts & 0xFFFFFFFF).sum())
    limit = min(MAX_TRAINING_ROWS, (2**63 - 1) // max(1, state.n_codes))
    if total + n_rows <= limit:
        return
    name = f"codebook {state.parent_fingerprint[:16]}" if state.parent_fingerprint else "the stream's codebook"
    raise InvalidInputError(
        f"{name} (the codes this stream continues): its counts sum to {total} rows, and the batch's {n_rows} rows "
        f"would make {total + n_rows}; expected at most {limit} (MAX_TRAINING_ROWS=2**53, and the counts times "
        f"n_codes={state.n_codes} must fit int64). The batch is fine; the counts are too large to add to. Fix: "
        f"continue from the codebook with its counts scaled down (e.g. counts // 1024 keeps their proportions), "
        f"or start a new stream from its centroids."
    )


def fit_minibatch(
    batches: Iterable[Any], n_codes: int, settings: FitSettings | None = None, stream: StreamSettings | None = None
) -> Codebook:
    """One pass of mini-batch K-means over ``batches`` ((n_rows, dim) arrays or tensors, the first
    with at least ``n_codes`` rows); the codebook of the final state. See :func:`start_minibatch`."""
    state: MiniBatchState | None = None
    for x in batches:
        if state is None:
            state = start_minibatch(x, n_codes, settings, stream)
        else:
            s = settings or FitSettings()
            state = update_minibatch(state, x, engine=s.engine, device=s.device, memory_budget=s.memory_budget)
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


@dataclass(frozen=True)
class _Assignment:
    """One exact assignment of a batch, on the CPU.

    codes: (n_rows,) int64. sqdist: (n_rows,) float32 squared L2 to the code. sums: (n_codes, dim)
    float64 per-code sums of the rows. counts: (n_codes,) int64. objective: sum of sqdist (float64).
    """

    codes: torch.Tensor
    sqdist: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    objective: float


def _assign(x: torch.Tensor, c: torch.Tensor, *, engine: str, memory_budget: int) -> _Assignment:
    """Assign the (n_rows, dim) float32 rows ``x`` (any device) to the nearest of the (n_codes, dim)
    float32 centroids ``c`` (on the compute device), in chunks through the engine."""
    (n_codes, dim), n_rows = c.shape, x.shape[0]
    eng = get_engine(engine, c.device, dim)
    chunk_rows = plan_chunk_rows(n_rows, n_codes, dim, k=1, engine=eng, memory_budget=memory_budget)
    sums = torch.zeros((n_codes, dim), dtype=torch.float64, device=c.device)  # (n_codes, dim)
    codes, sqdist = [], []
    for _, xb, d, idx in nearest_in_chunks(x, c, k=1, engine=eng, chunk_rows=chunk_rows):
        sums.index_add_(0, idx[:, 0], xb.double())
        codes.append(idx[:, 0].cpu())
        sqdist.append(d[:, 0].clamp_min(0).cpu())
    code = torch.cat(codes)  # (n_rows,) int64
    dist = torch.cat(sqdist)  # (n_rows,) float32
    counts = torch.bincount(code, minlength=n_codes)  # (n_codes,)
    return _Assignment(code, dist, sums.cpu(), counts, float(dist.double().sum()))


def _running_means(c64: torch.Tensor, counts: torch.Tensor, a: _Assignment, metric: str) -> torch.Tensor:
    """(n_codes, dim) float64: every code that received rows in ``a`` moved to the running mean of
    its rows, from the (n_codes, dim) float64 centroids ``c64`` weighing their (n_codes,) ``counts``."""
    out = c64.clone()  # (n_codes, dim)
    n_b = a.counts  # (n_codes,)
    hit = n_b > 0  # (n_codes,)
    # The running mean of every row a code has received: Sculley's per-code rate 1 / count, per batch.
    step = (a.sums[hit] - n_b[hit, None] * c64[hit]) / (counts[hit] + n_b[hit])[:, None]  # (n_hit, dim)
    moved = c64[hit] + step  # (n_hit, dim)
    if metric == "cosine":
        norms = torch.linalg.vector_norm(moved, dim=1, keepdim=True)  # (n_hit, 1)
        # Opposite unit rows can cancel to ~0: keep the old direction rather than divide by it.
        moved = torch.where(norms > 1e-12, moved / norms.clamp_min(1e-300), c64[hit])
    out[hit] = moved
    return out


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
    input had ``fingerprint``, with the stream settings of ``state.settings``; see the module docstring."""
    settings = state.settings
    c64 = state.centroids.double()  # (n_codes, dim)
    opts = {"engine": engine, "memory_budget": memory_budget}
    first = a = _assign(x, state.centroids.to(device, torch.float32).contiguous(), **opts)
    moved = _running_means(c64, state.counts, a, state.metric)  # (n_codes, dim) float64
    for _ in range(settings["batch_iter"] - 1):
        # Again from the old codes and counts: only where the batch's rows go changes.
        a = _assign(x, moved.to(device, torch.float32).contiguous(), **opts)
        moved = _running_means(c64, state.counts, a, state.metric)
    counts = state.counts + a.counts  # (n_codes,)
    centroids = moved.to(torch.float32)  # (n_codes, dim)
    x_cpu = x.cpu()  # (n_rows, dim)
    far_sqdist, far_rows = farthest(a.sqdist, x_cpu, state.n_codes)
    n_repairs = _repair_empty(centroids, counts, far_sqdist, far_rows, state.metric)
    n_splits = _split_underused(centroids, counts, a, x_cpu, settings["split_ratio"], state.metric)
    inertia = first.objective * (0.5 if state.metric == "cosine" else 1.0)  # |a - b|^2 = 2 (1 - cos) for unit rows
    chained = hashlib.sha256(f"{state.data_fingerprint}|{fingerprint}".encode()).hexdigest()
    return replace(
        state,
        centroids=centroids,
        counts=counts,
        n_batches=state.n_batches + 1,
        n_rows=state.n_rows + x.shape[0],
        n_repairs=state.n_repairs + n_repairs,
        n_splits=state.n_splits + n_splits,
        batch_inertia=inertia,
        streamed_inertia=state.streamed_inertia + inertia,
        data_fingerprint=chained,
    )


def _repair_empty(
    centroids: torch.Tensor, counts: torch.Tensor, far_sqdist: torch.Tensor, far_rows: torch.Tensor, metric: str
) -> int:
    """Move codes that have never received a row to the batch's farthest distinct rows (in place).

    Args:
        centroids: (n_codes, dim) float32 CPU, updated in place. counts: (n_codes,) int64 after the batch.
        far_sqdist: (n_far,) float32 descending, the batch's largest distances to their codes;
            far_rows: (n_far, dim) float32, their rows (CPU).

    Returns:
        How many codes were moved; codes left empty (too few far rows) wait for the next batch.
    """
    empty = (counts == 0).nonzero()[:, 0].tolist()
    if not empty:
        return 0
    picked: list[torch.Tensor] = []
    for d, row in zip(far_sqdist.tolist(), far_rows):
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


def _split_underused(
    centroids: torch.Tensor, counts: torch.Tensor, a: _Assignment, x: torch.Tensor, ratio: float, metric: str
) -> int:
    """Move under-used codes to split crowded codes with large squared errors, where that pays (in place).

    Candidates: codes with no row in the batch and ``counts * n_codes < ratio * counts.sum()``, the
    cheapest first; a candidate's cost is what its rows lose when they go to the nearest other code,
    ``counts[j] * min_k |c_j - c_k|^2``. Targets: codes with at least ``max(2, n_rows / n_codes)`` rows
    in the batch, largest batch error first. A target splits into ``c -+ h v`` (:func:`_half_split`)
    when the split's gain, the median over its batch rows of their gain times the rows it stands for
    (``counts[t]``), exceeds the cost of the cheapest candidate left, which then takes ``c + h v``.
    The median keeps a lone far row, which a split along its direction would not serve, from paying
    for a split it alone would gain from.

    Args:
        centroids: (n_codes, dim) float32 CPU, updated in place. counts: (n_codes,) int64 after the
            batch, updated in place (a split code and the code moved to split it share their counts).
        a: the batch's last assignment. x: (n_rows, dim) float32 CPU, the batch's rows.
        ratio: the split ratio (module docstring); 0 splits nothing.

    Returns:
        How many codes were moved.
    """
    n_codes = counts.shape[0]
    under = (a.counts == 0) & (counts > 0) & (counts * n_codes < ratio * int(counts.sum()))  # (n_codes,)
    if not bool(under.any()):
        return 0
    cand = under.nonzero()[:, 0]  # (n_cand,)
    c64 = centroids.double()  # (n_codes, dim)
    gaps = torch.cdist(c64[cand], c64).square()  # (n_cand, n_codes)
    gaps[torch.arange(cand.shape[0]), cand] = float("inf")
    cost = counts[cand].double() * gaps.min(dim=1).values  # (n_cand,)
    order = torch.argsort(cost, stable=True)
    cand, cost = cand[order].tolist(), cost[order].tolist()
    sse = torch.zeros(n_codes, dtype=torch.float64).index_add_(0, a.codes, a.sqdist.double())  # (n_codes,)
    targets = torch.argsort(sse, descending=True, stable=True)  # (n_codes,)
    targets = targets[a.counts[targets] >= max(2.0, x.shape[0] / n_codes)].tolist()
    by_code = torch.argsort(a.codes, stable=True)  # (n_rows,) row order grouped by code
    starts = (torch.cumsum(a.counts, 0) - a.counts).tolist()  # (n_codes,)
    n_splits = 0
    for t in targets:
        if n_splits == len(cand):
            break
        rows = x[by_code[starts[t] : starts[t] + int(a.counts[t])]].double()  # (n_t, dim)
        offset = _half_split(rows)  # (dim,)
        if offset is None:
            continue
        h = torch.linalg.vector_norm(offset)
        q = (rows - c64[t]) @ (offset / h)  # (n_t,) offsets along the axis
        gains = q.square() - torch.minimum((q - h).square(), (q + h).square())  # (n_t,)
        if float(gains.median()) * int(counts[t]) <= cost[n_splits]:
            continue
        j = cand[n_splits]
        pair = torch.stack([c64[t] - offset, c64[t] + offset])  # (2, dim)
        if metric == "cosine":
            pair = pair / torch.linalg.vector_norm(pair, dim=1, keepdim=True).clamp_min(1e-300)
        centroids[t], centroids[j] = pair.to(torch.float32)
        shared = int(counts[t] + counts[j])
        counts[t], counts[j] = (shared + 1) // 2, shared // 2
        n_splits += 1
    return n_splits


def _half_split(rows: torch.Tensor) -> torch.Tensor | None:
    """(dim,) float64 ``h v``: the principal axis ``v`` of the (n, dim) float64 ``rows`` (power iteration
    from the row farthest from their mean) times half their mean absolute offset along it, ``h``; None
    when the rows do not spread."""
    r = rows - rows.mean(dim=0)  # (n, dim)
    norms = torch.linalg.vector_norm(r, dim=1)  # (n,)
    if float(norms.max()) <= 0:
        return None
    v = r[int(norms.argmax())] / norms.max()  # (dim,)
    for _ in range(_AXIS_ITERATIONS):
        w = r.T @ (r @ v)  # (dim,)
        norm = torch.linalg.vector_norm(w)
        if float(norm) <= 0:
            break
        v = w / norm
    spread = float((r @ v).abs().mean())
    return 0.5 * spread * v if spread > 0 else None


__all__ = [
    "StreamSettings",
    "STREAM_DEFAULTS",
    "MiniBatchState",
    "fit_minibatch",
    "start_minibatch",
    "update_minibatch",
]
