"""Stable code numbers across refits: renumber a codebook's codes to agree with the codebook it replaces.

K-means numbers its codes in no meaningful order, so a refit (a cold one above all) gives code 17 to
other rows than the codebook before it did, and every table keyed on code numbers silently changes
meaning. :func:`align_codebook` permutes a codebook's codes (centroids and counts together) so that
as many rows as possible keep their number; the partition of the rows never changes, only the
numbers of its cells.

* With rows ``x`` (a sample of the training rows): the numbering that maximizes the rows that keep
  their code, exactly: the Hungarian assignment on the ``(n_codes, n_ref)`` table of how many rows
  each pair of codes (new, reference) shares. Codes the rows do not tell apart (no row in either)
  are matched by centroid distance.
* Without rows: the numbering that minimizes the total distance between matched centroids (squared
  L2, or ``1 - cos`` under cosine). Cheaper, and blind to where the rows are: a centroid that moved
  a little can still cover other rows.

Residual and product codebooks are renumbered level by level, each level on its own codes (the
renumbering of one level never changes what another level's codes mean, nor any decoded vector);
``kept`` is then the share of rows whose whole tuple of codes keeps its numbers.

Different code counts: only the first ``min(n_codes, n_ref)`` reference numbers can be kept (the new
codebook's numbers are ``0..n_codes-1``); new codes left unmatched take the unused numbers in
increasing order of their own index. The aligned codebook records what was done in
``stats["alignment"]`` (:func:`align_codebook`). Its centroids are in another order, so its
fingerprint differs from the unaligned codebook's (unless no code moved).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vq_pipeline.errors import DimensionMismatchError, InvalidInputError
from vq_pipeline.validate import check_choice

if TYPE_CHECKING:
    from vq_pipeline.codebook import Codebook

#: How :func:`align_codebook` matches codes: "auto" is "cooccurrence" with rows, "centroids" without.
ALIGN_METHODS = ("auto", "cooccurrence", "centroids")
#: Largest ``n_codes * n_ref`` aligned: the dense tables take 8 bytes a pair (0.5 GiB each at 8,192
#: codes), and the Hungarian assignment's time grows up to the cube of the code count, so the limit
#: bounds its time too (figures in the docs' Benchmarks page, "Stable code ids").
MAX_ALIGN_PAIRS = 8192 * 8192


def centroid_costs(centroids: torch.Tensor, reference: torch.Tensor, metric: str) -> np.ndarray:
    """(n_codes, n_ref) float64 distances between two codebooks' centroids: squared L2 under
    'l2', ``1 - cos`` under 'cosine' (centroids are unit rows there).

    Args:
        centroids: (n_codes, dim) float32 tensor. reference: (n_ref, dim) float32 tensor.
    """
    a = centroids.detach().cpu().double()  # (n_codes, dim)
    b = reference.detach().cpu().double()  # (n_ref, dim)
    if metric == "cosine":
        return (1.0 - a @ b.T).clamp_min(0.0).numpy()  # (n_codes, n_ref)
    return torch.cdist(a, b).square().numpy()  # (n_codes, n_ref)


def cooccurrence(codes: Any, ref_codes: Any, n_codes: int, n_ref: int) -> np.ndarray:
    """(n_codes, n_ref) int64 table: entry ``[i, j]`` counts the rows coded ``i`` by the new codebook
    and ``j`` by the reference.

    Args:
        codes: (n_rows,) integer codes in ``0..n_codes-1``. ref_codes: (n_rows,) codes in ``0..n_ref-1``.
    """
    a = np.asarray(codes, dtype=np.int64).ravel()
    b = np.asarray(ref_codes, dtype=np.int64).ravel()
    if a.shape != b.shape:
        raise InvalidInputError(
            f"codes has {a.size} rows and ref_codes {b.size}; expected one code per row from each codebook. "
            f"Fix: encode the same rows with both codebooks."
        )
    return np.bincount(a * n_ref + b, minlength=n_codes * n_ref).reshape(n_codes, n_ref)  # (n_codes, n_ref)


def match_codes(score: np.ndarray, *, maximize: bool) -> np.ndarray:
    """The renumbering that optimizes ``score``: (n_codes,) int64 ``mapping``, new code ``i`` ->
    number ``mapping[i]``, a permutation of ``0..n_codes-1``.

    Args:
        score: (n_codes, n_ref) float64; ``score[i, j]`` is what giving code ``i`` the number ``j``
            is worth (``maximize``) or costs. Columns from ``n_codes`` on are ignored: the new
            codebook has no such number. New codes left unmatched (``n_codes > n_ref``) take the
            numbers ``n_ref..n_codes-1`` in increasing order of their own index.
    """
    from scipy.optimize import linear_sum_assignment

    n_codes, n_ref = score.shape
    m = min(n_codes, n_ref)
    rows, cols = linear_sum_assignment(score[:, :m], maximize=maximize)  # rows sorted; len m
    mapping = np.full(n_codes, -1, dtype=np.int64)  # (n_codes,)
    mapping[rows] = cols
    unmatched = np.flatnonzero(mapping < 0)  # ascending
    mapping[unmatched] = np.arange(m, n_codes)
    return mapping


def match_by_cooccurrence(table: np.ndarray, costs: np.ndarray | None = None) -> np.ndarray:
    """The renumbering that keeps the most rows' codes (:func:`match_codes` on a :func:`cooccurrence`
    table); among equally good ones, the one with the smallest total centroid distance ``costs``.

    Args:
        table: (n_codes, n_ref) int64 co-occurrence counts. costs: (n_codes, n_ref) float64 or None.
    """
    score = table.astype(np.float64)  # (n_codes, n_ref)
    if costs is not None:
        m = min(table.shape)
        top = float(costs[:, :m].max()) if costs.size else 0.0
        # Lexicographic: m matched pairs give up less than 1/2 in all, under one row's worth.
        score = score - costs / (2.0 * m * top) if top > 0 else score
    return match_codes(score, maximize=True)


def kept_rows(codes: Any, ref_codes: Any, mapping: np.ndarray | None = None) -> int:
    """Rows whose code (renumbered by ``mapping`` when given) equals their reference code."""
    a = np.asarray(codes, dtype=np.int64).ravel()
    b = np.asarray(ref_codes, dtype=np.int64).ravel()
    return int(np.count_nonzero((a if mapping is None else mapping[a]) == b))


def check_alignable(codebook: Codebook, reference: Codebook) -> None:
    """Refuse a reference of another metric, dim, codec or number of levels: its codes partition
    another space."""
    if (reference.codec, reference.levels) != (codebook.codec, codebook.levels):
        raise InvalidInputError(
            f"reference codec={reference.codec!r} with levels={reference.levels} but this codebook has "
            f"codec={codebook.codec!r} with levels={codebook.levels}; expected the same codec and levels (levels "
            f"are renumbered one by one). Fix: align to a codebook of the same codec, or do not align across "
            f"a codec change."
        )
    if reference.metric != codebook.metric:
        raise InvalidInputError(
            f"reference metric={reference.metric!r} but this codebook has metric={codebook.metric!r}; expected "
            f"codebooks of one metric (their codes cover different cells). Fix: align to a codebook of metric="
            f"{codebook.metric!r}, or do not align across a metric change."
        )
    if reference.dim != codebook.dim:
        raise DimensionMismatchError(
            f"reference dim={reference.dim} but this codebook has dim={codebook.dim}; expected codebooks of one "
            f"embedding dim. Fix: align to a codebook of the same embedding model."
        )
    if codebook.n_codes * reference.n_codes > MAX_ALIGN_PAIRS:
        raise InvalidInputError(
            f"n_codes={codebook.n_codes} x reference n_codes={reference.n_codes} = "
            f"{codebook.n_codes * reference.n_codes} code pairs; expected at most {MAX_ALIGN_PAIRS} (the matching "
            f"holds a dense table of every pair). Fix: keep the numbering as it is for codebooks this large."
        )


def align_codebook(
    codebook: Codebook,
    reference: Codebook,
    x: Any = None,
    *,
    method: str = "auto",
    engine: str = "auto",
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
) -> Codebook:
    """``codebook`` with its codes renumbered to agree with ``reference``'s as much as possible.

    Args:
        codebook: the new codebook (a refit). reference: the codebook it replaces.
        x: (n_rows, dim) rows, torch tensor (any device) or numpy array, e.g. a sample of the
            training rows; None matches centroids.
        method: 'auto' ('cooccurrence' with ``x``, else 'centroids'), 'cooccurrence' (keep the most
            rows of ``x`` in their code; needs ``x``) or 'centroids' (closest centroids; with ``x``
            the rows only measure what was kept). engine, device, memory_budget: see
            :meth:`Codebook.encode`.

    Returns:
        A Codebook with the same cells: centroids and counts permuted, every other field kept, and
        ``stats["alignment"]``: ``reference`` (its fingerprint), ``method``, ``mapping`` (list: code
        ``i`` of ``codebook`` is code ``mapping[i]`` of the result, a reference number where
        matched; one such list per level for a residual or product codebook, which also records
        ``kept_per_level``), ``unaligned_fingerprint``,
        ``renumbered`` (codes whose number changed), ``rows`` (rows of ``x``; 0 without), ``kept``
        (share of those rows whose code equals their reference code), ``kept_unaligned`` (the same
        before renumbering), ``churn`` (``1 - kept``); the shares are None without rows. The
        fingerprint covers the centroids in order, so it changes whenever a code moves.

    Raises:
        InvalidInputError: another metric, 'cooccurrence' without rows, an unknown method, too many
            code pairs (:data:`MAX_ALIGN_PAIRS`), bad rows. DimensionMismatchError: another dim, or
            rows of another dim.
    """
    method = check_choice("method", method, ALIGN_METHODS)
    check_alignable(codebook, reference)
    if method == "auto":
        method = "centroids" if x is None else "cooccurrence"
    if method == "cooccurrence" and x is None:
        raise InvalidInputError(
            "method='cooccurrence' with x=None; expected rows to count which codes share them. Fix: pass x "
            "(e.g. a sample of the training rows), or method='centroids'."
        )
    n_codes, n_ref, multi = codebook.n_codes, reference.n_codes, codebook.codec != "flat"
    codes = ref_codes = None
    if x is not None:
        opts = dict(engine=engine, device=device, memory_budget=memory_budget)
        # np.asarray: encode answers numpy rows in numpy and tensors in CPU tensors.
        codes = np.asarray(codebook.encode(x, **opts), dtype=np.int64).reshape(-1, codebook.levels)  # (n_rows, L)
        ref_codes = np.asarray(reference.encode(x, **opts), dtype=np.int64).reshape(-1, codebook.levels)
    mappings = []
    for level in range(codebook.levels):
        new_c, ref_c = (codebook.level(level), reference.level(level)) if multi else (codebook, reference)
        costs = centroid_costs(new_c.centroids, ref_c.centroids, new_c.metric)  # (n_codes, n_ref)
        if method == "cooccurrence":
            table = cooccurrence(codes[:, level], ref_codes[:, level], n_codes, n_ref)
            mappings.append(match_by_cooccurrence(table, costs))
        else:
            mappings.append(match_codes(costs, maximize=False))
    n_rows = 0 if codes is None else len(codes)
    kept = unaligned = None
    if n_rows:
        renumbered = np.stack([m[codes[:, lv]] for lv, m in enumerate(mappings)], axis=1)  # (n_rows, L)
        kept = float((renumbered == ref_codes).all(axis=1).mean())  # the whole tuple keeps its numbers
        unaligned = float((codes == ref_codes).all(axis=1).mean())
    record = {
        "reference": reference.fingerprint,
        "method": method,
        "mapping": [m.tolist() for m in mappings] if multi else mappings[0].tolist(),
        "unaligned_fingerprint": codebook.fingerprint,
        "renumbered": int(sum(np.count_nonzero(m != np.arange(n_codes)) for m in mappings)),
        "rows": n_rows,
        "kept": kept,
        "kept_unaligned": unaligned,
        "churn": None if kept is None else 1.0 - kept,
    }
    if multi and n_rows:
        record["kept_per_level"] = [
            float((m[codes[:, lv]] == ref_codes[:, lv]).mean()) for lv, m in enumerate(mappings)
        ]
    orders = [torch.from_numpy(np.argsort(m)) for m in mappings]  # number -> code of ``codebook``, per level
    if multi:
        centroids = torch.stack([codebook.centroids[lv][o] for lv, o in enumerate(orders)])  # (L, n_codes, sub)
        counts = torch.stack([codebook.counts[lv][o] for lv, o in enumerate(orders)])  # (L, n_codes)
    else:
        centroids, counts = codebook.centroids[orders[0]], codebook.counts[orders[0]]  # (n_codes, dim), (n_codes,)
    return dataclasses.replace(
        codebook, centroids=centroids, counts=counts, stats={**codebook.stats, "alignment": record}
    )


__all__ = [
    "ALIGN_METHODS",
    "MAX_ALIGN_PAIRS",
    "align_codebook",
    "centroid_costs",
    "check_alignable",
    "cooccurrence",
    "kept_rows",
    "match_by_cooccurrence",
    "match_codes",
]
