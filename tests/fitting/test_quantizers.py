"""Scalar and binary codebooks (:mod:`vq_pipeline.fitting.quantizers`) against numpy oracles: ranges,
codes, counts, statistics; streamed fits from tables give the codebook of the same rows in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_parts
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.fitting import quantizers
from vq_pipeline.fitting.rotation import ROTATION_STREAM
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import FitSettings, TableSettings

CPU = dict(engine="torch", device="cpu")


def _rows(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + rng.standard_normal(dim)).astype(
        np.float32
    )


def _scalar_oracle(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The documented closed form in float32: clip(floor((x - lo) / step + 0.5), 0, K - 1)."""
    k = grid.shape[1]
    lo = grid[:, 0]
    step = (grid[:, -1] - grid[:, 0]) / np.float32(k - 1)
    step = np.where(step > 0, step, np.float32(1))
    q = np.clip(np.floor((x - lo) / step + np.float32(0.5)), 0, k - 1).astype(np.int64)
    return np.where(grid[:, -1] > grid[:, 0], q, 0)


def _check_scalar(cb: Codebook, x: np.ndarray) -> None:
    """Codes, counts and statistics of a scalar codebook against numpy on the training rows ``x``."""
    grid = cb.centroids.numpy()[:, :, 0]  # (dim, K)
    codes = _scalar_oracle(x, grid)
    np.testing.assert_array_equal(cb.encode(x), codes)
    counts = np.stack([np.bincount(codes[:, d], minlength=grid.shape[1]) for d in range(x.shape[1])])
    np.testing.assert_array_equal(cb.counts.numpy(), counts)
    decoded = np.take_along_axis(grid.T.astype(np.float64), codes, axis=0)  # (n, dim) grid[d, codes[:, d]]
    sq = (x.astype(np.float64) - decoded) ** 2
    assert cb.stats["mse"] == pytest.approx(sq.sum(axis=1).mean(), rel=1e-9)
    np.testing.assert_allclose(cb.stats["level_mse"], sq.mean(axis=0), rtol=1e-9)
    clipped = ((x < grid[:, 0]) | (x > grid[:, -1])).mean()
    assert cb.stats["clipped"] == pytest.approx(clipped, abs=1e-12)
    assert cb.stats["used_codes"] == (counts > 0).sum(axis=1).tolist()
    assert cb.stats["n_rows"] == x.shape[0] and cb.levels == x.shape[1]


@pytest.mark.parametrize("bits", [8, 4])
def test_minmax_scalar_ranges_codes_counts_and_mse_equal_numpy(bits: int) -> None:
    x = _rows(700, 12, seed=bits)
    cb = fit_codebook(x, codec="scalar", bits=bits, **CPU)
    grid = cb.centroids.numpy()[:, :, 0]
    np.testing.assert_array_equal(grid[:, 0], x.min(axis=0))
    np.testing.assert_array_equal(grid[:, -1], x.max(axis=0))
    assert grid.shape == (12, 2**bits) and (np.diff(grid, axis=1) > 0).all()
    _check_scalar(cb, x)
    assert cb.stats["clipped"] == 0.0
    assert cb.settings["bits"] == bits and cb.settings["scalar_range"] == "minmax" and cb.settings["n_codes"] == 2**bits


def test_quantile_scalar_ranges_are_numpy_quantiles_of_the_seeded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _rows(900, 6, seed=3)
    monkeypatch.setattr(quantizers, "QUANTILE_SAMPLE_ROWS", 400)
    cb = fit_codebook(x, codec="scalar", scalar_range="quantile", seed=11, **CPU)
    positions = np.sort(np.random.default_rng([11, quantizers.QUANTILE_STREAM]).choice(900, size=400, replace=False))
    lo, hi = np.quantile(x[positions].astype(np.float64), [0.001, 0.999], axis=0)
    grid = cb.centroids.numpy()[:, :, 0]
    np.testing.assert_array_equal(grid[:, 0], lo.astype(np.float32))
    np.testing.assert_allclose(grid[:, -1], hi, rtol=1e-6)
    assert cb.stats["quantile_rows"] == 400 and 0 < cb.stats["clipped"] < 0.01
    _check_scalar(cb, x)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 60),
    dim=st.integers(1, 9),
    bits=st.sampled_from([8, 4]),
    seed=st.integers(0, 2**16),
    constant=st.booleans(),
)
def test_scalar_fit_equals_the_oracle_on_any_rows(n: int, dim: int, bits: int, seed: int, constant: bool) -> None:
    x = _rows(n, dim, seed)
    if constant:
        x[:, 0] = 0.25  # a dimension with one value: every code 0
    cb = fit_codebook(x, codec="scalar", bits=bits, **CPU)
    _check_scalar(cb, x)


def test_binary_mean_scale_codes_and_mse_equal_numpy() -> None:
    x = _rows(800, 10, seed=5)
    cb = fit_codebook(x, codec="binary", **CPU)
    x64 = x.astype(np.float64)
    m = x64.mean(axis=0)
    s = np.abs(x64 - m).mean(axis=0)
    grid = cb.centroids.numpy()[:, :, 0]
    np.testing.assert_allclose(grid[:, 0], m - s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grid[:, 1], m + s, rtol=1e-6, atol=1e-6)
    codes = (x > (grid[:, 0] + grid[:, 1]) / np.float32(2)).astype(np.int64)
    np.testing.assert_array_equal(cb.encode(x), codes)
    np.testing.assert_array_equal(cb.counts.numpy(), np.stack([(codes == 0).sum(0), (codes == 1).sum(0)], axis=1))
    decoded = np.where(codes == 1, grid[:, 1], grid[:, 0]).astype(np.float64)
    assert cb.stats["mse"] == pytest.approx(((x64 - decoded) ** 2).sum(axis=1).mean(), rel=1e-9)
    share = codes.mean(axis=0)
    assert cb.stats["bit_balance"] == pytest.approx((2 * np.minimum(share, 1 - share)).mean(), rel=1e-12)
    assert cb.rotation is None and "rotation" not in cb.settings


@pytest.mark.parametrize("rotation", ["itq", "random"])
def test_rotated_binary_grid_is_the_oracle_of_the_rotated_rows_and_loads_back(tmp_path: Path, rotation: str) -> None:
    x = _rows(600, 16, seed=7)
    cb = fit_codebook(x, codec="binary", rotation=rotation, seed=2, **CPU)
    r = cb.rotation.numpy().astype(np.float64)
    assert np.abs(r.T @ r - np.eye(16)).max() < 1e-5
    z = x.astype(np.float64) @ r
    m = z.mean(axis=0)
    grid = cb.centroids.numpy()[:, :, 0]
    np.testing.assert_allclose((grid[:, 0] + grid[:, 1]) / 2, m, atol=1e-5)
    np.testing.assert_allclose((grid[:, 1] - grid[:, 0]) / 2, np.abs(z - m).mean(axis=0), rtol=1e-5, atol=1e-5)
    assert cb.settings["rotation"] == rotation
    if rotation == "itq":
        assert cb.stats["rotation_rows"] == 600 and cb.settings["rotation_iters"] == 20
    again = fit_codebook(x, codec="binary", rotation=rotation, seed=2, **CPU)
    assert again.rotation.numpy().tobytes() == cb.rotation.numpy().tobytes()  # same seed, same bytes
    assert again.centroids.numpy().tobytes() == cb.centroids.numpy().tobytes()
    loaded = Codebook.load(cb.save(tmp_path / "b.safetensors"))
    codes = loaded.encode(x)
    np.testing.assert_array_equal(codes, cb.encode(x))
    zhat = np.where(codes == 1, grid[:, 1], grid[:, 0]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(loaded.decode(codes)), zhat @ r.T, rtol=1e-4, atol=1e-4)


def test_itq_binary_sample_is_the_seeded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    from vq_pipeline.fitting import rotation

    x = _rows(1000, 8, seed=9)
    monkeypatch.setattr(rotation, "ROTATION_SAMPLE_ROWS", 200)  # then 256 rows per code: 512 of the 1000
    cb = fit_codebook(x, codec="binary", rotation="itq", seed=4, rotation_iters=5, **CPU)
    positions = np.sort(np.random.default_rng([4, ROTATION_STREAM]).choice(1000, size=512, replace=False))
    z = torch.from_numpy(x[positions] - x.astype(np.float64).mean(axis=0).astype(np.float32))
    opts = type("O", (), {"device": torch.device("cpu"), "seed": 4, "rotation_iters": 5})()
    assert cb.stats["rotation_rows"] == 512
    assert rotation.itq(z, opts).rotation.numpy().tobytes() == cb.rotation.numpy().tobytes()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codec="scalar", scalar_range="quantile"),
        dict(codec="scalar", scalar_range="mse", bits=4),
        dict(codec="scalar", bits=4, metric="cosine"),
        dict(codec="binary", rotation="itq"),
        dict(codec="binary", metric="cosine"),
    ],
)
def test_streamed_fit_from_tables_gives_the_codebook_in_memory(tmp_path: Path, kwargs: dict) -> None:
    write_parts(tmp_path / "in", {"a/part-0.parquet": 300, "b/part-0.parquet": 250}, dim=16)
    fit = FitSettings(**kwargs, **CPU)
    memory = fit_from_tables([tmp_path / "in"], None, TableSettings("embedding"), fit)
    streamed = fit_from_tables([tmp_path / "in"], None, TableSettings("embedding", data_budget=1, batch_rows=64), fit)
    assert (memory.stats["mode"], streamed.stats["mode"]) == ("in-memory", "streamed")
    assert streamed.centroids.numpy().tobytes() == memory.centroids.numpy().tobytes()
    assert torch.equal(streamed.counts, memory.counts)
    if memory.rotation is not None:
        assert streamed.rotation.numpy().tobytes() == memory.rotation.numpy().tobytes()
    assert streamed.fingerprint == memory.fingerprint
    assert streamed.stats["mse"] == pytest.approx(memory.stats["mse"], rel=1e-9)
    assert "init_sample" not in streamed.stats


def test_n_codes_and_levels_of_scalar_and_binary_codebooks() -> None:
    x = _rows(50, 4, seed=1)
    assert fit_codebook(x, 16, codec="scalar", bits=4, **CPU).n_codes == 16
    assert fit_codebook(x, 2, codec="binary", levels=4, **CPU).levels == 4
    with pytest.raises(InvalidInputError, match=r"n_codes=16 with codec='scalar' and bits=8; .* bits=4 for 16 codes"):
        fit_codebook(x, 16, codec="scalar", **CPU)
    with pytest.raises(InvalidInputError, match=r"n_codes=4 with codec='binary'"):
        fit_codebook(x, 4, codec="binary", **CPU)
    with pytest.raises(InvalidInputError, match=r"levels=2 with codec='scalar' and dim=4; .* levels=1 .* or levels=4"):
        fit_codebook(x, codec="scalar", levels=2, **CPU)
    with pytest.raises(InvalidInputError, match=r"n_codes=None with codec='flat'"):
        fit_codebook(x, **CPU)
    # more dimensions than a file holds levels of K-means codes: scalar codebooks are not bound by MAX_LEVELS
    wide = _rows(20, 300, seed=2)
    assert fit_codebook(wide, codec="scalar", **CPU).levels == 300


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_ranges_never_code_the_sample_worse_than_min_max_and_trim_only_outliers(bits: int) -> None:
    from vq_pipeline.compute.codecs import RANGE_TRIMS

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 6)).astype(np.float32)
    x[:3, 0] = 8.0  # three outliers stretch dimension 0's range: its bulk gets a coarser grid
    x[:, 5] = 2.0  # a constant dimension
    new = rng.standard_normal((4000, 6)).astype(np.float32)
    new[:, 5] = 2.0
    best = fit_codebook(x, codec="scalar", bits=bits, scalar_range="mse", **CPU)
    plain = fit_codebook(x, codec="scalar", bits=bits, **CPU)
    _check_scalar(best, x)  # codes, counts and statistics as for every scalar codebook
    # the sample is every row here (fewer than the sample's cap): the error on it never rises, per dimension
    assert all(a <= b * (1 + 1e-12) for a, b in zip(best.stats["level_mse"], plain.stats["level_mse"]))
    lo, hi = best.centroids[:, 0, 0].numpy(), best.centroids[:, -1, 0].numpy()
    assert lo[5] == hi[5] == 2.0
    if bits == 4:  # 16 values: the bulk's finer grid saves more than clipping 3 values costs
        assert hi[0] < 8.0
    else:  # 256 values: the grid is fine enough; clipping would cost more than it saves
        assert hi[0] == 8.0
    # each end is the data's extreme or one of the trimmed quantiles (as float32, the grid's ends)
    for d in range(6):
        lows = np.float32([x[:, d].min(), *np.quantile(x[:, d].astype(np.float64), RANGE_TRIMS[1:])])
        assert lo[d] in lows
    if bits == 4:  # the finer grid carries over to new rows of the same distribution (seeded rows)
        held_out = [((new - np.asarray(cb.decode(cb.encode(new)))) ** 2).sum(1).mean() for cb in (best, plain)]
        assert held_out[0] < 0.8 * held_out[1]
