"""Mini-batch K-means (vq_pipeline.minibatch): running means by hand, empty-code repair, determinism,
continuing from a saved codebook, and the first batch's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vq_pipeline import Codebook, DimensionMismatchError, TooFewPointsError, fit_codebook
from vq_pipeline.minibatch import MiniBatchState, fit_minibatch, start_minibatch, update_minibatch

from conftest import oracle

TOY_INIT = np.array([[0.0, 0.0], [10.0, 10.0]], dtype=np.float32)
TOY_BATCH_1 = np.array([[1, 0], [0, 1], [9, 10], [11, 10], [10, 12]], dtype=np.float32)
TOY_BATCH_2 = np.array([[2, 2], [10, 9]], dtype=np.float32)


def test_running_mean_by_hand() -> None:
    """Each code is the mean of every row it was ever assigned, and counts count them."""
    state = start_minibatch(TOY_BATCH_1, 2, init=TOY_INIT, engine="torch", device="cpu")
    # Batch 1: code 0 takes (1,0), (0,1); code 1 takes (9,10), (11,10), (10,12).
    np.testing.assert_allclose(state.centroids.numpy(), [[0.5, 0.5], [10.0, 32 / 3]], rtol=1e-6)
    assert state.counts.tolist() == [2, 3]
    # Its inertia is measured against the init, before the update: 1 + 1 + 1 + 1 + 4.
    assert state.batch_inertia == pytest.approx(8.0)
    state = update_minibatch(state, TOY_BATCH_2, engine="torch", device="cpu")
    # Batch 2: (2,2) -> code 0, (10,9) -> code 1; centroid += (sum - n c) / (count + n).
    np.testing.assert_allclose(state.centroids.numpy(), [[1.0, 1.0], [10.0, 10.25]], rtol=1e-6)
    assert state.counts.tolist() == [3, 4]
    assert state.batch_inertia == pytest.approx(2 * 1.5**2 + (32 / 3 - 9) ** 2, rel=1e-6)
    assert (state.n_batches, state.n_rows, state.n_repairs) == (2, 7, 0)
    assert state.streamed_inertia == pytest.approx(8.0 + state.batch_inertia)


def test_running_mean_cosine_renormalizes() -> None:
    """Under cosine: unit rows, the running-mean step on the unit centroid, then normalized again."""
    init = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    batch_1 = np.array([[3.0, 1.0], [0.0, 2.0]], dtype=np.float32)  # one row per code
    batch_2 = np.array([[1.0, 1.0], [2.0, 0.0]], dtype=np.float32)  # both nearer code 0
    state = start_minibatch(batch_1, 2, metric="cosine", init=init, engine="torch", device="cpu")
    u = batch_1[0] / np.linalg.norm(batch_1[0])
    np.testing.assert_allclose(state.centroids.numpy(), [u, [0.0, 1.0]], atol=1e-7)
    state = update_minibatch(state, batch_2, engine="torch", device="cpu")
    unit = batch_2 / np.linalg.norm(batch_2, axis=1, keepdims=True)
    step = u + (unit.sum(axis=0) - 2 * u) / 3  # count 1 + 2 rows
    np.testing.assert_allclose(state.centroids[0].numpy(), step / np.linalg.norm(step), atol=1e-6)
    np.testing.assert_allclose(state.centroids[1].numpy(), [0.0, 1.0], atol=1e-7)  # no row: not moved
    assert state.counts.tolist() == [3, 1]
    # 1 - cos of each row against the centroid it met.
    assert state.batch_inertia == pytest.approx(float((1 - unit @ u).sum()), rel=1e-5)


def test_a_code_that_never_received_a_row_takes_a_far_row() -> None:
    init = np.array([[0.0, 0.0], [1000.0, 1000.0], [10.0, 10.0]], dtype=np.float32)
    batch_1 = np.array([[1, 0], [0, 1], [9, 10], [11, 10], [10, 14]], dtype=np.float32)
    state = start_minibatch(batch_1, 3, init=init, engine="torch", device="cpu")
    # Code 1 got nothing; the batch's farthest row from its own code is (10, 14) (squared distance 16).
    np.testing.assert_array_equal(state.centroids[1].numpy(), [10.0, 14.0])
    assert state.counts.tolist() == [2, 0, 3] and state.n_repairs == 1
    # Its count stayed 0: the next rows it receives replace it entirely (no weight left on the far row).
    state = update_minibatch(state, np.array([[10, 16], [10, 18], [0, 0]], dtype=np.float32), engine="torch")
    np.testing.assert_allclose(state.centroids[1].numpy(), [10.0, 17.0], rtol=1e-6)
    assert state.counts.tolist() == [3, 2, 3] and state.n_repairs == 1
    # A code that received rows once is never moved, even when a batch gives it none.
    before = state.centroids.clone()
    state = update_minibatch(state, np.array([[0.5, 0.5], [1.0, 1.0]], dtype=np.float32), engine="torch")
    assert torch.equal(state.centroids[1:], before[1:]) and state.n_repairs == 1


def _batches(seed: int = 0, n: int = 2400, dim: int = 8, n_blobs: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=6.0, size=(n_blobs, dim))
    x = (centers[rng.integers(n_blobs, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)
    return np.array_split(x, 8)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_deterministic_and_resumable_from_a_saved_codebook(metric: str, tmp_path) -> None:
    batches = _batches()
    one = fit_minibatch(batches, 12, metric=metric, seed=3, engine="torch", device="cpu")
    two = fit_minibatch(batches, 12, metric=metric, seed=3, engine="torch", device="cpu")
    assert one.centroids.numpy().tobytes() == two.centroids.numpy().tobytes()
    assert torch.equal(one.counts, two.counts) and one.data_fingerprint == two.data_fingerprint
    assert int(one.counts.sum()) == sum(len(b) for b in batches) == one.stats["n_rows"]
    assert one.stats["mode"] == "minibatch" and one.stats["n_batches"] == 8
    if metric == "cosine":
        np.testing.assert_allclose(one.centroids.norm(dim=1).numpy(), 1.0, atol=1e-6)
    # Stop after 4 batches, save, load, continue: the same state as a stream that never stopped.
    state = start_minibatch(batches[0], 12, metric=metric, seed=3, engine="torch", device="cpu")
    for b in batches[1:4]:
        state = update_minibatch(state, b, engine="torch", device="cpu")
    path = state.to_codebook().save(tmp_path / "half.safetensors")
    resumed = MiniBatchState.from_codebook(Codebook.load(path))
    for b in batches[4:]:
        resumed = update_minibatch(resumed, b, engine="torch", device="cpu")
        state = update_minibatch(state, b, engine="torch", device="cpu")
    assert resumed.centroids.numpy().tobytes() == state.centroids.numpy().tobytes()
    assert resumed.centroids.numpy().tobytes() == one.centroids.numpy().tobytes()
    assert torch.equal(resumed.counts, one.counts) and resumed.n_rows == one.stats["n_rows"]


def test_one_pass_is_close_to_lloyd_on_separated_blobs() -> None:
    """An invariant, not the benchmark (benchmarks/minibatch.py): on well-separated blobs one pass
    over 8 batches lands within 5% of a full Lloyd fit's objective."""
    batches = _batches(seed=1)
    x = torch.from_numpy(np.concatenate(batches))
    mb = fit_minibatch(batches, 12, seed=0, engine="torch", device="cpu")
    full = fit_codebook(x, 12, seed=0, engine="torch", device="cpu")
    ratio = float(oracle(x, mb.centroids, "l2").min(dim=1).values.sum()) / full.stats["inertia"]
    assert ratio < 1.05, ratio


def test_first_batch_needs_n_codes_rows() -> None:
    with pytest.raises(TooFewPointsError, match=r"n_rows=3 .*n_codes=5.*Fix: make the first batch at least 5 rows"):
        start_minibatch(np.ones((3, 2), dtype=np.float32), 5)
    state = start_minibatch(_batches()[0], 4, engine="torch", device="cpu")
    # Later batches may be any size: one row is enough.
    assert update_minibatch(state, np.zeros((1, 8), dtype=np.float32), engine="torch").n_rows == state.n_rows + 1
    with pytest.raises(DimensionMismatchError, match=r"x.shape\[1\]=3 but the codes have dim=8"):
        update_minibatch(state, np.zeros((5, 3), dtype=np.float32))


def test_seeding_is_the_fits_own() -> None:
    """The first batch is seeded as fit_codebook seeds (same init, same seed: same initial codes)."""
    batch = _batches()[0]
    expected = fit_codebook(batch, 6, n_iter=0, seed=5, engine="torch", device="cpu")
    # Absorbing the batch moves each initial code to the mean of the rows nearest to it.
    codes = expected.encode(batch)
    codes = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    means = np.stack([batch[codes == k].astype(np.float64).mean(axis=0) for k in range(6)])
    state = start_minibatch(batch, 6, seed=5, engine="torch", device="cpu")
    np.testing.assert_allclose(state.centroids.numpy(), means, rtol=1e-5, atol=1e-5)
