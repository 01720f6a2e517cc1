"""The fit flow tells a person watching the Prefect run what it is doing, from the first seconds."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from vq_flows.fit import fit_codebook_flow

from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.settings import FitSettings, TableSettings


def test_fit_flow_logs_seeding_and_every_iteration_at_info(prefect_api, tmp_path: Path, caplog, monkeypatch) -> None:
    write_embeddings(tmp_path / "in" / "a.parquet", np.arange(800), generate_embeddings(800, 8, 6, seed=0))
    caplog.set_level(logging.INFO)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)  # Prefect keeps run logs to its own handlers
    summary = fit_codebook_flow([str(tmp_path / "in")], str(tmp_path / "cb.safetensors"), 20, TableSettings(column="embedding"), FitSettings(n_iter=4, tol=0.0))
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name.startswith("prefect.")]
    seeding = [m for m in info if m.startswith("seeding: ")]
    iterations = [m for m in info if m.startswith("iteration ")]
    assert seeding and seeding[-1].startswith("seeding: 20 of 20 initial centroids chosen"), info
    assert [m.split(":")[0] for m in iterations] == [f"iteration {i}" for i in range(1, summary["iterations"] + 2)], info
