"""Array types at the public edge: numpy (read-only too), torch and polars in, the same type out.

fit_codebook, Codebook.encode and Codebook.decode are checked for every input type against the
torch path (same codebook bytes, same codes and distances) and against the float64 oracle, with
every warning turned into an error; bad inputs get the clear errors.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import oracle

from vq_pipeline import Codebook, DimensionMismatchError, InvalidInputError, fit_codebook

N_ROWS, DIM, N_CODES = 400, 6, 8


@pytest.fixture(autouse=True)
def no_warnings():
    """Any warning (torch's "NumPy array is not writable" among them) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    rng = np.random.default_rng(7)
    centres = rng.normal(scale=4.0, size=(N_CODES, DIM))
    return (centres[rng.integers(0, N_CODES, N_ROWS)] + rng.normal(size=(N_ROWS, DIM))).astype(np.float32)


def read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def array_series(a: np.ndarray) -> pl.Series:
    return pl.Series("embedding", a, dtype=pl.Array(pl.Float32, a.shape[1]))


#: input type -> how to build it from a (n_rows, dim) float32 numpy array
INPUTS: dict[str, Callable[[np.ndarray], object]] = {
    "numpy": lambda a: a.copy(),
    "numpy-read-only": read_only,
    "torch": lambda a: torch.from_numpy(a.copy()),
    "polars-array": array_series,
    "polars-list": lambda a: pl.Series("embedding", a.tolist(), dtype=pl.List(pl.Float32)),
    "polars-frame": lambda a: pl.DataFrame({"embedding": array_series(a)}),
}
#: input type -> the type results come back in
OUT_TYPE = {"numpy": np.ndarray, "numpy-read-only": np.ndarray, "torch": torch.Tensor}


def out_type(kind: str) -> type:
    return OUT_TYPE.get(kind, pl.Series)


def values(r: object) -> np.ndarray:
    """The values of a numpy / torch / polars result as a numpy array, for comparisons."""
    if isinstance(r, torch.Tensor):
        return r.numpy()
    return r.to_numpy() if isinstance(r, pl.Series) else np.asarray(r)


def stable_bytes(cb: Codebook) -> bytes:
    return dataclasses.replace(cb, created_at="", timings={}).to_bytes()


@pytest.fixture(scope="module")
def reference(x: np.ndarray) -> Codebook:
    return fit_codebook(torch.from_numpy(x.copy()), N_CODES, device="cpu", seed=3)


@pytest.mark.parametrize("kind", INPUTS)
def test_fit_codebook_gives_the_torch_codebook_for_every_input_type(
    kind: str, x: np.ndarray, reference: Codebook
) -> None:
    cb = fit_codebook(INPUTS[kind](x), N_CODES, device="cpu", seed=3)
    assert stable_bytes(cb) == stable_bytes(reference)


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("kind", INPUTS)
def test_encode_returns_the_input_type_with_the_torch_values(
    kind: str, top_k: int, x: np.ndarray, reference: Codebook
) -> None:
    want_codes, want_dist = reference.encode(torch.from_numpy(x.copy()), top_k=top_k, return_distances=True)
    codes, dist = reference.encode(INPUTS[kind](x), top_k=top_k, return_distances=True)
    only_codes = reference.encode(INPUTS[kind](x), top_k=top_k)
    for r in (codes, dist, only_codes):
        assert isinstance(r, out_type(kind))
        assert len(r) == N_ROWS
    np.testing.assert_array_equal(values(codes), want_codes.numpy())
    np.testing.assert_array_equal(values(only_codes), want_codes.numpy())
    np.testing.assert_array_equal(values(dist), want_dist.numpy())
    if isinstance(codes, pl.Series):
        suffix = "" if top_k == 1 else "s"
        assert (codes.name, dist.name) == ("code" + suffix, "distance" + suffix)
        assert codes.dtype == (pl.Int64 if top_k == 1 else pl.Array(pl.Int64, top_k))
        assert dist.dtype == (pl.Float32 if top_k == 1 else pl.Array(pl.Float32, top_k))
    else:
        assert values(codes).dtype == np.int64 and values(dist).dtype == np.float32
        assert tuple(codes.shape) == ((N_ROWS,) if top_k == 1 else (N_ROWS, top_k))
    if isinstance(codes, torch.Tensor):
        assert codes.device.type == "cpu" and dist.device.type == "cpu"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", INPUTS)
def test_decode_of_encode_is_the_oracles_nearest_centroid(kind: str, metric: str, x: np.ndarray) -> None:
    cb = fit_codebook(torch.from_numpy(x.copy()), N_CODES, metric=metric, device="cpu", seed=1)
    codes = cb.encode(INPUTS[kind](x))
    decoded = cb.decode(codes)
    assert isinstance(decoded, out_type(kind))
    got = values(decoded)
    assert got.shape == (N_ROWS, DIM) and got.dtype == np.float32
    if isinstance(decoded, pl.Series):
        assert decoded.dtype == pl.Array(pl.Float32, DIM)
    d = oracle(torch.from_numpy(x), cb.centroids, metric)  # (n_rows, n_codes) float64
    two = d.topk(2, dim=1, largest=False).values  # (n_rows, 2)
    decisive = (two[:, 1] - two[:, 0] > 1e-4 * two.abs().amax().clamp_min(1.0)).numpy()
    assert decisive.sum() > 0.9 * N_ROWS
    want = cb.centroids[d.argmin(dim=1)].numpy()  # (n_rows, dim)
    np.testing.assert_array_equal(got[decisive], want[decisive])


@pytest.mark.parametrize(
    "codes",
    [
        np.array([7, 0, 3]),
        read_only(np.array([7, 0, 3], dtype=np.uint8)),
        torch.tensor([7, 0, 3]),
        torch.tensor([7, 0, 3], dtype=torch.int32),
        pl.Series("code", [7, 0, 3], dtype=pl.Int64),
        pl.Series("code", [7, 0, 3], dtype=pl.UInt8),  # as `vq encode` writes them for 8 codes
        pl.DataFrame({"code": pl.Series([7, 0, 3], dtype=pl.UInt16)}),
        np.array([], dtype=np.int64),
    ],
    ids=["numpy", "numpy-uint8-read-only", "torch", "torch-int32", "polars", "polars-uint8", "polars-frame", "empty"],
)
def test_decode_gives_the_centroids_in_the_type_of_the_codes(codes: object, reference: Codebook) -> None:
    got = reference.decode(codes)
    kind = "numpy" if isinstance(codes, np.ndarray) else "torch" if isinstance(codes, torch.Tensor) else "polars"
    assert isinstance(got, out_type(kind))
    idx = [7, 0, 3] if len(codes) else []
    np.testing.assert_array_equal(values(got).reshape(len(idx), DIM), reference.centroids[idx].numpy())
    if isinstance(got, torch.Tensor):  # a copy: writing into it leaves the codebook alone
        got += 1.0
        assert not torch.equal(got, reference.centroids[idx])


def test_integer_embeddings_agree_across_types(reference: Codebook) -> None:
    xi = np.random.default_rng(0).integers(-9, 9, size=(50, DIM)).astype(np.int16)
    want = reference.encode(torch.from_numpy(xi.copy()))
    np.testing.assert_array_equal(reference.encode(xi), want.numpy())
    got = reference.encode(pl.Series("e", xi, dtype=pl.Array(pl.Int16, DIM)))
    np.testing.assert_array_equal(got.to_numpy(), want.numpy())
    got = reference.encode(pl.Series("e", xi.tolist(), dtype=pl.List(pl.Int16)))
    np.testing.assert_array_equal(got.to_numpy(), want.numpy())


def test_settings_replace_the_fit_attribute_and_files_keep_their_fit_key(tmp_path: Path, reference: Codebook) -> None:
    assert not hasattr(reference, "fit")
    assert reference.settings["n_codes"] == N_CODES and reference.settings["seed"] == 3
    meta = reference.to_metadata()
    assert json.loads(meta["fit"]) == reference.settings and "settings" not in meta
    loaded = Codebook.load(reference.save(tmp_path / "cb.safetensors"))
    assert loaded.settings == reference.settings and loaded.to_bytes() == reference.to_bytes()


# ----------------------------------------------------------------- bad inputs


def ragged() -> pl.Series:
    rows = [[1.0] * DIM for _ in range(5)]
    rows[3] = [1.0] * (DIM - 1)
    return pl.Series("embedding", rows, dtype=pl.List(pl.Float32))


BAD_X = {
    "ragged-list": (ragged, InvalidInputError, [r"length 5 at row 3", "row 0 has length 6", "same length", "Fix:"]),
    "null-row": (
        lambda: pl.Series("embedding", [[1.0] * DIM, None], dtype=pl.Array(pl.Float32, DIM)),
        InvalidInputError,
        ["null at row 1", "Fix:"],
    ),
    "null-element": (
        lambda: pl.Series("embedding", [[1.0] * DIM, [1.0] * (DIM - 1) + [None]], dtype=pl.List(pl.Float32)),
        InvalidInputError,
        ["null element inside the vector at row 1", "Fix:"],
    ),
    "wrong-dim-numpy": (
        lambda: np.ones((4, DIM - 1), np.float32),
        DimensionMismatchError,
        [r"x\.shape\[1\]=5", "dim=6"],
    ),
    "wrong-dim-polars": (
        lambda: pl.Series("embedding", np.ones((4, DIM + 1), np.float32), dtype=pl.Array(pl.Float32, DIM + 1)),
        DimensionMismatchError,
        [r"x\.shape\[1\]=7", "dim=6"],
    ),
    "3d-numpy": (lambda: np.ones((4, 2, 3), np.float32), InvalidInputError, [r"x.shape=\(4, 2, 3\)", "2-d", "Fix:"]),
    "3d-polars": (
        lambda: pl.Series("embedding", np.ones((4, 2, 3), np.float32), dtype=pl.Array(pl.Float32, (2, 3))),
        InvalidInputError,
        [r"x.shape=\(4, 2, 3\)", "2-d"],
    ),
    "two-columns": (
        lambda: pl.DataFrame({"id": [1, 2], "embedding": array_series(np.ones((2, DIM), np.float32))}),
        InvalidInputError,
        ["DataFrame with 2 columns", r"df\['embedding'\]", "Fix:"],
    ),
    "scalar-column": (
        lambda: pl.Series("embedding", [1.0, 2.0]),
        InvalidInputError,
        ["dtype=Float64", "Array", "Fix:"],
    ),
    "lazy-frame": (lambda: pl.LazyFrame({"e": [[1.0]]}), InvalidInputError, ["polars.LazyFrame", "collect"]),
}


@pytest.mark.parametrize("case", BAD_X)
def test_bad_embeddings_get_clear_errors(case: str, reference: Codebook) -> None:
    build, error, parts = BAD_X[case]
    calls = [reference.encode] + (
        [] if error is DimensionMismatchError else [lambda v: fit_codebook(v, 2, device="cpu")]
    )
    for call in calls:
        with pytest.raises(error) as info:
            call(build())
        for part in parts:
            assert re.search(part, str(info.value)), (part, str(info.value))


BAD_CODES = {
    "numpy-out-of-range": (np.array([0, 8, -1, 2]), [r"codes\[1\]=8 is out of range \(2 code\(s\)", r"0\.\.7", "Fix:"]),
    "torch-negative": (torch.tensor([0, 1, -1]), [r"codes\[2\]=-1 is out of range", "n_codes=8"]),
    "polars-out-of-range": (pl.Series("code", [3, 300], dtype=pl.UInt16), [r"codes\[1\]=300 is out of range"]),
    "uint64-huge": (np.array([2**63 + 5], dtype=np.uint64), [r"codes\[0\]=9223372036854775813 is out of range"]),
    "float": (np.array([1.0, 2.0]), ["codes.dtype=float64 is not an integer type", "Fix:"]),
    "bool": (torch.tensor([True]), ["codes.dtype=torch.bool is not an integer type"]),
    "polars-null": (pl.Series("code", [1, None], dtype=pl.Int64), ["null at row 1", "Fix:"]),
    "polars-float": (pl.Series("code", [1.0]), ["dtype=Float64; expected integer codes"]),
    "two-d": (np.zeros((3, 2), np.int64), [r"codes.shape=\(3, 2\)", r"codes\[:, 0\]"]),
    "list": ([1, 2], ["codes has type list", "Fix:"]),
}


@pytest.mark.parametrize("case", BAD_CODES)
def test_bad_codes_get_clear_errors(case: str, reference: Codebook) -> None:
    codes, parts = BAD_CODES[case]
    with pytest.raises(InvalidInputError) as info:
        reference.decode(codes)
    for part in parts:
        assert re.search(part, str(info.value)), (part, str(info.value))
