"""Lloyd's K-means through an engine: init, E/M steps, empty-cluster repair, tolerance, restarts.

The loop follows the KeOps K-means tutorial (an argmin over symbolic squared distances, then
centroid means) and adds what it leaves out:

* k-means++ initialization (greedy, as in scikit-learn: ``2 + ln(n_codes)`` candidates per step),
  exact and pruned by the triangle inequality, in bounded chunks, and k-means|| (the default), which
  draws candidates in a few rounds and reduces them by weighted k-means++ (:mod:`vq_pipeline.compute.seeding`);
* empty clusters are repaired by moving them to the points farthest from their centroids
  (scikit-learn's rule), falling back to splitting the largest cluster (FAISS splits a cluster
  drawn at random, weighted by size; the largest keeps the fit deterministic); every repair
  is counted, and no centroid is ever NaN or left behind at zero;
* stopping when the objective's relative decrease falls to ``tol``, or after ``n_iter`` updates;
* ``n_init`` seeded restarts, keeping the lowest objective;
* per-iteration statistics (objective, repairs, imbalance, seconds).

Lloyd reads its rows only through a :class:`vq_pipeline.compute.data.DataSource` (in memory, streamed tables,
partitions on workers): ``e_step(centroids)`` gives the sums, counts, objective and far rows of one
pass (:class:`vq_pipeline.compute.data.EStepStats`, float64 sums), ``sample`` the rows that seeding draws from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vq_pipeline.codebook import Codebook, tensor_fingerprint
from vq_pipeline.compute.data import DataSource, InMemoryRows
from vq_pipeline.compute.lloyd import ProgressCallback, also_logged, chained, print_progress, run_steps
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.fitting.flat import fit_steps
from vq_pipeline.fitting.multilevel import fit_levels
from vq_pipeline.fitting.options import (
    FitOptions,
    fit_options,
    maybe_to_device,
    split_holdout,
    with_holdout_stats,
    with_scorecard_stats,
)
from vq_pipeline.fitting.quantizers import fit_binary, fit_scalar
from vq_pipeline.settings import FitSettings
from vq_pipeline.validate import as_embeddings, check_nonzero_rows, normalize_rows

if TYPE_CHECKING:
    from vq_pipeline.fitting.checkpoint import FitCheckpoint


def fit_codebook(
    x: Any,
    n_codes: int | None = None,
    *,
    metric: str = FitSettings.metric,
    n_iter: int = FitSettings.n_iter,
    tol: float = FitSettings.tol,
    init: str | torch.Tensor | Codebook = FitSettings.init,
    seed: int = FitSettings.seed,
    n_init: int = FitSettings.n_init,
    engine: str = FitSettings.engine,
    device: str | torch.device | None = FitSettings.device,
    memory_budget: int = FitSettings.memory_budget,
    codec: str = FitSettings.codec,
    levels: int = FitSettings.levels,
    train_beam: int = FitSettings.train_beam,
    prune: bool = FitSettings.prune,
    holdout: float = FitSettings.holdout,
    rotation: str = FitSettings.rotation,
    bits: int = FitSettings.bits,
    scalar_range: str = FitSettings.scalar_range,
    rotation_iters: int = FitSettings.rotation_iters,
    balance: float | None = FitSettings.balance,
    progress: ProgressCallback | None = None,
    verbose: bool = False,
    sources: tuple[str, ...] = (),
    column: str = "",
) -> Codebook:
    """Fit a K-means codebook with Lloyd's algorithm.

    Args:
        x: (n_rows, dim) embeddings: torch tensor (any device), numpy array (read-only ones too,
            without a copy), or a polars Series (or one-column DataFrame) of Array or same-length
            List rows. float16, bfloat16, float64 and integer inputs are converted to float32;
            NaN/Inf are refused.
        n_codes: number of centroids, ``1 <= n_codes <= n_rows`` (per level for a multi-level codec).
            Scalar and binary codecs: None (the default) or their fixed codes per dimension,
            ``2**bits`` and 2; every other codec needs it.
        metric: 'l2' (squared Euclidean) or 'cosine' (rows and centroids L2-normalized; centroids
            re-normalized after every update).
        n_iter: at most this many centroid updates (0 evaluates the initial centroids only).
        tol: stop when the objective's relative decrease is ``<= tol``.
        init: 'auto' (default: 'progressive' for residual codebooks; for others 'sample' on large tables,
            :func:`vq_pipeline.fitting.options.resolve_init`, else 'k-means||'),
            'k-means++' (exact greedy k-means++), 'k-means||' (approximate k-means||: 2 rounds of
            oversampling, then weighted k-means++ on the candidates; faster), 'progressive'
            (K-means over more and more principal directions, see :mod:`vq_pipeline.compute.progressive`),
            'sample' (k-means|| and Lloyd on a seeded sample of 256 rows a code; Lloyd on every row
            goes on from there), 'random' (distinct random rows), 'first' (the first n_codes rows, as in
            the KeOps tutorial), a (n_codes, dim) tensor, or a Codebook to warm-start from (its fingerprint
            is recorded as the parent). The file records the init used ('k-means||' or 'sample' for 'auto' flat).
        seed: seed of every random choice; with the same data, settings and device kind the
            codebook is the same.
        n_init: restarts from different seeded inits; the lowest objective wins.
        engine: 'auto', 'keops' or 'torch'. device: None (CUDA if available), 'cpu' or 'cuda'.
        memory_budget: bytes of temporaries one chunk may use.
        codec: 'flat' (default: one code per row), 'residual' (``levels`` codes per row, each level
            fitted by exact Lloyd on what the levels before it leave: coarse-to-fine semantic ids) or
            'product' (the dimensions split into ``levels`` contiguous slices, one K-means each,
            advanced together in one pass over the data per iteration). ``n_codes`` is per level.
            See :mod:`vq_pipeline.compute.levels`.
            'scalar' (``bits`` per dimension, each dimension's calibrated range cut into ``2**bits``
            evenly spaced values) or 'binary' (one bit per dimension: the sign after centring, decoded
            to ``mean +- scale``); both fitted in a few passes over the rows, no Lloyd
            (:mod:`vq_pipeline.fitting.quantizers`).
        levels: codes per row for 'residual' and 'product' (1 for 'flat'); 'product' needs
            ``dim % levels == 0``. Scalar and binary: 1 or ``dim`` (they have one level per dimension).
        rotation: 'none' (default); 'random' (a seeded random orthogonal rotation: residual, product,
            binary); 'opq' (learned with the codes, as FAISS's OPQMatrix: product, residual); 'itq'
            (iterative quantization: binary). A learned rotation runs on a seeded sample of at most
            ``max(65,536, 256 * n_codes)`` rows (``stats['rotation_rows']``); the codes are then fitted
            over all rows rotated (:mod:`vq_pipeline.fitting.rotation`).
        bits: 'scalar': 8 or 4 bits per dimension.
        scalar_range: 'scalar': 'minmax' (each dimension's minimum and maximum over the rows) or
            'quantile' (its 0.001 and 0.999 quantiles over a seeded sample of at most 65,536 rows;
            values outside are coded as the range's ends).
        rotation_iters: rounds of a learned rotation ('opq', 'itq').
        train_beam: 'residual': every level after the first is fitted on what the ``train_beam``
            best partial tuples of the levels before leave of each row (so ``train_beam`` times as
            many rows; 1: the greedy residuals). Encode with ``beam=train_beam`` to match.
        prune: skip the search of the rows whose code the triangle inequality proves unchanged
            (Hamerly's bounds, 8 bytes of state per row; :mod:`vq_pipeline.compute.prune`). The codebook is
            the same as without; ``timings['iteration_pruned']`` gives each pass's skipped rows. Off
            by default: it did not save time reliably in the benchmarks (docs' Engines page, "Exact
            pruned Lloyd").
        holdout: keep this share of the rows out of the fit (0: none, the default): the rows of
            :func:`vq_pipeline.fitting.options.holdout_rows` (seeded by ``seed``) are left out, the
            codebook is the one fitted on the others, and ``stats["holdout"]`` records the share, the
            held-out rows, the seed and their mean distance to their codes (``mean_distance``: squared
            L2, or ``1 - cos``), the error on rows the fit did not see.
            Every fit also records ``stats["scorecard"]`` (:mod:`vq_pipeline.compute.scorecard`: error,
            recall@10, prefix coherence, effective size, collision rate, and for residual codes the error and
            recall by levels ``0..l``) on the held-out rows (``"sample": "holdout"``), else on a sample of at
            most 1,024 training rows seeded by ``seed`` (``"sample": "training"``), and its seconds in
            ``timings["scorecard_seconds"]``; the centroids do not depend on it.
        balance: balanced codes (None: off, the default): every E step assigns the rows under a cap of
            ``ceil((1 + balance) * n_rows / n_codes)`` rows per code (per level for a multi-level codec;
            :mod:`vq_pipeline.compute.balanced`), and ``stats["balance"]`` (each level's in
            ``stats["levels"]``) records the cap, the largest code and how close the last assignment is to
            the least distance under the cap.
        progress: called with :class:`InitProgress` events while the initial centroids are chosen
            (when a seeding begins, after each k-means|| round, about every 5% of k-means++, at its end),
            then with a :class:`vq_pipeline.compute.lloyd.IterationProgress` (an :class:`IterationStats`)
            after every E step (of every level, for a multi-level codec); the last E step of each Lloyd
            run has ``done=True``. :func:`vq_pipeline.compute.lloyd.print_progress` prints the lines
            ``vq fit`` prints; ``log_progress(logger)`` logs them.
        verbose: also write the progress lines ``vq fit`` writes to stderr (:func:`with_verbose`).
        sources, column: provenance recorded in the codebook.

    Returns:
        A :class:`Codebook` whose counts and inertia belong to its centroids.
    """
    t_start = time.perf_counter()
    settings = FitSettings.from_keywords(locals())
    x = as_embeddings(x)
    n_rows, dim = x.shape
    opts = fit_options(n_codes, settings, dim=dim, n_rows=n_rows, x_device=x)
    data_fingerprint = tensor_fingerprint(x)
    if opts.metric == "cosine":
        check_nonzero_rows(x)
        x = normalize_rows(x)
    x, held = split_holdout(x, opts)
    source = InMemoryRows(
        maybe_to_device(x, opts.device), engine=opts.engine, memory_budget=opts.memory_budget, prune=opts.prune
    )
    codebook = fit_source(
        source,
        opts,
        data_fingerprint=data_fingerprint,
        sources=sources,
        column=column,
        progress=with_verbose(progress, verbose),
        t_start=t_start,
        held=held,
    )
    return with_holdout_stats(codebook, held, opts)


def with_verbose(progress: ProgressCallback | None, verbose: bool) -> ProgressCallback | None:
    """``progress``, preceded by the lines ``vq fit`` prints on stderr
    (:func:`vq_pipeline.compute.lloyd.print_progress`) when ``verbose``."""
    if not isinstance(verbose, bool):
        raise InvalidInputError(
            f"verbose={verbose!r}; expected True or False. Fix: pass verbose=True to print the fit's progress lines."
        )
    return chained(print_progress(), progress) if verbose else progress


def fit_source(
    source: DataSource,
    opts: FitOptions,
    *,
    data_fingerprint: str,
    sources: Sequence[str] = (),
    column: str = "",
    extra_stats: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    t_start: float | None = None,
    checkpoint: FitCheckpoint | None = None,
    held: torch.Tensor | None = None,
) -> Codebook:
    """Lloyd restarts over ``source``, seeded from its :meth:`~vq_pipeline.compute.data.DataSource.sample`;
    the one fit behind every entry point (in memory, streamed tables, partitions).

    Args:
        source: the training rows: validated, unit rows under cosine.
        checkpoint: where to save the state after every update, and to resume from if it holds a
            state of this very fit (same data fingerprint and settings); removed once the fit ends.
        held: the rows held out of the fit (validated like ``source``'s), or None.

    Every fit records ``stats["scorecard"]``, a scorecard of its codes
    (:func:`vq_pipeline.fitting.options.with_scorecard_stats`) on the held-out rows when there are any, else on a
    seeded sample of the training rows, and ``timings["scorecard_seconds"]``; the centroids do not depend on it.

    A multi-level codec (``opts.codec``) fits its levels through :func:`fit_steps` each
    (:func:`vq_pipeline.fitting.multilevel.fit_levels`).
    """
    kwargs = dict(
        data_fingerprint=data_fingerprint,
        sources=sources,
        column=column,
        extra_stats=extra_stats,
        progress=also_logged(progress),  # the library's log gets the lines too
        t_start=t_start,
        checkpoint=checkpoint,
    )
    if opts.codec == "scalar":
        codebook = fit_scalar(source, opts, **kwargs)
    elif opts.codec == "binary":
        codebook = fit_binary(source, opts, **kwargs)
    elif opts.codec != "flat":
        codebook = fit_levels(source, opts, **kwargs)
    else:
        codebook = run_steps(fit_steps(source, opts, **kwargs), source.e_step)
    return with_scorecard_stats(codebook, source, held, opts)
