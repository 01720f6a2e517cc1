"""The scikit-learn estimator (vq_pipeline.sklearn.VectorQuantizer): scikit-learn's own checks, float64
oracles for predict/transform/score, decode, the codebook-file round trip, partial_fit, and that
``import vq_pipeline`` never loads scikit-learn."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from conftest import assert_codes_match, oracle  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from vq_pipeline import FitSettings, Codebook, InvalidInputError, TooFewPointsError, fit_codebook
from vq_pipeline.fitting.minibatch import fit_minibatch
from vq_pipeline.sklearn import VectorQuantizer


def _expected_failures(estimator: VectorQuantizer) -> dict[str, str]:
    if estimator.metric == "cosine":
        return {"check_estimators_dtypes": "its integer data holds all-zero rows, which have no direction under cosine"}
    return {}


@parametrize_with_checks(
    [VectorQuantizer(engine="torch", device="cpu"), VectorQuantizer(metric="cosine", engine="torch", device="cpu")],
    expected_failed_checks=_expected_failures,
)
def test_scikit_learn_checks(estimator, check) -> None:
    check(estimator)


def _data(seed: int = 0, n: int = 600, dim: int = 6, n_blobs: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(n_blobs, dim))
    return (centers[rng.integers(n_blobs, size=n)] + rng.normal(size=(n, dim)) + 50.0).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_predict_transform_score_against_a_float64_oracle(metric: str) -> None:
    x_train, x_new = _data(0), _data(1)
    vq = VectorQuantizer(7, metric=metric, random_state=0, engine="torch", device="cpu").fit(x_train)
    c = torch.from_numpy(vq.cluster_centers_.copy())
    d = oracle(torch.from_numpy(x_new), c, metric)  # (n, K) float64
    codes = vq.predict(x_new)
    assert codes.dtype == np.int64 and codes.shape == (len(x_new),)
    assert assert_codes_match(torch.from_numpy(codes), torch.from_numpy(x_new), c, metric) > len(x_new) // 2
    t = vq.transform(x_new)
    assert t.dtype == np.float32 and t.shape == (len(x_new), 7)
    # Euclidean distances, as KMeans.transform gives them (between unit vectors under cosine: |a - b|^2 = 2 (1 - cos)).
    euclidean = np.sqrt((2.0 * d if metric == "cosine" else d).clamp(min=0).numpy())
    np.testing.assert_allclose(t, euclidean, rtol=1e-5, atol=1e-6 * float(euclidean.max()))
    assert vq.score(x_new) == pytest.approx(-float(d.min(dim=1).values.sum()), rel=1e-5)
    if metric == "l2":  # score stays the negative inertia: the sum of squared distances
        assert vq.score(x_new) == pytest.approx(-float((t.astype(np.float64).min(axis=1) ** 2).sum()), rel=1e-5)
    # fit's inertia_ and labels_ belong to the returned centroids.
    d_train = oracle(torch.from_numpy(x_train), c, metric)
    assert vq.inertia_ == pytest.approx(float(d_train.min(dim=1).values.sum()), rel=1e-5)
    assert vq.inertia_ == pytest.approx(-vq.score(x_train), rel=1e-6)
    np.testing.assert_array_equal(vq.labels_, vq.predict(x_train))
    np.testing.assert_array_equal(vq.fit_predict(x_train), vq.labels_)


def test_defaults_are_the_librarys() -> None:
    library = inspect.signature(fit_codebook).parameters
    params = VectorQuantizer().get_params()
    assert params["n_codes"] == 8 and params["random_state"] == library["seed"].default
    for name in ("metric", "n_iter", "tol", "init", "n_init", "engine", "device", "memory_budget"):
        assert params[name] == library[name].default, name


def test_random_state_is_the_library_seed() -> None:
    x = _data()
    vq = VectorQuantizer(6, random_state=4, engine="torch", device="cpu").fit(x)
    cb = fit_codebook(x, 6, seed=4, engine="torch", device="cpu")
    assert vq.cluster_centers_.tobytes() == cb.centroids.numpy().tobytes()
    assert vq.n_iter_ == cb.stats["iterations"] and vq.counts_.tolist() == cb.counts.tolist()


def test_inverse_transform_decodes_codes_and_distances() -> None:
    x = _data()
    vq = VectorQuantizer(5, random_state=0, engine="torch", device="cpu").fit(x)
    labels = vq.predict(x)
    np.testing.assert_array_equal(vq.inverse_transform(labels), vq.cluster_centers_[labels])
    np.testing.assert_array_equal(vq.inverse_transform(vq.transform(x)), vq.cluster_centers_[labels])
    with pytest.raises(ValueError, match=r"codes\[0\]=5 is out of range; expected codes between 0 and 4"):
        vq.inverse_transform(np.array([5, 0]))


def test_codebook_file_round_trip(tmp_path) -> None:
    x, x_new = _data(0), _data(2)
    vq = VectorQuantizer(6, metric="cosine", n_iter=20, random_state=3, engine="torch", device="cpu").fit(x)
    path = vq.to_codebook().save(tmp_path / "vq.safetensors")
    back = VectorQuantizer.from_codebook(Codebook.load(path), engine="torch", device="cpu")
    assert back.get_params() == vq.get_params()
    assert back.cluster_centers_.tobytes() == vq.cluster_centers_.tobytes()
    np.testing.assert_array_equal(back.predict(x_new), vq.predict(x_new))
    np.testing.assert_array_equal(back.transform(x_new), vq.transform(x_new))
    assert back.inertia_ == vq.inertia_ and back.n_features_in_ == 6 and not hasattr(back, "labels_")
    # The loaded estimator keeps streaming: partial_fit weighs its centroids by the saved counts. The
    # batch is assigned twice (the stream's default batch_iter=2): to the loaded codes, then to the
    # codes those rows move them to; the update is from the loaded codes with the second assignment.
    batch = _data(3, n=50)
    back.partial_fit(batch)
    unit = batch / np.linalg.norm(batch, axis=1, keepdims=True)
    c = vq.cluster_centers_.astype(np.float64)  # (6, dim), unit rows

    def step(codes: np.ndarray) -> np.ndarray:
        out = c.copy()
        for k in np.unique(codes):
            n_k = (codes == k).sum()
            moved = c[k] + (unit[codes == k].sum(axis=0) - n_k * c[k]) / (vq.counts_[k] + n_k)
            out[k] = moved / np.linalg.norm(moved)
        return out

    expected = step((unit @ step((unit @ c.T).argmax(axis=1)).T).argmax(axis=1))
    np.testing.assert_allclose(back.cluster_centers_, expected, atol=1e-6)
    assert back.to_codebook().stats["n_splits"] == 0


def test_partial_fit_is_the_minibatch_stream() -> None:
    batches = np.array_split(_data(0, n=800), 4)
    vq = VectorQuantizer(6, random_state=2, engine="torch", device="cpu")
    for b in batches:
        vq.partial_fit(b)
    cb = fit_minibatch(batches, 6, FitSettings(seed=2, engine="torch", device="cpu"))
    assert vq.cluster_centers_.tobytes() == cb.centroids.numpy().tobytes()
    assert vq.counts_.tolist() == cb.counts.tolist() and vq.n_steps_ == 4 and vq.n_iter_ == 0
    # labels_ and inertia_ describe the last batch against the updated codes, as in MiniBatchKMeans.
    np.testing.assert_array_equal(vq.labels_, vq.predict(batches[-1]))
    assert vq.inertia_ == pytest.approx(-vq.score(batches[-1]))
    assert vq.to_codebook().stats["mode"] == "minibatch"
    with pytest.raises(TooFewPointsError, match=r"n_rows=3 rows but n_codes=6.*Fix:"):
        VectorQuantizer(6).partial_fit(batches[0][:3])


def test_read_only_and_polars_inputs_without_warnings() -> None:
    pl = pytest.importorskip("polars")
    x = _data()
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vq = VectorQuantizer(5, random_state=0, engine="torch", device="cpu").fit(x)
        vq.predict(x), vq.transform(x), vq.score(x), vq.partial_fit(x)
        VectorQuantizer(5, engine="torch", device="cpu").partial_fit(x)
    df = pl.DataFrame({f"f{i}": x[:, i] for i in range(x.shape[1])})
    vq = VectorQuantizer(5, random_state=0, engine="torch", device="cpu").fit(df)
    assert vq.feature_names_in_.tolist() == list(df.columns)
    np.testing.assert_array_equal(vq.predict(df), VectorQuantizer(5, random_state=0, engine="torch", device="cpu").fit(x).predict(x))


def test_fewer_rows_than_codes_is_explained() -> None:
    with pytest.raises(TooFewPointsError, match=r"n_samples=4 rows but n_codes=8.*Fix: lower n_codes to at most 4"):
        VectorQuantizer().fit(_data(n=4))


def test_import_vq_pipeline_never_loads_scikit_learn() -> None:
    code = (
        "import sys, vq_pipeline, vq_pipeline.fitting.minibatch\n"
        "[getattr(vq_pipeline, name) for name in vq_pipeline.__all__]\n"
        "assert 'sklearn' not in sys.modules, 'sklearn imported'\n"
        "assert 'vq_pipeline.sklearn' not in sys.modules, 'vq_pipeline.sklearn imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_multi_level_codecs_predict_tuples_and_inverse_transform_decodes(tmp_path) -> None:
    x, x_new = _data(0), _data(2)
    vq = VectorQuantizer(6, codec="residual", levels=2, random_state=1, engine="torch", device="cpu").fit(x)
    cb = vq.to_codebook()
    assert cb.codec == "residual" and vq.cluster_centers_.shape == (2, 6, 6)
    codes = vq.predict(x_new)
    assert codes.shape == (len(x_new), 2)
    np.testing.assert_array_equal(codes, cb.encode(x_new))
    np.testing.assert_array_equal(vq.labels_, cb.encode(x))
    np.testing.assert_array_equal(vq.inverse_transform(codes), cb.decode(codes))
    err = ((x - cb.decode(cb.encode(x))).astype(np.float64) ** 2).sum()
    assert vq.inertia_ == pytest.approx(err, rel=1e-5) and vq.score(x) == pytest.approx(-err, rel=1e-5)
    with pytest.raises(InvalidInputError, match="transform needs a flat codebook"):
        vq.transform(x_new)
    with pytest.raises(InvalidInputError, match="partial_fit needs a flat codebook"):
        vq.partial_fit(x_new)
    back = VectorQuantizer.from_codebook(Codebook.load(cb.save(tmp_path / "rq.safetensors")), engine="torch", device="cpu")
    assert back.get_params() == vq.get_params()
    np.testing.assert_array_equal(back.predict(x_new), codes)


@pytest.mark.parametrize(
    ("key", "value"), [("n_codes", 3), ("metric", "cosine"), ("codec", "residual"), ("levels", 2), ("n_codes", 8.0)]
)
def test_from_codebook_refuses_overrides_that_contradict_the_codebook(key: str, value: object) -> None:
    cb = fit_codebook(_data(0), 8, engine="torch", device="cpu")
    with pytest.raises(InvalidInputError, match=rf"from_codebook\({key}=.*but the codebook has {key}=.*Fix: leave {key} out"):
        VectorQuantizer.from_codebook(cb, **{key: value})
    # the codebook's own values, and settings of later fits and of the computation, are accepted
    est = VectorQuantizer.from_codebook(cb, n_codes=np.int64(8), metric="l2", n_iter=3, engine="torch", device="cpu")
    assert est.get_params()["n_codes"] == 8 and est.n_iter == 3


@pytest.mark.parametrize(("key", "value"), [("n_codes", 3), ("metric", "cosine"), ("codec", "product"), ("levels", 2)])
def test_changing_what_the_codes_are_after_fit_is_refused_when_the_codes_are_used(key: str, value: object) -> None:
    x = _data(0)
    vq = VectorQuantizer(8, random_state=0, engine="torch", device="cpu").fit(x)
    vq.set_params(**{key: value})
    for use in (vq.predict, vq.transform, vq.score, vq.partial_fit):
        with pytest.raises(InvalidInputError, match=rf"{key}=.* but the fitted codebook has {key}=.*Fix: call fit"):
            use(x)
    with pytest.raises(InvalidInputError, match=rf"{key}=.* but the fitted codebook has {key}="):
        vq.inverse_transform(np.zeros(3, np.int64))
    vq.set_params(n_iter=5, tol=0.0, engine="torch")  # steering a fit or the computation: always allowed
    vq.set_params(**{key: VectorQuantizer.from_codebook(vq.to_codebook()).get_params()[key]})
    np.testing.assert_array_equal(vq.predict(x), vq.labels_)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_clone_of_a_loaded_estimator_fits_the_model_its_params_describe(metric: str) -> None:
    from sklearn.base import clone

    x = _data(0)
    cb = fit_codebook(x, 5, metric=metric, codec="residual", levels=2, seed=3, n_iter=7, engine="torch", device="cpu")
    other = "l2" if metric == "cosine" else "cosine"
    with pytest.raises(InvalidInputError, match=rf"from_codebook\(metric='{other}'\) but the codebook has metric='{metric}'"):
        VectorQuantizer.from_codebook(cb, metric=other)  # would describe a model it does not encode with
    est = VectorQuantizer.from_codebook(cb, engine="torch", device="cpu")
    refit = clone(est).fit(x)
    assert refit.get_params() == est.get_params()
    got = refit.to_codebook()
    assert (got.n_codes, got.metric, got.codec, got.levels) == (5, metric, "residual", 2)
    np.testing.assert_array_equal(got.centroids.numpy(), cb.centroids.numpy())


def test_from_codebook_inertia_is_the_sum_of_one_minus_cos() -> None:
    x = _data(0)
    vq = VectorQuantizer(5, metric="cosine", codec="residual", levels=2, engine="torch", device="cpu").fit(x)
    back = VectorQuantizer.from_codebook(vq.to_codebook(), engine="torch", device="cpu")
    assert back.inertia_ == pytest.approx(vq.inertia_, rel=1e-5) and vq.inertia_ == pytest.approx(-vq.score(x), rel=1e-5)


# ----------------------------------------------------------------------------- estimator habits


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)  # (1797, 64), pixel values 0..16


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_transform_is_kmeans_transform_with_the_same_centroids(metric: str) -> None:
    """On digits, ``transform`` equals ``KMeans.transform`` given our centroids (cosine: KMeans on unit rows)."""
    from sklearn.cluster import KMeans

    x = _digits()
    vq = VectorQuantizer(n_codes=32, metric=metric, random_state=0, engine="torch", device="cpu").fit(x)
    rows = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    km = KMeans(n_clusters=32, n_init=1, max_iter=1, random_state=0).fit(rows)
    km.cluster_centers_ = vq.cluster_centers_.astype(np.float64)
    expected = km.transform(rows.astype(np.float64))
    got = vq.transform(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))
    np.testing.assert_array_equal(got.argmin(axis=1), vq.predict(x))
    np.testing.assert_array_equal(vq.inverse_transform(got), vq.cluster_centers_[vq.predict(x)])


def test_transform_features_feed_a_logistic_regression_as_kmeans_ones_do() -> None:
    """The issue's scenario at K=128: the features span KMeans' range (0 to about 60), not squared distances."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32)
    vq = VectorQuantizer(n_clusters=128, random_state=0, engine="torch", device="cpu").fit(x)
    km = KMeans(n_clusters=128, n_init=1, max_iter=1, random_state=0).fit(x)
    km.cluster_centers_ = vq.cluster_centers_.astype(np.float64)
    features, reference = vq.transform(x), km.transform(x.astype(np.float64))
    assert features.min() >= 0 and features.max() == pytest.approx(reference.max(), rel=1e-5)
    assert features.max() < 100  # squared distances reached thousands
    np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-4)


def test_n_clusters_is_an_alias_of_n_codes_that_clone_and_get_params_keep() -> None:
    from sklearn.base import clone

    x = _data(0)
    est = VectorQuantizer(n_clusters=5, random_state=2, engine="torch", device="cpu")
    params = est.get_params()
    assert params["n_clusters"] == 5 and params["n_codes"] == 8  # stored as given, as clone requires
    twin = clone(est)
    assert twin.get_params() == params
    fitted = est.fit(x)
    assert fitted.cluster_centers_.shape == (5, x.shape[1]) and fitted.to_codebook().n_codes == 5
    same = VectorQuantizer(5, random_state=2, engine="torch", device="cpu").fit(x)
    np.testing.assert_array_equal(twin.fit(x).cluster_centers_, same.cluster_centers_)
    # n_codes set to the same number agrees; another number is refused, saying why
    VectorQuantizer(n_codes=5, n_clusters=5, engine="torch", device="cpu").fit(x)
    with pytest.raises(InvalidInputError, match=r"n_codes=6 and n_clusters=5 disagree; expected one number of codes.*Fix: pass only one"):
        VectorQuantizer(n_codes=6, n_clusters=5, engine="torch", device="cpu").fit(x)
    # what the codes are: changed through the alias after fit, the codes are not used
    fitted.set_params(n_clusters=4)
    with pytest.raises(InvalidInputError, match=r"n_codes=4 but the fitted codebook has n_codes=5"):
        fitted.predict(x)
    fitted.set_params(n_clusters=None, n_codes=5)
    np.testing.assert_array_equal(fitted.predict(x), fitted.labels_)
    with pytest.raises(InvalidInputError, match=r"from_codebook\(n_clusters=3\) but the codebook has n_clusters=5"):
        VectorQuantizer.from_codebook(fitted.to_codebook(), n_clusters=3)
    assert VectorQuantizer.from_codebook(fitted.to_codebook(), n_clusters=5).get_params()["n_clusters"] == 5


def test_verbose_prints_the_fit_progress_lines_on_stderr(capfd) -> None:
    """``verbose=True`` writes the lines ``vq fit`` writes on a log: the library's formatter
    (``ProgressLines``) of the very events the fit reports to ``progress``, one line each on stderr."""
    from vq_pipeline.compute.lloyd import ProgressLines

    x = _data(0)
    events: list = []
    cb = fit_codebook(x, 6, n_iter=4, tol=0.0, seed=1, engine="torch", device="cpu", progress=events.append, verbose=True)
    out, err = capfd.readouterr()
    expected: list[str] = []
    replay = ProgressLines(expected.append, clock=lambda: 0.0)  # a quick fit: no line depends on the clock
    for event in events:
        replay(event)
    lines = err.splitlines()
    assert out == "" and lines == expected and cb.stats["iterations"] == 4
    assert lines[0].startswith("seeding") and sum(line.startswith("iteration ") for line in lines) == 4
    fit_codebook(x, 6, n_iter=4, seed=1, engine="torch", device="cpu")
    assert capfd.readouterr() == ("", "")  # quiet by default
    VectorQuantizer(6, n_iter=4, tol=0.0, random_state=1, engine="torch", device="cpu", verbose=1).fit(x)
    est_lines = capfd.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in est_lines] == [line.split(":")[0] for line in lines]
    VectorQuantizer(6, n_iter=4, random_state=1, engine="torch", device="cpu").fit(x)
    assert capfd.readouterr() == ("", "")
    with pytest.raises(InvalidInputError, match=r"verbose='yes'; expected True or False"):
        fit_codebook(x, 6, engine="torch", device="cpu", verbose="yes")
