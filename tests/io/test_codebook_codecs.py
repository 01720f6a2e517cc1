"""Scalar and binary codebooks and rotations in the codebook file (format 1.2): byte-exact round trips,
earlier files unchanged, and hostile files refused for each new tensor and metadata entry."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vq_pipeline import Codebook, CodebookFileError, InvalidInputError, UnsupportedFormatError
from vq_pipeline.compute.codecs import binary_grid, random_rotation, scalar_grid
from vq_pipeline.io.codebook_file import load_info, write_codebook_bytes

LOADERS: dict[str, Callable[[Path], Any]] = {"Codebook.load": Codebook.load, "load_info": load_info}
PROVENANCE: dict[str, Any] = dict(
    stats={"inertia": 1.5},
    data_fingerprint="d" * 8,
    sources=("a.parquet",),
    column="e",
    versions={"vq-pipeline": "0.1.0"},
    created_at="2026-01-01T00:00:00+00:00",
    timings={"fit_seconds": 1.0},
)
#: sha256 of the bytes and the fingerprint of each `earlier` codebook, as written by the code before
#: format 1.2 existed (flat: 1.0, residual and product: 1.1).
EARLIER = {
    ("flat", "l2"): (
        "b1b50d449ba44c844225b4971f8b360ba1d8f6b12488872da04e4560116ac789",
        "acec680b84c03c713708e7a27d23ec1eaec3a78cbf83f94ab25e4f88c863c23e",
    ),
    ("flat", "cosine"): (
        "12936cc4bfc1b857f57a807ec7ed5898adcfd6e6da0a7e3f1fabb0b37abfa554",
        "6d06ecd78ac706f066b0e965efae6ef64a1e7b0f04b34e1c24b498239626ef3e",
    ),
    ("residual", "l2"): (
        "820e46fd933c81375b31aad42e05c74efea623027009c46bee09dcdb06805d3d",
        "ab8740303d32935cb5a94cf74be96ae9d4b84f4e4d267fdf4981762de322b036",
    ),
    ("residual", "cosine"): (
        "e1f8c763400274fc81d5bbec5dc4f043d6be6ed0e634e3068c34d1bf0be65f8b",
        "f86f77231356d4a61b0413e6f5906213d0f1d87ce4456b33cbe8a05def18af7e",
    ),
    ("product", "l2"): (
        "82c9e88f8dd2fb24d5114f589d8c064ee850d45b43d0cc2e54d2d2ff149b5cdb",
        "95dee1999d56ab2b79cd490acd3e86764cf01c263d7d60137d4ff0d51cef3650",
    ),
    ("product", "cosine"): (
        "e9d07d2758b4af2e3d54b5007020c2f811c1cb7bd24a0e0eed908ec0d8288055",
        "a3c3102df935d1fbe6d6da178f73734b98d2cf7d6e48954de7a8efcda51100c1",
    ),
}


def earlier(codec: str, metric: str) -> Codebook:
    """The codebooks behind EARLIER."""
    rng = np.random.default_rng(7)
    if codec == "flat":
        c = rng.standard_normal((5, 4)).astype(np.float32)
        n = np.arange(5, dtype=np.int64)
        settings: dict[str, Any] = {"n_codes": 5, "metric": metric, "seed": 0}
    else:
        c = rng.standard_normal((3, 5, 4)).astype(np.float32)
        n = np.arange(15, dtype=np.int64).reshape(3, 5)
        settings = {"codec": codec, "levels": 3, "n_codes": 5, "metric": metric, "train_beam": 1}
    if metric == "cosine":
        if codec == "flat":
            c /= np.linalg.norm(c, axis=1, keepdims=True)
        else:
            c[0] /= np.linalg.norm(c[0], axis=1, keepdims=True)
    cb = Codebook(
        centroids=torch.from_numpy(c), counts=torch.from_numpy(n), metric=metric, codec=codec, settings=settings,
        **PROVENANCE,
    )  # fmt: skip
    return cb


@pytest.mark.parametrize(("codec", "metric"), sorted(EARLIER))
def test_earlier_files_keep_their_bytes_fingerprints_and_versions(codec: str, metric: str, tmp_path: Path) -> None:
    cb = earlier(codec, metric)
    data = cb.to_bytes()
    assert (hashlib.sha256(data).hexdigest(), cb.fingerprint) == EARLIER[(codec, metric)]
    path = tmp_path / "old.safetensors"
    path.write_bytes(data)
    for load in LOADERS.values():
        back = load(path)
        assert back.fingerprint == cb.fingerprint and back.rotation is None
    assert Codebook.load(path).to_bytes() == data
    assert cb.to_metadata()["format_version"] == ("1.0" if codec == "flat" else "1.1")


def scalar(bits: int, dim: int = 6, metric: str = "l2") -> Codebook:
    rng = np.random.default_rng(bits)
    lo = rng.standard_normal(dim)
    grid = scalar_grid(torch.from_numpy(lo), torch.from_numpy(lo + rng.random(dim) + 0.1), bits)
    counts = torch.from_numpy(rng.integers(0, 9, (dim, 2**bits)))
    settings = {"codec": "scalar", "levels": dim, "n_codes": 2**bits, "metric": metric, "bits": bits}
    if bits == 4:
        settings["scalar_range"] = "quantile"
    return Codebook(centroids=grid, counts=counts, metric=metric, codec="scalar", settings=settings, **PROVENANCE)


def binary(rotation: str = "none", dim: int = 12, metric: str = "l2") -> Codebook:
    rng = np.random.default_rng(3)
    grid = binary_grid(torch.from_numpy(rng.standard_normal(dim)), torch.from_numpy(rng.random(dim)))
    r = None if rotation == "none" else random_rotation(dim, 5)
    settings: dict[str, Any] = {"codec": "binary", "levels": dim, "n_codes": 2, "metric": metric}
    if rotation != "none":
        settings.update(rotation=rotation, rotation_iters=7)
    counts = torch.from_numpy(rng.integers(0, 9, (dim, 2)))
    return Codebook(
        centroids=grid, counts=counts, metric=metric, codec="binary", settings=settings, rotation=r, **PROVENANCE
    )


def multilevel(codec: str, rotation: str = "opq", metric: str = "l2") -> Codebook:
    rng = np.random.default_rng(4)
    c = rng.standard_normal((2, 4, 4 if codec == "residual" else 2)).astype(np.float32)
    if metric == "cosine" and codec == "residual":
        c[0] /= np.linalg.norm(c[0], axis=1, keepdims=True)
    dim = 4
    settings = {"codec": codec, "levels": 2, "n_codes": 4, "metric": metric, "rotation": rotation}
    return Codebook(
        centroids=torch.from_numpy(c),
        counts=torch.ones(2, 4, dtype=torch.int64),
        metric=metric,
        codec=codec,
        settings=settings,
        rotation=random_rotation(dim, 11),
        **PROVENANCE,
    )


NEW = {
    "scalar8": lambda: scalar(8),
    "scalar4": lambda: scalar(4),
    "scalar4-cosine": lambda: scalar(4, metric="cosine"),
    "binary": lambda: binary(),
    "binary-itq": lambda: binary("itq"),
    "binary-random-cosine": lambda: binary("random", metric="cosine"),
    "product-opq": lambda: multilevel("product"),
    "residual-opq-cosine": lambda: multilevel("residual", metric="cosine"),
    "product-random": lambda: multilevel("product", "random"),
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_new_codebooks_round_trip_byte_for_byte_as_format_1_2(name: str, tmp_path: Path) -> None:
    cb = NEW[name]()
    path = cb.save(tmp_path / "cb.safetensors")
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"]["format_version"] == "1.2"
    assert ("rotation" in header) == (cb.rotation is not None)
    back = Codebook.load(path)
    assert back.to_bytes() == data and back.fingerprint == cb.fingerprint and back.codec == cb.codec
    assert torch.equal(back.centroids, cb.centroids) and torch.equal(back.counts, cb.counts)
    info = load_info(path)
    assert info.fingerprint == cb.fingerprint and (info.rotation is None) == (cb.rotation is None)
    if cb.rotation is not None:
        assert torch.equal(back.rotation, cb.rotation) and np.array_equal(info.rotation, cb.rotation.numpy())
        assert header["rotation"]["shape"] == [cb.dim, cb.dim] and header["rotation"]["dtype"] == "F32"
    # the codes a loaded codebook gives are the saved one's
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((30, cb.dim)).astype(np.float32))
    assert torch.equal(back.encode(x), cb.encode(x))
    torch.testing.assert_close(back.decode(cb.encode(x)), cb.decode(cb.encode(x)), rtol=0, atol=0)


def test_the_rotation_is_part_of_the_fingerprint() -> None:
    a = multilevel("product")
    b = Codebook(
        centroids=a.centroids,
        counts=a.counts,
        metric=a.metric,
        codec=a.codec,
        settings=a.settings,
        rotation=random_rotation(4, 12),
        **PROVENANCE,
    )
    plain = Codebook(
        centroids=a.centroids,
        counts=a.counts,
        metric=a.metric,
        codec=a.codec,
        settings={k: v for k, v in a.settings.items() if k != "rotation"},
        **PROVENANCE,
    )
    assert len({a.fingerprint, b.fingerprint, plain.fingerprint}) == 3
    assert plain.to_metadata()["format_version"] == "1.1"


def test_scalar_and_binary_codes_pack_to_their_file_widths() -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((9, 6)).astype(np.float32))
    for cb, width in ((scalar(8), 6), (scalar(4), 3)):
        codes = cb.encode(x)
        packed = cb.pack(codes)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (9, width)
        assert torch.equal(cb.unpack(packed), codes)
        assert np.array_equal(cb.unpack(cb.pack(codes.numpy())), codes.numpy())
    b = binary(dim=12)
    xb = torch.from_numpy(np.random.default_rng(2).standard_normal((9, 12)).astype(np.float32))
    codes = b.encode(xb)
    assert np.array_equal(b.pack(codes.numpy()), np.packbits(codes.numpy().astype(np.uint8), axis=1))
    assert torch.equal(b.unpack(b.pack(codes)), codes)
    with pytest.raises(InvalidInputError, match=r"pack with codec='product'.*Fix:"):
        multilevel("product").pack(torch.zeros((1, 2), dtype=torch.int64))


# ----------------------------------------------------------------------------- hostile files


def meta(codec: str, levels: int, n_codes: int, dim: int, version: str = "1.2", **fit: Any) -> dict[str, str]:
    m = {
        "format": "vq-pipeline.codebook",
        "format_version": version,
        "metric": "l2",
        "n_codes": str(n_codes),
        "dim": str(dim),
        "dtype": "float32",
        "fit": json.dumps(fit),
        "stats": "{}",
        "sources": "[]",
        "versions": "{}",
        "timings": "{}",
    }
    if codec != "flat":
        m.update(codec=codec, levels=str(levels))
    return m


def grid8(dim: int = 4) -> np.ndarray:
    return scalar_grid(torch.zeros(dim), torch.ones(dim), 8).numpy()


def bgrid(dim: int = 4) -> np.ndarray:
    return binary_grid(torch.zeros(dim), torch.ones(dim)).numpy()


ROT = random_rotation(4, 0).numpy()
PROD = np.random.default_rng(0).standard_normal((2, 4, 2)).astype(np.float32)
ONES = {
    "scalar": np.ones((4, 256), np.int64),
    "binary": np.ones((4, 2), np.int64),
    "product": np.ones((2, 4), np.int64),
}


def bad_grid() -> np.ndarray:
    g = grid8()
    g[2, 100, 0] = g[2, 99, 0]  # a flat step inside an increasing grid
    return g


def neg_scale() -> np.ndarray:
    g = bgrid()
    g[1, :, 0] = [0.5, -0.5]
    return g


def skewed() -> np.ndarray:
    r = ROT.copy()
    r[0, 0] += 0.01
    return r


def with_nan() -> np.ndarray:
    r = ROT.copy()
    r[1, 2] = np.nan
    return r


# name: (metadata, centroids, counts, rotation, pattern of the message)
HOSTILE: dict[str, tuple[dict[str, str], np.ndarray, np.ndarray, np.ndarray | None, str]] = {
    "non-orthogonal rotation": (
        meta("product", 2, 4, 4, rotation="opq"), PROD, ONES["product"], skewed(),
        r"rotation is not orthogonal: max \|R\^T R - I\|=0.0\d+; expected at most 0.0001.*Fix:",
    ),
    "rotation of the wrong shape": (
        meta("product", 2, 4, 4), PROD, ONES["product"], random_rotation(3, 0).numpy(),
        r"tensor 'rotation' is .*expected dtype F32 and shape \[4, 4\]",
    ),
    "rotation of the wrong dtype": (
        meta("product", 2, 4, 4), PROD, ONES["product"], None,  # written as F64 below
        r"tensor 'rotation' is .*'dtype': 'F64'.*expected dtype F32 and shape \[4, 4\]",
    ),
    "NaN in the rotation": (
        meta("binary", 4, 2, 4), bgrid(), ONES["binary"], with_nan(),
        r"rotation holds NaN or ±Inf values; expected finite numbers. Fix:",
    ),
    "rotation on a flat file": (
        meta("flat", 1, 4, 4), PROD[0, :, :].repeat(2, 1), np.ones(4, np.int64), ROT,
        r"a 'rotation' tensor with codec='flat'; the flat codec takes no rotation.*Fix:",
    ),
    "rotation on a scalar file": (
        meta("scalar", 4, 256, 4), grid8(), ONES["scalar"], ROT,
        r"a 'rotation' tensor with codec='scalar'; the scalar codec takes no rotation.*Fix:",
    ),
    "1.1 file carrying a rotation": (
        meta("product", 2, 4, 4, version="1.1"), PROD, ONES["product"], ROT,
        r"a 'rotation' tensor in a file of format_version='1.1'; rotations are written as format 1.2.*Fix:",
    ),
    "1.1 file claiming a scalar codec": (
        meta("scalar", 4, 256, 4, version="1.1"), grid8(), ONES["scalar"], None,
        r"codec='scalar' in a file of format_version='1.1'; scalar codebooks are written as format 1.2.*Fix:",
    ),
    "scalar grid not increasing": (
        meta("scalar", 4, 256, 4), bad_grid(), ONES["scalar"], None,
        r"centroids\[2, 99:101\]=.*\(dimension 2\) breaks the scalar grid; expected values strictly increasing.*Fix:",
    ),
    "binary grid with a negative scale": (
        meta("binary", 4, 2, 4), neg_scale(), ONES["binary"], None,
        r"centroids\[1\]=\[0.5, -0.5\] \(dimension 1\) has a negative scale; expected .*scale >= 0. Fix:",
    ),
    "scalar levels != dim": (
        meta("scalar", 2, 256, 4), grid8(), ONES["scalar"], None,
        r"levels=2 with codec='scalar' and dim=4; expected levels == dim \(one code per dimension\).*Fix:",
    ),
    "binary levels != dim": (
        meta("binary", 8, 2, 4), bgrid(), ONES["binary"], None,
        r"levels=8 with codec='binary' and dim=4; expected levels == dim.*Fix:",
    ),
    "scalar n_codes not 2**bits": (
        meta("scalar", 4, 32, 4), grid8()[:, :32], ONES["scalar"][:, :32], None,
        r"n_codes=32 with codec='scalar'; expected one of \(256, 16\) codes per dimension.*Fix:",
    ),
    "bits disagreeing with n_codes": (
        meta("scalar", 4, 256, 4, bits=4), grid8(), ONES["scalar"], None,
        r"metadata fit.bits=4 contradicts the codebook's n_codes=256; expected 2\*\*bits == n_codes.*Fix:",
    ),
    "bits on a binary file": (
        meta("binary", 4, 2, 4, bits=8), bgrid(), ONES["binary"], None,
        r"metadata fit.bits=8 with codec='binary'; bits belong to scalar codes. Fix:",
    ),
    "fit says a rotation the file lacks": (
        meta("product", 2, 4, 4, rotation="opq"), PROD, ONES["product"], None,
        r"metadata fit.rotation='opq' contradicts the codebook, which holds no rotation.*Fix:",
    ),
    "fit names a rotation the codec does not take": (
        meta("binary", 4, 2, 4, rotation="opq"), bgrid(), ONES["binary"], ROT,
        r"metadata fit.rotation='opq' with codec='binary'; expected one of \('none', 'random', 'itq'\).*Fix:",
    ),
    "unknown scalar_range": (
        meta("scalar", 4, 256, 4, scalar_range="median"), grid8(), ONES["scalar"], None,
        r"metadata fit.scalar_range='median' with codec='scalar'; expected one of \('minmax', 'quantile', 'mse'\).*Fix:",
    ),
}  # fmt: skip


def hostile_bytes(name: str) -> bytes:
    m, c, n, r, _ = HOSTILE[name]
    if name == "rotation of the wrong dtype":
        good = write_codebook_bytes(m, c, n, ROT)
        size = int.from_bytes(good[:8], "little")
        header = json.loads(good[8 : 8 + size])
        start = header["rotation"]["data_offsets"][0]
        header["rotation"].update(dtype="F64", data_offsets=[start, start + ROT.nbytes])
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw + good[8 + size :]
    return write_codebook_bytes(m, c, n, r)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_for_each_new_tensor_and_entry_are_refused(name: str, loader: str, tmp_path: Path) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(hostile_bytes(name))
    with pytest.raises(CodebookFileError, match=HOSTILE[name][4]) as info:
        LOADERS[loader](path)
    assert re.escape(str(path)) in re.escape(str(info.value))


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_an_unknown_major_version_is_refused(loader: str, tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    path.write_bytes(write_codebook_bytes(meta("scalar", 4, 256, 4, version="2.0"), grid8(), ONES["scalar"]))
    with pytest.raises(UnsupportedFormatError, match=r"format_version='2.0'; this release reads major version 1"):
        LOADERS[loader](path)


def test_codebooks_in_memory_are_held_to_the_same_rules() -> None:
    base = dict(centroids=torch.from_numpy(PROD), counts=torch.ones(2, 4, dtype=torch.int64), metric="l2")
    with pytest.raises(InvalidInputError, match=r"rotation is not orthogonal.*Fix:"):
        Codebook(**base, codec="product", rotation=torch.from_numpy(skewed()))
    with pytest.raises(InvalidInputError, match=r"rotation.shape=\(3, 3\).*expected a \(4, 4\) float32 matrix"):
        Codebook(**base, codec="product", rotation=random_rotation(3, 0))
    with pytest.raises(InvalidInputError, match=r"rotation given with codec='flat'; the flat codec takes no rotation"):
        Codebook(centroids=torch.from_numpy(PROD[0]), counts=torch.ones(4, dtype=torch.int64), metric="l2",
                 rotation=random_rotation(2, 0))  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"rotation given with codec='scalar'"):
        Codebook(centroids=torch.from_numpy(grid8()), counts=torch.from_numpy(ONES["scalar"]), metric="l2",
                 codec="scalar", rotation=torch.from_numpy(ROT))  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"expected \(dim, n_codes, 1\) for codec='binary'"):
        Codebook(**base, codec="binary")
