"""Tables in, codebook and codes out: equality with in-memory results, resume, refusal, locks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import assert_codes_match, fit_tables, snapshot, write_parts

from vq_pipeline import DimensionMismatchError, InvalidInputError, IterationStats, NonFiniteError, fit_codebook
from vq_pipeline.compute.seeding import InitProgress
from vq_pipeline.errors import EncodeLockedError
from vq_pipeline.io.fileio import temporary_name
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.drift import drift_report
from vq_pipeline.jobs.encode_folder import encode_lock, encode_tables
from vq_pipeline.jobs.encode_state import manifest_path, state_dir
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import EncodeOptions, EncodeSettings, FitSettings, TableSettings

DIM = 12


def make_dataset(root: Path, parts: dict[str, int], *, seed: int = 0, id_base: int = 0) -> dict[str, np.ndarray]:
    """Hive-style partitions of clustered embeddings, off-centre and not unit norm; returns each file's rows."""
    return write_parts(root, parts, dim=DIM, seed=seed, id_base=id_base, scale=3, offset=1)


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "in"
    rows = make_dataset(root, {"date=2026-11-01/part-0.parquet": 700, "date=2026-11-01/part-1.parquet": 300, "date=2026-11-02/part-0.parquet": 500})
    return root, rows


def test_fit_from_tables_in_memory_equals_fit_codebook(dataset) -> None:
    root, rows = dataset
    x = torch.from_numpy(np.concatenate([rows[k] for k in sorted(rows)]))
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"), FitSettings(seed=3))
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
    memory = fit_tables([root], **common)
    streamed = fit_tables([root], data_budget=0, batch_rows=97, **common)
    assert streamed.stats["mode"] == "streamed"
    torch.testing.assert_close(streamed.centroids, memory.centroids, rtol=0, atol=1e-5)
    assert torch.equal(streamed.counts, memory.counts)
    assert streamed.stats["inertia"] == pytest.approx(memory.stats["inertia"], rel=1e-6)
    # Streamed k-means++ draws from a seeded sample; it still gives a valid codebook.
    pp = fit_from_tables([root], 8, TableSettings(column="embedding", data_budget=0, batch_rows=200), FitSettings(metric=metric))
    assert pp.stats["init_sample"] == 1500 and torch.isfinite(pp.centroids).all()


def test_sampled_fit_records_the_sample(dataset) -> None:
    root, _ = dataset
    a = fit_from_tables([root], 8, TableSettings(column="embedding", sample=400), FitSettings(seed=5))
    b = fit_from_tables([root], 8, TableSettings(column="embedding", sample=400), FitSettings(seed=5))
    assert a.stats["mode"] == "sample" and a.stats["n_rows"] == 400 and a.stats["sample_seed"] == 5
    assert a.stats["rows_total"] == 1500 and torch.equal(a.centroids, b.centroids)
    with pytest.raises(InvalidInputError, match=r"sample=2000 is out of range; expected an integer between 1 and 1500"):
        fit_from_tables([root], 8, TableSettings(column="embedding", sample=2000))


def test_encode_outputs_equal_in_memory_encode_row_for_row(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "out"
    result = encode_tables([root], cb, out, EncodeSettings(column="embedding", id_column="id", top_k=3, with_distance=True), EncodeOptions(batch_rows=128))
    assert sorted(result.encoded) == sorted(rows) and result.rows_total == 1500
    for rel, x in rows.items():
        table = pl.read_parquet(out / rel)
        assert table.columns == ["id", "code", "codes", "distance", "distances"]
        assert table["code"].dtype == pl.UInt8
        want_codes, want_dist = cb.encode(torch.from_numpy(x), top_k=3, return_distances=True)
        codes = torch.from_numpy(table["codes"].to_numpy().astype(np.int64))
        assert torch.equal(codes, want_codes)
        assert torch.equal(torch.from_numpy(table["distances"].to_numpy().copy()), want_dist)
        assert torch.equal(torch.from_numpy(table["code"].to_numpy().astype(np.int64)), want_codes[:, 0])
        assert table["id"].to_list() == pl.read_parquet(root / rel)["id"].to_list()
        assert_codes_match(codes, torch.from_numpy(x), cb.centroids, "l2")
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["codebook_fingerprint"] == cb.fingerprint and manifest["rows"] == 1500
    entry = manifest["outputs"]["date=2026-11-02/part-0.parquet"]
    assert entry["rows"] == 500 and len(entry["sha256"]) == 64 and sum(entry["code_counts"]) == 500
    assert entry["input"].endswith("date=2026-11-02/part-0.parquet")


def test_rerun_is_a_no_op_and_resume_rebuilds_only_what_is_missing(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "out"
    encode_tables([root], cb, out, EncodeSettings(column="embedding", with_distance=True))
    before = snapshot(out)
    again = encode_tables([root], cb, out, EncodeSettings(column="embedding", with_distance=True))
    assert again.encoded == [] and sorted(again.skipped) == sorted(rows)
    assert snapshot(out) == before
    (out / "date=2026-11-01/part-1.parquet").unlink()
    (out / "date=2026-11-02/part-0.parquet").write_bytes(b"garbage")  # a damaged output is rebuilt too
    manifest_path(out).unlink()
    (out / "date=2026-11-01" / temporary_name(out / "date=2026-11-01" / "part-0.parquet")).write_bytes(b"left by a crash")
    resumed = encode_tables([root], cb, out, EncodeSettings(column="embedding", with_distance=True))
    assert sorted(resumed.encoded) == ["date=2026-11-01/part-1.parquet", "date=2026-11-02/part-0.parquet"]
    assert snapshot(out) == before, "resumed outputs and manifest are byte-identical to the first run's"


def test_changed_input_is_re_encoded(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "out"
    encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    make_dataset(root, {"date=2026-11-02/part-0.parquet": 123}, seed=50)
    result = encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    assert result.encoded == ["date=2026-11-02/part-0.parquet"] and result.rows_encoded == 123


def test_another_codebook_or_settings_is_refused_without_overwrite(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    a = fit_from_tables([root], 8, TableSettings(column="embedding"), FitSettings(seed=1))
    b = fit_from_tables([root], 6, TableSettings(column="embedding"), FitSettings(seed=2))
    out = tmp_path / "out"
    encode_tables([root], a, out, EncodeSettings(column="embedding"))
    before = snapshot(out)
    with pytest.raises(InvalidInputError, match=r"holds codes written with codebook .*Fix: pass --overwrite"):
        encode_tables([root], b, out, EncodeSettings(column="embedding"))
    with pytest.raises(InvalidInputError, match=r"holds codes written with settings"):
        encode_tables([root], a, out, EncodeSettings(column="embedding", top_k=2))
    assert snapshot(out) == before
    result = encode_tables([root], b, out, EncodeSettings(column="embedding"), EncodeOptions(overwrite=True))
    assert len(result.encoded) == 3
    assert json.loads(manifest_path(out).read_text())["codebook_fingerprint"] == b.fingerprint


def test_second_concurrent_run_fails_clearly(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "out"
    with encode_lock(out, inputs=[root]):
        with pytest.raises(EncodeLockedError, match=r"is locked by another run \(pid .*Fix: wait"):
            encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    assert not manifest_path(out).exists()
    assert encode_tables([root], cb, out, EncodeSettings(column="embedding")).rows_total == 1500  # free again


def test_bad_inputs_write_nothing(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    bad = tmp_path / "bad"
    x = rows["date=2026-11-01/part-0.parquet"].copy()
    x[321, 4] = np.nan
    write_embeddings(bad / "p.parquet", np.arange(len(x)), x)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"p.parquet: embedding\[321, 4\]=nan"):
        encode_tables([bad], cb, out, EncodeSettings(column="embedding"), EncodeOptions(batch_rows=100))
    with pytest.raises(NonFiniteError, match=r"p.parquet: embedding\[321, 4\]=nan"):
        fit_from_tables([bad], 4, TableSettings(column="embedding"))
    with pytest.raises(NonFiniteError, match=r"embedding\[321, 4\]=nan"):
        fit_from_tables([bad], 4, TableSettings(column="embedding", data_budget=0, batch_rows=100), FitSettings(init="first"))
    dup = tmp_path / "dup"
    write_embeddings(dup / "a.parquet", np.array([1, 2, 3]), x[:3])
    write_embeddings(dup / "b.parquet", np.array([4, 3, 5]), x[3:6])
    with pytest.raises(InvalidInputError, match=r"duplicate ids across the inputs, e.g. \[3\]"):
        encode_tables([dup], cb, out, EncodeSettings(column="embedding", id_column="id"))
    wrong = tmp_path / "wrong"
    write_embeddings(wrong / "w.parquet", np.arange(5), np.ones((5, DIM + 1)))
    with pytest.raises(DimensionMismatchError, match=r"has dim=13 but the codebook has dim=12"):
        encode_tables([wrong], cb, out, EncodeSettings(column="embedding"))
    empty = tmp_path / "empty"
    write_embeddings(empty / "e.parquet", np.arange(0), np.ones((0, DIM)))
    with pytest.raises(InvalidInputError, match=r"has no rows"):
        encode_tables([empty], cb, out, EncodeSettings(column="embedding"))
    with pytest.raises(InvalidInputError, match=r"hold no rows"):
        fit_from_tables([empty], 2, TableSettings(column="embedding"))
    assert not snapshot(out)


def test_drift_report_is_flat_on_training_data_and_rises_on_shifted_data(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    same = encode_tables([root], cb, tmp_path / "same", EncodeSettings(column="embedding"))
    report = drift_report(cb, list(same.records.values()))
    assert report["distortion_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert report["usage_divergence"] == pytest.approx(0.0, abs=1e-9) and report["codes_used"] == 8
    shifted = tmp_path / "shifted"
    make_dataset(shifted, {"p.parquet": 400}, seed=99)
    write_embeddings(shifted / "p.parquet", np.arange(400), pl.read_parquet(shifted / "p.parquet")["embedding"].to_numpy() * 2 + 5)
    moved = encode_tables([shifted], cb, tmp_path / "moved", EncodeSettings(column="embedding"))
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
            fit_tables([tmp_path / "in"], column="embedding", n_codes=4, **kwargs)
    z = x.copy()
    z[12] = 0
    write_embeddings(tmp_path / "in" / "b.parquet", np.arange(300), z)
    with pytest.raises(InvalidInputError, match=r"b.parquet: embedding\[12\] has norm 0"):
        fit_from_tables([tmp_path / "in"], 4, TableSettings(column="embedding"), FitSettings(metric="cosine"))


def test_failed_encode_leaves_no_output_folder(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "never"
    with pytest.raises(InvalidInputError, match="does not exist"):
        encode_tables([tmp_path / "typo"], cb, out, EncodeSettings(column="embedding"))
    assert not out.exists() and not state_dir(out).exists()


def test_glob_and_folder_inputs_name_outputs_alike(dataset, tmp_path: Path) -> None:
    root, rows = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "out"
    encode_tables([root / "date=2026-11-01"], cb, out, EncodeSettings(column="embedding"))
    again = encode_tables([str(root / "date=2026-11-01" / "*.parquet")], cb, out, EncodeSettings(column="embedding"))
    assert again.encoded == [] and sorted(again.skipped) == ["part-0.parquet", "part-1.parquet"]


def test_codes_folder_reads_as_a_dataset_with_polars_pyarrow_and_duckdb(dataset, tmp_path: Path) -> None:
    """Nothing but parquet files in the output folder: readers need no knowledge of the bookkeeping."""
    import duckdb
    import pyarrow.dataset as ds

    root, rows = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "codes"
    encode_tables([root], cb, out, EncodeSettings(column="embedding", id_column="id", with_distance=True))
    assert {p.suffix for p in out.rglob("*") if p.is_file()} == {".parquet"}
    assert manifest_path(out).is_file() and manifest_path(out).parent == tmp_path / "codes.vq"
    ids = sorted(np.concatenate([pl.read_parquet(root / k)["id"].to_numpy() for k in rows]).tolist())
    assert sorted(pl.scan_parquet(out).select("id").collect()["id"].to_list()) == ids
    assert sorted(ds.dataset(out, format="parquet").to_table(columns=["id"])["id"].to_pylist()) == ids
    got = duckdb.sql(f"select id from read_parquet('{out}/**/*.parquet') order by id").fetchall()
    assert [r[0] for r in got] == ids


def test_a_folder_of_the_previous_layout_is_migrated_and_not_re_encoded(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "out"
    encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    want = snapshot(out)
    (out / ".vq").mkdir()
    os.replace(state_dir(out) / "receipts", out / ".vq" / "receipts")  # the 0.1 layout: bookkeeping inside
    os.replace(manifest_path(out), out / "_manifest.json")
    again = encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    assert again.encoded == [] and len(again.skipped) == 3
    assert snapshot(out) == want and not (out / ".vq").exists() and not (out / "_manifest.json").exists()


def test_touched_or_copied_input_is_not_encoded_again_but_changed_content_is(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    out = tmp_path / "out"
    encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    want = snapshot(out)
    touched = root / "date=2026-11-01/part-0.parquet"
    os.utime(touched, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    copied = root / "date=2026-11-02/part-0.parquet"
    data = copied.read_bytes()
    copied.unlink()
    copied.write_bytes(data)  # same content, a new inode and mtime
    again = encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    assert again.encoded == [] and len(again.skipped) == 3
    assert json.loads(manifest_path(out).read_bytes()) == json.loads(want[f"state/{manifest_path(out).name}"])
    assert {k: v for k, v in snapshot(out).items() if "receipts" not in k} == {k: v for k, v in want.items() if "receipts" not in k}
    assert encode_tables([root], cb, out, EncodeSettings(column="embedding")).encoded == []  # the receipts learned the new stat
    x = pl.read_parquet(copied)
    write_embeddings(copied, x["id"].to_numpy(), x["embedding"].to_numpy()[::-1].copy())  # same size, other content
    assert encode_tables([root], cb, out, EncodeSettings(column="embedding")).encoded == ["date=2026-11-02/part-0.parquet"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_mode_a_plain_open_gives(dataset, tmp_path: Path, umask: int) -> None:
    root, _ = dataset
    previous = os.umask(umask)
    try:
        cb = fit_from_tables([root], 8, TableSettings(column="embedding"), FitSettings(n_iter=2), checkpoint=tmp_path / "fit.ckpt")
        cb.save(tmp_path / "cb.safetensors")
        encode_tables([root], cb, tmp_path / "out", EncodeSettings(column="embedding"))
        from vq_pipeline.fitting.checkpoint import FitCheckpoint
        from vq_pipeline.fitting.options import fit_options

        opts = fit_options(8, FitSettings(), dim=DIM, n_rows=100)
        FitCheckpoint(tmp_path / "kept.ckpt").save("fp", opts, restart=0, inertias=[], best=None, lloyd=None)
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (os.stat(tmp_path / "plain").st_mode & 0o777) == expected
    written = [tmp_path / "cb.safetensors", tmp_path / "kept.ckpt", *(tmp_path / "out").rglob("*.parquet"), *state_dir(tmp_path / "out").rglob("*.json")]
    assert len(written) == 2 + 3 + 3 + 1
    assert {p.name: oct(os.stat(p).st_mode & 0o777) for p in written} == {p.name: oct(expected) for p in written}


def test_code_dtype_can_be_pinned_and_a_narrow_or_unknown_one_is_refused_up_front(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    cb = fit_from_tables([root], 8, TableSettings(column="embedding"))
    for pinned, dtype in (("uint32", pl.UInt32), ("int64", pl.Int64), (None, pl.UInt8)):
        out = tmp_path / f"out-{pinned}"
        encode_tables([root], cb, out, EncodeSettings(column="embedding", code_dtype=pinned))
        assert {pl.read_parquet(p)["code"].dtype for p in out.rglob("*.parquet")} == {dtype}
    wide = fit_codebook(torch.from_numpy(generate_embeddings(600, DIM, 20, seed=3)), 300)
    with pytest.raises(InvalidInputError, match=r"code_dtype='uint8' holds codes up to 255 but the codebook has n_codes=300.*Fix"):
        encode_tables([root], wide, tmp_path / "narrow", EncodeSettings(column="embedding", code_dtype="uint8"))
    with pytest.raises(InvalidInputError, match=r"code_dtype='float32' is not a supported code type.*uint32"):
        encode_tables([root], cb, tmp_path / "unknown", EncodeSettings(column="embedding", code_dtype="float32"))
    assert not (tmp_path / "narrow").exists() and not (tmp_path / "unknown").exists()


def test_seeding_reports_progress_then_iterations(dataset) -> None:
    root, _ = dataset
    events: list = []
    fit_from_tables([root], 40, TableSettings(column="embedding"), FitSettings(n_iter=3), progress=events.append)
    seeding = [e for e in events if isinstance(e, InitProgress)]
    assert len(seeding) >= 10 and events[: len(seeding)] == seeding, "seeding is reported first, every few percent"
    assert [e.chosen for e in seeding] == sorted(e.chosen for e in seeding) and seeding[-1].chosen == seeding[-1].n_codes == 40
    assert all(isinstance(e, IterationStats) for e in events[len(seeding) :]) and len(events) - len(seeding) == 4
    events.clear()
    fit_from_tables([root], 40, TableSettings(column="embedding"), FitSettings(n_iter=1, init="random"), progress=events.append)
    assert [(e.chosen, e.n_codes) for e in events if isinstance(e, InitProgress)] == [(40, 40)]


def test_checkpoint_exists_once_the_initial_centroids_are_chosen(dataset, tmp_path: Path) -> None:
    """A fit stopped before its first update resumes without seeding again, and ends the same."""
    import dataclasses

    root, _ = dataset
    kwargs = dict(column="embedding", n_codes=40, n_iter=6, tol=0.0)
    want = dataclasses.replace(fit_tables([root], **kwargs), created_at="", timings={}).to_bytes()
    ckpt = tmp_path / "fit.ckpt"

    def stop_at_first_iteration(event) -> None:
        if isinstance(event, IterationStats):
            assert ckpt.is_file(), "no checkpoint yet when the first iteration ends"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_tables([root], checkpoint=ckpt, progress=stop_at_first_iteration, **kwargs)
    events: list = []
    got = fit_tables([root], checkpoint=ckpt, progress=events.append, **kwargs)
    assert not [e for e in events if isinstance(e, InitProgress)], "the resumed fit seeded again"
    assert events[0].iteration == 1
    assert dataclasses.replace(got, created_at="", timings={}).to_bytes() == want and not ckpt.exists()
