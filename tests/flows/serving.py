"""What the tests of ``vq serve`` share: the command, the ``prefect`` CLI against a server, waiting for the
deployment to register and for a run to finish, and stopping the served process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "vq"


def vq_command(*args: str) -> list[str]:
    """``vq ARGS``: the installed console script when there is one, else ``python -m vq_flows.cli``."""
    return [str(SCRIPT), *args] if SCRIPT.exists() else [sys.executable, "-m", "vq_flows.cli", *args]


def prefect(url: str, *args: str, timeout: float = 600) -> str:
    """``prefect ARGS`` against the server at ``url``; its stdout (a failure fails the test)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": url}
    done = subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def wait_for_deployment(url: str, name: str, served: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Wait until the deployment ``name`` (``flow/deployment``) is registered, while ``served`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert served.poll() is None, f"the served deployment exited early:\n{log.read_text()[-3000:]}"
        if name.split("/")[1] in prefect(url, "deployment", "ls"):
            return
        time.sleep(1)
    raise AssertionError(f"deployment {name} never registered:\n{log.read_text()[-3000:]}")


def run_deployment(url: str, served: subprocess.Popen, log: Path, name: str = "vq-pipeline/scheduled") -> None:
    """``prefect deployment run NAME`` and wait until the run completes."""
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", prefect(url, "deployment", "run", name)).group(1)
    deadline, state = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        state = prefect(url, "flow-run", "inspect", run_id)
        if re.search(r"type=StateType\.(COMPLETED|FAILED|CRASHED|CANCELLED)", state):
            break
        assert served.poll() is None, f"the served deployment exited:\n{log.read_text()[-3000:]}"
        time.sleep(2)
    assert "type=StateType.COMPLETED" in state, f"run {run_id} did not complete:\n{log.read_text()[-4000:]}"


def stop(served: subprocess.Popen) -> None:
    """Ctrl-C to the served process group; a grace period, not a check: past it the group is killed."""
    os.killpg(served.pid, signal.SIGINT)
    try:
        served.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(served.pid, signal.SIGKILL)
        served.wait()
