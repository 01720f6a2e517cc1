"""The codebook file: byte-exact round trips, reproducibility, and hostile or broken files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from vq_pipeline import Codebook, CodebookFileError, InvalidInputError, UnsupportedFormatError, fit_codebook
from vq_pipeline.codebook import RUN_KEYS


@pytest.fixture(scope="module")
def codebook() -> Codebook:
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    return fit_codebook(x, 8, device="cpu", sources=("s3://bucket/part-0.parquet",), column="embedding")


def header_of(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def with_header(data: bytes, mutate) -> bytes:
    """Rewrite a codebook's header through ``mutate(header)`` keeping the tensor bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_round_trip_is_byte_exact(codebook: Codebook, tmp_path: Path) -> None:
    path = codebook.save(tmp_path / "cb.safetensors")
    loaded = Codebook.load(path)
    assert torch.equal(loaded.centroids, codebook.centroids) and torch.equal(loaded.counts, codebook.counts)
    assert loaded.summary() == codebook.summary()
    assert loaded.to_bytes() == path.read_bytes() == codebook.to_bytes()
    assert not list(tmp_path.glob(".*tmp")), "no temporary file is left behind"


def test_file_is_plain_safetensors_with_readable_metadata(codebook: Codebook, tmp_path: Path) -> None:
    path = codebook.save(tmp_path / "cb.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["centroids", "counts"]
        assert torch.equal(f.get_tensor("centroids"), codebook.centroids)
    assert meta["format"] == "vq-pipeline.codebook" and meta["format_version"] == "1.0"
    assert (meta["metric"], meta["n_codes"], meta["dim"], meta["dtype"]) == ("l2", "8", "6", "float32")
    fit, stats = json.loads(meta["fit"]), json.loads(meta["stats"])
    assert fit["init"] == "k-means||" and fit["seed"] == 0 and fit["engine"] == "torch"
    assert stats["n_rows"] == 500 and stats["iterations"] >= 1 and "history" in stats
    assert len(meta["data_fingerprint"]) == 64 and json.loads(meta["sources"]) == ["s3://bucket/part-0.parquet"]
    assert set(json.loads(meta["versions"])) == {"vq-pipeline", "torch", "pykeops", "python"}
    assert meta["created_at"].endswith("+00:00")


def test_two_fits_give_identical_files_except_run_record(tmp_path: Path) -> None:
    x = torch.randn(800, 5, generator=torch.Generator().manual_seed(1))
    files = [fit_codebook(x, 10, device="cpu", seed=3).to_bytes() for _ in range(2)]
    headers = [header_of(f) for f in files]
    for h in headers:
        for key in RUN_KEYS:
            h["__metadata__"].pop(key)
    assert headers[0] == headers[1]
    assert files[0][-(10 * 5 * 4 + 10 * 8) :] == files[1][-(10 * 5 * 4 + 10 * 8) :]  # tensor bytes
    # With the run record pinned, the whole files are byte-identical.
    pinned = [with_header(f, lambda h: h["__metadata__"].update(created_at="T", timings="{}")) for f in files]
    assert pinned[0] == pinned[1]


def test_truncated_files_are_refused(codebook: Codebook, tmp_path: Path) -> None:
    data = codebook.to_bytes()
    for cut in sorted({0, 1, 7, 8, 9, 50, len(data) // 2, len(data) - 8, len(data) - 1}):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CodebookFileError, match=r"(too short|truncated|header)"):
            Codebook.load(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, data in {
        "pickle": pickle.dumps(_Exploit(marker), protocol=4),
        "pickle2": pickle.dumps(_Exploit(marker), protocol=2),
    }.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CodebookFileError, match=r"pickle.*never loaded"):
            Codebook.load(path)
    torch.save({"centroids": torch.zeros(2, 2)}, tmp_path / "torch.pt")
    with pytest.raises(CodebookFileError, match="pickle or torch.save"):
        Codebook.load(tmp_path / "torch.pt")
    assert not marker.exists()


def test_random_bytes_missing_paths_and_folders(tmp_path: Path) -> None:
    (tmp_path / "rand").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(2)).byte().numpy().tobytes())
    with pytest.raises(CodebookFileError, match="not a codebook|truncated"):
        Codebook.load(tmp_path / "rand")
    with pytest.raises(CodebookFileError, match=r"does not exist.*Fix"):
        Codebook.load(tmp_path / "nope.safetensors")
    with pytest.raises(CodebookFileError, match="is a folder"):
        Codebook.load(tmp_path)


def test_header_that_lies_about_shapes(codebook: Codebook) -> None:
    lying = with_header(codebook.to_bytes(), lambda h: h["__metadata__"].update(n_codes="9"))
    with pytest.raises(CodebookFileError, match=r"expected dtype F32 and shape \[9, 6\]"):
        Codebook.from_bytes(lying)
    overlong = with_header(codebook.to_bytes(), lambda h: h["centroids"].update(data_offsets=[0, 10**6]))
    with pytest.raises(CodebookFileError, match="truncated|could not read"):
        Codebook.from_bytes(overlong)
    wrong_dtype = with_header(codebook.to_bytes(), lambda h: h["counts"].update(dtype="F64"))
    with pytest.raises(CodebookFileError, match="expected dtype I64"):
        Codebook.from_bytes(wrong_dtype)


def test_nan_centroids_are_refused(codebook: Codebook) -> None:
    data = bytearray(codebook.to_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n : 8 + n + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(CodebookFileError, match="NaN"):
        Codebook.from_bytes(bytes(data))


def test_unknown_format_version_and_foreign_safetensors(codebook: Codebook) -> None:
    future = with_header(codebook.to_bytes(), lambda h: h["__metadata__"].update(format_version="2.0"))
    with pytest.raises(UnsupportedFormatError, match=r"format_version='2.0'.*Fix: upgrade"):
        Codebook.from_bytes(future)
    minor = with_header(codebook.to_bytes(), lambda h: h["__metadata__"].update(format_version="1.7"))
    assert Codebook.from_bytes(minor).fingerprint == codebook.fingerprint  # minor versions stay readable
    from safetensors.torch import save

    with pytest.raises(UnsupportedFormatError, match="format=None"):
        Codebook.from_bytes(save({"weight": torch.zeros(3)}, metadata={"x": "y"}))


def test_metric_mismatch_is_refused(codebook: Codebook, tmp_path: Path) -> None:
    path = codebook.save(tmp_path / "cb.safetensors")
    assert Codebook.load(path, metric="l2").metric == "l2"
    with pytest.raises(InvalidInputError, match=r"metric='cosine' was requested.*metric='l2' codebook"):
        Codebook.load(path, metric="cosine")


def test_save_replaces_atomically(codebook: Codebook, tmp_path: Path) -> None:
    path = tmp_path / "deep" / "cb.safetensors"
    codebook.save(path)
    other = Codebook(centroids=torch.ones(2, 6), counts=torch.ones(2, dtype=torch.int64), metric="l2")
    other.save(path)
    assert Codebook.load(path).n_codes == 2
    assert [p.name for p in path.parent.iterdir()] == ["cb.safetensors"]


def test_codebook_constructor_validates() -> None:
    ok = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(InvalidInputError, match="NaN"):
        Codebook(centroids=torch.full((3, 2), float("nan")), counts=ok, metric="l2")
    with pytest.raises(InvalidInputError, match="unit-norm"):
        Codebook(centroids=torch.ones(3, 2), counts=ok, metric="cosine")
    with pytest.raises(InvalidInputError, match="metric='dot'"):
        Codebook(centroids=torch.ones(3, 2), counts=ok, metric="dot")
    with pytest.raises(InvalidInputError, match="int64 tensor of shape"):
        Codebook(centroids=torch.ones(3, 2), counts=torch.zeros(2, dtype=torch.int64), metric="l2")


FUZZ_EXAMPLES = 400


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_files_load_or_raise_codebook_file_error(data: st.DataObject) -> None:
    # Flat (format 1.0) and multi-level (format 1.1: codec, levels, 3-d centroids) layouts alike.
    codec = data.draw(st.sampled_from(["flat", "residual", "product"]))
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    n = torch.ones(4, dtype=torch.int64)
    if codec != "flat":
        x, n = torch.stack([x, x / 7]), torch.stack([n, n])  # (2, 4, 3), (2, 4)
    blob = bytearray(Codebook(centroids=x, counts=n, metric="l2", codec=codec).to_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "header_flip", "truncate", "length", "insert"]))
        if kind == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif kind == "header_flip" and len(blob) > 8:
            i = data.draw(st.integers(8, min(8 + n, len(blob)) - 1))
            blob[i] = data.draw(st.sampled_from(list(b'{}[]",:0123456789 aeFIN-')))
        elif kind == "truncate":
            del blob[data.draw(st.integers(0, len(blob))) :]
        elif kind == "length" and len(blob) >= 8:
            blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
        elif kind == "insert":
            i = data.draw(st.integers(0, len(blob)))
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        cb = Codebook.from_bytes(bytes(blob))
    except CodebookFileError:
        return
    # Whatever loads is a valid codebook.
    expected = (cb.n_codes, cb.dim) if cb.codec == "flat" else (cb.levels, cb.n_codes, cb.centroids.shape[2])
    assert torch.isfinite(cb.centroids).all() and cb.centroids.shape == expected
    assert cb.codec != "product" or cb.dim == cb.levels * cb.centroids.shape[2]
