"""The scorecard against brute-force oracles written with plain numpy loops, and hand-made cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline.compute.scorecard import sample_rows, scorecard
from vq_pipeline.errors import InvalidInputError


def _oracle(x: np.ndarray, codes: np.ndarray, dec: np.ndarray, k: int, ref: np.ndarray | None) -> dict:
    """Everything in float64, one row at a time; ties broken by the lower index (a stable sort)."""
    n = x.shape[0]
    hits = same = 0
    for i in range(n):
        d_true = [(float(((x[i] - x[j]) ** 2).sum()), j) for j in range(n) if j != i]
        d_dec = [(float(((x[i] - dec[j]) ** 2).sum()), j) for j in range(n) if j != i]
        true = [j for _, j in sorted(d_true)[:k]]
        approx = {j for _, j in sorted(d_dec)[:k]}
        hits += sum(j in approx for j in true)
        same += sum(codes[j, 0] == codes[i, 0] for j in true)
    tuples = [tuple(r) for r in codes]
    counts = {t: tuples.count(t) for t in set(tuples)}
    out = {
        "error": float(((x - dec) ** 2).sum(1).mean()),
        "recall_at_k": hits / (n * k),
        "prefix_coherence": same / (n * k),
        "collision_rate": sum(c for c in counts.values() if c > 1) / n,
        "effective_size_tuples": math.exp(-sum(c / n * math.log(c / n) for c in counts.values())),
    }
    if ref is not None:
        out["churn"] = float(np.mean([(ref[i] != codes[i]).any() for i in range(n)]))
    return out


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(3, 24),
    dim=st.integers(1, 5),
    levels=st.integers(1, 3),
    n_codes=st.integers(1, 4),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_scorecard_matches_a_loop_oracle(n: int, dim: int, levels: int, n_codes: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # integer-valued rows: distances are exact in float64, so ties are broken the same way by both
    x = rng.integers(-3, 4, size=(n, dim)).astype(np.float32)
    dec = rng.integers(-3, 4, size=(n, dim)).astype(np.float32)
    codes = rng.integers(0, n_codes, size=(n, levels))
    ref = rng.integers(0, n_codes, size=(n, levels))
    k_eff = min(k, n - 1)
    got = scorecard(torch.from_numpy(x), codes, torch.from_numpy(dec), metric="l2", k=k, reference_codes=ref)
    want = _oracle(x.astype(np.float64), codes, dec.astype(np.float64), k_eff, ref)
    assert got["k"] == k_eff and got["n_rows"] == n
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_perfect_codes_recall_everything_and_cosine_halves_the_error() -> None:
    x = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    codes = torch.arange(50)
    card = scorecard(x, codes, x.clone(), metric="cosine")
    assert card["recall_at_k"] == 1.0 and card["error"] == 0.0 and card["collision_rate"] == 0.0
    assert card["effective_size"] == [pytest.approx(50.0)] and card["prefix_coherence"] == 0.0
    flipped = scorecard(x, codes, -x, metric="cosine")
    assert flipped["error"] == pytest.approx(2.0)  # 1 - cos(x, -x); the squared distance is 4


def test_per_dimension_codecs_leave_out_the_semantic_id_measures() -> None:
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(2))
    codes = (x > 0).long()
    card = scorecard(x, codes, torch.where(x > 0, 1.0, -1.0), metric="l2", codec="binary")
    assert "prefix_coherence" not in card and "effective_size" not in card
    assert 0.0 <= card["recall_at_k"] <= 1.0


def test_bad_shapes_are_refused_with_a_fix() -> None:
    x = torch.zeros(5, 3)
    with pytest.raises(InvalidInputError, match=r"codes.shape=\(4, 1\).*Fix"):
        scorecard(x, np.zeros(4, np.int64), x, metric="l2")
    with pytest.raises(InvalidInputError, match=r"two or more rows.*Fix"):
        scorecard(x[:1], np.zeros(1, np.int64), x[:1], metric="l2")
    with pytest.raises(InvalidInputError, match=r"reference_codes.shape"):
        scorecard(x, np.zeros((5, 2), np.int64), x, metric="l2", reference_codes=np.zeros((5, 1), np.int64))


def test_sample_rows_is_seeded_sorted_and_bounded() -> None:
    a, b = sample_rows(10_000, 100, seed=3), sample_rows(10_000, 100, seed=3)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and a.size == 100
    assert np.array_equal(sample_rows(7, 100, seed=3), np.arange(7))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(3, 20), levels=st.integers(1, 3), k=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_error_and_recall_by_levels_are_those_of_each_prefix_reconstruction(
    n: int, levels: int, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, 3)).astype(np.float32)
    prefix = [rng.integers(-3, 4, size=(n, 3)).astype(np.float32) for _ in range(levels)]
    codes = rng.integers(0, 3, size=(n, levels))
    got = scorecard(
        torch.from_numpy(x),
        codes,
        torch.from_numpy(prefix[-1]),
        metric="l2",
        k=k,
        prefix_decoded=[torch.from_numpy(p) for p in prefix],
    )
    for level, p in enumerate(prefix):
        want = _oracle(x.astype(np.float64), codes, p.astype(np.float64), min(k, n - 1), None)
        assert got["error_by_levels"][level] == pytest.approx(want["error"], rel=1e-9)
        assert got["recall_by_levels"][level] == pytest.approx(want["recall_at_k"], rel=1e-9)
    assert got["error_by_levels"][-1] == got["error"] and got["recall_by_levels"][-1] == got["recall_at_k"]
    with pytest.raises(InvalidInputError, match=r"prefix_decoded holds .*Fix"):
        scorecard(torch.from_numpy(x), codes, torch.from_numpy(x), metric="l2", prefix_decoded=[])


def test_neighbours_among_many_ties_take_the_lowest_indices() -> None:
    # row 0 at the origin, every other row on the circle of radius 5 (exactly 25 away): many ties
    ring = [(5, 0), (0, 5), (-5, 0), (0, -5), (3, 4), (4, 3), (-3, 4), (-4, 3), (3, -4), (4, -3), (-3, -4), (-4, -3)]
    x = np.array([(0, 0), *ring], dtype=np.float32)
    dec = x[::-1].copy()
    codes = (np.arange(13) % 3)[:, None]
    for k in (1, 3, 5, 12):
        got = scorecard(torch.from_numpy(x), codes, torch.from_numpy(dec), metric="l2", k=k)
        want = _oracle(x.astype(np.float64), codes, dec.astype(np.float64), k, None)
        for key in ("recall_at_k", "prefix_coherence"):
            assert got[key] == pytest.approx(want[key], rel=1e-12), (k, key)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(6, 60),
    n_codes=st.integers(1, 14),
    k=st.integers(1, 8),
    twin=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_recall_of_codes_that_share_reconstructions_matches_the_oracle(
    n: int, n_codes: int, k: int, twin: bool, seed: int
) -> None:
    # a flat codebook's reconstructions: few distinct rows, each shared by many (ties at every distance);
    # coordinates on a 1/64 grid keep every distance exact in float32 and float64; more codes than k + 2
    # (the search looks at the nearest few only) and two codes of one centroid (twin) included
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, 3)).astype(np.float32)
    centroids = (rng.integers(-3, 4, size=(n_codes, 3)) + rng.integers(1, 64, size=(n_codes, 3)) / 64).astype(
        np.float32
    )
    if twin:
        centroids[-1] = centroids[0]
    codes = rng.integers(0, n_codes, size=n)
    dec = centroids[codes]
    got = scorecard(torch.from_numpy(x), codes, torch.from_numpy(dec), metric="l2", k=k)
    want = _oracle(x.astype(np.float64), codes[:, None], dec.astype(np.float64), min(k, n - 1), None)
    assert got["recall_at_k"] == pytest.approx(want["recall_at_k"], rel=1e-12)


def test_a_tie_between_two_codes_of_one_reconstruction_beyond_the_nearest_few_is_seen() -> None:
    # codes 2 and 3 share the reconstruction 5; row 0 (alone in code 0) finds its 2nd decoded neighbour at
    # that distance, in both codes: the lowest index over both is taken (row 2, not row 5). Code 4 holds
    # the far rows, whose neighbours are all at distance 0.
    x = np.array([0, 100, 2, 100, 100, 1, 100, 100, 100, 100], dtype=np.float32)[:, None]
    codes = np.array([0, 1, 2, 2, 4, 3, 3, 4, 4, 4])
    dec = np.array([0.0, 3.0, 5.0, 5.0, 100.0], dtype=np.float32)[codes][:, None]
    for k in (1, 2, 3):
        got = scorecard(torch.from_numpy(x), codes, torch.from_numpy(dec), metric="l2", k=k)
        want = _oracle(x.astype(np.float64), codes[:, None], dec.astype(np.float64), k, None)
        assert got["recall_at_k"] == pytest.approx(want["recall_at_k"], rel=1e-12), k
