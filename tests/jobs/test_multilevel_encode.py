"""Multi-level codebooks in the encode path: ``codes`` columns, resumable runs, semantic-id suffixes, drift per level."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import encode_folder, snapshot
from kill_points import CHILD_PRELUDE, count, kill_at, points
from sklearn.datasets import load_digits

from vq_pipeline import fit_codebook
from vq_pipeline.compute.semantic_ids import unique_suffix
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.io.table_writer import file_sha256, parquet_bytes, with_suffix, write_embeddings
from vq_pipeline.io.tables import read_table
from vq_pipeline.jobs.drift import drift_report
from vq_pipeline.jobs.encode_folder import encode_lock, encode_source, encode_tables, plan_encode
from vq_pipeline.jobs.encode_state import manifest_path, output_path, read_receipt, receipt_path
from vq_pipeline.settings import EncodeOptions, EncodeSettings

N_FILES = 6


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().data.astype("float32")  # (1797, 64)


@pytest.fixture(scope="module")
def books(digits: np.ndarray) -> dict:
    return {
        "residual": fit_codebook(digits, 8, codec="residual", levels=3, seed=0),
        "product": fit_codebook(digits, 16, codec="product", levels=4, seed=0),
        "flat": fit_codebook(digits, 8, seed=0),
    }


def write_inputs(folder: Path, x: np.ndarray, *, ids: np.ndarray | None = None, n_files: int = N_FILES) -> list[Path]:
    """Split ``x`` into ``n_files`` parquet files (ids: 0.. unless given, reversed-order ids test id ordering)."""
    ids = np.arange(len(x)) if ids is None else ids
    bounds = np.linspace(0, len(x), n_files + 1).astype(int)
    return [
        write_embeddings(folder / f"part-{i}.parquet", ids[a:b], x[a:b])
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def read_folder(out: Path) -> pl.DataFrame:
    return pl.concat([read_table(p) for p in sorted(out.glob("*.parquet"))])


@pytest.mark.parametrize("codec", ["residual", "product"])
def test_codes_column_matches_codebook_encode(tmp_path: Path, digits: np.ndarray, books: dict, codec: str) -> None:
    cb = books[codec]
    write_inputs(tmp_path / "in", digits)
    result = encode_tables([tmp_path / "in"], cb, tmp_path / "out", EncodeSettings(column="embedding", id_column="id", with_distance=True), EncodeOptions(batch_rows=200))
    frame = read_folder(tmp_path / "out").sort("id")
    assert frame.columns == ["id", "codes", "distance"]
    assert frame.schema["codes"] == pl.Array(pl.UInt8, cb.levels)
    codes, dists = cb.encode(digits, return_distances=True)
    np.testing.assert_array_equal(frame["codes"].to_numpy(), np.asarray(codes))
    np.testing.assert_allclose(frame["distance"].to_numpy(), np.asarray(dists), rtol=1e-5, atol=1e-3)
    assert frame.schema["distance"] == pl.Float32
    assert (result.codec, result.levels, result.semantic_ids) == (codec, cb.levels, None)
    manifest = json.loads(manifest_path(tmp_path / "out").read_text())
    assert (manifest["codec"], manifest["levels"]) == (codec, cb.levels)
    counts = np.sum([e["code_counts"] for e in manifest["outputs"].values()], axis=0)  # (levels, n_codes)
    want = np.stack([np.bincount(np.asarray(codes)[:, lv], minlength=cb.n_codes) for lv in range(cb.levels)])
    np.testing.assert_array_equal(counts, want)
    # a pinned type holds every level's codes
    encode_tables([tmp_path / "in"], cb, tmp_path / "pinned", EncodeSettings(column="embedding", id_column="id", code_dtype="int64"))
    assert read_folder(tmp_path / "pinned").schema["codes"] == pl.Array(pl.Int64, cb.levels)


def test_flat_outputs_keep_their_code_column(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    write_inputs(tmp_path / "in", digits)
    result = encode_tables([tmp_path / "in"], books["flat"], tmp_path / "out", EncodeSettings(column="embedding", id_column="id"))
    assert read_folder(tmp_path / "out").columns == ["id", "code"]
    assert not {"codec", "levels", "semantic_ids"} & set(result.to_dict())
    assert "codec" not in json.loads(manifest_path(tmp_path / "out").read_text())


def test_bad_combinations_are_refused_before_any_work(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    write_inputs(tmp_path / "in", digits[:300], n_files=1)
    cases = [
        (books["flat"], {"unique": True}, "unique=True with a flat codebook"),
        (books["residual"], {"top_k": 2}, "top_k=2 with a residual codebook"),
        (books["product"], {"beam": 2}, "beam=2 with a product codebook"),
        (books["flat"], {"beam": 2}, "beam=2 with a flat codebook"),
    ]
    for cb, kwargs, message in cases:
        out = tmp_path / "out"
        with pytest.raises(InvalidInputError, match=message):
            encode_folder([tmp_path / "in"], cb, out, column="embedding", **kwargs)
        assert not out.exists()


def suffix_oracle(frame: pl.DataFrame, order: np.ndarray) -> np.ndarray:
    return unique_suffix(frame["codes"].to_numpy().astype(np.int64), order)


def test_unique_suffix_matches_the_oracle_and_is_deterministic(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    cb = books["residual"]
    ids = np.arange(len(digits))[::-1] * 7  # ids run against row order: the suffix follows ids, not rows
    write_inputs(tmp_path / "in", digits, ids=ids)
    result = encode_tables([tmp_path / "in"], cb, tmp_path / "out", EncodeSettings(column="embedding", id_column="id", beam=2, unique=True))
    frame = read_folder(tmp_path / "out")
    assert frame.columns == ["id", "codes", "suffix"] and frame.schema["suffix"] == pl.UInt32
    assert frame.select("codes", "suffix").n_unique() == len(digits)
    np.testing.assert_array_equal(frame["suffix"].to_numpy(), suffix_oracle(frame, frame["id"].to_numpy()))
    codes = np.asarray(cb.encode(digits, beam=2))
    want = unique_suffix(codes, ids)
    np.testing.assert_array_equal(frame.sort("id")["suffix"].to_numpy(), want[np.argsort(ids)])
    stats = result.semantic_ids
    assert stats["max_suffix"] == want.max() > 0
    assert stats["rows_with_suffix"] == int((want > 0).sum())
    groups = np.unique(codes, axis=0, return_counts=True)[1]
    assert stats["collision_rate"] == pytest.approx(groups[groups > 1].sum() / len(codes))
    manifest = json.loads(manifest_path(tmp_path / "out").read_text())
    assert manifest["semantic_ids"] == stats
    # from scratch again: the same bytes; a rerun after success writes nothing
    again = encode_tables([tmp_path / "in"], cb, tmp_path / "again", EncodeSettings(column="embedding", id_column="id", beam=2, unique=True))
    assert snapshot(tmp_path / "again") == snapshot(tmp_path / "out")
    want_bytes = snapshot(tmp_path / "out")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}
    rerun = encode_tables([tmp_path / "in"], cb, tmp_path / "out", EncodeSettings(column="embedding", id_column="id", beam=2, unique=True))
    assert rerun.encoded == [] and rerun.semantic_ids == again.semantic_ids
    assert snapshot(tmp_path / "out") == want_bytes
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")} == mtimes


def test_unique_without_id_column_orders_by_file_key_then_row(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    cb = books["product"]
    write_inputs(tmp_path / "in", digits)
    encode_tables([tmp_path / "in"], cb, tmp_path / "out", EncodeSettings(column="embedding", unique=True))
    parts = [read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))]  # keys sort as part-0..part-5
    frame = pl.concat(parts)
    assert frame.columns == ["row", "codes", "suffix"]
    np.testing.assert_array_equal(frame["suffix"].to_numpy(), unique_suffix(np.asarray(cb.encode(digits))))


def test_a_later_run_recomputes_suffixes_over_the_folder(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    cb = books["residual"]
    write_embeddings(tmp_path / "day1" / "a.parquet", np.arange(0, 900) * 2 + 1, digits[:900])
    write_embeddings(tmp_path / "day2" / "b.parquet", np.arange(900, 1797) * 2 - 1800, digits[900:])  # smaller ids
    out = tmp_path / "out"
    encode_tables([tmp_path / "day1"], cb, out, EncodeSettings(column="embedding", id_column="id", unique=True))
    before = read_table(out / "a.parquet")
    result = encode_tables([tmp_path / "day2"], cb, out, EncodeSettings(column="embedding", id_column="id", unique=True))
    assert result.stale == ["a.parquet"]
    frame = read_folder(out)
    assert len(frame) == len(digits) and frame.select("codes", "suffix").n_unique() == len(digits)
    np.testing.assert_array_equal(frame["suffix"].to_numpy(), suffix_oracle(frame, frame["id"].to_numpy()))
    after = read_table(out / "a.parquet")
    assert not after["suffix"].equals(before["suffix"])  # day2's smaller ids come first: day1's file was rewritten
    # its receipt follows the new bytes, so the stale output stays owned (not "unrecorded")
    receipt = read_receipt(receipt_path(out, "a.parquet"), out)
    assert receipt["sha256"] == file_sha256(out / "a.parquet") and "pending_sha256" not in receipt
    assert result.unrecorded == []


def test_a_crash_inside_the_suffix_step_resumes_to_the_same_bytes(
    tmp_path: Path, digits: np.ndarray, books: dict
) -> None:
    """The states the suffix step passes through, built with the library's own steps: every input
    encoded (suffix null), then one receipt recording the new bytes as pending before (and after)
    its output is replaced. A rerun ends with the bytes of an uninterrupted run."""
    cb = books["residual"]
    write_inputs(tmp_path / "in", digits)
    kwargs = dict(column="embedding", id_column="id", unique=True)
    encode_folder([tmp_path / "in"], cb, tmp_path / "want", **kwargs)
    want = snapshot(tmp_path / "want")
    settings = EncodeSettings(column="embedding", id_column="id", unique=True)
    for replaced in (False, True):
        out = tmp_path / f"crash{int(replaced)}"
        with encode_lock(out, inputs=[tmp_path / "in"]):
            todo, _, _ = plan_encode([tmp_path / "in"], cb, out, settings)
            receipts = [encode_source(s, cb, out, settings, EncodeOptions()) for s in todo]
        assert read_table(output_path(out, todo[0]))["suffix"].null_count() > 0
        first = receipts[0]
        final = (tmp_path / "want" / first["output"]).read_bytes()
        with open(receipt_path(out, first["key"]), "w") as f:
            json.dump({**first, "pending_sha256": file_sha256(tmp_path / "want" / first["output"])}, f)
        if replaced:
            (out / first["output"]).write_bytes(final)
        encode_folder([tmp_path / "in"], cb, out, **kwargs)
        assert snapshot(out) == want, f"replaced={replaced}"
    # the bytes the step writes are those of a suffix replaced in the encoded table
    frame = read_table(tmp_path / "want" / "part-0.parquet")
    assert parquet_bytes(with_suffix(frame, frame["suffix"])) == (tmp_path / "want" / "part-0.parquet").read_bytes()


CHILD = CHILD_PRELUDE + """
from vq_pipeline.jobs.encode_folder import EncodeEvents, encode_tables
from vq_pipeline.settings import EncodeOptions, EncodeSettings
settings = EncodeSettings("embedding", id_column="id", with_distance=True, unique=sys.argv[4] == "1")
encode_tables([sys.argv[1]], sys.argv[2], sys.argv[3], settings, EncodeOptions(batch_rows=64), events=EncodeEvents(rows=at_step))
finish()
"""


@pytest.mark.slow
@pytest.mark.parametrize("unique", [False, True])
def test_kill_nine_then_resume_gives_identical_outputs(
    tmp_path: Path, digits: np.ndarray, books: dict, unique: bool
) -> None:
    """kill -9 at chosen points (the child says when it is there: ``kill_points``), then resume."""
    codebook = tmp_path / "cb.safetensors"
    books["residual"].save(codebook)
    write_inputs(tmp_path / "in", digits, n_files=8)
    kwargs = dict(column="embedding", id_column="id", with_distance=True, batch_rows=64, unique=unique)
    encode_folder([tmp_path / "in"], codebook, tmp_path / "reference", **kwargs)
    want = snapshot(tmp_path / "reference")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = [sys.executable, "-c", CHILD, str(tmp_path / "in"), str(codebook)]
    counted = count([*child, str(tmp_path / "counted"), str(int(unique))], env=env)
    assert snapshot(tmp_path / "counted") == want, "the child's run differs from this process's"
    chosen = points(counted, 4, seed=7 + unique)
    if unique:  # and once while the suffixes are written, after every input is encoded
        chosen.append(f"before-replace:{counted['replace'] - 2}")
    for point in chosen:
        out = tmp_path / point.replace(":", "-")
        kill_at([*child, str(out), str(int(unique))], point, env=env)
        encode_folder([tmp_path / "in"], codebook, out, **kwargs)
        assert snapshot(out) == want, f"{point}: resumed run differs from the uninterrupted one"
        shutil.rmtree(out)
    print(json.dumps({"counts": counted, "points": chosen}))


def test_drift_per_level_on_two_runs(tmp_path: Path, digits: np.ndarray, books: dict) -> None:
    cb = books["residual"]
    rng = np.random.default_rng(0)
    shifted = digits[::-1].copy() + rng.normal(0, 4, digits.shape).astype("float32") + 3.0
    write_inputs(tmp_path / "same", digits, n_files=2)
    write_inputs(tmp_path / "moved", shifted, n_files=2)
    reports = {}
    for name, x in (("same", digits), ("moved", shifted)):
        result = encode_tables([tmp_path / name], cb, tmp_path / f"out-{name}", EncodeSettings(column="embedding", id_column="id"))
        report = drift_report(cb, list(result.records.values()))
        codes, dists = cb.encode(x, return_distances=True)
        codes = np.asarray(codes)
        assert report["levels"] == 3 and len(report["per_level"]) == 3
        for level, entry in enumerate(report["per_level"]):
            p = np.bincount(codes[:, level], minlength=cb.n_codes) / len(x)
            q = cb.counts[level].double().numpy() / cb.counts[level].sum().item()
            m = (p + q) / 2

            def kl(a: np.ndarray, b: np.ndarray) -> float:
                return float(np.sum(a[a > 0] * np.log2(a[a > 0] / b[a > 0])))

            assert entry["usage_divergence"] == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), abs=1e-12)
            assert entry["codes_used"] == int((p > 0).sum())
        assert report["usage_divergence"] == pytest.approx(
            np.mean([e["usage_divergence"] for e in report["per_level"]])
        )
        assert report["mean_distance"] == pytest.approx(float(np.asarray(dists, dtype=np.float64).mean()), rel=1e-5)
        reports[name] = report
    # the training rows themselves: distortion 1 (the codebook's reconstruction error)
    assert reports["same"]["distortion_ratio"] == pytest.approx(1.0, rel=1e-4)
    # counts are the training rows' own codes: no divergence at all on them, some on moved rows
    assert reports["same"]["usage_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert reports["moved"]["usage_divergence"] > 1e-3
    assert reports["moved"]["distortion_ratio"] > 1.2
