"""A quality scorecard of a codebook's codes on a held-out sample, computed in one pass.

What users of semantic ids and compressed embeddings ask before they train anything on the codes:

* ``error``: the mean distance of a row to its reconstruction (squared L2; ``1 - cos`` under cosine),
  the codebook's one objective;
* ``recall_at_k``: the share of a row's ``k`` true nearest neighbours (exact search over the sample's
  original rows, distances in float32) that remain among its ``k`` nearest when the other rows are
  replaced by their reconstructions (asymmetric search, as a vector index over the decoded rows answers
  the original query); rows at the same distance as the ``k``-th are taken by lowest index;
* ``prefix_coherence``: the share of those true neighbours whose level-0 code equals the row's (how well
  the first token of a semantic id groups neighbours; for a flat codebook, its one code);
* ``effective_size``: ``exp`` of the entropy of code usage, per level, and of whole tuples;
* ``collision_rate``: the share of rows whose whole tuple of codes another row of the sample has;
* ``churn`` (with ``reference_codes``): the share of rows whose tuple differs from the published
  version's, and per level;
* ``error_by_levels`` and ``recall_by_levels`` (with ``prefix_decoded``, residual codes): the error and
  recall of the reconstruction by levels ``0..l``, for every ``l`` (what a semantic id cut after ``l + 1``
  tokens still says about the row).

The neighbour search is an exact (n, n) float32 product over the sample, so the sample is kept small
(:data:`DEFAULT_SAMPLE_ROWS`); reconstructions that many rows share (a flat codebook's, a residual
codebook's first level) are searched once each. Every figure is a mean over the sample and is
deterministic for a given sample. Only torch and numpy are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vq_pipeline.compute.semantic_ids import collision_stats
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.settings import PER_DIMENSION_CODECS

#: Rows of the held-out sample a scorecard looks at: each neighbour search costs ``n**2 * dim`` float32
#: multiply-adds (1,024 rows of 256-d: about 0.27 G), under a tenth of one encode pass of a 200k-row table
#: (the docs' Multi-level page, "Scorecard").
DEFAULT_SAMPLE_ROWS = 1024
#: Neighbours per row of ``recall_at_k`` and ``prefix_coherence``.
DEFAULT_K = 10


def _as_2d_codes(codes: torch.Tensor | np.ndarray, n_rows: int) -> np.ndarray:
    arr = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    if arr.ndim == 1:
        arr = arr[:, None]  # (n, 1): a flat codebook is one level
    if arr.ndim != 2 or arr.shape[0] != n_rows:
        raise InvalidInputError(
            f"codes.shape={arr.shape}; expected ({n_rows}, levels), one tuple per row of x. "
            f"Fix: pass the codes of the same rows, in the same order."
        )
    return arr.astype(np.int64, copy=False)


def _neighbours(queries: torch.Tensor, base: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """(n, k) indices of the ``k`` rows of ``base`` (n, dim) nearest (squared L2, in float32) to each row of
    ``queries`` (n, dim), as a set per row (any order); among rows at the same distance as the ``k``-th, the
    lower indices are taken; row ``i`` itself excluded when ``exclude_self`` (then ``k < n``)."""
    q, b = queries.float(), base.float()
    # |q|^2 is the same for a whole row: the order of a row's distances is that of |b|^2 - 2 q.b
    d = torch.addmm((b * b).sum(1)[None, :], q, b.T, beta=1.0, alpha=-2.0)  # (n, n)
    if exclude_self:
        d.fill_diagonal_(math.inf)
    m = min(k + 1, d.shape[1])
    values, idx = torch.topk(d, m, dim=1, largest=False, sorted=True)  # (n, m): nearest first
    idx = idx[:, :k].clone()
    if m == k:  # every row is a neighbour: nothing is left to choose
        return idx
    # a row whose (k+1)-th distance equals its k-th has a tie at the boundary: take every row nearer than
    # the k-th distance, then the lowest indices at it
    tied = (values[:, k] == values[:, k - 1]).nonzero().flatten()
    if tied.numel():
        th = values[tied, k - 1]  # (t,)
        # the candidates (distance <= the k-th), row by row, columns increasing: few per row
        rows, cols = (d[tied] <= th[:, None]).nonzero(as_tuple=True)
        at = (d[tied[rows], cols] == th[rows]).long()  # 1: at the k-th distance, 0: nearer
        per_row = torch.bincount(rows, minlength=tied.numel())
        start = torch.cumsum(per_row, 0) - per_row  # (t,) first candidate of each row
        running = torch.cumsum(at, 0)
        rank_at = running - (running[start] - at[start])[rows]  # 1, 2, ... among a row's candidates at the k-th
        nearer = per_row - torch.bincount(rows, weights=at.double(), minlength=tied.numel()).long()
        keep = (at == 0) | (rank_at <= (k - nearer)[rows])
        idx[tied] = cols[keep].reshape(-1, k)
    return idx


def _error_and_recall(
    x32: torch.Tensor,
    x64: torch.Tensor,
    decoded: torch.Tensor,
    true: torch.Tensor,
    metric: str,
    codes: np.ndarray | None,
) -> tuple[float, float]:
    """(mean error, recall of the true neighbours ``true`` (n, k)) of the reconstructions ``decoded`` of the
    rows ``x32`` (float32; ``x64``: the same in float64, for the error). ``codes`` (n, levels): the codes
    that ``decoded`` decodes (rows of equal codes share a reconstruction), or None."""
    dec = decoded.detach().cpu().float()
    err = (x64 - dec.double()).square().sum(1)  # (n,)
    if metric == "cosine":
        err = err * 0.5
    found = _found_among_groups(x32, dec, true, codes) if codes is not None else None
    if found is None:  # few rows share a reconstruction: the plain search
        approx = _neighbours(x32, dec, true.shape[1], exclude_self=True)  # (n, k)
        found = (true[:, :, None] == approx[:, None, :]).any(dim=2)  # (n, k)
    return float(err.mean()), float(found.double().mean())


def _found_among_groups(
    x32: torch.Tensor, dec: torch.Tensor, true: torch.Tensor, codes: np.ndarray
) -> torch.Tensor | None:
    """(n, k) bool: whether each true neighbour ``true[i, j]`` is among the ``k`` rows of ``dec`` nearest to
    ``x32[i]`` (row ``i`` excluded, ties at the ``k``-th distance taken by lowest index), the same answer as
    :func:`_neighbours`, searched over the reconstructions of the distinct ``codes`` (a flat codebook's codes,
    a residual codebook's first levels: far fewer than rows). None when most rows are distinct, when rows of
    equal codes have different reconstructions, or when a row's ``k``-th distance is shared by two groups
    (the plain search then answers)."""
    n, k = true.shape
    _, first, inv_np = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    n_groups = first.shape[0]
    if 2 * n_groups > n:
        return None
    inv = torch.from_numpy(inv_np.reshape(-1).astype(np.int64))  # (n,) each row's group
    groups = dec[torch.from_numpy(first)]  # (g, dim) each group's reconstruction
    if not torch.equal(groups[inv], dec):
        return None
    rows = torch.arange(n)
    du = torch.addmm((groups * groups).sum(1)[None, :], x32, groups.T, beta=1.0, alpha=-2.0)  # (n, g)
    size = torch.bincount(inv, minlength=n_groups)  # (g,)
    # Every group but the row's own (less the row itself) holds a row: the k-th distance is among the
    # k + 1 nearest groups; one more shows a tie beyond them.
    m = min(n_groups, k + 2)
    near_du, near = torch.topk(du, m, dim=1, largest=False, sorted=True)  # (n, m)
    mult = size[near] - (near == inv[:, None]).long()  # (n, m) rows within each near group, row i left out
    reach = torch.cumsum(mult, dim=1)  # rows within the nearest 1, 2, ... groups
    th = near_du.gather(1, (reach < k).sum(1, keepdim=True))  # (n, 1): the k-th distance
    if bool(((near_du == th) & (mult > 0)).sum(1).gt(1).any()) or (
        m < n_groups and bool((near_du[:, -1:] == th).any())
    ):
        return None
    need = k - (mult * (near_du < th)).sum(1, keepdim=True)  # (n, 1): rows taken at the k-th distance
    # each row's place among the rows of its group, by index (0 for the lowest)
    by_group = torch.sort(inv, stable=True).indices
    start = torch.cumsum(size, 0) - size
    place = torch.empty(n, dtype=torch.int64)
    place[by_group] = torch.arange(n) - start[inv[by_group]]
    dj = du.gather(1, inv[true])  # (n, k): each true neighbour's distance to its row's reconstruction
    rank = place[true] - ((inv[true] == inv[:, None]) & (rows[:, None] < true)).long()  # row i left out
    return (dj < th) | ((dj == th) & (rank < need))


def _effective_size(column: np.ndarray) -> float:
    _, counts = np.unique(column, return_counts=True, axis=0)
    p = counts / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def scorecard(
    x: torch.Tensor,
    codes: torch.Tensor | np.ndarray,
    decoded: torch.Tensor,
    *,
    metric: str,
    codec: str = "flat",
    k: int = DEFAULT_K,
    reference_codes: torch.Tensor | np.ndarray | None = None,
    prefix_decoded: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The scorecard of the codes of the rows ``x``.

    Args:
        x: (n, dim) float32 rows of a held-out sample (unit rows under cosine), ``n >= 2``.
        codes: (n,) or (n, levels) integer codes of those rows.
        decoded: (n, dim) float32 reconstructions ``decode(codes)``.
        metric: 'l2' or 'cosine' (neighbours by squared L2 of the rows as given: for unit rows the same
            order as by cosine).
        codec: the codebook's codec; for 'scalar' and 'binary' (one code per dimension)
            ``prefix_coherence`` and ``effective_size`` are left out: they are semantic-id measures.
        k: neighbours per row (at most ``n - 1``; smaller samples use ``n - 1``).
        reference_codes: the same rows' codes under the published version, for ``churn``.
        prefix_decoded: for residual codes, the (n, dim) reconstructions by levels ``0..l``, one per
            level ``l`` in order (the last one is ``decoded``), for ``error_by_levels`` and ``recall_by_levels``.

    Returns:
        JSON-able: ``n_rows``, ``k``, ``error``, ``recall_at_k``, ``prefix_coherence``,
        ``effective_size`` (per level), ``effective_size_tuples``, ``collision_rate``; with
        ``reference_codes`` ``churn`` and ``churn_per_level``; with ``prefix_decoded``
        ``error_by_levels`` and ``recall_by_levels``.
    """
    n = int(x.shape[0])
    if n < 2 or tuple(decoded.shape) != tuple(x.shape):
        raise InvalidInputError(
            f"x.shape={tuple(x.shape)}, decoded.shape={tuple(decoded.shape)}; expected two or more rows and "
            f"one reconstruction per row. Fix: pass a sample of at least 2 rows and decode(codes) of the same rows."
        )
    arr = _as_2d_codes(codes, n)
    if prefix_decoded is not None and (
        len(prefix_decoded) != arr.shape[1] or any(tuple(p.shape) != tuple(x.shape) for p in prefix_decoded)
    ):
        raise InvalidInputError(
            f"prefix_decoded holds {len(prefix_decoded)} reconstructions; expected {arr.shape[1]} (one per level) of "
            f"shape {tuple(x.shape)}. Fix: pass the reconstruction by levels 0..l of the same rows for every level l."
        )
    k = max(1, min(int(k), n - 1))
    x32 = x.detach().cpu().float()
    x64 = x32.double()
    true = _neighbours(x32, x32, k, exclude_self=True)  # (n, k)
    grouped = codec not in PER_DIMENSION_CODECS  # one code per dimension: rows rarely share a reconstruction
    error, recall = _error_and_recall(x32, x64, decoded, true, metric, arr if grouped else None)
    out: dict[str, Any] = {
        "n_rows": n,
        "k": k,
        "error": error,
        "recall_at_k": recall,
        "collision_rate": float(collision_stats(arr)["collision_rate"]),
    }
    if prefix_decoded is not None:
        by_levels = [
            _error_and_recall(x32, x64, p, true, metric, arr[:, : level + 1] if grouped else None)
            for level, p in enumerate(prefix_decoded[:-1])
        ] + [(error, recall)]
        out["error_by_levels"] = [e for e, _ in by_levels]
        out["recall_by_levels"] = [r for _, r in by_levels]
    if codec not in PER_DIMENSION_CODECS:
        level0 = torch.from_numpy(arr[:, 0])
        out["prefix_coherence"] = float((level0[true] == level0[:, None]).double().mean())
        out["effective_size"] = [_effective_size(arr[:, level]) for level in range(arr.shape[1])]
        out["effective_size_tuples"] = _effective_size(arr)
    if reference_codes is not None:
        ref = _as_2d_codes(reference_codes, n)
        if ref.shape != arr.shape:
            raise InvalidInputError(
                f"reference_codes.shape={ref.shape}; expected {arr.shape}, the published version's codes of the "
                f"same rows. Fix: encode the sample with the published codebook."
            )
        differ = ref != arr  # (n, levels)
        out["churn"] = float(differ.any(axis=1).mean())
        out["churn_per_level"] = differ.mean(axis=0).tolist()
    return out


def sample_rows(n_rows: int, n_sample: int, seed: int | Sequence[int]) -> np.ndarray:
    """Sorted positions of a uniform sample of ``min(n_rows, n_sample)`` rows, drawn by
    ``numpy.random.default_rng(seed)`` (``seed``: an int or a sequence of ints)."""
    if n_rows <= n_sample:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)
    return np.sort(rng.choice(n_rows, size=n_sample, replace=False)).astype(np.int64)


__all__ = ["DEFAULT_K", "DEFAULT_SAMPLE_ROWS", "sample_rows", "scorecard"]
