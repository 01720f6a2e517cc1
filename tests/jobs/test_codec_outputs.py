"""Scalar, binary and rotated codes in the encode path: packed ``codes`` columns, receipts, reruns, kills, refusals, drift."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import encode_folder, snapshot
from kill_points import CHILD_PRELUDE, count, kill_at, points
from sklearn.datasets import load_digits

from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.io.table_writer import packed_codes, write_embeddings
from vq_pipeline.io.tables import read_table
from vq_pipeline.jobs.drift import drift_report, example_ids
from vq_pipeline.jobs.encode_state import manifest_path, read_receipt, receipt_path
from vq_pipeline.jobs.semantic_ids import collision_stats_table, suffix_table

N_FILES = 3
#: name: (n_codes, fit keywords); dim 63 (odd) so that the last byte of a packed row is partly padding.
CODECS = {
    "scalar8": (256, dict(codec="scalar", bits=8)),
    "scalar4": (16, dict(codec="scalar", bits=4)),
    "scalar4-quantile": (16, dict(codec="scalar", bits=4, scalar_range="quantile")),
    "binary": (2, dict(codec="binary")),
    "binary-itq": (2, dict(codec="binary", rotation="itq")),
    "binary-random": (2, dict(codec="binary", rotation="random")),
    "product-opq": (16, dict(codec="product", levels=7, rotation="opq")),
    "residual-random": (8, dict(codec="residual", levels=3, rotation="random")),
}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    x = load_digits().data.astype("float32")[:, :63]  # (1797, 63)
    return x + np.random.default_rng(0).normal(0, 0.25, x.shape).astype("float32")  # no constant column


@pytest.fixture(scope="module")
def books(digits: np.ndarray) -> dict:
    return {name: fit_codebook(digits, n, seed=0, **kw) for name, (n, kw) in CODECS.items()}


def write_inputs(folder: Path, x: np.ndarray, n_files: int = N_FILES, first_id: int = 0) -> list[Path]:
    bounds = np.linspace(0, len(x), n_files + 1).astype(int)
    return [
        write_embeddings(folder / f"part-{i}.parquet", np.arange(a, b) + first_id, x[a:b])
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def read_folder(out: Path) -> pl.DataFrame:
    return pl.concat([read_table(p) for p in sorted(out.glob("*.parquet"))])


def oracle_pack(codes: np.ndarray, codec: str, n_codes: int) -> np.ndarray:
    """numpy's packing of (n, dim) codes: bytes, nibbles (even dimension low) or packbits order."""
    codes = codes.astype(np.uint8)
    if codec == "binary":
        return np.packbits(codes, axis=1)
    if n_codes == 16:
        padded = np.pad(codes, ((0, 0), (0, codes.shape[1] % 2)))
        return padded[:, 0::2] | (padded[:, 1::2] << 4)
    return codes


def assert_holds_codes(out: Path, cb, x: np.ndarray) -> None:
    """The folder ``out`` holds, for rows ``x`` (ids 0..), the codes ``cb.encode`` gives, in their file form."""
    frame = read_folder(out).sort("id")
    codes = np.asarray(cb.encode(x))
    if cb.codec in ("scalar", "binary"):
        assert np.array_equal(packed_codes(frame), oracle_pack(codes, cb.codec, cb.n_codes))
    else:
        assert np.array_equal(frame["codes"].to_numpy(), codes)


@pytest.mark.parametrize("name", list(CODECS))
def test_codes_column_holds_the_packed_codes_of_encode(tmp_path: Path, digits: np.ndarray, books: dict, name: str) -> None:
    cb = books[name]
    codec = cb.codec
    write_inputs(tmp_path / "in", digits)
    result = encode_folder([tmp_path / "in"], cb, tmp_path / "out", column="embedding", id_column="id", with_distance=True)
    assert (result.codec, result.levels) == (codec, cb.levels)
    frame = read_folder(tmp_path / "out").sort("id")
    want_codes, want_dist = cb.encode(digits, return_distances=True)
    want_codes, want_dist = np.asarray(want_codes), np.asarray(want_dist)
    assert frame.columns == ["id", "codes", "distance"]
    assert np.array_equal(frame["distance"].to_numpy(), want_dist)
    schema = pq.read_schema(tmp_path / "out" / "part-0.parquet")
    if codec in ("scalar", "binary"):
        assert want_codes.shape == (len(digits), 63) and cb.levels == 63
        width = {"binary": 8, "scalar": 32 if cb.n_codes == 16 else 63}[codec]
        got = packed_codes(frame)
        assert got.shape == (len(digits), width)
        assert np.array_equal(got, oracle_pack(want_codes, codec, cb.n_codes))
        packed = cb.pack(want_codes)
        assert np.array_equal(got, np.asarray(packed.numpy() if hasattr(packed, "numpy") else packed))
        if codec == "binary":
            assert frame.schema["codes"] == pl.Binary
            assert str(schema.field("codes").type) == "fixed_size_binary[8]"
        else:
            assert frame.schema["codes"] == pl.Array(pl.UInt8, width)
        receipt = read_receipt(receipt_path(tmp_path / "out", "part-0.parquet"), tmp_path / "out")
        assert (receipt["codec"], receipt["levels"], receipt["bits"]) == (codec, 63, {2: 1, 16: 4, 256: 8}[cb.n_codes])
        assert np.asarray(receipt["code_counts"]).shape == (63, cb.n_codes)
        manifest = json.loads(manifest_path(tmp_path / "out").read_text())
        assert manifest["codec"] == codec and all("code_counts" not in e for e in manifest["outputs"].values())
    else:  # a rotated product or residual codebook writes codes as the unrotated ones do
        assert frame.schema["codes"] == pl.Array(pl.UInt8, cb.levels)
        assert np.array_equal(frame["codes"].to_numpy(), want_codes)
    assert cb.decode(want_codes).shape == digits.shape


@pytest.mark.parametrize("name", ["scalar4", "binary-itq", "product-opq"])
def test_a_rerun_is_a_no_op_and_a_fresh_run_gives_the_same_bytes(
    tmp_path: Path, digits: np.ndarray, books: dict, name: str
) -> None:
    write_inputs(tmp_path / "in", digits)
    kwargs = dict(column="embedding", id_column="id", batch_rows=100)
    encode_folder([tmp_path / "in"], books[name], tmp_path / "a", **kwargs)
    assert_holds_codes(tmp_path / "a", books[name], digits)
    first = snapshot(tmp_path / "a")
    again = encode_folder([tmp_path / "in"], books[name], tmp_path / "a", **kwargs)
    assert again.encoded == [] and len(again.skipped) == N_FILES
    assert snapshot(tmp_path / "a") == first
    encode_folder([tmp_path / "in"], books[name], tmp_path / "b", **{**kwargs, "batch_rows": 7})
    outputs = {k: v for k, v in snapshot(tmp_path / "b").items() if not k.startswith("state/")}
    assert outputs == {k: v for k, v in first.items() if not k.startswith("state/")}  # batches change no byte


@pytest.mark.parametrize("codec", ["scalar", "binary"])
def test_settings_packed_codes_cannot_honour_are_refused_before_any_work(
    tmp_path: Path, digits: np.ndarray, books: dict, codec: str
) -> None:
    cb = books["scalar8" if codec == "scalar" else "binary"]
    write_inputs(tmp_path / "in", digits)
    refused = [
        (dict(unique=True), f"unique=True with a {codec} codebook; expected a residual or product codebook"),
        (dict(code_dtype="uint32"), f"code_dtype='uint32' with a {codec} codebook"),
        (dict(top_k=2), f"top_k=2 with a {codec} codebook"),
        (dict(beam=2), f"beam=2 with a {codec} codebook"),
    ]
    for given, message in refused:
        with pytest.raises(InvalidInputError, match="Fix: ") as err:
            encode_folder([tmp_path / "in"], cb, tmp_path / "out", column="embedding", id_column="id", **given)
        assert message in str(err.value)
        assert not (tmp_path / "out").exists()
    # their code tables are not semantic ids either
    encode_folder([tmp_path / "in"], cb, tmp_path / "out", column="embedding", id_column="id")
    files = sorted(str(p) for p in (tmp_path / "out").glob("*.parquet"))
    assert pl.read_parquet_metadata(files[0])["vq-pipeline.codec"] == codec
    with pytest.raises(InvalidInputError, match=f"hold {codec} codes .*Fix: "):
        collision_stats_table(files, codes_column="codes")
    with pytest.raises(InvalidInputError, match=f"hold {codec} codes .*Fix: "):
        suffix_table(files[0], id_column="id", codes_column="codes")


def test_drift_of_scalar_codes_counts_clipped_values(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    cb = books["scalar4"]
    moved = digits * 1.5 + 1.0
    write_inputs(tmp_path / "in", moved)
    result = encode_folder([tmp_path / "in"], cb, tmp_path / "out", column="embedding", id_column="id")
    report = drift_report(cb, list(result.records.values()))
    grid = cb.centroids.numpy()  # (dim, 16, 1)
    lo, hi = grid[:, 0, 0], grid[:, -1, 0]
    want = float(((moved < lo) | (moved > hi)).mean())
    assert want > 0.05
    assert report["clipped"]["share"] == pytest.approx(want, abs=1e-12)
    assert report["clipped"]["train_share"] == cb.stats.get("clipped")
    assert report["levels"] == 63 and len(report["per_level"]) == 63
    shifts = example_ids(tmp_path / "out", list(result.records.values()), report["code_shifts"], id_column="id")
    codes = np.asarray(cb.encode(moved))
    for entry in shifts["gains"]:  # the ids shown hold the code at the listed dimension
        assert entry["ids"] and all(codes[i, entry["level"]] == entry["code"] for i in entry["ids"])


def test_drift_of_binary_codes_reports_the_bits_balance(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    cb = books["binary"]
    moved = digits + 4.0 * (np.arange(63) % 2 == 0)
    write_inputs(tmp_path / "in", moved)
    result = encode_folder([tmp_path / "in"], cb, tmp_path / "out", column="embedding", id_column="id")
    balance = drift_report(cb, list(result.records.values()))["bit_balance"]
    ones = np.asarray(cb.encode(moved)).mean(axis=0)  # (dim,)
    train_counts = cb.counts.numpy()  # (dim, 2)
    train_ones = train_counts[:, 1] / train_counts.sum(axis=1)
    assert balance["ones_share"] == pytest.approx(ones.mean(), abs=1e-12)
    assert balance["train_ones_share"] == pytest.approx(train_ones.mean(), abs=1e-12)
    shift = np.abs(ones - train_ones)
    assert balance["max_shift"] == pytest.approx(shift.max(), abs=1e-12)
    assert balance["max_shift_dim"] == int(shift.argmax())
    assert balance["mean_shift"] > 0.1


CHILD = CHILD_PRELUDE + """
from vq_pipeline.jobs.encode_folder import EncodeEvents, encode_tables
from vq_pipeline.settings import EncodeOptions, EncodeSettings
settings = EncodeSettings("embedding", id_column="id", with_distance=True)
encode_tables([sys.argv[1]], sys.argv[2], sys.argv[3], settings, EncodeOptions(batch_rows=200), events=EncodeEvents(rows=at_step))
finish()
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scalar4", "binary-itq"])
def test_kill_nine_then_resume_gives_identical_outputs(tmp_path: Path, digits: np.ndarray, books: dict, name: str) -> None:
    """kill -9 at chosen points (the child says when it is there: ``kill_points``), then resume."""
    codebook = tmp_path / "cb.safetensors"
    books[name].save(codebook)
    write_inputs(tmp_path / "in", digits, n_files=5)
    kwargs = dict(column="embedding", id_column="id", with_distance=True, batch_rows=200)
    encode_folder([tmp_path / "in"], codebook, tmp_path / "reference", **kwargs)
    assert_holds_codes(tmp_path / "reference", books[name], digits)
    want = snapshot(tmp_path / "reference")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = [sys.executable, "-c", CHILD, str(tmp_path / "in"), str(codebook)]
    counted = count([*child, str(tmp_path / "counted")], env=env)
    assert snapshot(tmp_path / "counted") == want, "the child's run differs from this process's"
    chosen = points(counted, 4, seed=11)
    for point in chosen:
        out = tmp_path / point.replace(":", "-")
        kill_at([*child, str(out)], point, env=env)
        encode_folder([tmp_path / "in"], codebook, out, **kwargs)
        assert snapshot(out) == want, f"{point}: resumed run differs from the uninterrupted one"
        shutil.rmtree(out)
    print(json.dumps({"counts": counted, "points": chosen}))


@pytest.mark.parametrize(
    "given",
    [dict(codec="scalar", bits=4, n_codes=16), dict(codec="binary", rotation="itq", n_codes=2)],
    ids=["scalar4", "binary-itq"],
)
def test_the_scheduled_pipeline_keeps_a_scalar_or_binary_codebook(tmp_path: Path, digits: np.ndarray, given: dict) -> None:
    """A run with unchanged settings keeps the codebook (its levels are the tables' width, not a setting);
    a change of rotation refits; n_codes other than the codec's is refused before any work."""
    from vq_pipeline.jobs.scheduled import run_once
    from vq_pipeline.settings import PipelineSettings

    write_inputs(tmp_path / "in" / "day=1", digits[:900])
    settings = PipelineSettings(column="embedding", id_column="id", usage_threshold=None, drift_threshold=10.0, **given)
    first = run_once(tmp_path / "in", tmp_path / "work", settings)
    assert first["action"] == "fit"
    cb = Codebook.load(first["codebook"])
    assert (cb.codec, cb.levels, cb.n_codes) == (given["codec"], 63, given["n_codes"])
    out = Path(first["codes_dir"])
    frame = pl.concat([read_table(p) for p in sorted(out.rglob("*.parquet"))]).sort("id")
    assert np.array_equal(packed_codes(frame), oracle_pack(np.asarray(cb.encode(digits[:900])), cb.codec, cb.n_codes))
    write_inputs(tmp_path / "in" / "day=2", digits[900:], first_id=900)
    second = run_once(tmp_path / "in", tmp_path / "work", settings)
    assert second["action"] == "none" and second["fingerprint"] == first["fingerprint"], second["reason"]
    assert second["drift"]["rows"] == len(digits) - 900
    assert ("clipped" if cb.codec == "scalar" else "bit_balance") in second["drift"]
    if cb.codec == "binary":
        turned = PipelineSettings(column="embedding", id_column="id", usage_threshold=None, drift_threshold=10.0, **{**given, "rotation": "random"})
        third = run_once(tmp_path / "in", tmp_path / "work", turned)
        assert third["action"] == "fit" and "rotation itq → random" in third["reason"]
    with pytest.raises(InvalidInputError, match=rf"n_codes=8 with codec='{cb.codec}'.*Fix: pass n_codes={cb.n_codes}"):
        run_once(tmp_path / "in", tmp_path / "work", PipelineSettings(column="embedding", **{**given, "n_codes": 8}))
