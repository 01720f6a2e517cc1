"""Start-up and Ctrl-C of the ``vq`` command, in fresh processes (both depend on the process).

* What a command imports, from ``python -X importtime`` (it lists every module a process imports):
  ``vq --help``, ``vq --version`` and ``import vq_pipeline`` import neither torch, polars nor
  prefect; ``vq inspect`` imports torch (the codebook module needs it) but neither polars nor prefect.
* Ctrl-C (SIGINT) prints one ``interrupted`` line on stderr and exits 130, without a traceback:
  while torch is being imported, and while polars reads a table. The signal is sent once the child
  shows that it got there (an import line, or the bytes it has read), never after a fixed delay.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from vq_flows import cli

import vq_pipeline
from vq_pipeline import Codebook, runtime
from vq_pipeline.compute import seeding
from vq_pipeline.fitting import kmeans
from vq_pipeline.io.table_writer import write_embeddings

HEAVY = {"torch", "polars", "prefect"}
SCRIPT = Path(sys.executable).parent / "vq"
# Rows of the table read while Ctrl-C comes: 1,000,000 x 32 float32 (120 MB), read in small batches
# (about 4 s of polars queries here).
BIG_ROWS, BIG_DIM, BIG_BATCH = 1_000_000, 32, 8192


def command(*args: str, importtime: bool = False) -> list[str]:
    """The installed console script (when there is one) under this interpreter, else ``-m vq_flows.cli``."""
    flags = ["-X", "importtime"] if importtime else []
    entry = [str(SCRIPT)] if SCRIPT.exists() else ["-m", "vq_flows.cli"]
    return [sys.executable, *flags, *entry, *args]


def imported(stderr: str) -> set[str]:
    """Top-level names of the modules that a ``python -X importtime`` process imported."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines[1:]}  # lines[0]: the header


def other_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@pytest.fixture(scope="module")
def codebook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("startup") / "cb.safetensors"
    vq_pipeline.fit_codebook(x, 4, engine="torch").save(path)
    return path


# ----------------------------------------------------------------------------- start-up


def test_import_changes_no_environment_and_the_cli_sets_the_omp_waits() -> None:
    code = (
        "import os; os.environ.pop('OMP_WAIT_POLICY', None); os.environ.pop('GOMP_SPINCOUNT', None)\n"
        "before = dict(os.environ)\n"
        "import vq_pipeline, vq_pipeline.runtime\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "import vq_pipeline.codebook, vq_pipeline.jobs.encode_folder  # torch and polars set their own variables\n"
        "assert 'OMP_WAIT_POLICY' not in os.environ and 'GOMP_SPINCOUNT' not in os.environ\n"
        "import vq_flows.cli\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), vq_pipeline.VQError.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    # one of the two, by the CPU's pressure when the CLI starts
    assert proc.stdout in ("PASSIVE None VQError\n", f"None {runtime.OMP_SPIN_COUNT} VQError\n"), proc.stdout


def test_light_imports_load_nothing_heavy() -> None:
    argv = [sys.executable, "-X", "importtime", "-c", "import vq_pipeline, vq_flows.cli; vq_pipeline.VQError"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not HEAVY & imported(proc.stderr), sorted(HEAVY & imported(proc.stderr))


def test_first_heavy_name_sets_the_omp_waits_before_torch_loads() -> None:
    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); os.environ.pop('GOMP_SPINCOUNT', None)\n"
        "from vq_pipeline import fit_codebook\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout in ("PASSIVE None\n", f"None {runtime.OMP_SPIN_COUNT}\n"), proc.stdout


@pytest.mark.parametrize("chosen", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}])
def test_the_cli_keeps_the_users_omp_waits(chosen: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | chosen
    code = "import os, vq_flows.cli; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{chosen.get('OMP_WAIT_POLICY')} {chosen.get('GOMP_SPINCOUNT')}\n"


@pytest.mark.parametrize(
    ("pressure", "running", "cpus", "expected"),
    [
        (0.0, 5, 2, {"GOMP_SPINCOUNT": "100000"}),  # pressure decides when known: quiet
        (9.99, 0, 2, {"GOMP_SPINCOUNT": "100000"}),
        (10.0, 0, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),  # shared
        (85.0, 0, 16, {"OMP_WAIT_POLICY": "PASSIVE"}),
        (None, 1, 2, {"GOMP_SPINCOUNT": "100000"}),  # no PSI: runnable tasks against CPUs
        (None, 2, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
        (None, None, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),  # nothing known: the safe choice
    ],
)
def test_omp_waits_follow_the_cpu_pressure(pressure, running, cpus, expected) -> None:
    assert runtime.OMP_SPIN_COUNT == 100_000
    assert runtime.omp_wait_settings({}, pressure, running, cpus) == expected
    assert runtime.omp_wait_settings({"OMP_WAIT_POLICY": "PASSIVE"}, pressure, running, cpus) == {}
    assert runtime.omp_wait_settings({"GOMP_SPINCOUNT": "0"}, pressure, running, cpus) == {}


def test_public_names_resolve_on_first_use() -> None:
    from vq_pipeline import errors, settings

    assert set(vq_pipeline.__all__) == {
        "Codebook",
        "EncodeOptions",
        "EncodeSettings",
        "FitSettings",
        "PipelineSettings",
        "TableSettings",
        "InitProgress",
        "IterationStats",
        "MiniBatchState",
        "collision_stats",
        "collision_stats_table",
        "encode_tables",
        "fit_codebook",
        "fit_from_tables",
        "fit_minibatch",
        "hamming",
        "hamming_topk",
        "run_once",
        "suffix_table",
        "unique_suffix",
        *errors.__all__,
    }
    assert all(getattr(vq_pipeline, name) is not None for name in vq_pipeline.__all__)
    assert vq_pipeline.InitProgress is seeding.InitProgress and vq_pipeline.fit_codebook is kmeans.fit_codebook
    assert vq_pipeline.FitSettings is settings.FitSettings and vq_pipeline.EncodeSettings is settings.EncodeSettings
    assert set(vq_pipeline.__all__) <= set(dir(vq_pipeline))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vq_pipeline.nope  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["fit", "--help"], ["encode", "--help"]])
def test_help_and_version_import_nothing_heavy(argv: list[str]) -> None:
    proc = subprocess.run(command(*argv, importtime=True), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not HEAVY & imported(proc.stderr), sorted(HEAVY & imported(proc.stderr))
    if argv == ["--version"]:
        assert proc.stdout == f"vq {vq_pipeline.__version__}\n"
    elif len(argv) == 1:
        assert proc.stdout.startswith("usage: vq") and "--version" in proc.stdout and "inspect" in proc.stdout
    else:
        assert proc.stdout.startswith(f"usage: vq {argv[0]}") and "--column" in proc.stdout


def test_inspect_imports_neither_torch_nor_polars_nor_prefect(codebook: Path) -> None:
    argv = command("inspect", str(codebook), importtime=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not {"torch", "polars", "prefect"} & imported(proc.stderr)
    assert proc.stdout == cli.describe(Codebook.load(codebook), title=str(codebook)) + "\n"


# ----------------------------------------------------------------------------- Ctrl-C


def interrupt(argv: list[str], ready: Callable[[subprocess.Popen[str], str], bool]) -> tuple[int, str]:
    """Run ``argv``, send SIGINT once ``ready(process, stderr line)`` says so, and return (exit status, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if ready(proc, line):
                break
        else:
            pytest.fail(f"the command ended (status {proc.wait()}) before it was interrupted:\n{''.join(seen)}")
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        return proc.wait(timeout=600), "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_interrupted(status: int, stderr: str, *progress: str) -> None:
    """Exit 130 and, after the expected progress lines, one ``interrupted`` line, no traceback."""
    assert status == cli.EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert other_lines(stderr) == [*progress, "interrupted"], stderr


def test_ctrl_c_while_torch_is_imported(tmp_path: Path) -> None:
    table = tmp_path / "t.parquet"
    write_embeddings(table, np.arange(100), np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32))
    out = tmp_path / "cb.safetensors"
    argv = command("fit", str(table), "--column", "embedding", "--codes", "4", "--out", str(out), importtime=True)

    def importing_torch(proc: subprocess.Popen[str], line: str) -> bool:
        # importtime writes a module's line when it is imported: torch's submodules come while torch loads.
        return bool(re.search(r"\|\s+torch\.", line))

    status, stderr = interrupt(argv, importing_torch)
    assert_interrupted(status, stderr)
    assert not out.exists()


@pytest.fixture(scope="module")
def big_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = np.random.default_rng(1).standard_normal((BIG_ROWS, BIG_DIM), dtype=np.float32)
    return write_embeddings(tmp_path_factory.mktemp("big") / "big.parquet", np.arange(BIG_ROWS), x)


def bytes_read(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_ctrl_c_while_polars_reads_a_table(big_table: Path, tmp_path: Path) -> None:
    """Before the fix, polars cancelled its query with a KeyboardInterrupt and passed the signal on to
    Python, which raised a second one in the except clause: two tracebacks, exit by signal."""
    if not Path(f"/proc/{os.getpid()}/io").exists():
        pytest.skip("needs /proc/PID/io to see the child read")
    size = big_table.stat().st_size
    out = tmp_path / "cb.safetensors"
    argv = command(
        "fit",
        str(big_table),
        "--column",
        "embedding",
        "--codes",
        "16",
        "--init",
        "first",
        "--batch-rows",
        str(BIG_BATCH),
        "--out",
        str(out),
    )

    def reading(proc: subprocess.Popen[str], line: str) -> bool:
        if not line.startswith("reading "):
            return False
        # After the line: the table's fingerprint reads the file once, then polars reads it in batches.
        # Wait until polars has read half a table more than that, so that the signal comes mid-read.
        start = bytes_read(proc.pid)
        while proc.poll() is None and bytes_read(proc.pid) < start + 1.5 * size:
            time.sleep(0.005)
        return True

    status, stderr = interrupt(argv, reading)
    assert_interrupted(status, stderr, f"reading {BIG_ROWS:,} rows (dim {BIG_DIM}) from 1 table")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no codebook, no checkpoint
