"""The fit flow and the scheduled run tell a person watching the Prefect run what they are doing, in
lines that read well: seeding's start and end, iterations with ``k/n_iter``, elapsed time, ETA and the
objective's relative change, the level of a multi-level fit, and as many iterations as the summary says.
Real flow runs on the session's Prefect test harness; the lines are the run logger's records."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_parts
from vq_flows.fit import fit_codebook_flow
from vq_flows.pipeline import vq_pipeline_flow

from vq_pipeline.codebook import Codebook
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.settings import FitSettings, PipelineSettings, TableSettings

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
ITERATION = re.compile(r"(?:level (\d+)/(\d+), )?iteration (\d+)/(\d+): objective ([^\s,]+)(?: \(([-+]\S+%|unchanged)\))?(.*)")
END = re.compile(r"(?:level (\d+)/(\d+), )?(?:converged|stopped) after (\d+) iterations?\b.*")
SEEDING = re.compile(r"(?:level \d+/\d+, )?seeding[ :].*")


@pytest.fixture
def run_log(caplog, monkeypatch):
    """The run logger's records of the flows run in the test, DEBUG included: (level, message) pairs."""
    for name in RUN_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)  # Prefect keeps run logs to its own handlers
        caplog.set_level(logging.DEBUG, logger=name)

    def records() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith(RUN_LOGGERS)]

    return records


def fit(tmp_path: Path, n_codes: int, settings: FitSettings, n_rows: int = 1200) -> tuple[dict, float]:
    data = tmp_path / "in" / "a.parquet"
    if not data.exists():
        write_embeddings(data, np.arange(n_rows), generate_embeddings(n_rows, 8, 6, seed=0))
    t0 = time.perf_counter()
    summary = fit_codebook_flow([str(tmp_path / "in")], str(tmp_path / f"cb-{time.monotonic_ns()}.safetensors"), n_codes, TableSettings(column="embedding"), settings)
    return summary, time.perf_counter() - t0


def test_fit_flow_logs_as_many_iterations_as_the_summary_with_k_of_n_eta_and_change(prefect_api, tmp_path: Path, run_log) -> None:
    summary, seconds = fit(tmp_path, 20, FitSettings(n_iter=6, tol=0.0))
    lines = run_log()
    info = [m for level, m in lines if level == logging.INFO]
    iterations = [ITERATION.fullmatch(m) for _, m in lines if ITERATION.fullmatch(m)]
    # Every iteration is logged once (INFO or DEBUG), numbered 1..n of n_iter, and the summary counts as many.
    assert [int(m[3]) for m in iterations] == list(range(1, summary["iterations"] + 1)) and summary["iterations"] == 6, lines
    assert {int(m[4]) for m in iterations} == {6}
    ends = [END.fullmatch(m) for m in info if END.fullmatch(m)]
    assert len(ends) == 1 and int(ends[0][3]) == summary["iterations"] and "not converged" in ends[0][0], info
    # Each line has elapsed time, all but the last an ETA, all but the first a change.
    for m in iterations:
        assert re.search(r", \d+\.\d s elapsed", m[7]) and (("ETA at most" in m[7]) == (int(m[3]) < 6)), m[0]
        assert (m[6] is None) == (m[3] == "1"), m[0]
    # Objectives that differ are printed differently; no pruning figures with pruning off.
    objectives = [m[5] for m in iterations]
    assert all(a != b for a, b in zip(objectives, objectives[1:])), objectives
    assert not [m for _, m in lines if "proven unchanged" in m], lines
    # Seeding: a start line and an end line, at most one a second between them.
    seeding = [m for m in info if SEEDING.fullmatch(m)]
    assert seeding[0].startswith("seeding 20 initial centroids (k-means|| from 1,200 rows)"), seeding
    assert re.fullmatch(r"seeding: 20/20 initial centroids \(\d+\.\d s\)", seeding[-1]), seeding
    assert 2 <= len(seeding) <= 2 + seconds, seeding
    assert not [m for m in info if m.startswith("initial centroids") or re.match(r"iteration \d+:", m)], info


def test_fit_flow_names_pruning_only_when_on(prefect_api, tmp_path: Path, run_log) -> None:
    summary, _ = fit(tmp_path, 20, FitSettings(n_iter=5, tol=0.0, prune=True))
    iterations = [ITERATION.fullmatch(m) for _, m in run_log() if ITERATION.fullmatch(m)]
    assert len(iterations) == summary["iterations"] == 5
    assert all(re.search(r", [\d,]+ rows? proven unchanged, ", m[7]) for m in iterations), [m[0] for m in iterations]


def test_multilevel_fit_lines_name_their_level_and_add_up_to_the_summary(prefect_api, tmp_path: Path, run_log) -> None:
    summary, _ = fit(tmp_path, 8, FitSettings(codec="residual", levels=3, n_iter=4, tol=1e-3))
    lines = [m for _, m in run_log() if SEEDING.fullmatch(m) or ITERATION.fullmatch(m) or END.fullmatch(m)]
    assert lines and all(re.match(r"level [123]/3, ", m) for m in lines), lines
    ends = [END.fullmatch(m) for m in lines if END.fullmatch(m)]
    assert [int(m[1]) for m in ends] == [1, 2, 3]
    assert sum(int(m[3]) for m in ends) == summary["iterations"], lines
    for level, end in zip((1, 2, 3), ends):
        numbers = [int(m[3]) for m in map(ITERATION.fullmatch, lines) if m and int(m[1]) == level]
        assert numbers == list(range(1, int(end[3]) + 1)), lines
    assert [s["iterations"] for s in summary["level_stats"]] == [int(m[3]) for m in ends]


def test_scheduled_run_fits_on_one_screen_at_info(prefect_api, tmp_path: Path, run_log) -> None:
    write_parts(tmp_path / "in", {f"date=2026-11-0{i}/part-0.parquet": 600 for i in range(1, 4)}, dim=12)
    settings = PipelineSettings(column="embedding", n_codes=32, id_column="id")
    summary = vq_pipeline_flow(str(tmp_path / "in"), str(tmp_path / "work"), settings)
    assert summary["action"] == "fit"
    lines = run_log()
    info = [m for level, m in lines if level >= logging.INFO]
    assert len(info) <= 25, "\n".join(info)
    # Of those, Prefect's own (a run begins, its link, each task run's end) are most; ours are few.
    ours = [m for m in info if not re.match(r"Beginning |View at |Finished in state ", m)]
    assert len(ours) <= 8 and len([m for m in ours if SEEDING.fullmatch(m)]) == 2, ours
    assert not [m for m in ours if ITERATION.fullmatch(m)], ours  # a quick fit: seeding and its end
    # DEBUG has the rest: every iteration of the fit, as many as the codebook records.
    iterations = [m for _, m in lines if ITERATION.fullmatch(m)]
    assert len(iterations) == Codebook.load(summary["codebook"]).stats["iterations"] > 1, lines
