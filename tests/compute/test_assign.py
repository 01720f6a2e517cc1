"""Encoding: float64 oracle, top-k, chunking and order invariance, exactness off-centre, OOM retry."""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINES, assert_codes_match, oracle

from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.compute.assign import nearest_in_chunks, plan_chunk_rows
from vq_pipeline.compute.engines.torch import TorchEngine


def make_codebook(n_codes: int, dim: int, metric: str, *, seed: int, offset: float = 0.0) -> Codebook:
    c = torch.randn(n_codes, dim, generator=torch.Generator().manual_seed(seed)) + offset
    if metric == "cosine":
        c = c / c.norm(dim=1, keepdim=True)
    return Codebook(centroids=c, counts=torch.zeros(n_codes, dtype=torch.int64), metric=metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("engine", ENGINES)
def test_codes_and_distances_match_float64_oracle(engine: str, metric: str) -> None:
    cb = make_codebook(40, 8, metric, seed=1)
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(2))
    codes, dist = cb.encode(x, return_distances=True, engine=engine, device="cpu")
    assert codes.shape == (3000,) and codes.dtype == torch.int64 and dist.dtype == torch.float32
    assert assert_codes_match(codes, x, cb.centroids, metric) > 2900
    ref = oracle(x, cb.centroids, metric).min(dim=1).values
    torch.testing.assert_close(dist.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("engine", ENGINES)
def test_top_k_matches_oracle(engine: str, metric: str) -> None:
    cb = make_codebook(40, 8, metric, seed=3)
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(4))
    codes, dist = cb.encode(x, top_k=3, return_distances=True, engine=engine, device="cpu")
    assert codes.shape == (1000, 3) and dist.shape == (1000, 3)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all()), "top-k distances must be ascending"
    assert assert_codes_match(codes, x, cb.centroids, metric) > 900
    ref = oracle(x, cb.centroids, metric).sort(dim=1).values[:, :3]
    torch.testing.assert_close(dist.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_exact_on_data_far_from_the_origin(engine: str) -> None:
    # Offset 1000: a plain |x|^2 - 2x.c + |c|^2 GEMM mis-assigns ~10% of rows here.
    cb = make_codebook(64, 8, "l2", seed=5, offset=1000.0)
    x = cb.centroids[torch.randint(64, (4000,), generator=torch.Generator().manual_seed(6))]
    x = x + 0.5 * torch.randn(4000, 8, generator=torch.Generator().manual_seed(7))
    assert assert_codes_match(cb.encode(x, engine=engine, device="cpu"), x, cb.centroids, "l2") > 3900


@pytest.mark.parametrize("engine", ENGINES)
def test_encoding_the_centroids_gives_every_code(engine: str) -> None:
    for metric in ("l2", "cosine"):
        cb = make_codebook(50, 8, metric, seed=8)
        assert torch.equal(cb.encode(cb.centroids, engine=engine, device="cpu"), torch.arange(50))


@pytest.mark.parametrize("engine", ENGINES)
def test_codes_do_not_depend_on_asking_for_distances(engine: str) -> None:
    # Without distances the torch engine skips its exact recompute; the ranking must not change.
    for metric in ("l2", "cosine"):
        cb = make_codebook(70, 12, metric, seed=15, offset=50.0 if metric == "l2" else 0.0)
        x = cb.centroids[torch.randint(70, (3000,), generator=torch.Generator().manual_seed(16))]
        x = x + 0.3 * torch.randn(3000, 12, generator=torch.Generator().manual_seed(17))
        codes = cb.encode(x, engine=engine, device="cpu")
        with_dist, _ = cb.encode(x, return_distances=True, engine=engine, device="cpu")
        assert torch.equal(codes, with_dist)
        assert assert_codes_match(codes, x, cb.centroids, metric) > 2900


def test_torch_engine_breaks_ties_towards_the_lowest_code() -> None:
    c = torch.randn(12, 5, generator=torch.Generator().manual_seed(20))
    c[9] = c[3]  # a duplicated centroid: every row nearest to it is tied between codes 3 and 9
    x = c[3] + 0.01 * torch.randn(200, 5, generator=torch.Generator().manual_seed(21))
    _, idx = TorchEngine().nearest(x, c, 1, distances=False)
    assert torch.equal(idx[:, 0], torch.full((200,), 3))
    assert torch.equal(idx, oracle(x, c, "l2").argmin(dim=1, keepdim=True))


def test_split_argmin_matches_torch_and_works_in_a_forked_child() -> None:
    import os
    import signal
    import time

    from vq_pipeline.compute.engines import torch as torch_engine

    g = torch.Generator().manual_seed(22)
    partial = torch.randint(0, 6, (10_001, 37), generator=g).float()  # many ties: the first must win
    want = partial.argmin(dim=1, keepdim=True)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            assert torch.equal(torch_engine._argmin_rows(partial), want)
        torch.set_num_threads(2)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child inherits no helper threads; the pool must start afresh
            ok = torch.equal(torch_engine._argmin_rows(partial), want)
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 600
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the argmin hung in a forked child")
        assert os.read(read, 1) == b"1" and done[1] == 0
    finally:
        torch.set_num_threads(threads)


def test_engine_recomputes_centroid_terms_when_the_centroids_change_in_place() -> None:
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(18))
    c = torch.randn(20, 6, generator=torch.Generator().manual_seed(19))
    engine = TorchEngine()
    engine.nearest(x, c, 1)
    c[:10] += 3.0  # same tensor object, new contents
    got = engine.nearest(x, c, 3)
    want = TorchEngine().nearest(x, c.clone(), 3)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert torch.equal(engine.sqdist(x, c), TorchEngine().sqdist(x, c.clone()))
    # Reused work buffers: a smaller chunk, then another codebook size, then a larger chunk.
    for rows, codes in ((slice(0, 37), c), (slice(0, 300), c[:7]), (slice(0, 500), c)):
        got, want = engine.nearest(x[rows], codes, 1), TorchEngine().nearest(x[rows], codes.clone(), 1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_chunk_size_and_row_order_do_not_change_codes() -> None:
    cb = make_codebook(100, 16, "l2", seed=9)
    x = torch.randn(5000, 16, generator=torch.Generator().manual_seed(10))
    whole = cb.encode(x, top_k=2, device="cpu")
    per_row = TorchEngine().bytes_per_row(100, 16, 2) + 4 * 16
    for budget in (per_row, 7 * per_row, 1000 * per_row):
        assert torch.equal(cb.encode(x, top_k=2, memory_budget=budget, device="cpu"), whole)
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(11))
    assert torch.equal(cb.encode(x[perm], top_k=2, device="cpu"), whole[perm])


def test_chunk_plan_follows_the_memory_budget() -> None:
    engine = TorchEngine()
    per_row = engine.bytes_per_row(1024, 128, 1) + 4 * 128
    assert plan_chunk_rows(10**6, 1024, 128, k=1, engine=engine, memory_budget=100 * per_row) == 100
    assert plan_chunk_rows(50, 1024, 128, k=1, engine=engine, memory_budget=10**9) == 50
    with pytest.raises(ValueError, match=r"memory_budget=10 bytes cannot hold one row.*Fix: raise memory_budget"):
        plan_chunk_rows(10, 1024, 128, k=1, engine=engine, memory_budget=10)
    # On the CPU the engine keeps the distance block near cache size; on a GPU the budget decides.
    budget = 2**28
    assert plan_chunk_rows(10**7, 1024, 128, k=1, engine=engine, memory_budget=budget) == 2048
    gpu = TorchEngine(torch.device("cuda"))
    assert plan_chunk_rows(10**7, 1024, 128, k=1, engine=gpu, memory_budget=budget) == budget // per_row


class FlakyEngine(TorchEngine):
    """Fails like a KeOps CUDA out-of-memory (a plain RuntimeError) on chunks above a size."""

    def __init__(self, max_rows: int) -> None:
        super().__init__()
        self.max_rows, self.failures = max_rows, 0

    def nearest(self, x: torch.Tensor, c: torch.Tensor, k: int, *, distances: bool = True) -> tuple:
        if x.shape[0] > self.max_rows:
            self.failures += 1
            raise RuntimeError("[KeOps] Cuda error: out of memory")
        return super().nearest(x, c, k, distances=distances)


def test_out_of_memory_halves_the_chunk_and_gives_the_same_codes() -> None:
    c = torch.randn(30, 4, generator=torch.Generator().manual_seed(12))
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(13))
    flaky = FlakyEngine(max_rows=130)
    got = torch.cat([idx for _, _, _, idx in nearest_in_chunks(x, c, k=1, engine=flaky, chunk_rows=1000)])
    want = torch.cat([idx for _, _, _, idx in nearest_in_chunks(x, c, k=1, engine=TorchEngine(), chunk_rows=1000)])
    assert flaky.failures == 3  # 1000 -> 500 -> 250 -> 125
    assert torch.equal(got, want)


def test_other_runtime_errors_are_not_retried() -> None:
    class Broken(TorchEngine):
        def nearest(self, x: torch.Tensor, c: torch.Tensor, k: int, *, distances: bool = True) -> tuple:
            raise RuntimeError("kernel exploded")

    with pytest.raises(RuntimeError, match="kernel exploded"):
        list(nearest_in_chunks(torch.ones(10, 2), torch.ones(1, 2), k=1, engine=Broken(), chunk_rows=10))


def test_fitted_codebook_encodes_its_training_rows_like_the_oracle() -> None:
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(14)) * 3 + 7
    cb = fit_codebook(x, 32, device="cpu")
    assert assert_codes_match(cb.encode(x), x, cb.centroids, "l2") > 3900
