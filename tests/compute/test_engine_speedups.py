"""The torch engine's faster per-chunk paths give the answers of their oracles.

* :func:`_proven_best_rows` (best code and exactness proof in four vectorized passes) against numpy:
  the proven rows, and the index of the smallest entry on each of them, on ties, NaN, infinities,
  zero and infinite bounds, widths on both sides of powers of two;
* ``nearest`` through it and through numpy's two argmins (``_WIDE_ROWS`` moved) against the float64
  brute force, at widths 16 to 1024, with duplicated centroids and rows halfway between codes;
* the E step's far rows (kept by a running threshold) against the top distances of all rows, for
  chunk sizes from a few rows to all of them.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline.compute.data import MAX_FAR_CANDIDATES, e_step

te = importlib.import_module("vq_pipeline.compute.engines.torch")  # `vq_pipeline.compute.engines.torch`, not torch


def proven_oracle(block: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(proven, argmin)`` by numpy: a row is proven when it has no NaN, ``t = fl32(min + 2 E)`` is
    finite and exactly one entry is ``<= t``; ``argmin`` is the first smallest entry."""
    with np.errstate(invalid="ignore", over="ignore"):
        best = block.min(axis=1)  # (n,) NaN where the row holds one
        t = (best + np.float32(2.0) * bound).astype(np.float32)  # (n,) one rounding, as float32
        count = (block <= t[:, None]).sum(axis=1)  # (n,)
    proven = np.isfinite(t) & (count == 1) & ~np.isnan(block).any(axis=1)
    return proven, block.argmin(axis=1) if block.shape[1] else np.zeros(0, np.int64)


def check_proven_best_rows(block: np.ndarray, bound: np.ndarray) -> None:
    n, m = block.shape
    want_proven, want_idx = proven_oracle(block, bound)
    idx, unproven = te._proven_best_rows(
        torch.from_numpy(block.copy()), torch.from_numpy(bound), te._marks(m, torch.device("cpu"))
    )
    proven = np.ones(n, dtype=bool)
    proven[unproven] = False
    assert np.array_equal(proven, want_proven)
    assert idx.shape == (n, 1) and idx.dtype == torch.int64
    assert np.array_equal(idx[:, 0].numpy()[proven], want_idx[proven])
    # The contract: on a proven row every other entry exceeds the smallest by more than 2E, exactly.
    for i in np.flatnonzero(proven):
        rest = np.delete(block[i].astype(np.float64), want_idx[i])
        assert rest.size == 0 or rest.min() - float(block[i, want_idx[i]]) > 2.0 * float(bound[i])


@pytest.mark.parametrize("m", [1, 2, 3, 16, 63, 64, 65, 100, 383, 1000])
def test_proven_best_rows_matches_numpy_on_ties_and_near_ties(m: int) -> None:
    g = np.random.default_rng(m)
    n = 600
    block = g.standard_normal((n, m)).astype(np.float32) * 10
    bound = np.full(n, 1e-3, dtype=np.float32)
    ties = g.integers(0, 4, size=(n // 6, m)).astype(np.float32)  # many exact ties
    block[: n // 6] = ties
    bound[: n // 6] = 0.0  # a zero bound still proves a unique smallest entry
    if m > 1:
        rows = np.arange(n // 6, n // 3)
        j = block[rows].argmin(axis=1)
        second = block[rows].copy()
        second[np.arange(rows.size), j] = np.inf
        k = second.argmin(axis=1)
        gap = np.float32(2e-3) * g.choice([0.5, 0.999, 1.0, 1.001, 2.0], size=rows.size).astype(np.float32)
        block[rows, k] = block[rows, j] + gap  # second best at about 2E from the best: both sides
    block[n // 3 : n // 3 + 5, m // 2] = np.nan  # a NaN anywhere leaves the row unproven
    block[n // 3 + 5 : n // 3 + 10] = np.inf  # overflowed rows
    block[n // 3 + 10, 0] = -np.inf
    bound[n // 3 + 11 : n // 3 + 15] = np.inf  # nothing can be proven
    check_proven_best_rows(block, bound)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 40),
    st.lists(
        st.sampled_from([0.0, -0.0, 1.0, 1.5, 2.0, -3.0, 1e30, 3e38, -3e38, np.inf, -np.inf, np.nan]),
        min_size=480,
        max_size=480,
    ),
    st.lists(st.sampled_from([0.0, 1e-7, 0.25, 1.0, 1e38, np.inf]), min_size=12, max_size=12),
)
def test_proven_best_rows_matches_numpy_on_any_entries(
    n: int, m: int, values: list[float], bounds: list[float]
) -> None:
    block = np.array(values[: n * m], dtype=np.float32).reshape(n, m)
    check_proven_best_rows(block, np.array(bounds[:n], dtype=np.float32))


def test_proven_best_rows_on_an_empty_chunk() -> None:
    idx, unproven = te._proven_best_rows(torch.empty(0, 5), torch.empty(0), te._marks(5, torch.device("cpu")))
    assert idx.shape == (0, 1) and unproven.size == 0


def hard_case(m: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids far from the origin with duplicates, and rows on them, between two of them, and around."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(m, dim, generator=g) + 300.0  # (m, dim)
    c[m // 2 :: 7] = c[: len(range(m // 2, m, 7))]  # duplicated codes: ties go to the lower one
    a, b = torch.randint(m, (2, 300), generator=g)
    x = torch.cat(
        [
            c[torch.randint(m, (300,), generator=g)],  # on a centroid
            (c[a] + c[b]) / 2,  # halfway between two
            c[torch.randint(m, (1400,), generator=g)] + 0.05 * torch.randn(1400, dim, generator=g),
        ]
    )
    return x, c


@pytest.mark.parametrize(("m", "dim"), [(16, 3), (100, 32), (383, 8), (384, 8), (1024, 16)])
def test_both_best_code_paths_are_exact(m: int, dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x, c = hard_case(m, dim, seed=m + dim)
    want = oracle(x, c, "l2").argmin(dim=1)  # (n,) the first smallest: the lowest code on ties
    got = {}
    for wide in (1 << 30, 0):  # every width through _proven_best_rows, then through _best_two_rows
        monkeypatch.setattr(te, "_WIDE_ROWS", wide)
        d, idx = te.TorchEngine().nearest(x, c, 1)
        _, idx_only = te.TorchEngine().nearest(x, c, 1, distances=False)
        assert torch.equal(idx, idx_only)
        assert torch.equal(idx[:, 0], want)
        assert torch.equal(d[:, 0], (x - c[want]).square().sum(dim=1))  # the direct form, float32
        got[wide] = idx
    assert torch.equal(got[0], got[1 << 30])


def test_engine_reuses_its_marks_across_widths() -> None:
    eng = te.TorchEngine()
    for m in (20, 7, 20, 33):  # the marks of the previous width must not be reused
        x, c = hard_case(m, 4, seed=m)
        _, idx = eng.nearest(x, c, 1, distances=False)
        assert torch.equal(idx[:, 0], oracle(x, c, "l2").argmin(dim=1))


def far_oracle(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's distance to its nearest centroid (the engine's direct form), and the rows sorted
    by it, descending (stable: ties in row order)."""
    d, _ = te.TorchEngine().nearest(x, c, 1)
    order = d[:, 0].sort(descending=True, stable=True).indices
    return d[order, 0], order


@pytest.mark.parametrize("n_codes", [5, 64, 1030])
def test_e_step_keeps_the_farthest_rows_for_every_chunk_size(n_codes: int) -> None:
    g = torch.Generator().manual_seed(n_codes)
    x = torch.randn(3000, 6, generator=g) * torch.rand(3000, 1, generator=g) * 4  # (3000, 6)
    c = x[:n_codes].clone() + 0.01  # (n_codes, 6)
    n_far = min(n_codes, MAX_FAR_CANDIDATES)
    want_d, order = far_oracle(x, c)
    want_idx = oracle(x, c, "l2").argmin(dim=1)
    want_sums = torch.zeros(n_codes, 6, dtype=torch.float64).index_add_(0, want_idx, x.double())
    for chunk in (7, 100, 1024, 3000):  # far rows full after a few chunks, or within the first
        s = e_step(x, c, engine=te.TorchEngine(), chunk_rows=chunk)
        assert torch.equal(s.far_sqdist, want_d[:n_far])
        assert torch.equal(s.far_rows, x[order[:n_far]])  # distinct distances: the same rows, in order
        assert torch.equal(s.counts, torch.bincount(want_idx, minlength=n_codes))
        assert torch.equal(s.sums, want_sums)  # float64 sums in row order, whatever the chunk size
        assert s.objective == pytest.approx(want_d.double().sum().item(), rel=1e-12)


def test_e_step_far_rows_with_tied_distances() -> None:
    # Every row three times: each distance is tied three ways, at the threshold too.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(400, 4, generator=g) * 3
    x = base.repeat(3, 1)  # (1200, 4)
    c = torch.randn(50, 4, generator=g)
    want_d, _ = far_oracle(x, c)
    for chunk in (9, 64, 1200):
        s = e_step(x, c, engine=te.TorchEngine(), chunk_rows=chunk)
        assert torch.equal(s.far_sqdist, want_d[:50])
        # Each kept row is a row of x at the distance recorded for it.
        d_rows, _ = te.TorchEngine().nearest(s.far_rows, c, 1)
        assert torch.equal(d_rows[:, 0], s.far_sqdist)
        assert all(bool((x == r).all(dim=1).any()) for r in s.far_rows)
