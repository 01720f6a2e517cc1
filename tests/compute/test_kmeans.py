"""fit_codebook: hand-computed cases, recovery, invariants, repairs, restarts, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ENGINES, assert_codes_match, oracle

from vq_pipeline import TooFewPointsError, fit_codebook
from vq_pipeline.compute.engines.torch import TorchEngine
from vq_pipeline.compute.seeding import kmeans_plus_plus


def blobs(n_per: int, centres: torch.Tensor, *, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(n_per)
    x = centres[labels] + spread * torch.randn(len(labels), centres.shape[1], generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm].float(), labels[perm]


@pytest.mark.parametrize("engine", ENGINES)
def test_hand_computed_four_points(engine: str) -> None:
    x = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [1.0, 1.0]])
    cb = fit_codebook(x, 2, init=torch.tensor([[0.0, 0.0], [1.0, 1.0]]), engine=engine, device="cpu")
    torch.testing.assert_close(cb.centroids, torch.tensor([[0.25, 0.0], [0.75, 1.0]]), rtol=0, atol=1e-7)
    assert cb.stats["inertia"] == pytest.approx(0.25, abs=1e-7)
    assert cb.counts.tolist() == [2, 2]
    assert cb.stats["converged"] is True


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("engine", ENGINES)
def test_recovers_well_separated_blobs(engine: str, metric: str) -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 8, generator=g)
    centres = 10 * centres / centres.norm(dim=1, keepdim=True)  # far apart in angle and distance
    x, labels = blobs(200, centres, spread=0.3, seed=2)
    cb = fit_codebook(x, 6, metric=metric, engine=engine, device="cpu", seed=3, n_init=2)
    codes = cb.encode(x, engine=engine, device="cpu")
    # Perfect recovery: the partition is the true one, up to renaming the codes.
    pairs = set(zip(labels.tolist(), codes.tolist()))
    assert len(pairs) == 6 and len({p[0] for p in pairs}) == 6 and len({p[1] for p in pairs}) == 6
    truth = centres / centres.norm(dim=1, keepdim=True) if metric == "cosine" else centres
    for label, code in pairs:
        assert torch.dist(cb.centroids[code], truth[label]) < (0.1 if metric == "l2" else 0.01)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_objective_never_rises_and_stats_are_consistent(metric: str) -> None:
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(4)) + 3.0
    cb = fit_codebook(x, 32, metric=metric, n_iter=30, tol=0.0, init="random", device="cpu")
    objectives = [h["objective"] for h in cb.stats["history"]]
    assert len(objectives) >= 2
    for before, after in zip(objectives, objectives[1:]):
        assert after <= before * (1 + 1e-6)
    # The reported inertia and counts belong to the returned centroids (float64 oracle).
    d = oracle(x, cb.centroids, metric)
    assert cb.stats["inertia"] == pytest.approx(float(d.min(dim=1).values.sum()), rel=1e-5)
    assert torch.equal(cb.counts, torch.bincount(d.argmin(dim=1), minlength=32))
    assert cb.stats["inertia"] == objectives[-1]
    if metric == "cosine":
        torch.testing.assert_close(cb.centroids.norm(dim=1), torch.ones(32), rtol=0, atol=1e-5)
    assert all(h["imbalance"] >= 1.0 - 1e-9 for h in cb.stats["history"])
    assert len(cb.timings["iteration_seconds"]) == len(objectives)


@pytest.mark.parametrize("engine", ENGINES)
def test_forced_empty_cluster_is_repaired(engine: str) -> None:
    x, _ = blobs(50, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), spread=0.5, seed=5)
    # The third starting centroid is far from every row: it is empty after the first E step.
    init = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1000.0, 1000.0]])
    cb = fit_codebook(x, 3, init=init, engine=engine, device="cpu", n_iter=20)
    assert cb.stats["n_repairs"] >= 1
    assert cb.stats["history"][0]["n_empty"] == 1
    assert torch.isfinite(cb.centroids).all()
    assert (cb.counts > 0).all(), "the repaired code must end up with data"
    assert cb.centroids.abs().amax() < 20  # moved onto the data, not left at (1000, 1000) or zero
    # The repair moved it to the farthest row, which splits a blob: the objective fell below the 2-code fit's.
    two = fit_codebook(x, 2, init=init[:2], device="cpu")
    assert cb.stats["inertia"] < two.stats["inertia"]


def test_repair_without_distinct_rows_left_says_so() -> None:
    x = torch.tensor([[0.0, 0.0]] * 8 + [[1.0, 1.0]] * 2)  # 80% duplicates, 2 distinct rows
    with pytest.raises(TooFewPointsError, match=r"only 2 distinct rows but n_codes=3.*Fix: lower n_codes"):
        fit_codebook(x, 3, device="cpu")
    with pytest.raises(TooFewPointsError, match=r"only 2 distinct rows but n_codes=3"):
        fit_codebook(x, 3, init="first", device="cpu")
    cb = fit_codebook(x, 2, device="cpu")  # as many codes as distinct rows is fine
    assert cb.stats["inertia"] == 0.0


def test_n_codes_one_is_the_mean_and_all_identical_rows_fit_one_code() -> None:
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(6))
    cb = fit_codebook(x, 1, device="cpu")
    torch.testing.assert_close(cb.centroids[0], x.double().mean(0).float(), rtol=0, atol=1e-6)
    same = fit_codebook(torch.ones(10, 3), 1, device="cpu")
    assert same.centroids.tolist() == [[1.0, 1.0, 1.0]] and same.stats["inertia"] == 0.0


def test_tolerance_stops_early_and_n_iter_caps() -> None:
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(7))
    loose = fit_codebook(x, 16, tol=1e-2, n_iter=100, device="cpu")
    assert loose.stats["converged"] and loose.stats["iterations"] < 100
    capped = fit_codebook(x, 16, tol=0.0, n_iter=3, init="random", device="cpu")
    assert capped.stats["iterations"] == 3 and len(capped.stats["history"]) == 4
    zero = fit_codebook(x, 16, n_iter=0, init="first", device="cpu")
    torch.testing.assert_close(zero.centroids, x[:16])


def test_restarts_keep_the_best_objective() -> None:
    x = torch.randn(1500, 6, generator=torch.Generator().manual_seed(8))
    cb = fit_codebook(x, 20, n_init=4, init="random", seed=11, device="cpu")
    inertias = cb.stats["restart_inertias"]
    assert len(inertias) == 4 and len(set(inertias)) > 1
    assert cb.stats["inertia"] == min(inertias)


def test_same_seed_same_codebook_different_seed_differs() -> None:
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(9))
    a = fit_codebook(x, 16, seed=5, device="cpu")
    b = fit_codebook(x.clone(), 16, seed=5, device="cpu")
    c = fit_codebook(x, 16, seed=6, device="cpu")
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.counts, b.counts)
    assert a.data_fingerprint == b.data_fingerprint
    assert not torch.equal(a.centroids, c.centroids)


def test_kmeans_plus_plus_picks_distinct_rows_and_spreads_out() -> None:
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    x, _ = blobs(250, centres, spread=1.0, seed=10)
    c = kmeans_plus_plus(
        x, 4, generator=torch.Generator().manual_seed(0), engine=TorchEngine(), memory_budget=2**20, device=torch.device("cpu")
    )
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in c.tolist())
    # One seed per blob: the D^2 weighting makes a second seed in an occupied blob vanishingly unlikely.
    assert sorted(oracle(c, centres, "l2").argmin(dim=1).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_other_dtypes_are_converted(dtype: torch.dtype) -> None:
    x = (torch.randn(300, 4, generator=torch.Generator().manual_seed(12)) * 4).to(dtype)
    cb = fit_codebook(x, 5, device="cpu")
    ref = fit_codebook(x.to(torch.float32), 5, device="cpu")
    assert torch.equal(cb.centroids, ref.centroids) and cb.centroids.dtype == torch.float32


def test_numpy_input_matches_torch_input() -> None:
    x = np.random.default_rng(13).standard_normal((400, 6)).astype(np.float32)
    assert torch.equal(fit_codebook(x, 7, device="cpu").centroids, fit_codebook(torch.from_numpy(x), 7, device="cpu").centroids)


def test_warm_start_from_codebook_records_parent() -> None:
    x = torch.randn(1000, 5, generator=torch.Generator().manual_seed(14))
    parent = fit_codebook(x, 8, n_iter=2, tol=0.0, device="cpu")
    child = fit_codebook(x, 8, init=parent, device="cpu")
    assert child.parent_fingerprint == parent.fingerprint and child.settings["init"] == "tensor"
    assert child.stats["inertia"] <= parent.stats["inertia"] * (1 + 1e-6)
    assert child.stats["history"][0]["objective"] == pytest.approx(parent.stats["inertia"], rel=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_engines_fit_the_same_codebook(metric: str) -> None:
    pytest.importorskip("pykeops")
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(15)) + 2
    a = fit_codebook(x, 12, metric=metric, init="first", engine="torch", device="cpu", n_iter=10)
    b = fit_codebook(x, 12, metric=metric, init="first", engine="keops", device="cpu", n_iter=10)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=1e-5)
    assert a.stats["inertia"] == pytest.approx(b.stats["inertia"], rel=1e-5)
    assert_codes_match(b.encode(x, engine="keops"), x, b.centroids, metric)
