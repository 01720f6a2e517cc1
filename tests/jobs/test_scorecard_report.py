"""A scheduled run scores its current codebook on a seeded sample of the run's new rows, with the churn against
the codebook a refit replaced, and the run report (markdown and JSON) shows it.

Oracle: the scorecard computed here from the parquet rows read back with polars, the sample drawn by hand,
the codes encoded with both codebook files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import write_parts

from vq_pipeline import Codebook
from vq_pipeline.compute.scorecard import DEFAULT_SAMPLE_ROWS, sample_rows, scorecard
from vq_pipeline.fitting.options import SCORECARD_STREAM
from vq_pipeline.jobs.scheduled import run_once
from vq_pipeline.settings import PipelineSettings

DIM, N_CODES = 8, 6


def _rows(paths: list[Path]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([pl.read_parquet(p)["embedding"].to_numpy() for p in sorted(paths)]))


def _expected(codebook: str, x: torch.Tensor, seed: int, reference: str | None = None) -> dict:
    cb = Codebook.load(codebook)
    x = x[torch.from_numpy(sample_rows(x.shape[0], DEFAULT_SAMPLE_ROWS, [seed, SCORECARD_STREAM]))]
    codes = cb.encode(x, engine="torch", device="cpu")
    ref = None if reference is None else Codebook.load(reference).encode(x, engine="torch", device="cpu")
    return scorecard(x, codes, cb.decode(codes), metric=cb.metric, reference_codes=ref)


def _check(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_a_run_report_has_the_scorecard_of_the_new_rows_with_churn_on_a_refit(tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    first = {"date=2026-11-01/part-0.parquet": 2500}
    write_parts(root, first, dim=DIM)
    s = PipelineSettings("embedding", N_CODES, seed=3, refit_every_hours=0)  # every later run refits
    one = run_once(root, work, s)
    assert one["action"] == "fit"
    card = one["scorecard"]
    assert card["sample"] == "new rows" and card["files"] == 1 and card["n_rows"] == DEFAULT_SAMPLE_ROWS
    assert "churn" not in card and card["seconds"] > 0
    _check(card, _expected(one["codebook"], _rows([root / k for k in first]), seed=3))

    second = {"date=2026-11-02/part-0.parquet": 700}
    write_parts(root, second, dim=DIM, seed=5, offset=0.5)  # new rows, drawn elsewhere
    two = run_once(root, work, s)
    assert two["action"] == "refit" and two["previous_codebook"] == one["codebook"]
    card = two["scorecard"]
    assert card["files"] == 1 and card["n_rows"] == 700  # only this run's new file, all its rows
    want = _expected(two["codebook"], _rows([root / k for k in second]), seed=3, reference=one["codebook"])
    assert 0.0 <= want["churn"] <= 1.0
    _check(card, want)

    report = Path(two["report"]).read_text()
    section = report[report.index("## Scorecard") :]
    assert "flat codes of 700 this run's new rows" in section
    assert f"| recall@10 (true neighbours found among the decoded rows) | {want['recall_at_k']:.4g} |" in section
    assert f"| churn against the previous codebook (rows whose codes changed) | {want['churn']:.4g} |" in section
    saved = json.loads(Path(two["report"]).with_suffix(".json").read_text())
    assert saved["scorecard"]["churn"] == pytest.approx(want["churn"])


def test_a_run_without_new_rows_has_no_scorecard(tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    write_parts(root, {"part-0.parquet": 300}, dim=DIM)
    s = PipelineSettings("embedding", N_CODES, refit_every_hours=None)
    run_once(root, work, s)
    again = run_once(root, work, s)  # nothing new: no rows to score
    assert again["action"] == "none" and again["scorecard"] is None
    assert "## Scorecard" not in Path(again["report"]).read_text()
