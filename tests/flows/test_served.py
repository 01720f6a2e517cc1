"""The flows as a served deployment runs them: pickled by value, and through a real Prefect server.

When ``flow.serve`` starts a scheduled run, Prefect 3 pickles the flow with every local module
registered for pickle-by-value and loads it in a fresh process, where parameter validation must
resolve every annotation from what was pickled. The last test starts ``prefect server start`` on
loopback, serves the ``vq-pipeline`` deployment with ``vq serve`` exactly as the README says, triggers
``prefect deployment run`` and checks what the run wrote. ``python -m vq_flows.deploy`` (deprecated)
still does the same, after one line on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from serving import run_deployment, stop, vq_command, wait_for_deployment
from vq_flows.dask import prefect_server

from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings

# End to end: real servers, clusters or processes killed mid-run (make test-slow).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# Settings parameters as a deployment stores them: the dict of their fields (JSON).
FLOWS = {
    "vq_flows.pipeline:vq_pipeline_flow": dict(
        input_root="/in", work_dir="/work", settings={"column": "embedding", "n_codes": 8, "usage_threshold": None},
    ),
    "vq_flows.encode:encode_embeddings_flow": dict(
        inputs=["/in"], codebook="/cb.safetensors", out_dir="/out", settings={"column": "embedding", "keep": ["a", "b"]},
        options={"engine": "torch"},
    ),
    "vq_flows.fit:fit_codebook_flow": dict(
        inputs=["/in"], out="/cb.safetensors", n_codes=8, reading={"column": "embedding"}, settings={"n_iter": 3},
    ),
}

PICKLE = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import cloudpickle
    import vq_flows
    # What a served run does: the flows' modules pickled by value (a superset of Prefect's choice). The
    # library (vq_pipeline) is an installed dependency wherever a flow runs, so it travels by reference:
    # its settings dataclasses must be the installed ones for their fields' defaults to keep their meaning.
    for package in (vq_flows,):
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


@pytest.mark.slow
def test_served_deployment_runs_end_to_end(tmp_path):
    """``vq serve`` against a real server; ``prefect deployment run`` completes and
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
                vq_command("serve", "--cron", "0 0 1 1 *", "--input-root", str(inputs), "--work-dir", str(work),
                           "--column", "embedding", "--codes", "8", "--id-column", "id"),
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
            )
        try:
            wait_for_deployment(url, "vq-pipeline/scheduled", served, log)
            run_deployment(url, served, log)
        finally:
            stop(served)

    current = json.loads((work / "codebooks" / "current.json").read_text())
    assert (work / current["codebook"]).is_file()
    codes = pl.read_parquet(work / current["codes"] / "**" / "*.parquet")
    assert codes.height == 1100 and codes["id"].n_unique() == 1100
    reports = sorted((work / "reports").glob("*.md"))
    assert len(reports) == 1 and "fitted a first codebook" in reports[0].read_text()


# ----------------------------------------------------------------------------- python -m vq_flows.deploy (deprecated)


def test_deprecated_deploy_module_prints_one_line_then_does_what_vq_serve_does(monkeypatch, capsys, tmp_path):
    """In-process, with the blocking serve replaced: the same deployment from both spellings."""
    import vq_flows.cli.serve as serve_command
    import vq_flows.deploy as deploy
    from vq_flows import cli

    served: list[tuple[str, str, dict]] = []
    monkeypatch.setattr(serve_command, "serve_deployment", lambda cron, name, **params: served.append((cron, name, params)))
    argv = ["--cron", "0 0 1 1 *", "--input-root", str(tmp_path / "in"), "--work-dir", str(tmp_path / "work"),
            "--column", "embedding", "--codes", "8", "--codec", "residual", "--levels", "2", "--usage-threshold", "off"]
    assert deploy.main(argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        "python -m vq_flows.deploy is deprecated; use vq serve",
        "serving vq-pipeline/scheduled on the schedule '0 0 1 1 *' (Ctrl-C stops)",
    ]
    assert cli.main(["serve", *argv, "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert len(served) == 2 and served[0] == served[1]
    cron, name, params = served[0]
    assert (cron, name) == ("0 0 1 1 *", "scheduled")
    assert (params["input_root"], params["work_dir"], params["dask"]) == (str(tmp_path / "in"), str(tmp_path / "work"), None)
    settings = params["settings"]
    assert (settings["column"], settings["n_codes"], settings["codec"], settings["levels"]) == ("embedding", 8, "residual", 2)
    assert settings["usage_threshold"] is None and settings["metric"] == "l2"
    assert params == deploy.parse_args(argv)[2]


@pytest.mark.parametrize(
    "argv, status, fragment",
    [(["--help"], 0, "usage: vq serve"), ([], 2, "the following arguments are required: --input-root")],
)
def test_deprecated_deploy_module_as_a_process(argv, status, fragment, tmp_path):
    done = subprocess.run([sys.executable, "-m", "vq_flows.deploy", *argv], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=600)
    assert done.returncode == status, done.stderr
    err = done.stderr.splitlines()
    assert err[0] == "python -m vq_flows.deploy is deprecated; use vq serve"
    assert sum("deprecated" in line for line in err) == 1
    assert fragment in (done.stdout if status == 0 else done.stderr)
