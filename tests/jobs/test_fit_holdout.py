"""``holdout`` through the fit from tables (``vq fit --holdout``): the held-out rows are a seeded choice
among the rows in memory (all rows in table order, or the sample's), the codebook is the fit of the
others, and the held-out error reaches the codebook's stats, the fit summary and ``vq inspect``."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import oracle, write_parts

from vq_pipeline import Codebook, FitSettings, InvalidInputError, fit_codebook
from vq_pipeline.fitting.options import holdout_rows
from vq_pipeline.jobs.fit_file import FitJob, fit_to_file
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import TableSettings

PARTS = {"date=2026-11-01/part-0.parquet": 300, "date=2026-11-02/part-0.parquet": 200}
CPU = dict(engine="torch", device="cpu")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_held_out_error_reaches_the_stats_summary_and_inspect(tmp_path: Path, metric: str) -> None:
    from vq_flows.cli.inspection import describe

    rows = write_parts(tmp_path / "in", PARTS, dim=8)
    x = np.concatenate([rows[k] for k in sorted(rows)]).astype(np.float32)  # the tables' rows in order
    settings = FitSettings(metric=metric, seed=5, holdout=0.2, n_iter=10, **CPU)
    job = FitJob((str(tmp_path / "in"),), str(tmp_path / "cb.safetensors"), 6, TableSettings("embedding"), settings)
    summary = fit_to_file(job)
    cb = Codebook.load(summary.path)
    held = holdout_rows(len(x), 0.2, 5, n_codes=6)
    keep = np.setdiff1d(np.arange(len(x)), held)
    rest = fit_codebook(x[keep], 6, metric=metric, seed=5, n_iter=10, **CPU)
    np.testing.assert_allclose(cb.centroids.numpy(), rest.centroids.numpy(), rtol=1e-5, atol=1e-5)
    expected = float(oracle(torch.from_numpy(x[held]), cb.centroids, metric).min(dim=1).values.mean())
    h = cb.stats["holdout"]
    assert (h["rows"], h["fraction"], h["seed"], cb.stats["n_rows"]) == (100, 0.2, 5, 400)
    assert h["mean_distance"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert summary.holdout == h and summary.to_dict()["holdout"] == h
    line = next(line for line in describe(cb).splitlines() if "held-out error" in line)
    assert f"mean {expected:.4g} per row over 100 held-out rows (holdout 0.2, seed 5)" in line


def test_a_sample_holds_out_a_share_of_the_sample(tmp_path: Path) -> None:
    write_parts(tmp_path / "in", PARTS, dim=8)
    reading = TableSettings("embedding", sample=250)
    full = fit_from_tables([tmp_path / "in"], 5, reading, FitSettings(seed=1, **CPU))
    held = fit_from_tables([tmp_path / "in"], 5, reading, FitSettings(seed=1, holdout=0.1, **CPU))
    assert full.stats["n_rows"] == 250 and held.stats["n_rows"] == 225 and held.stats["holdout"]["rows"] == 25
    assert held.stats["sample"] == 250 and held.settings["holdout"] == 0.1 and "holdout" not in full.settings


def test_streamed_or_partitioned_fits_refuse_a_holdout_before_reading_rows(tmp_path: Path) -> None:
    from vq_pipeline.jobs.mappers import serial

    write_parts(tmp_path / "in", PARTS, dim=8)
    settings = FitSettings(holdout=0.1, **CPU)
    streamed = dataclasses.replace(TableSettings("embedding"), data_budget=100)
    with pytest.raises(InvalidInputError, match=r"holdout=0.1 but the 500 training rows are fitted streamed \(their "
                       r"16,000 bytes exceed data_budget=100\); expected the rows in memory.*Fix: pass sample="):
        fit_from_tables([tmp_path / "in"], 5, streamed, settings)
    with pytest.raises(InvalidInputError, match=r"fitted through a mapper; expected the rows in memory"):
        fit_from_tables([tmp_path / "in"], 5, TableSettings("embedding"), settings, mapper=serial, scratch=tmp_path)


def test_vq_fit_holdout_option_and_vq_inspect(tmp_path: Path, capsys) -> None:
    from vq_flows import cli

    write_parts(tmp_path / "in", PARTS, dim=8)
    out = tmp_path / "cb.safetensors"
    argv = ["fit", str(tmp_path / "in"), "--column", "embedding", "--codes", "4", "--holdout", "0.3", "--seed", "2"]
    assert cli.main([*argv, "--engine", "torch", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    h = Codebook.load(out).stats["holdout"]
    assert (h["rows"], h["fraction"], h["seed"]) == (150, 0.3, 2)
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    expected = f"mean {h['mean_distance']:.4g} per row over 150 held-out rows (holdout 0.3, seed 2)"
    assert re.search(rf"^  held-out error +{re.escape(expected)}$", shown, re.MULTILINE), shown
    assert cli.main(["fit", str(tmp_path / "in"), "--column", "embedding", "--codes", "4", "--holdout", "1",
                     "--out", str(tmp_path / "no.safetensors")]) == 1
    assert "error: holdout=1.0; expected the share of rows kept out of the fit" in capsys.readouterr().err


@pytest.mark.parametrize("value", [[1, 2], "\x1b[31mred", {"mean_distance": "\x1b]0;title\x07", "rows": -1e400}])
def test_inspect_shows_a_hostile_holdout_entry_safely(value) -> None:
    from vq_flows.cli.inspection import describe

    cb = Codebook(torch.eye(3), torch.ones(3, dtype=torch.int64), "l2", stats={"n_rows": 3, "holdout": value})
    text = describe(cb)
    (line,) = [line for line in text.splitlines() if "held-out error" in line]
    assert "\x1b" not in text and "\x07" not in text and line.strip().startswith("held-out error")
