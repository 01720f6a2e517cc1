"""CUDA cases: skipped on machines without a GPU (run by benchmarks/gpu_check.sh on one).

With ``VQ_TEST_DEVICE=cpu`` (the dry run of gpu_check.sh) the same bodies run on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINES, GPU_DEVICE, assert_codes_match, cuda

from vq_pipeline import fit_codebook

pytestmark = [pytest.mark.gpu, cuda]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("engine", ENGINES)
def test_cuda_encode_matches_float64_oracle(engine: str, metric: str) -> None:
    x = torch.randn(20000, 32, generator=torch.Generator().manual_seed(0)) + 5
    cb = fit_codebook(x, 100, metric=metric, engine=engine, device=GPU_DEVICE, n_iter=10)
    codes = cb.encode(x, engine=engine, device=GPU_DEVICE, top_k=2)
    assert assert_codes_match(codes, x, cb.centroids, metric) > 19000


@pytest.mark.parametrize("engine", ENGINES)
def test_cuda_fit_agrees_with_cpu_fit(engine: str) -> None:
    x = torch.randn(5000, 16, generator=torch.Generator().manual_seed(1))
    gpu = fit_codebook(x, 20, init="first", engine=engine, device=GPU_DEVICE, n_iter=5, tol=0.0)
    cpu = fit_codebook(x, 20, init="first", engine="torch", device="cpu", n_iter=5, tol=0.0)
    torch.testing.assert_close(gpu.centroids, cpu.centroids, rtol=0, atol=1e-4)
