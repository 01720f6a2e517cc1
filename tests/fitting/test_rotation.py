"""Learned rotations (:mod:`vq_pipeline.fitting.rotation`): ITQ and OPQ lower the error they minimize
and never raise it from one round to the next; OPQ + product codes beat plain product codes on new
rows of correlated data; rotations are orthogonal, reproducible, stored, and encode after loading."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_parts
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.fitting.options import fit_options
from vq_pipeline.fitting.rotation import balanced_pca, itq, itq_loss, opq, orthogonality_error
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import FitSettings, TableSettings

CPU = dict(engine="torch", device="cpu")


def low_rank(n: int, dim: int, rank: int, seed: int, noise: float = 0.1) -> np.ndarray:
    """Correlated rows: a seeded random rank-``rank`` signal with a decaying spectrum, plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, dim)) * np.linspace(3.0, 0.5, rank)[:, None]
    return (rng.standard_normal((n, rank)) @ basis + noise * rng.standard_normal((n, dim))).astype(np.float32)


def _opts(dim: int, n_rows: int, **kwargs) -> object:
    return fit_options(kwargs.pop("n_codes", None), FitSettings(**kwargs, **CPU), dim=dim, n_rows=n_rows)


def test_itq_lowers_the_quantization_loss_against_no_rotation() -> None:
    x = low_rank(2000, 16, rank=4, seed=0)
    z = torch.from_numpy(x - x.mean(axis=0))
    learned = itq(z, _opts(16, 2000, codec="binary", rotation="itq", rotation_iters=30))
    assert orthogonality_error(learned.rotation) < 1e-5
    assert itq_loss(z, learned.rotation) < 0.95 * itq_loss(z, torch.eye(16))
    assert learned.losses[-1] < 0.95 * learned.losses[0]  # and against the random rotation it starts from
    assert learned.losses[-1] == pytest.approx(itq_loss(z, learned.rotation), rel=1e-4)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(8, 300), dim=st.integers(2, 12), seed=st.integers(0, 2**16), iters=st.integers(1, 15))
def test_itq_never_raises_its_loss_across_rounds(n: int, dim: int, seed: int, iters: int) -> None:
    x = low_rank(n, dim, rank=max(1, dim // 3), seed=seed)
    z = torch.from_numpy(x - x.mean(axis=0))
    learned = itq(z, _opts(dim, n, codec="binary", rotation="itq", rotation_iters=iters, seed=seed % 97))
    assert len(learned.losses) == iters + 1
    for before, after in zip(learned.losses, learned.losses[1:]):
        assert after <= before * (1 + 1e-5) + 1e-9
    assert orthogonality_error(learned.rotation) < 1e-5


@pytest.mark.parametrize("codec,levels", [("product", 4), ("residual", 2)])
def test_opq_never_raises_its_loss_and_is_orthogonal(codec: str, levels: int) -> None:
    x = torch.from_numpy(low_rank(1500, 16, rank=5, seed=1))
    learned = opq(x, _opts(16, 1500, n_codes=16, codec=codec, levels=levels, rotation="opq", rotation_iters=8))
    assert len(learned.losses) == 9 and learned.centroids.shape == (
        levels,
        16,
        16 // levels if codec == "product" else 16,
    )
    for before, after in zip(learned.losses, learned.losses[1:]):
        assert after <= before * (1 + 1e-5)
    assert orthogonality_error(learned.rotation) < 1e-5


def test_balanced_pca_is_orthogonal_and_balances_the_slices_variances() -> None:
    x = torch.from_numpy(low_rank(3000, 16, rank=4, seed=2, noise=0.05))
    r = balanced_pca(x, 4)
    assert orthogonality_error(r) < 1e-5
    var = (x @ r).double().var(dim=0).reshape(4, 4)
    # each slice gets one of the 4 strong directions: no slice holds two, none holds only noise
    assert (var.max(dim=1).values > 1.0).all() and ((var > 1.0).sum(dim=1) == 1).all()


def test_opq_product_beats_plain_product_on_new_rows_of_correlated_data() -> None:
    x = low_rank(5000, 32, rank=8, seed=3)
    train, new = x[:4000], x[4000:]
    plain = fit_codebook(train, 16, codec="product", levels=8, n_iter=25, seed=1, **CPU)
    rotated = fit_codebook(train, 16, codec="product", levels=8, n_iter=25, seed=1, rotation="opq", **CPU)
    _, d_plain = plain.encode(new, return_distances=True)
    _, d_rot = rotated.encode(new, return_distances=True)
    assert float(np.mean(d_rot)) < 0.7 * float(np.mean(d_plain))
    assert rotated.stats["mse"] < plain.stats["mse"]
    assert orthogonality_error(rotated.rotation) < 1e-5
    assert rotated.stats["rotation_rows"] == 4000 and rotated.stats["level_init"] == "opq"
    assert rotated.settings["rotation"] == "opq" and rotated.settings["rotation_iters"] == 20
    # the stats pass encodes the rotated rows as encode does: its error is encode's
    _, d_train = rotated.encode(train, return_distances=True)
    assert rotated.stats["mse"] == pytest.approx(float(np.mean(d_train.astype(np.float64))), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codec="product", levels=4, rotation="opq"),
        dict(codec="product", levels=4, rotation="random", metric="cosine"),
        dict(codec="residual", levels=2, rotation="opq"),
        dict(codec="residual", levels=2, rotation="random", metric="cosine"),
    ],
)
def test_rotated_fits_are_reproducible_load_back_and_encode(tmp_path: Path, kwargs: dict) -> None:
    x = low_rank(1200, 16, rank=4, seed=4)
    cb = fit_codebook(x, 16, n_iter=10, seed=3, rotation_iters=5, **kwargs, **CPU)
    again = fit_codebook(x, 16, n_iter=10, seed=3, rotation_iters=5, **kwargs, **CPU)
    assert cb.rotation.numpy().tobytes() == again.rotation.numpy().tobytes()
    assert cb.centroids.numpy().tobytes() == again.centroids.numpy().tobytes()
    assert cb.fingerprint == again.fingerprint
    loaded = Codebook.load(cb.save(tmp_path / "r.safetensors"))
    assert loaded.rotation.numpy().tobytes() == cb.rotation.numpy().tobytes()
    codes, dist = loaded.encode(x, return_distances=True)
    np.testing.assert_array_equal(codes, cb.encode(x))
    assert float(np.mean(dist.astype(np.float64))) == pytest.approx(cb.stats["mse"], rel=1e-5)
    assert np.asarray(loaded.decode(codes)).shape == x.shape


def test_rotation_statistics_name_the_sample_and_a_streamed_fit_learns_the_same_rotation(tmp_path: Path) -> None:
    write_parts(tmp_path / "in", {"a/part-0.parquet": 400, "b/part-0.parquet": 300}, dim=16)
    fit = FitSettings(codec="product", levels=4, rotation="opq", rotation_iters=4, n_iter=8, **CPU)
    memory = fit_from_tables([tmp_path / "in"], 8, TableSettings("embedding"), fit)
    streamed = fit_from_tables([tmp_path / "in"], 8, TableSettings("embedding", data_budget=1, batch_rows=128), fit)
    assert streamed.stats["mode"] == "streamed" and streamed.stats["rotation_rows"] == 700
    assert streamed.rotation.numpy().tobytes() == memory.rotation.numpy().tobytes()
    np.testing.assert_allclose(streamed.centroids.numpy(), memory.centroids.numpy(), rtol=1e-4, atol=1e-4)
    assert streamed.stats["mse"] == pytest.approx(memory.stats["mse"], rel=1e-4)


def test_no_rotation_records_what_it_recorded_before() -> None:
    x = low_rank(300, 8, rank=2, seed=5)
    cb = fit_codebook(x, 4, codec="product", levels=2, n_iter=3, **CPU)
    assert cb.rotation is None
    assert not {"rotation", "rotation_iters", "bits", "scalar_range"} & set(cb.settings)
    assert not {"rotation_rows", "rotation_losses", "level_init"} & set(cb.stats)
    assert "rotation_seconds" not in cb.timings
    opts = _opts(8, 300, n_codes=4, codec="product", levels=2)
    assert replace(opts, rotation="random").settings("torch")["rotation"] == "random"
