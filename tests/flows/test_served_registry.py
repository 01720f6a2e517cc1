"""The served deployment (``vq serve`` against a real Prefect server) with semantic ids through the
work_dir's id registry, over several scheduled runs with new items and a refit on every run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from serving import run_deployment, stop, vq_command, wait_for_deployment
from vq_flows.dask import prefect_server

from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.registry import Registry

pytestmark = pytest.mark.slow

def issued(work: Path) -> dict[int, tuple]:
    with Registry.open(work / "ids" / "registry", id_column="id", write=False) as reg:
        assert reg.current_version == 1
        f = reg.frame()
    return {i: (*c, s) for i, c, s in zip(f["id"], f["codes"].to_list(), f["suffix"])}


def test_served_deployment_keeps_issued_ids_over_scheduled_runs(tmp_path: Path) -> None:
    inputs, work = tmp_path / "input", tmp_path / "work"
    days = [(np.arange(400) + 1000, 0), (np.arange(300), 1), (np.arange(300) + 500, 2)]  # day 2: smaller ids
    write_embeddings(inputs / "date=1" / "part-0.parquet", days[0][0], generate_embeddings(400, 16, 6, seed=0))
    seen: dict[int, tuple] = {}
    with prefect_server() as url:
        log = tmp_path / "serve.log"
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": url}
        argv = ["serve", "--cron", "0 0 1 1 *", "--input-root", str(inputs), "--work-dir", str(work),
                "--column", "embedding", "--codes", "4", "--codec", "residual", "--levels", "2", "--id-column", "id",
                "--unique", "--id-registry", "--id-policy", "keep", "--refit-every-hours", "0", "--usage-threshold", "off"]
        with open(log, "wb") as out:
            served = subprocess.Popen(vq_command(*argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                      start_new_session=True)
        try:
            wait_for_deployment(url, "vq-pipeline/scheduled", served, log)
            for d, (ids, seed) in enumerate(days):
                if d:
                    write_embeddings(inputs / f"date={d + 1}" / "part-0.parquet", ids,
                                     generate_embeddings(len(ids), 16, 6, seed=seed) + 0.5 * d)
                run_deployment(url, served, log)
                now = issued(work)
                assert {i: now[i] for i in seen} == seen, f"run {d}: an issued id changed"
                assert len(now) == sum(len(i) for i, _ in days[: d + 1])
                seen = now
        finally:
            stop(served)
    reports = sorted((work / "reports").glob("*.md"))
    assert len(reports) == 3
    assert "kept id version 1 (policy keep)" in reports[-1].read_text()  # the later runs refitted, ids kept
    assert (work / "ids" / "prefix-v1.safetensors").is_file()
    first = pl.read_parquet(work / "codes" / "*" / "**" / "*.parquet", hive_partitioning=False)  # every folder
    assert first.height >= 1000
