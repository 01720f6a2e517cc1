"""The flows as a served deployment runs them: pickled by value, and through a real Prefect server.

When ``flow.serve`` starts a scheduled run, Prefect 3 pickles the flow with every local module
registered for pickle-by-value and loads it in a fresh process, where parameter validation must
resolve every annotation from what was pickled. The last test starts ``prefect server start`` on
loopback, serves the ``vq-pipeline`` deployment with ``python -m vq_flows.deploy`` exactly as the
README says, triggers ``prefect deployment run`` and checks what the run wrote.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vq_flows.dask import prefect_server
from vq_pipeline.demo import generate_embeddings
from vq_pipeline.tables import write_embeddings

ROOT = Path(__file__).resolve().parents[1]

FLOWS = {
    "vq_flows.pipeline:vq_pipeline_flow": dict(input_root="/in", work_dir="/work", column="embedding", n_codes=8),
    "vq_flows.encode:encode_embeddings_flow": dict(
        inputs=["/in"], codebook="/cb.safetensors", out_dir="/out", column="embedding", keep=("a", "b"),
    ),
    "vq_flows.fit:fit_codebook_flow": dict(inputs=["/in"], column="embedding", n_codes=8, out="/cb.safetensors"),
}

PICKLE = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import cloudpickle
    import vq_flows, vq_pipeline
    # What a served run does: every local module pickled by value (a superset of Prefect's choice).
    for package in (vq_flows, vq_pipeline):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            cloudpickle.register_pickle_by_value(importlib.import_module(info.name))
        cloudpickle.register_pickle_by_value(package)
    module, name = sys.argv[1].split(":")
    sys.stdout.buffer.write(cloudpickle.dumps(getattr(importlib.import_module(module), name)))
    """
)

# A fresh process that never imports the project: only what was pickled is there.
VALIDATE = textwrap.dedent(
    """
    import json, sys
    import cloudpickle
    flow = cloudpickle.loads(sys.stdin.buffer.read())
    params = flow.validate_parameters(json.loads(sys.argv[1]))
    assert "vq_flows" not in sys.modules, "the pickle imported the module instead of carrying it"
    print(json.dumps(sorted(params)))
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_flow_pickled_by_value_validates_its_parameters(flow, tmp_path):
    pickled = subprocess.run([sys.executable, "-c", PICKLE, flow], capture_output=True, check=True, env=_env(), cwd=tmp_path)
    params = FLOWS[flow]
    done = subprocess.run(
        [sys.executable, "-c", VALIDATE, json.dumps(params)], input=pickled.stdout, capture_output=True, env=_env(), cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert set(params) <= set(json.loads(done.stdout))


def _prefect(url: str, *args: str, timeout: float = 120) -> str:
    env = {**_env(), "PREFECT_API_URL": url}
    done = subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def _wait_for_deployment(url: str, name: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the served deployment exited early:\n{log.read_text()[-3000:]}"
        env = {**_env(), "PREFECT_API_URL": url}
        done = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], capture_output=True, text=True, env=env)
        if name.split("/")[1] in done.stdout:
            return
        time.sleep(1)
    raise AssertionError(f"deployment {name} never registered:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_served_deployment_runs_end_to_end(tmp_path):
    """``python -m vq_flows.deploy`` against a real server; ``prefect deployment run`` completes and
    leaves a codebook, its codes, a manifest and a report."""
    inputs = tmp_path / "input"
    for i, n in enumerate((600, 500)):
        write_embeddings(inputs / f"date=2026-11-0{i + 1}" / "part-0.parquet", np.arange(n) + 1000 * i, generate_embeddings(n, 16, 6, seed=i))
    work = tmp_path / "work"
    with prefect_server() as url:
        log = tmp_path / "serve.log"
        env = {**_env(), "PREFECT_API_URL": url}
        with open(log, "wb") as out:
            served = subprocess.Popen(
                [sys.executable, "-m", "vq_flows.deploy", "--cron", "0 0 1 1 *", "--input-root", str(inputs), "--work-dir", str(work),
                 "--column", "embedding", "--codes", "8", "--id-column", "id"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
            )
        try:
            _wait_for_deployment(url, "vq-pipeline/scheduled", served, log)
            started = _prefect(url, "deployment", "run", "vq-pipeline/scheduled")
            run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
            deadline, state = time.monotonic() + 300, ""
            while time.monotonic() < deadline:
                state = _prefect(url, "flow-run", "inspect", run_id)
                if re.search(r"type=StateType\.(COMPLETED|FAILED|CRASHED|CANCELLED)", state):
                    break
                assert served.poll() is None, f"the served deployment exited:\n{log.read_text()[-3000:]}"
                time.sleep(2)
            assert "type=StateType.COMPLETED" in state, f"run {run_id} did not complete:\n{log.read_text()[-4000:]}"
        finally:
            os.killpg(served.pid, signal.SIGINT)
            try:
                served.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(served.pid, signal.SIGKILL)
                served.wait()

    current = json.loads((work / "codebooks" / "current.json").read_text())
    assert (work / current["codebook"]).is_file()
    codes = pl.read_parquet(work / current["codes"] / "**" / "*.parquet")
    assert codes.height == 1100 and codes["id"].n_unique() == 1100
    reports = sorted((work / "reports").glob("*.md"))
    assert len(reports) == 1 and "fitted a first codebook" in reports[0].read_text()
