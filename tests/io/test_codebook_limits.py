"""What a codebook file may ask of a reader: at most MAX_LEVELS levels (refused before the tensor data is
read), centroids and residual reconstructions within MAX_SQUARED_NORM, fit settings that agree with the
file's structure, and counts that sum to at most MAX_TRAINING_ROWS and that a stream can still add to."""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_pipeline import Codebook, CodebookFileError, InvalidInputError, fit_codebook, validate
from vq_pipeline.fitting.minibatch import MiniBatchState, update_minibatch
from vq_pipeline.io.codebook_file import (
    MAX_LEVELS,
    MAX_SQUARED_NORM,
    MAX_TRAINING_ROWS,
    load_info,
    write_codebook_bytes,
)
from vq_pipeline.sklearn import VectorQuantizer

LOADERS: dict[str, Callable[[Path], Any]] = {"Codebook.load": Codebook.load, "load_info": load_info}
INT64_MAX = 2**63 - 1
SQRT_MAX = math.sqrt(MAX_SQUARED_NORM)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def metadata(codec: str, levels: int, n_codes: int, dim: int, *, metric: str = "l2", fit: Any = None) -> dict[str, str]:
    """The string metadata of a codebook file, as Codebook.to_metadata writes it."""
    meta = {
        "format": "vq-pipeline.codebook",
        "format_version": "1.0" if codec == "flat" else "1.1",
        "metric": metric,
        "n_codes": str(n_codes),
        "dim": str(dim),
        "dtype": "float32",
        "fit": json.dumps({} if fit is None else fit),
        "stats": "{}",
        "sources": "[]",
        "versions": "{}",
        "timings": "{}",
    }
    if codec != "flat":
        meta.update(codec=codec, levels=str(levels))
    return meta


def write(path: Path, codec: str, centroids: np.ndarray, counts: np.ndarray, **kwargs: Any) -> Path:
    """A codebook file of these arrays, written without the checks that Codebook runs."""
    levels, n_codes, sub = (1, *centroids.shape) if codec == "flat" else centroids.shape
    dim = sub * levels if codec == "product" else sub
    path.write_bytes(write_codebook_bytes(metadata(codec, levels, n_codes, dim, **kwargs), centroids, counts))
    return path


def named(path: Path) -> str:
    """A pattern of the file as messages name it."""
    return re.escape(f"codebook file {str(path)!r}")


def refused(load: Callable[[], Any]) -> tuple[str, int, float]:
    """The CodebookFileError message of ``load()``, the peak of Python allocations and the seconds it took."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CodebookFileError) as info:
            load()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak, seconds


def test_the_norm_bound_is_the_one_rows_are_held_to() -> None:
    assert MAX_SQUARED_NORM == validate.MAX_SQUARED_NORM


# ----------------------------------------------------------------------------- levels


def sparse_codebook(path: Path, codec: str, levels: int, n_codes: int, sub_dim: int) -> Path:
    """A file as long as its header says (the tensor data a hole of zeros: costs no disk)."""
    dim = sub_dim * levels if codec == "product" else sub_dim
    n_centroids, n_counts = 4 * levels * n_codes * sub_dim, 8 * levels * n_codes
    header = {
        "__metadata__": metadata(codec, levels, n_codes, dim),
        "centroids": {"dtype": "F32", "shape": [levels, n_codes, sub_dim], "data_offsets": [0, n_centroids]},
        "counts": {"dtype": "I64", "shape": [levels, n_codes], "data_offsets": [n_centroids, n_centroids + n_counts]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + n_centroids + n_counts)
    return path


@FAST
@given(
    codec=st.sampled_from(["residual", "product"]),
    levels=st.integers(MAX_LEVELS + 1, 20_000),
    n_codes=st.integers(1, 8),
    sub_dim=st.integers(1, 16),
)
def test_more_levels_than_the_cap_are_refused_before_the_data_is_read(
    codec: str, levels: int, n_codes: int, sub_dim: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = sparse_codebook(Path(folder) / "levels.safetensors", codec, levels, n_codes, sub_dim)
        for load in LOADERS.values():
            error, peak, _ = refused(lambda load=load: load(path))
            assert re.search(rf"levels={levels}; expected at most MAX_LEVELS={MAX_LEVELS} codes per row.*Fix:", error)
            assert str(path) in error
            assert peak < 2**20, f"refusing levels={levels} allocated {peak:,} bytes"


def test_the_reported_file_fails_fast(tmp_path: Path) -> None:
    """Residual, levels=20000, n_codes=1, dim=16 (1.4 MB): it loaded, and then encoding took seconds and GBs."""
    c = np.random.default_rng(0).standard_normal((20_000, 1, 16)).astype(np.float32)
    path = write(tmp_path / "levels.safetensors", "residual", c, np.ones((20_000, 1), np.int64))
    for load in LOADERS.values():
        error, peak, seconds = refused(lambda load=load: load(path))
        assert "levels=20000; expected at most MAX_LEVELS=256" in error and str(path) in error
        assert peak < 2**20 and seconds < 2.0, (peak, seconds)


def test_a_huge_declared_level_count_reads_only_the_header(tmp_path: Path) -> None:
    path = sparse_codebook(tmp_path / "huge.safetensors", "residual", 999_999, 1, 16)  # a 72 MB hole
    error, peak, _ = refused(lambda: load_info(path))
    assert "levels=999999" in error and peak < 2**20


def test_shapes_whose_sizes_wrap_around_int64_are_measured_exactly(tmp_path: Path) -> None:
    """64 levels of 2**58 codes are 2**64 values, which int64 arithmetic makes 0: an empty data section matched."""
    n_codes = 2**58
    header = {
        "__metadata__": metadata("residual", 64, n_codes, 1),
        "centroids": {"dtype": "F32", "shape": [64, n_codes, 1], "data_offsets": [0, 0]},
        "counts": {"dtype": "I64", "shape": [64, n_codes], "data_offsets": [0, 0]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "wraps.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    for load in LOADERS.values():
        error, _, _ = refused(lambda load=load: load(path))
        assert f"expected {4 * 64 * n_codes} bytes for dtype F32 and shape [64, {n_codes}, 1]" in error, error


def test_codebooks_at_the_cap_round_trip_and_fits_above_it_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cb = Codebook(
        centroids=torch.from_numpy(rng.standard_normal((MAX_LEVELS, 2, 1)).astype(np.float32)),
        counts=torch.ones(MAX_LEVELS, 2, dtype=torch.int64),
        metric="l2",
        codec="product",
        settings={"codec": "product", "levels": MAX_LEVELS, "n_codes": 2, "metric": "l2"},
    )
    path = cb.save(tmp_path / "cap.safetensors")
    assert Codebook.load(path).to_bytes() == cb.to_bytes() and load_info(path).levels == MAX_LEVELS
    x = torch.from_numpy(rng.standard_normal((20, MAX_LEVELS + 1)).astype(np.float32))
    with pytest.raises(InvalidInputError, match=rf"levels={MAX_LEVELS + 1} exceeds MAX_LEVELS={MAX_LEVELS}.*Fix:"):
        fit_codebook(x, 2, codec="product", levels=MAX_LEVELS + 1, n_iter=1, engine="torch", device="cpu")
    with pytest.raises(InvalidInputError, match=rf"levels={MAX_LEVELS + 1} exceeds MAX_LEVELS"):
        fit_codebook(x[:, :4], 2, codec="residual", levels=MAX_LEVELS + 1, n_iter=1, engine="torch", device="cpu")


# ----------------------------------------------------------------------------- norms


def small_centroids(codec: str, levels: int, n_codes: int, sub_dim: int, seed: int) -> np.ndarray:
    shape = (n_codes, sub_dim) if codec == "flat" else (levels, n_codes, sub_dim)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def set_norm(c: np.ndarray, where: tuple[int, ...], factor: float, seed: int) -> float:
    """Give the centroid ``c[where]`` a squared norm of about ``factor * MAX_SQUARED_NORM``; its exact one."""
    v = np.random.default_rng(seed).standard_normal(c.shape[-1]) + 1e-3
    c[where] = (v / np.linalg.norm(v) * math.sqrt(factor * MAX_SQUARED_NORM)).astype(np.float32)
    return float(np.square(c[where].astype(np.float64)).sum())


@FAST
@given(
    codec=st.sampled_from(["flat", "residual", "product"]),
    levels=st.integers(1, 4),
    n_codes=st.integers(1, 5),
    sub_dim=st.integers(1, 6),
    pick=st.integers(0, 1000),
    factor=st.floats(1.01, 3.5),
    seed=st.integers(0, 100),
)
def test_centroids_whose_squared_norm_overflows_are_refused_naming_level_and_code(
    codec: str, levels: int, n_codes: int, sub_dim: int, pick: int, factor: float, seed: int
) -> None:
    levels = 1 if codec == "flat" else levels
    c = small_centroids(codec, levels, n_codes, sub_dim, seed)
    level, code = (pick // n_codes) % levels, pick % n_codes
    where = (code,) if codec == "flat" else (level, code)
    sq = set_norm(c, where, factor, seed)
    assert sq > MAX_SQUARED_NORM  # the oracle: this centroid's exact squared norm
    counts = np.ones(c.shape[:-1], np.int64)
    name = rf"centroids\[{code}\]" if codec == "flat" else rf"centroids\[{level}, {code}\] \(level {level}, code {code}\)"
    message = rf"{name} has squared norm {re.escape(f'{sq:.3e}')}; expected at most MAX_SQUARED_NORM=8\.0e\+37 .*Fix:"
    with pytest.raises(InvalidInputError, match=message):
        Codebook(centroids=torch.from_numpy(c), counts=torch.from_numpy(counts), metric="l2", codec=codec)
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "big.safetensors", codec, c, counts)
        for load in LOADERS.values():
            with pytest.raises(CodebookFileError, match=rf"{named(path)} is not a valid codebook: {message}"):
                load(path)


def test_the_reported_residual_codebook_scaled_by_1e30_is_refused(tmp_path: Path) -> None:
    c = small_centroids("residual", 3, 4, 8, 0)
    c[1] *= 1e30  # finite in float32, but every squared distance to it overflows
    path = write(tmp_path / "scaled.safetensors", "residual", c, np.ones((3, 4), np.int64))
    worst = int(np.argmax(np.square(c[1].astype(np.float64)).sum(axis=1)))
    for load in LOADERS.values():
        with pytest.raises(CodebookFileError, match=rf"centroids\[1, {worst}\] \(level 1, code {worst}\) has squared"):
            load(path)


@FAST
@given(
    levels=st.integers(2, 5),
    n_codes=st.integers(1, 4),
    sub_dim=st.integers(1, 6),
    first=st.integers(0, 4),
    gap=st.integers(1, 4),
    fa=st.floats(0.05, 0.95),
    fb=st.floats(0.05, 0.95),
    seed=st.integers(0, 100),
)
def test_residual_levels_whose_sums_could_overflow_are_refused(
    levels: int, n_codes: int, sub_dim: int, first: int, gap: int, fa: float, fb: float, seed: int
) -> None:
    """Two levels whose centroids are each within the bound, but whose sum need not be: refused at the
    level where the sum of the levels' largest norms (the triangle inequality's bound) first exceeds it."""
    a = first % (levels - 1)
    b = min(a + gap, levels - 1)
    c = small_centroids("residual", levels, n_codes, sub_dim, seed)
    set_norm(c, (a, seed % n_codes), fa**2, seed)
    set_norm(c, (b, (seed + 1) % n_codes), fb**2, seed + 1)
    largest = np.sqrt(np.square(c.astype(np.float64)).sum(axis=2).max(axis=1))  # (levels,)
    reach = np.cumsum(largest) ** 2  # (levels,) the oracle: the bound on every partial sum of codes
    counts = np.ones((levels, n_codes), np.int64)
    build = lambda: Codebook(centroids=torch.from_numpy(c), counts=torch.from_numpy(counts), metric="l2", codec="residual")  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "sums.safetensors", "residual", c, counts)
        if reach[-1] <= MAX_SQUARED_NORM * (1 - 1e-6):
            build()
            for load in LOADERS.values():
                load(path)
            return
        if np.any(np.abs(reach / MAX_SQUARED_NORM - 1) < 1e-6):
            return  # too close to the bound to tell float rounding from the rule
        level = int(np.argmax(reach > MAX_SQUARED_NORM))
        code = int(np.argmax(np.square(c[level].astype(np.float64)).sum(axis=1)))
        message = rf"centroids\[{level}, {code}\] \(level {level}, code {code}\) lets a reconstruction of levels 0\.\.{level}"
        with pytest.raises(InvalidInputError, match=message + r".*Fix:"):
            build()
        for load in LOADERS.values():
            with pytest.raises(CodebookFileError, match=named(path) + ".*" + message):
                load(path)


def test_a_residual_codebook_at_the_bound_gives_finite_distances() -> None:
    """Rows at the row bound and a residual codebook at the centroid bound: every distance is finite."""
    d = 8
    unit = np.ones(d) / math.sqrt(d)
    c = np.zeros((2, 2, d), np.float32)
    c[0, 0], c[1, 1] = unit * 0.49 * SQRT_MAX, unit * 0.49 * SQRT_MAX  # partial sums reach 0.98 of the bound
    c[0, 1], c[1, 0] = -unit * 0.49 * SQRT_MAX, -unit * 0.49 * SQRT_MAX
    cb = Codebook(centroids=torch.from_numpy(c), counts=torch.ones(2, 2, dtype=torch.int64), metric="l2", codec="residual")
    x = np.stack([unit, -unit, np.eye(d)[0]]).astype(np.float32) * np.float32(0.99 * SQRT_MAX)
    codes, dist = cb.encode(x, return_distances=True, engine="torch", device="cpu")
    assert np.isfinite(dist).all(), dist
    assert codes[0].tolist() == [0, 1] and codes[1].tolist() == [1, 0]


# ----------------------------------------------------------------------------- fit settings that contradict the file


@pytest.fixture(scope="module", params=["flat", "residual", "product"])
def fitted(request: pytest.FixtureRequest) -> Codebook:
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    levels = 1 if request.param == "flat" else 3
    return fit_codebook(x, 4, codec=request.param, levels=levels, n_iter=5, engine="torch", device="cpu")


def with_fit(data: bytes, fit: Any) -> bytes:
    """A codebook's bytes with its ``fit`` metadata replaced, the tensor bytes kept."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["fit"] = json.dumps(fit)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


WRONG = {
    "codec": st.sampled_from(["flat", "residual", "product", "scalar", ""]) | st.integers(),
    "levels": st.integers(-3, 300) | st.floats(allow_nan=False) | st.text(max_size=3) | st.booleans(),
    "n_codes": st.integers(-3, 300) | st.floats(allow_nan=False) | st.text(max_size=3),
    "dim": st.integers(-3, 300) | st.floats(allow_nan=False) | st.none(),
    "metric": st.sampled_from(["l2", "cosine", "L2", "ip"]) | st.none(),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(WRONG)), data=st.data())
def test_fit_settings_that_contradict_the_file_are_refused(fitted: Codebook, key: str, data: st.DataObject) -> None:
    actual = {
        "codec": fitted.codec,
        "levels": fitted.levels,
        "n_codes": fitted.n_codes,
        "dim": fitted.dim,
        "metric": fitted.metric,
    }[key]
    value = data.draw(WRONG[key].filter(lambda v: not (type(v) is type(actual) and v == actual)), label=key)
    fit = {**fitted.settings, key: value}
    shown = re.escape(repr(value)[:77])
    message = rf"metadata fit\.{key}={shown}.* contradicts the codebook's {key}={re.escape(repr(actual))} \(codec=.*Fix:"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "contradicts.safetensors"
        path.write_bytes(with_fit(fitted.to_bytes(), fit))
        for load in LOADERS.values():
            with pytest.raises(CodebookFileError, match=rf"{named(path)} is not a valid codebook: {message}"):
                load(path)
    with pytest.raises(InvalidInputError, match=rf"settings\.{key}=.* contradicts the codebook's {key}="):
        Codebook(centroids=fitted.centroids, counts=fitted.counts, metric=fitted.metric, codec=fitted.codec, settings=fit)


def test_the_reported_product_settings_in_a_residual_file_are_refused(tmp_path: Path) -> None:
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    cb = fit_codebook(x, 4, codec="residual", levels=3, n_iter=5, engine="torch", device="cpu")
    path = tmp_path / "lying.safetensors"
    path.write_bytes(with_fit(cb.to_bytes(), {**cb.settings, "codec": "product", "levels": 5}))
    for load in LOADERS.values():
        with pytest.raises(CodebookFileError, match=r"metadata fit\.codec='product' contradicts the codebook's codec='residual'"):
            load(path)


def test_fitted_files_and_their_levels_agree_with_their_settings(fitted: Codebook, tmp_path: Path) -> None:
    """What fits write loads, and so does each level of a multi-level codebook saved on its own."""
    assert Codebook.load(fitted.save(tmp_path / "cb.safetensors")).to_bytes() == fitted.to_bytes()
    for level in range(fitted.levels):
        one = fitted.level(level)
        loaded = Codebook.load(one.save(tmp_path / f"level{level}.safetensors"))
        assert loaded.codec == "flat" and loaded.settings.get("metric", one.metric) == one.metric
        assert "levels" not in loaded.settings or fitted.codec == "flat"


@pytest.mark.parametrize(
    "key, value, expected",
    [("n_iter", "10", "an integer >= 0"), ("seed", -1, "an integer >= 0"), ("tol", [0.1], "a number")],
)
def test_fit_settings_an_estimator_takes_must_have_their_types(key: str, value: Any, expected: str, tmp_path: Path) -> None:
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    cb = fit_codebook(x, 3, n_iter=3, engine="torch", device="cpu")
    path = tmp_path / "typed.safetensors"
    path.write_bytes(with_fit(cb.to_bytes(), {**cb.settings, key: value}))
    for load in LOADERS.values():
        with pytest.raises(CodebookFileError, match=rf"metadata fit\.{key}=.*; expected {expected}\. Fix:"):
            load(path)


# ----------------------------------------------------------------------------- counts


@FAST
@given(
    counts=st.lists(st.integers(0, INT64_MAX), min_size=1, max_size=6),
    multi=st.booleans(),
)
def test_counts_summing_beyond_the_cap_are_refused_naming_the_file(counts: list[int], multi: bool) -> None:
    total = sum(counts)  # the oracle: exact, in Python integers
    n = np.array(counts, dtype=np.int64)
    c = np.zeros((len(counts), 2), np.float32)
    codec, n, c = ("residual", n[None], c[None]) if multi else ("flat", n, c)
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "counts.safetensors", codec, c, n)
        which = "counts of level 0" if multi else "counts"
        for load in LOADERS.values():
            if total <= MAX_TRAINING_ROWS:
                assert int(load(path).counts.sum()) == total
                continue
            with pytest.raises(
                CodebookFileError,
                match=rf"{named(path)} is not a valid codebook: {which} sum to {total} training rows; expected "
                rf"at most MAX_TRAINING_ROWS={MAX_TRAINING_ROWS} .*Fix:",
            ):
                load(path)


def test_negative_counts_name_the_code(tmp_path: Path) -> None:
    path = write(tmp_path / "neg.safetensors", "residual", np.zeros((2, 3, 2), np.float32), np.array([[1, 2, 3], [4, -5, 6]]))
    for load in LOADERS.values():
        with pytest.raises(CodebookFileError, match=r"counts\[1, 1\]=-5 is negative; expected counts >= 0 .*Fix:"):
            load(path)


def stream(n_codes: int, counts: list[int], dim: int = 3) -> MiniBatchState:
    c = torch.randn(n_codes, dim, generator=torch.Generator().manual_seed(n_codes))
    cb = Codebook(centroids=c, counts=torch.tensor(counts, dtype=torch.int64), metric="l2")
    return MiniBatchState.from_codebook(cb)


@settings(max_examples=30, deadline=None)
@given(
    n_codes=st.sampled_from([1, 2, 7, 1024, 1025, 4096]),
    n_rows=st.integers(1, 40),
    delta=st.integers(-3, 3),
    share=st.floats(0.0, 1.0),
)
def test_a_stream_refuses_a_batch_its_counts_cannot_hold(n_codes: int, n_rows: int, delta: int, share: float) -> None:
    limit = min(MAX_TRAINING_ROWS, INT64_MAX // n_codes)  # the oracle: counts times n_codes must fit int64
    total = min(MAX_TRAINING_ROWS, limit - n_rows + delta)  # a codebook holds at most MAX_TRAINING_ROWS
    counts = [0] * n_codes
    counts[0] = int(total * share)
    counts[-1] += total - counts[0]
    state = stream(n_codes, counts)
    x = torch.randn(n_rows, 3, generator=torch.Generator().manual_seed(1))
    if total + n_rows <= limit:
        after = update_minibatch(state, x, engine="torch", device="cpu")
        assert int(after.counts.sum()) == total + n_rows and bool((after.counts >= 0).all())
        return
    message = (
        rf"codebook {state.parent_fingerprint[:16]} \(the codes this stream continues\): its counts sum to {total} rows, "
        rf"and the batch's {n_rows} rows would make {total + n_rows}; expected at most {limit} .*Fix:"
    )
    with pytest.raises(InvalidInputError, match=message) as info:
        update_minibatch(state, x, engine="torch", device="cpu")
    assert "negative" not in str(info.value)


def test_partial_fit_of_a_codebook_with_counts_near_the_cap_names_the_codebook(tmp_path: Path) -> None:
    """The report: counts near 2**63, then partial_fit. Such a file is refused on load, naming it; a codebook
    at the cap that a batch would take beyond it is refused by partial_fit, naming the codebook, not the data."""
    near = write(tmp_path / "near.safetensors", "flat", np.eye(2, dtype=np.float32), np.array([2**62, 2**62 - 1]))
    with pytest.raises(CodebookFileError, match=rf"{named(near)} is not a valid codebook: counts sum to"):
        Codebook.load(near)
    at_cap = write(tmp_path / "cap.safetensors", "flat", np.eye(2, dtype=np.float32), np.array([2**52, 2**52]))
    cb = Codebook.load(at_cap)
    est = VectorQuantizer.from_codebook(cb, engine="torch", device="cpu")
    with pytest.raises(InvalidInputError, match=rf"codebook {cb.fingerprint[:16]} .*its counts sum to {2**53} rows"):
        est.partial_fit(np.random.default_rng(0).standard_normal((10, 2)).astype(np.float32))
