"""Run the flows' tasks on a Dask cluster through prefect-dask's ``DaskTaskRunner``.

``ADDRESS`` (the flows' ``dask=`` option, ``vq … --dask ADDRESS``):

* ``local:N``: a ``LocalCluster`` of N worker processes on this machine (scheduler on 127.0.0.1,
  one task thread per worker, the cores shared out as ``OMP_NUM_THREADS``), started for the run and
  stopped after it;
* ``tcp://host:8786`` (or ``host:8786``, or any scheduler address Dask accepts): an existing cluster.

Workers run the same Prefect tasks as a local run. They need:

* a Prefect API they can reach: tasks carry the flow's settings to the workers, so the flow must run
  against a real server (``PREFECT_API_URL``), not an embedded one that only its own process knows.
  :func:`worker_api_url` finds the URL (the configured one, or the URL of the temporary server this
  process started) and refuses a loopback URL for workers on other hosts;
  :func:`prefect_server` starts ``prefect server start`` on 127.0.0.1 for ``local:N`` runs from the
  command line, and stops it afterwards;
* the package installed, and the inputs, codebook and output folder at the same paths (shared or
  object storage): tasks get paths, workers read their partitions themselves;
* their own KeOps cache folder: :class:`KeopsWorkerFolder` sets ``VQ_KEOPS_WORKER`` per worker
  (concurrent compiles into one folder clash).
"""

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vq_pipeline.errors import ConfigurationError, DaskAddressError

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError as exc:  # the dask extra is not installed
    raise ConfigurationError(
        f"Dask is not importable ({exc}); expected distributed and prefect-dask for --dask and dask=... "
        f"Fix: pip install 'vq-pipeline[dask]', or run without Dask."
    ) from None

_LOCAL = re.compile(r"local:(\d+)")
_HOST_PORT = re.compile(r"[A-Za-z0-9_.\-\[\]:]+:\d+")
log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int | None]:
    """``("local", N)`` for ``local:N``, else ``(scheduler_address, None)``; clear errors otherwise."""
    a = str(address).strip()
    m = _LOCAL.fullmatch(a)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise DaskAddressError(
                f"dask={address!r} asks for {n} workers; expected local:N with N >= 1. Fix: pass e.g. local:2."
            )
        return "local", n
    if "://" in a:
        return a, None
    if _HOST_PORT.fullmatch(a):
        return f"tcp://{a}", None
    raise DaskAddressError(
        f"dask={address!r} is not a Dask address; expected 'local:N' (a local cluster of N workers) or a "
        f"scheduler address such as 'tcp://host:8786'. Fix: pass one of those."
    )


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _worker_folder_name(host: str, name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", f"dask-{host}-{name}")


class KeopsWorkerFolder(WorkerPlugin):
    """Dask worker plugin: give each worker its own KeOps cache folder (``VQ_KEOPS_WORKER``).

    Set before the worker runs a task, so before KeOps is imported there. A worker restarted under
    the same name reuses its folder (the old process is gone, so nothing clashes).
    """

    name = "vq-keops-worker-folder"
    idempotent = True

    def setup(self, worker: Any) -> None:
        os.environ["VQ_KEOPS_WORKER"] = _worker_folder_name(socket.gethostname(), worker.name)

    def teardown(self, worker: Any) -> None:  # noqa: D102 - nothing to undo
        pass


def _register_worker_plugin(client: Any) -> None:
    client.register_plugin(KeopsWorkerFolder(), name=KeopsWorkerFolder.name)


@contextlib.contextmanager
def dask_cluster(address: str) -> Iterator[str]:
    """Yield a scheduler address for ``address``: a LocalCluster for ``local:N`` (stopped on exit), else itself."""
    kind, n = parse_address(address)
    if kind != "local":
        yield kind
        return
    from distributed import LocalCluster

    assert n is not None
    threads = str(max(1, (os.cpu_count() or 1) // n))
    with LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=logging.WARNING,
        # Coarse tasks (one file each): one at a time per worker, torch spreads it over its cores.
        env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    ) as cluster:
        yield cluster.scheduler_address


def worker_api_url(scheduler: str) -> str:
    """The Prefect API URL the workers of ``scheduler`` should use.

    ``PREFECT_API_URL`` when set; otherwise the URL of the temporary server this process's flow
    runs against (workers on the same host can reach it). A loopback URL is refused for a
    scheduler on another host: its workers could not reach it.
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        ctx = FlowRunContext.get()
        url = str(ctx.client.api_url) if ctx is not None and ctx.client is not None else None
    if not url:
        raise ConfigurationError(
            "no Prefect API URL for the Dask workers; expected PREFECT_API_URL or a running flow. "
            "Fix: set PREFECT_API_URL to a Prefect server the workers can reach."
        )
    api_host = urlparse(url).hostname
    sched_host = urlparse(scheduler).hostname if "://" in scheduler else None
    if _is_loopback(api_host) and sched_host is not None and not _is_loopback(sched_host):
        raise ConfigurationError(
            f"the Prefect API is at {url}, on this machine's loopback, but the Dask scheduler {scheduler} is on "
            f"another host whose workers cannot reach it; expected a server the workers can reach. Fix: start "
            f"`prefect server start --host 0.0.0.0` (or use Prefect Cloud) and set PREFECT_API_URL to its URL."
        )
    return url.rstrip("/")


@contextlib.contextmanager
def dask_task_runner(address: str) -> Iterator[Any]:
    """A started ``DaskTaskRunner`` on ``address`` (``local:N`` starts a cluster), for use inside a flow.

    Tasks submitted through it (``runner.submit(task, parameters={...})``) carry the Prefect settings
    with the API URL from :func:`worker_api_url`, so workers report to the flow's server. Every
    worker gets its own KeOps cache folder.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    with dask_cluster(address) as scheduler:
        url = worker_api_url(scheduler)
        with temporary_settings({PREFECT_API_URL: url}), DaskTaskRunner(address=scheduler) as runner:
            _register_worker_plugin(runner.client)
            yield runner


# ----------------------------------------------------------------------------- a Prefect server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def prefect_server(host: str = "127.0.0.1", port: int | None = None, *, timeout: float = 120.0) -> Iterator[str]:
    """Run ``prefect server start`` in a throwaway ``PREFECT_HOME``; yield its API URL; stop it on exit.

    The server listens on ``host`` (loopback by default: only this machine's workers reach it) and
    keeps its database in a temporary folder removed afterwards. Analytics and the UI are off.
    """
    port = port or free_port(host)
    home = Path(tempfile.mkdtemp(prefix="vq-prefect-server-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    url = f"http://{host}:{port}/api"
    log_file = open(home / "server.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (home / "server.log").read_text(errors="replace")[-2000:]
                raise ConfigurationError(
                    f"`prefect server start` on {host}:{port} did not become healthy within {timeout:g} s "
                    f"(exit code {proc.poll()}); its log ends with:\n{tail}"
                )
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(Exception):  # send this process's queued run logs while the server is up
            from prefect.logging.handlers import APILogHandler

            APILogHandler.flush()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log_file.close()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def prefect_api_for(address: str) -> Iterator[str | None]:
    """Make sure a run on ``address`` has a Prefect server its workers can reach.

    With ``PREFECT_API_URL`` set, use it. Otherwise, for ``local:N`` or a scheduler on this
    machine's loopback, start a temporary server (:func:`prefect_server`) and point this process at
    it for the duration; for a remote scheduler, refuse with the fix.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    kind, _ = parse_address(address)
    if kind != "local" and not _is_loopback(urlparse(kind).hostname):
        raise ConfigurationError(
            f"dask={address!r} is a remote cluster and PREFECT_API_URL is not set; expected a Prefect server its "
            f"workers can reach. Fix: export PREFECT_API_URL=http://<server>:4200/api (prefect server start "
            f"--host 0.0.0.0, or Prefect Cloud)."
        )
    with prefect_server() as url, temporary_settings({PREFECT_API_URL: url}):
        yield url


__all__ = [
    "DaskAddressError",
    "KeopsWorkerFolder",
    "dask_cluster",
    "dask_task_runner",
    "parse_address",
    "prefect_api_for",
    "prefect_server",
    "worker_api_url",
]
