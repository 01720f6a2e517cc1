"""Held-out rows (``FitSettings.holdout``): a seeded choice of rows is kept out of the fit, and the
codebook records their mean distance to their codes. Oracles: the codebook equals a fit on the
remaining rows, and the recorded error equals a float64 brute-force mean distance to the centroids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_pipeline import FitSettings, InvalidInputError, TooFewPointsError, fit_codebook
from vq_pipeline.fitting.options import holdout_rows

CPU = dict(engine="torch", device="cpu")


def _data(seed: int, n: int = 300, dim: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(6, dim))
    return (centers[rng.integers(6, size=n)] + rng.normal(size=(n, dim)) + 1.0).astype(np.float32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    fraction=st.floats(0.05, 0.6),
    metric=st.sampled_from(["l2", "cosine"]),
    n_codes=st.integers(1, 9),
)
def test_held_out_rows_are_left_out_and_their_error_is_the_brute_force_mean(seed, fraction, metric, n_codes) -> None:
    x = _data(seed)
    cb = fit_codebook(x, n_codes, metric=metric, seed=seed, holdout=fraction, n_iter=8, **CPU)
    held = holdout_rows(len(x), fraction, seed, n_codes=n_codes)
    keep = np.setdiff1d(np.arange(len(x)), held)
    assert len(held) == round(fraction * len(x)) and np.all(np.diff(held) > 0)
    # the codebook is the fit of the other rows: same centroids, counts and training stats
    rest = fit_codebook(x[keep], n_codes, metric=metric, seed=seed, n_iter=8, **CPU)
    np.testing.assert_array_equal(cb.centroids.numpy(), rest.centroids.numpy())
    np.testing.assert_array_equal(cb.counts.numpy(), rest.counts.numpy())
    assert cb.stats["n_rows"] == len(keep) and cb.stats["inertia"] == rest.stats["inertia"]
    # the recorded error: the mean float64 distance of the held-out rows to their nearest centroid
    expected = float(oracle(torch.from_numpy(x[held]), cb.centroids, metric).min(dim=1).values.mean())
    h = cb.stats["holdout"]
    assert (h["fraction"], h["rows"], h["seed"]) == (fraction, len(held), seed)
    assert h["mean_distance"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert cb.settings["holdout"] == fraction and "holdout" not in rest.settings and "holdout" not in rest.stats


def test_the_choice_is_seeded_and_recorded_in_the_file(tmp_path) -> None:
    from vq_pipeline import Codebook

    x = _data(1)
    a = fit_codebook(x, 4, seed=3, holdout=0.1, **CPU)
    b = fit_codebook(x, 4, seed=3, holdout=0.1, **CPU)
    c = fit_codebook(x, 4, seed=4, holdout=0.1, **CPU)
    assert a.fingerprint == b.fingerprint and a.stats["holdout"] == b.stats["holdout"]
    assert not np.array_equal(holdout_rows(300, 0.1, 3, n_codes=4), holdout_rows(300, 0.1, 4, n_codes=4))
    assert c.stats["holdout"]["seed"] == 4
    a.save(tmp_path / "a.safetensors")
    assert Codebook.load(tmp_path / "a.safetensors").stats["holdout"] == a.stats["holdout"]


def test_multi_level_codebooks_hold_out_rows_too() -> None:
    x = _data(2, dim=6)
    cb = fit_codebook(x, 4, codec="residual", levels=2, seed=0, holdout=0.2, **CPU)
    held = x[holdout_rows(len(x), 0.2, 0, n_codes=4)]
    recon = cb.decode(cb.encode(held)).astype(np.float64)
    expected = float(((held.astype(np.float64) - recon) ** 2).sum(axis=1).mean())
    assert cb.stats["holdout"]["mean_distance"] == pytest.approx(expected, rel=1e-5)


def test_a_holdout_that_keeps_no_row_or_leaves_too_few_is_refused() -> None:
    x = _data(0, n=100)
    with pytest.raises(TooFewPointsError, match=r"holdout=0.001 of n_rows=100 rows holds out no row; .*Fix: pass a holdout"):
        fit_codebook(x, 4, holdout=0.001, **CPU)
    with pytest.raises(TooFewPointsError, match=r"holdout=0.9 of n_rows=100 rows leaves 10 rows to fit n_codes=20 codes"):
        fit_codebook(x, 20, holdout=0.9, **CPU)
    for bad in (1.0, -0.1, "0.1", True, float("nan")):
        with pytest.raises(InvalidInputError, match=r"holdout=.*; expected the share of rows kept out of the fit.*Fix:"):
            FitSettings(holdout=bad)
    assert FitSettings(holdout=0).holdout == 0.0 and "holdout" not in fit_codebook(x, 4, holdout=0, **CPU).stats
