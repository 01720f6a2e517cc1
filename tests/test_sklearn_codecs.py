"""The scikit-learn estimator with scalar, binary and rotated codes: the library's fit as oracle, the
file round trip, clone, and the parameters that define the codes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402

from vq_pipeline import Codebook, InvalidInputError, fit_codebook  # noqa: E402
from vq_pipeline.sklearn import VectorQuantizer  # noqa: E402

COMPUTE = dict(engine="torch", device="cpu")
# name: (estimator parameters, n_codes of the library's fit)
CASES: dict[str, tuple[dict[str, Any], int]] = {
    "scalar8": (dict(codec="scalar"), 256),
    "scalar4": (dict(codec="scalar", bits=4, scalar_range="quantile"), 16),
    "binary": (dict(codec="binary"), 2),
    "binary-itq": (dict(codec="binary", rotation="itq", rotation_iters=5), 2),
    "product-opq": (dict(codec="product", levels=3, rotation="opq", rotation_iters=4, n_codes=8), 8),
}


def _data(seed: int, n: int = 400, dim: int = 12) -> np.ndarray:
    """Correlated rows: a rotation has something to learn."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(dim, dim))
    return (rng.normal(size=(n, dim)) * np.linspace(3, 0.2, dim)) @ mix + 1.5


@pytest.mark.parametrize("name", list(CASES))
def test_fit_predict_decode_are_the_librarys(name: str, tmp_path) -> None:
    params, n_codes = CASES[name]
    x, x_new = _data(0).astype(np.float32), _data(1).astype(np.float32)
    est = VectorQuantizer(random_state=2, **params, **COMPUTE).fit(x)
    fit_kw = {k: v for k, v in params.items() if k != "n_codes"}
    cb = fit_codebook(x, n_codes, seed=2, **fit_kw, **COMPUTE)
    got = est.to_codebook()
    assert got.fingerprint == cb.fingerprint
    codes = est.predict(x_new)
    per_dim = params["codec"] in ("scalar", "binary")  # one byte per dimension, as FAISS's codes
    width, dtype = (12, np.uint8) if per_dim else (params["levels"], np.int64)
    assert codes.shape == (len(x_new), width) and codes.dtype == dtype
    np.testing.assert_array_equal(codes, np.asarray(cb.encode(x_new)))
    np.testing.assert_array_equal(est.labels_, np.asarray(cb.encode(x)))
    np.testing.assert_array_equal(est.inverse_transform(codes), np.asarray(cb.decode(codes)))
    err = ((x - np.asarray(cb.decode(cb.encode(x)))).astype(np.float64) ** 2).sum()
    assert est.inertia_ == pytest.approx(err, rel=1e-4)
    with pytest.raises(InvalidInputError, match="transform needs a flat codebook"):
        est.transform(x_new)
    with pytest.raises(InvalidInputError, match="partial_fit needs a flat codebook"):
        est.partial_fit(x_new)
    # the file round trip and a clone of the loaded estimator
    back = VectorQuantizer.from_codebook(Codebook.load(got.save(tmp_path / "cb.safetensors")), **COMPUTE)
    np.testing.assert_array_equal(back.predict(x_new), codes)
    assert {k: back.get_params()[k] for k in ("codec", "rotation", "bits", "scalar_range")} == {
        k: est.get_params()[k] for k in ("codec", "rotation", "bits", "scalar_range")
    }
    assert clone(back).fit(x).to_codebook().fingerprint == cb.fingerprint


def test_scalar_n_codes_is_two_to_the_bits() -> None:
    x = _data(0)
    assert VectorQuantizer(codec="scalar", bits=4, **COMPUTE).fit(x).to_codebook().n_codes == 16
    assert VectorQuantizer(16, codec="scalar", bits=4, levels=12, **COMPUTE).fit(x).to_codebook().n_codes == 16
    with pytest.raises(InvalidInputError, match="bits"):
        VectorQuantizer(16, codec="scalar", bits=8, **COMPUTE).fit(x)


@pytest.mark.parametrize(
    ("start", "key", "value"),
    [
        (dict(codec="scalar"), "bits", 4),
        (dict(codec="scalar"), "scalar_range", "quantile"),
        (dict(codec="binary"), "rotation", "itq"),
        (dict(codec="binary", rotation="random"), "rotation", "none"),
    ],
)
def test_changing_what_the_codes_are_after_fit_is_refused(start: dict[str, Any], key: str, value: Any) -> None:
    x = _data(0)
    est = VectorQuantizer(**start, **COMPUTE).fit(x)
    est.set_params(**{key: value})
    with pytest.raises(InvalidInputError, match=rf"{key}=.* but the fitted codebook has {key}=.*Fix: call fit"):
        est.predict(x)
    est.set_params(rotation_iters=3)  # steering a later fit: allowed
    est.set_params(**{key: start.get(key, VectorQuantizer().get_params()[key])})
    np.testing.assert_array_equal(est.predict(x), est.labels_)


def test_from_codebook_refuses_another_bits() -> None:
    cb = fit_codebook(_data(0), 16, codec="scalar", bits=4, **COMPUTE)
    with pytest.raises(InvalidInputError, match=r"from_codebook\(bits=8\) but the codebook has bits=4"):
        VectorQuantizer.from_codebook(cb, bits=8)
