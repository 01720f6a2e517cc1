"""Every refusal names the value, says what was expected and how to fix it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vq_pipeline import (
    Codebook,
    DimensionMismatchError,
    InvalidInputError,
    NonFiniteError,
    TooFewPointsError,
    fit_codebook,
)
from vq_pipeline.validate import MAX_SQUARED_NORM, as_embeddings


@pytest.fixture(scope="module")
def cb() -> Codebook:
    return fit_codebook(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), 5, device="cpu")


def good(n: int = 50, dim: int = 4) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_at_fit_and_encode(bad_value: float, cb: Codebook) -> None:
    x = good()
    x[17, 2] = bad_value
    for call in (lambda: fit_codebook(x, 3, device="cpu"), lambda: cb.encode(x, device="cpu")):
        with pytest.raises(NonFiniteError, match=r"x\[17, 2\]=.*1 non-finite value.*row 17, column 2.*Fix: drop or impute"):
            call()


def test_float64_beyond_float32_range_and_overflowing_norms(cb: Codebook) -> None:
    x = good().double()
    x[3, 0] = 1e300
    with pytest.raises(NonFiniteError, match=r"outside float32's range.*row 3"):
        fit_codebook(x, 3, device="cpu")
    y = good()
    y[5] = 3e19  # finite in float32, but its squared norm is not
    with pytest.raises(NonFiniteError, match=r"squared norm of x\[5\]=.*Fix: rescale"):
        cb.encode(y, device="cpu")


def test_squared_norm_bound_is_exact_at_the_limit() -> None:
    # The fast float32 norm scan only flags rows; the bound itself is checked in float64.
    limit = (MAX_SQUARED_NORM / 4) ** 0.5  # a 4-wide row of this value has squared norm == the bound
    x = torch.ones(6, 4)
    x[2] = limit * (1 - 1e-6)
    assert torch.equal(as_embeddings(x), x)
    x[2] = limit * (1 + 1e-5)
    with pytest.raises(NonFiniteError, match=r"squared norm of x\[2\]=8\.000e\+37 is too large"):
        as_embeddings(x)


@pytest.mark.parametrize(
    "x, pattern",
    [
        (torch.empty(0, 4), r"x.shape=\(0, 4\) is empty.*Fix"),
        (torch.empty(5, 0), r"x.shape=\(5, 0\) is empty"),
        (torch.ones(8), r"x.shape=\(8,\) has 1 dimension.*expected a 2-d"),
        (torch.ones(2, 3, 4), r"has 3 dimension"),
        (torch.ones(5, 4, dtype=torch.bool), r"x.dtype=torch.bool is not a real number type"),
        (torch.ones(5, 4, dtype=torch.complex64), r"x.dtype=torch.complex64"),
        (np.array([["a", "b"]]), r"x.dtype=<U1 is not numeric.*Fix"),
        ([[1.0, 2.0]], r"x has type list; expected a torch.Tensor or numpy.ndarray"),
    ],
)
def test_malformed_arrays(x, pattern: str, cb: Codebook) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        fit_codebook(x, 1, device="cpu")
    with pytest.raises(InvalidInputError, match=pattern):
        cb.encode(x, device="cpu")


def test_dim_mismatch(cb: Codebook) -> None:
    with pytest.raises(DimensionMismatchError, match=r"x.shape\[1\]=7 but the codebook has dim=4.*Fix"):
        cb.encode(good(dim=7), device="cpu")


def test_n_codes_bounds() -> None:
    with pytest.raises(TooFewPointsError, match=r"n_codes=51 exceeds the n_rows=50 rows.*Fix: lower n_codes"):
        fit_codebook(good(), 51, device="cpu")
    for bad in (0, -3):
        with pytest.raises(InvalidInputError, match=rf"n_codes={bad} is out of range; expected an integer >= 1"):
            fit_codebook(good(), bad, device="cpu")
    with pytest.raises(InvalidInputError, match=r"n_codes=2.5 has type float"):
        fit_codebook(good(), 2.5, device="cpu")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"metric": "dot"}, r"metric='dot' is not supported; expected one of 'l2', 'cosine'"),
        ({"engine": "faiss"}, r"engine='faiss' is not supported; expected one of 'auto', 'keops', 'torch'"),
        ({"init": "kmeans||"}, r"init='kmeans\|\|' is not supported"),
        ({"n_iter": -1}, r"n_iter=-1 is out of range"),
        ({"tol": -0.1}, r"tol=-0.1 is out of range"),
        ({"tol": float("nan")}, r"tol=nan is out of range"),
        ({"seed": -1}, r"seed=-1 is out of range"),
        ({"n_init": 0}, r"n_init=0 is out of range"),
        ({"device": "tpu"}, r"device='tpu' is (not a device|not supported)"),
        ({"init": torch.zeros(3, 5)}, r"init.shape=\(3, 5\); expected \(n_codes, dim\)=\(3, 4\)"),
        ({"init": torch.randn(3, 4), "n_init": 2}, r"n_init=2 with a given init tensor"),
        ({"memory_budget": 0}, r"memory_budget=0 is out of range"),
    ],
)
def test_bad_options(kwargs: dict, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        fit_codebook(good(), 3, **kwargs)


def test_bad_encode_options(cb: Codebook) -> None:
    with pytest.raises(InvalidInputError, match=r"top_k=6 is out of range; expected an integer between 1 and 5"):
        cb.encode(good(), top_k=6)
    with pytest.raises(InvalidInputError, match=r"engine='gpu' is not supported"):
        cb.encode(good(), engine="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_requested_without_gpu() -> None:
    with pytest.raises(InvalidInputError, match=r"device='cuda' was requested but no CUDA GPU.*Fix: pass device='cpu'"):
        fit_codebook(good(), 3, device="cuda")


def test_zero_vector_under_cosine() -> None:
    x = good()
    x[9] = 0
    with pytest.raises(InvalidInputError, match=r"x\[9\] has norm 0.*Fix: drop all-zero embeddings, or use metric='l2'"):
        fit_codebook(x, 3, metric="cosine", device="cpu")
    cb = fit_codebook(good(), 3, metric="cosine", device="cpu")
    with pytest.raises(InvalidInputError, match=r"x\[9\] has norm 0"):
        cb.encode(x)
    assert fit_codebook(x, 3, metric="l2", device="cpu").n_codes == 3  # fine under l2


def test_warm_start_metric_mismatch(cb: Codebook) -> None:
    with pytest.raises(InvalidInputError, match=r"init codebook metric='l2' but metric='cosine'"):
        fit_codebook(good(), 5, metric="cosine", init=cb)


def test_errors_are_value_errors() -> None:
    for cls in (InvalidInputError, NonFiniteError, DimensionMismatchError, TooFewPointsError):
        assert issubclass(cls, ValueError)
