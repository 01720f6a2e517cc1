"""Pictures (vq_pipeline.jobs.plots): real PNG files of real codebooks and of report summaries written by
vq_pipeline.jobs.run_report.write_report from real encode receipts; the output rule; the missing-matplotlib error.

A picture is checked as a file (PNG signature, decoded size, not one flat colour) and through what
it is drawn from (:func:`vq_pipeline.jobs.plots.drift_series` against the summaries' own numbers), plus a
colour that only the marks under test use (the empty codes' red).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vq_pipeline import ConfigurationError, InvalidInputError, fit_codebook
from vq_pipeline.io.codebook_file import CodebookInfo
from vq_pipeline.io.fileio import is_temporary_name
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs import run_report
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.drift import drift_report
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.plots import PNG_MAGIC, drift_series, plot_codebook, plot_drift, read_report_summaries
from vq_pipeline.jobs.workdir import refit_checks, report_path
from vq_pipeline.settings import DEFAULT_DRIFT_THRESHOLD, DEFAULT_USAGE_THRESHOLD
from vq_pipeline.settings import EncodeOptions, EncodeSettings

DIM, N_TOPICS, N_CODES = 8, 6, 6
TAB_RED = np.array([0xD6, 0x27, 0x28]) / 255  # matplotlib's "tab:red": the empty codes' mark


def read_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The picture at ``path``, checked: a PNG file of ``size`` (height, width) pixels, not one flat colour."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[: len(PNG_MAGIC)] == PNG_MAGIC and len(data) > 5000, data[:16]
    image = imread(path)  # (height, width, 4) float32 in [0, 1]
    assert image.shape[:2] == size, image.shape
    rgba = np.ascontiguousarray((image * 255).round().astype(np.uint8)).view(np.uint32)  # (height, width, 1)
    colours = len(np.unique(rgba))
    assert colours > 50, colours  # text, lines and bars, not a blank canvas
    return image


def red_pixels(image: np.ndarray) -> int:
    return int((np.abs(image[..., :3] - TAB_RED).max(axis=-1) < 0.06).sum())


def no_temporaries(folder: Path) -> bool:
    return not any(is_temporary_name(p.name) for p in folder.iterdir())


# ----------------------------------------------------------------------------- the codebook


@pytest.fixture(scope="module")
def codebook() -> Any:
    x = torch.from_numpy(generate_embeddings(1500, DIM, N_TOPICS, seed=1))
    return fit_codebook(x, N_CODES, seed=0, n_init=3, engine="torch")


def test_codebook_picture_is_a_png_with_the_empty_codes_marked(codebook: Any, tmp_path: Path) -> None:
    history = codebook.stats["history"]
    assert len(history) >= 2 and len(codebook.stats["restart_inertias"]) == 3  # what the picture draws
    assert not any(h["n_repairs"] for h in history) and int((codebook.counts == 0).sum()) == 0
    path = plot_codebook(codebook, tmp_path / "cb.png")
    assert path == (tmp_path / "cb.png").resolve()
    full = read_png(path, (480, 1200))
    assert red_pixels(full) == 0  # nothing is empty and nothing was repaired: no red mark

    counts = codebook.counts.clone()
    counts[counts.argsort()[:2]] = 0  # the two smallest codes lose their rows
    with_empty = plot_codebook(dataclasses.replace(codebook, counts=counts), tmp_path / "empty.png")
    assert red_pixels(read_png(with_empty, (480, 1200))) > 20  # the "2 empty" label
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cb.png", "empty.png"]  # no temporary left


def test_codebook_picture_from_a_file_and_without_a_history(codebook: Any, tmp_path: Path) -> None:
    saved = tmp_path / "cb.safetensors"
    codebook.save(saved)
    read_png(plot_codebook(saved, tmp_path / "from-file.png"), (480, 1200))
    # A codebook of an older release has no history; unreadable entries of a hostile file are left out.
    for stats in ({}, {"history": [5, {"iteration": "1", "objective": 2.0}, {"iteration": 1, "objective": math.nan}]}):
        info = CodebookInfo(centroids=codebook.centroids.numpy(), counts=codebook.counts.numpy(), metric="l2", stats=stats)
        read_png(plot_codebook(info, tmp_path / "old.png"), (480, 1200))  # replaces its own picture


def many_levels(n_levels: int, n_codes: int, n_iterations: int) -> CodebookInfo:
    """A residual codebook in memory (not checked as a file is) with more levels than a file may hold."""
    rng = np.random.default_rng(0)
    history = [{"iteration": i, "objective": 100.0 / (i + 1)} for i in range(n_iterations)]
    return CodebookInfo(
        centroids=np.zeros((n_levels, n_codes, 4), np.float32),
        counts=rng.integers(0, 50, (n_levels, n_codes)),
        metric="l2",
        codec="residual",
        stats={"levels": [{"history": history, "converged": True}] * n_levels},
    )


@pytest.mark.parametrize("n_levels, n_codes, n_iterations", [(20_000, 1, 3), (3, 50_000, 5000), (1, 50_000, 1)])
def test_codebook_picture_draws_a_bounded_number_of_lines_and_points(n_levels: int, n_codes: int, n_iterations: int) -> None:
    from vq_pipeline.jobs.plots import MAX_PLOTTED_LEVELS, MAX_POINTS, codebook_figure

    info = many_levels(n_levels, n_codes, n_iterations)
    if n_levels == 1:  # a flat codebook of many codes and iterations
        info = dataclasses.replace(info, centroids=info.centroids[0], counts=info.counts[0], codec="flat",
                                   stats={"history": info.stats["levels"][0]["history"] * 5000,
                                          "restart_inertias": list(range(1, 10_000))})  # fmt: skip
    sizes, objective = codebook_figure(info).axes
    drawn = min(n_levels, MAX_PLOTTED_LEVELS)
    assert len(sizes.lines) == drawn + 1  # one per drawn level, and the mean
    assert all(len(line.get_xdata()) <= MAX_POINTS for ax in (sizes, objective) for line in ax.lines)
    assert sum(len(c.get_offsets()) for c in objective.collections) <= MAX_POINTS  # the restarts' marks
    largest = sizes.lines[0]  # the first level's sizes, largest first: its first and last points are drawn
    first = np.sort(np.asarray(info.counts).reshape(-1, n_codes)[0])[::-1]
    assert largest.get_ydata()[0] == first[0] and largest.get_ydata()[-1] == first[-1]
    if n_levels > MAX_PLOTTED_LEVELS:
        assert f"levels 0-{MAX_PLOTTED_LEVELS - 1} of {n_levels:,} drawn" in sizes.get_title()
        assert f"({drawn} of {n_levels:,} levels)" in objective.get_title()


def test_codebook_picture_refuses_its_input_and_files_it_did_not_write(codebook: Any, tmp_path: Path) -> None:
    named_png = tmp_path / "cb.png"  # a codebook file whose name looks like a picture
    codebook.save(named_png)
    before = named_png.read_bytes()
    with pytest.raises(InvalidInputError, match="destroy the input"):
        plot_codebook(named_png, named_png)
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    with pytest.raises(InvalidInputError, match="not a PNG picture"):
        plot_codebook(codebook, notes)
    with pytest.raises(InvalidInputError, match=r"expected a \.png file.*Fix: pass path cb\.png"):
        plot_codebook(codebook, tmp_path / "cb.svg")
    assert named_png.read_bytes() == before and notes.read_text() == "not a picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cb.png", "notes.png"]


def test_missing_matplotlib_is_a_clear_error(codebook: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # what an absent package raises
    with pytest.raises(ConfigurationError, match=r"Fix: pip install 'vq-pipeline\[plot\]'"):
        plot_codebook(codebook, tmp_path / "cb.png")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- drift per run


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A work_dir's reports of three runs, written by workdir.write_report from real encode receipts:
    the first fit (a baseline), rows of the training mixture (no refit), rows of one topic (a refit)."""
    root = tmp_path_factory.mktemp("drift")
    train = generate_embeddings(1200, DIM, N_TOPICS, seed=1)
    cb = fit_codebook(torch.from_numpy(train), N_CODES, seed=0, engine="torch")
    counts = np.bincount(cb.encode(torch.from_numpy(train)).numpy(), minlength=N_CODES)
    one_code = generate_embeddings(4000, DIM, N_TOPICS, seed=3)
    one_code = one_code[cb.encode(torch.from_numpy(one_code)).numpy() == int(counts.argmax())][:400]
    batches = [train, generate_embeddings(600, DIM, N_TOPICS, seed=2), one_code]
    started = dt.datetime(2026, 11, 2, 6, tzinfo=dt.UTC)
    summaries = []
    for run, x in enumerate(batches):
        write_embeddings(root / "in" / f"day={run}" / "part.parquet", np.arange(len(x)) + 10_000 * run, x)
        result = encode_tables([root / "in"], cb, root / "codes", EncodeSettings(column="embedding"), EncodeOptions(engine="torch"))
        receipts = [result.records[key] for key in result.encoded]  # the new rows only, as the flow measures
        drift = drift_report(cb, receipts, baseline=run == 0)
        when = started + dt.timedelta(hours=6 * run)
        checks = refit_checks(
            created_at=started.isoformat(),
            last_fit_at=None,
            now=when,
            refit_every_hours=None,
            drift=drift,
            drift_threshold=DEFAULT_DRIFT_THRESHOLD,
            usage_threshold=DEFAULT_USAGE_THRESHOLD,
        )
        fired = [c["rule"] for c in checks if c["fired"]]
        summary = {
            "started_at": when.isoformat(timespec="seconds"),
            "action": "fit" if run == 0 else "refit" if fired else "none",
            "drift": drift,
            "refit_rules": checks,
            "fired": fired,
            "params": {"drift_threshold": DEFAULT_DRIFT_THRESHOLD, "usage_threshold": DEFAULT_USAGE_THRESHOLD},
        }
        path = report_path(root / "work", when, f"run{run}0000")
        run_report.write_report(str(path), f"# run {run}\n", summary)
        summaries.append(json.loads(path.with_suffix(".json").read_text()))
    assert [s["action"] for s in summaries] == ["fit", "none", "refit"], [s["fired"] for s in summaries]
    return {"reports": root / "work" / "reports", "summaries": summaries}


def test_drift_picture_of_a_work_dirs_reports(work: dict[str, Any]) -> None:
    reports = work["reports"]
    path = plot_drift(reports, reports / "drift.png")  # beside the reports it draws
    read_png(path, (650, 800))
    read_png(plot_drift(reports, reports / "drift.png"), (650, 800))  # a rerun replaces it
    assert sorted(p.suffix for p in reports.iterdir()) == [".json"] * 3 + [".md"] * 3 + [".png"]
    assert no_temporaries(reports)

    # What it draws is what the summaries say, in time order (given out of order here).
    s = drift_series(work["summaries"][::-1])
    assert s["action"] == ["fit", "none", "refit"] and s["baseline"] == [True, False, False]
    assert s["started_at"] == ["2026-11-02T06:00:00", "2026-11-02T12:00:00", "2026-11-02T18:00:00"]
    drifts = [summary["drift"] for summary in work["summaries"]]
    assert math.isnan(s["distortion_ratio"][0]) and math.isnan(s["usage_divergence"][0])
    assert s["distortion_ratio"][1:] == [d["distortion_ratio"] for d in drifts[1:]]
    assert s["usage_divergence"][1:] == [d["usage_divergence"] for d in drifts[1:]]
    assert s["usage_limit"][1:] == [d["usage_divergence_expected"] + DEFAULT_USAGE_THRESHOLD for d in drifts[1:]]
    assert s["distortion_limit"] == [1 + DEFAULT_DRIFT_THRESHOLD] * 3
    assert s["usage_divergence"][2] > s["usage_limit"][2] and s["usage_divergence"][1] < s["usage_limit"][1]
    assert all(math.isnan(v) for v in s["churn"])


def test_drift_picture_shows_churn_when_a_summary_records_it(work: dict[str, Any], tmp_path: Path) -> None:
    summaries = [dict(s) for s in work["summaries"]]
    summaries[2]["alignment"] = {"kept": 0.75, "kept_unaligned": 0.125, "method": "co-occurrence"}
    s = drift_series(summaries)
    assert s["churn"][2] == 0.25 and s["churn_unaligned"][2] == 0.875 and math.isnan(s["churn"][1])
    read_png(plot_drift(summaries, tmp_path / "churn.png"), (850, 800))  # a third panel: churn
    summaries[2] = {**work["summaries"][2], "drift": {**work["summaries"][2]["drift"], "churn": 0.4}}
    assert drift_series(summaries)["churn"][2] == 0.4


def test_drift_picture_refuses_its_inputs_and_files_it_did_not_write(work: dict[str, Any], tmp_path: Path) -> None:
    summary = tmp_path / "summary.png"  # a summary file whose name looks like a picture
    summary.write_bytes(sorted(work["reports"].glob("*.json"))[0].read_bytes())
    before = summary.read_bytes()
    with pytest.raises(InvalidInputError, match="destroy the input"):
        plot_drift([summary], summary)
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    with pytest.raises(InvalidInputError, match="not a PNG picture"):
        plot_drift(work["summaries"], notes)
    with pytest.raises(InvalidInputError, match=r"expected a \.png file"):
        plot_drift(work["summaries"], tmp_path / "drift.jpg")
    assert summary.read_bytes() == before and notes.read_text() == "not a picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png", "summary.png"]


def test_drift_picture_refuses_what_is_not_a_summary(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="holds no run summary"):
        plot_drift(tmp_path / "empty", tmp_path / "drift.png")
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps([1, 2]))
    with pytest.raises(InvalidInputError, match="stranger.json.*is not a run summary"):
        read_report_summaries(tmp_path)
    stranger.write_text("{not json")
    with pytest.raises(InvalidInputError, match="stranger.json.*is not JSON"):
        plot_drift([stranger], tmp_path / "drift.png")
    assert not (tmp_path / "drift.png").exists()
