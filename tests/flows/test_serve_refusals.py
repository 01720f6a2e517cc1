"""Deploy-time means deploy-time: whatever the scheduled flow refuses on its first run, ``vq serve``
refuses before it registers anything, with one ``error:`` line and exit status 1.

Each case is run twice: first the flow itself (a real run on the session's Prefect test harness, on
real parquet partitions) collects its refusal; then ``vq serve`` with the same parameters, as a
process, must print exactly that refusal and exit. The served process points at a Prefect API that
does not answer, so a check that misses fails at once (it cannot register, or serve) instead of
hanging; the timeout is only a backstop.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import write_parts
from serving import vq_command
from vq_flows.pipeline import vq_pipeline_flow

from vq_pipeline import VQError
from vq_pipeline.settings import PipelineSettings

#: Nothing listens there: a deployment that got past the checks fails to register at once.
DEAD_API = "http://127.0.0.1:9/api"
PARTS = {"date=2026-11-01/part-0.parquet": 500, "date=2026-11-02/part-0.parquet": 400}


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": DEAD_API}
    return subprocess.run(
        vq_command("serve", *args), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False
    )


# A case: from tmp_path (with partitions under tmp_path / "in"), the flow's parameters; it may set up state.
Case = Callable[[Path], dict[str, Any]]


def parameters(tmp_path: Path, *, root: str = "in", work: str = "work", dask: str | None = None, **fields: Any):
    fields = {"column": "embedding", "n_codes": 8, "id_column": "id", **fields}
    return dict(input_root=str(tmp_path / root), work_dir=str(tmp_path / work), settings=fields, dask=dask)


def work_dir_a_file(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "file").write_text("not a folder")
    return parameters(tmp_path, work="file")


def corrupt_pointer(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "work" / "codebooks").mkdir(parents=True)
    (tmp_path / "work" / "codebooks" / "current.json").write_text("{not json")
    return parameters(tmp_path)


def code_dtype_changed(tmp_path: Path) -> dict[str, Any]:
    first = parameters(tmp_path)
    vq_pipeline_flow(first["input_root"], first["work_dir"], PipelineSettings(**first["settings"]))
    return parameters(tmp_path, code_dtype="uint32")


def id_column_changed(tmp_path: Path) -> dict[str, Any]:
    first = parameters(tmp_path)
    vq_pipeline_flow(first["input_root"], first["work_dir"], PipelineSettings(**first["settings"]))
    return parameters(tmp_path, id_column=None)


CASES: dict[str, Case] = {
    "work_dir inside input_root": lambda t: parameters(t, work="in/work"),
    "work_dir is input_root": lambda t: parameters(t, work="in"),
    "work_dir inside an input_root not made yet": lambda t: parameters(t, root="later", work="later/work"),
    "work_dir is a file": work_dir_a_file,
    "code_dtype too narrow for n_codes": lambda t: parameters(t, n_codes=300, code_dtype="uint8"),
    "sample below n_codes": lambda t: parameters(t, sample=4),
    "not a Dask address": lambda t: parameters(t, dask="not an address"),
    "unreadable current codebook pointer": corrupt_pointer,
    "code_dtype changed after a run": code_dtype_changed,
    "id_column changed after a run": id_column_changed,
}


def serve_options(params: dict[str, Any]) -> list[str]:
    """``vq serve``'s options for the flow's ``params`` (what its options generate, backwards)."""
    s = params["settings"]
    args = ["--cron", "0 0 1 1 *", "--input-root", params["input_root"], "--work-dir", params["work_dir"]]
    args += ["--column", s["column"], "--codes", str(s["n_codes"])]
    for field, flag in (("id_column", "--id-column"), ("code_dtype", "--code-dtype"), ("sample", "--sample")):
        if s.get(field) is not None:
            args += [flag, str(s[field])]
    return args + (["--dask", params["dask"]] if params["dask"] else [])


def flow_refusal(params: dict[str, Any]) -> str:
    """What the flow's run with ``params`` refuses (it must refuse)."""
    with pytest.raises(VQError) as refused:
        vq_pipeline_flow(params["input_root"], params["work_dir"], PipelineSettings(**params["settings"]), params["dask"])
    return str(refused.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_refusal_of_the_flow_is_refused_by_vq_serve_before_it_serves(case: str, prefect_api, tmp_path: Path) -> None:
    write_parts(tmp_path / "in", PARTS, dim=6)
    params = CASES[case](tmp_path)
    message = flow_refusal(params)
    assert "\n" not in message and "Fix:" in message
    served = serve(tmp_path, *serve_options(params))
    assert (served.returncode, served.stderr.splitlines(), served.stdout) == (1, [f"error: {message}"], ""), served.stderr[-3000:]


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--cron", "not a cron"], "error: cron='not a cron' is not a cron schedule; expected 5 fields"),
        (["--cron", "61 * * * *"], "error: cron='61 * * * *' is not a cron schedule"),
        (["--cron", "0 * * * *", "--name", "a/b"], "error: name='a/b' is not a deployment name Prefect accepts"),
        (["--interval", "0"], "error: interval=0 s; expected a positive time between scheduled runs. Fix: pass one"),
        (["--interval=-5m"], "error: interval=-300 s; expected a positive time between scheduled runs"),
        (["--interval", "soon"], "error: interval='soon' is not a duration; expected seconds (3600) or a number with"),
        (["--cron", "0 * * * *", "--interval", "1h"], "error: --cron '0 * * * *' and --interval '1h' given; expected exactly one schedule"),
        ([], "error: neither --cron nor --interval given; expected exactly one schedule"),
    ],
)
def test_a_schedule_or_name_prefect_refuses_is_one_error_line(options: list[str], expected: str, tmp_path: Path) -> None:
    """Refused by the deployment itself (no flow run involved): a cron string or a name Prefect refuses, an
    interval that is not positive, both or neither schedule: one line, naming the value and the fix."""
    (tmp_path / "in").mkdir()
    served = serve(tmp_path, *options, "--input-root", "in", "--work-dir", "work", "--column", "embedding", "--codes", "8")
    assert served.returncode == 1 and served.stdout == "", served.stderr[-3000:]
    (line,) = served.stderr.splitlines()
    assert line.startswith(expected) and "Fix: pass" in line


@pytest.mark.parametrize(("text", "seconds"), [("3600", 3600), ("90s", 90), ("15m", 900), ("1h", 3600), ("1.5d", 129600)])
def test_an_interval_deployment_has_prefects_interval_schedule(text: str, seconds: float, tmp_path: Path) -> None:
    from vq_flows.cli.parser import build_parser
    from vq_flows.cli.serve import build_deployment, check_deployment, schedule_text, serve_arguments

    write_parts(tmp_path / "in", PARTS, dim=6)
    args = build_parser().parse_args(
        ["serve", "--interval", text, "--input-root", str(tmp_path / "in"), "--work-dir", str(tmp_path / "work"),
         "--column", "embedding", "--codes", "8"]
    )
    schedule, name, params = serve_arguments(args)
    assert schedule.total_seconds() == seconds and schedule_text(schedule) == f"every {seconds:g} s"
    check_deployment(schedule, name, **params)  # a positive interval and good parameters: nothing refused
    deployment = build_deployment(schedule, name, **params)
    assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [seconds]
    assert [getattr(s.schedule, "cron", None) for s in deployment.schedules] == [None]
