"""Tables in, codebook and codes out: equality with in-memory results, resume, refusal, locks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import assert_codes_match
from vq_pipeline import Codebook, DimensionMismatchError, InvalidInputError, NonFiniteError, fit_codebook
from vq_pipeline.demo import generate_embeddings
from vq_pipeline.pipeline import (
    MANIFEST_NAME,
    EncodeLockedError,
    drift_report,
    encode_lock,
    encode_tables,
    fit_from_tables,
)
from vq_pipeline.tables import write_embeddings

DIM = 12


def make_dataset(root: Path, parts: dict[str, int], *, seed: int = 0, id_base: int = 0) -> dict[str, np.ndarray]:
    """Hive-style partitions of clustered embeddings; returns each file's rows."""
    out = {}
    for i, (rel, n) in enumerate(sorted(parts.items())):
        x = generate_embeddings(n, DIM, 10, seed=seed + i) * 3 + 1  # off-centre, not unit norm
        write_embeddings(root / rel, np.arange(n) + id_base + 100_000 * i, x)
        out[rel] = x
    return out


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "in"
    rows = make_dataset(root, {"date=2026-11-01/part-0.parquet": 700, "date=2026-11-01/part-1.parquet": 300, "date=2026-11-02/part-0.parquet": 500})
    return root, rows


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "lock"}


def test_fit_from_tables_in_memory_equals_fit_codebook(dataset) -> None:
    root, rows = dataset
    x = torch.from_numpy(np.concatenate([rows[k] for k in sorted(rows)]))
    cb = fit_from_tables([root], column="embedding", n_codes=8, seed=3)
    ref = fit_codebook(x, 8, seed=3)
    assert torch.equal(cb.centroids, ref.centroids) and torch.equal(cb.counts, ref.counts)
    assert cb.stats["mode"] == "in-memory" and cb.stats["n_rows"] == 1500 and cb.column == "embedding"
    assert len(cb.sources) == 3 and len(cb.data_fingerprint) == 64


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_streamed_fit_equals_in_memory_fit_from_the_same_init(dataset, metric: str) -> None:
    root, rows = dataset
    x = torch.from_numpy(np.concatenate([rows[k] for k in sorted(rows)]))
    init = x[::150][:8].clone()
    common = dict(column="embedding", n_codes=8, metric=metric, init=init, n_iter=8, tol=0.0)
    memory = fit_from_tables([root], **common)
    streamed = fit_from_tables([root], data_budget=0, batch_rows=97, **common)
    assert streamed.stats["mode"] == "streamed"
    torch.testing.assert_close(streamed.centroids, memory.centroids, rtol=0, atol=1e-5)
    assert torch.equal(streamed.counts, memory.counts)
    assert streamed.stats["inertia"] == pytest.approx(memory.stats["inertia"], rel=1e-6)
    # Streamed k-means++ draws from a seeded sample; it still gives a valid codebook.
    pp = fit_from_tables([root], column="embedding", n_codes=8, metric=metric, data_budget=0, batch_rows=200)
    assert pp.stats["init_sample"] == 1500 and torch.isfinite(pp.centroids).all()


def test_sampled_fit_records_the_sample(dataset) -> None:
    root, _ = dataset
    a = fit_from_tables([root], column="embedding", n_codes=8, sample=400, seed=5)
    b = fit_from_tables([root], column="embedding", n_codes=8, sample=400, seed=5)
    assert a.stats["mode"] == "sample" and a.stats["n_rows"] == 400 and a.stats["sample_seed"] == 5
    assert a.stats["rows_total"] == 1500 and torch.equal(a.centroids, b.centroids)
    with pytest.raises(InvalidInputError, match=r"sample=2000 is out of range; expected an integer between 1 and 1500"):
        fit_from_tables([root], column="embedding", n_codes=8, sample=2000)


def test_encode_outputs_equal_in_memory_encode_row_for_row(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    out = tmp_path / "out"
    result = encode_tables([root], cb, out, column="embedding", id_column="id", top_k=3, with_distance=True, batch_rows=128)
    assert sorted(result.encoded) == sorted(rows) and result.rows_total == 1500
    for rel, x in rows.items():
        table = pl.read_parquet(out / rel)
        assert table.columns == ["id", "code", "codes", "distance", "distances"]
        assert table["code"].dtype == pl.UInt8
        want_codes, want_dist = cb.encode(x, top_k=3, return_distances=True)
        codes = torch.from_numpy(table["codes"].to_numpy().astype(np.int64))
        assert torch.equal(codes, want_codes)
        assert torch.equal(torch.from_numpy(table["distances"].to_numpy().copy()), want_dist)
        assert torch.equal(torch.from_numpy(table["code"].to_numpy().astype(np.int64)), want_codes[:, 0])
        assert table["id"].to_list() == pl.read_parquet(root / rel)["id"].to_list()
        assert_codes_match(codes, torch.from_numpy(x), cb.centroids, "l2")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["codebook_fingerprint"] == cb.fingerprint and manifest["rows"] == 1500
    entry = manifest["outputs"]["date=2026-11-02/part-0.parquet"]
    assert entry["rows"] == 500 and len(entry["sha256"]) == 64 and sum(entry["code_counts"]) == 500
    assert entry["input"].endswith("date=2026-11-02/part-0.parquet")


def test_rerun_is_a_no_op_and_resume_rebuilds_only_what_is_missing(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    out = tmp_path / "out"
    encode_tables([root], cb, out, column="embedding", with_distance=True)
    before = snapshot(out)
    again = encode_tables([root], cb, out, column="embedding", with_distance=True)
    assert again.encoded == [] and sorted(again.skipped) == sorted(rows)
    assert snapshot(out) == before
    (out / "date=2026-11-01/part-1.parquet").unlink()
    (out / "date=2026-11-02/part-0.parquet").write_bytes(b"garbage")  # a damaged output is rebuilt too
    (out / MANIFEST_NAME).unlink()
    (out / "date=2026-11-01" / ".part-0.parquet.abc.tmp").write_bytes(b"left by a crash")
    resumed = encode_tables([root], cb, out, column="embedding", with_distance=True)
    assert sorted(resumed.encoded) == ["date=2026-11-01/part-1.parquet", "date=2026-11-02/part-0.parquet"]
    assert snapshot(out) == before, "resumed outputs and manifest are byte-identical to the first run's"


def test_changed_input_is_re_encoded(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    out = tmp_path / "out"
    encode_tables([root], cb, out, column="embedding")
    make_dataset(root, {"date=2026-11-02/part-0.parquet": 123}, seed=50)
    result = encode_tables([root], cb, out, column="embedding")
    assert result.encoded == ["date=2026-11-02/part-0.parquet"] and result.rows_encoded == 123


def test_another_codebook_or_settings_is_refused_without_overwrite(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    a = fit_from_tables([root], column="embedding", n_codes=8, seed=1)
    b = fit_from_tables([root], column="embedding", n_codes=6, seed=2)
    out = tmp_path / "out"
    encode_tables([root], a, out, column="embedding")
    before = snapshot(out)
    with pytest.raises(InvalidInputError, match=r"holds codes written with codebook .*Fix: pass --overwrite"):
        encode_tables([root], b, out, column="embedding")
    with pytest.raises(InvalidInputError, match=r"holds codes written with settings"):
        encode_tables([root], a, out, column="embedding", top_k=2)
    assert snapshot(out) == before
    result = encode_tables([root], b, out, column="embedding", overwrite=True)
    assert len(result.encoded) == 3
    assert json.loads((out / MANIFEST_NAME).read_text())["codebook_fingerprint"] == b.fingerprint


def test_second_concurrent_run_fails_clearly(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    out = tmp_path / "out"
    with encode_lock(out):
        with pytest.raises(EncodeLockedError, match=r"is locked by another run \(pid .*Fix: wait"):
            encode_tables([root], cb, out, column="embedding")
    assert not (out / MANIFEST_NAME).exists()
    assert encode_tables([root], cb, out, column="embedding").rows_total == 1500  # free again


def test_bad_inputs_write_nothing(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    bad = tmp_path / "bad"
    x = rows["date=2026-11-01/part-0.parquet"].copy()
    x[321, 4] = np.nan
    write_embeddings(bad / "p.parquet", np.arange(len(x)), x)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"p.parquet: embedding\[321, 4\]=nan"):
        encode_tables([bad], cb, out, column="embedding", batch_rows=100)
    with pytest.raises(NonFiniteError, match=r"p.parquet: embedding\[321, 4\]=nan"):
        fit_from_tables([bad], column="embedding", n_codes=4)
    with pytest.raises(NonFiniteError, match=r"embedding\[321, 4\]=nan"):
        fit_from_tables([bad], column="embedding", n_codes=4, data_budget=0, batch_rows=100, init="first")
    dup = tmp_path / "dup"
    write_embeddings(dup / "a.parquet", np.array([1, 2, 3]), x[:3])
    write_embeddings(dup / "b.parquet", np.array([4, 3, 5]), x[3:6])
    with pytest.raises(InvalidInputError, match=r"duplicate ids across the inputs, e.g. \[3\]"):
        encode_tables([dup], cb, out, column="embedding", id_column="id")
    wrong = tmp_path / "wrong"
    write_embeddings(wrong / "w.parquet", np.arange(5), np.ones((5, DIM + 1)))
    with pytest.raises(DimensionMismatchError, match=r"has dim=13 but the codebook has dim=12"):
        encode_tables([wrong], cb, out, column="embedding")
    empty = tmp_path / "empty"
    write_embeddings(empty / "e.parquet", np.arange(0), np.ones((0, DIM)))
    with pytest.raises(InvalidInputError, match=r"has no rows"):
        encode_tables([empty], cb, out, column="embedding")
    with pytest.raises(InvalidInputError, match=r"hold no rows"):
        fit_from_tables([empty], column="embedding", n_codes=2)
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != "lock"]


def test_drift_report_is_flat_on_training_data_and_rises_on_shifted_data(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    same = encode_tables([root], cb, tmp_path / "same", column="embedding")
    report = drift_report(cb, list(same.records.values()))
    assert report["distortion_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert report["usage_divergence"] == pytest.approx(0.0, abs=1e-9) and report["codes_used"] == 8
    shifted = tmp_path / "shifted"
    make_dataset(shifted, {"p.parquet": 400}, seed=99)
    write_embeddings(shifted / "p.parquet", np.arange(400), pl.read_parquet(shifted / "p.parquet")["embedding"].to_numpy() * 2 + 5)
    moved = encode_tables([shifted], cb, tmp_path / "moved", column="embedding")
    report = drift_report(cb, list(moved.records.values()))
    assert report["distortion_ratio"] > 2 and report["usage_divergence"] > 0.1


def test_errors_name_the_file_and_its_row_in_every_fit_mode(tmp_path: Path) -> None:
    x = generate_embeddings(300, DIM, 5, seed=1)
    write_embeddings(tmp_path / "in" / "a.parquet", np.arange(300), x)
    y = x.copy()
    y[237, 1] = np.inf
    write_embeddings(tmp_path / "in" / "b.parquet", np.arange(300), y)
    for kwargs in ({}, {"sample": 600}, {"data_budget": 0, "batch_rows": 64, "init": "first"}):
        with pytest.raises(NonFiniteError, match=r"b.parquet: embedding\[237, 1\]=inf"):
            fit_from_tables([tmp_path / "in"], column="embedding", n_codes=4, **kwargs)
    z = x.copy()
    z[12] = 0
    write_embeddings(tmp_path / "in" / "b.parquet", np.arange(300), z)
    with pytest.raises(InvalidInputError, match=r"b.parquet: embedding\[12\] has norm 0"):
        fit_from_tables([tmp_path / "in"], column="embedding", n_codes=4, metric="cosine")


def test_failed_encode_leaves_no_output_folder(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    out = tmp_path / "never"
    with pytest.raises(InvalidInputError, match="does not exist"):
        encode_tables([tmp_path / "typo"], cb, out, column="embedding")
    assert not out.exists()


def test_glob_and_folder_inputs_name_outputs_alike(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], column="embedding", n_codes=8)
    out = tmp_path / "out"
    encode_tables([root / "date=2026-11-01"], cb, out, column="embedding")
    again = encode_tables([str(root / "date=2026-11-01" / "*.parquet")], cb, out, column="embedding")
    assert again.encoded == [] and sorted(again.skipped) == ["part-0.parquet", "part-1.parquet"]
