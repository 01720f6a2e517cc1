"""The GPU check script, run in its dry-run mode on the CPU, so it keeps working between GPU runs.

``GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh`` runs every step of the real check (environment,
KeOps self-check, the GPU tests with ``VQ_TEST_DEVICE=cpu``, ``gpu_bench.py --dry-run``) with tiny shapes;
~30-50 s on two cores with a warm KeOps cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vq_pipeline.compute.engines import keops

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
DRY_SHAPES = [(2_000, 2, 16), (5_000, 16, 32)]  # gpu_bench.DRY_SHAPES
METHODS = [
    "keops-tutorial",
    "ours keops",
    "ours keops, prune=True",
    "ours torch",
    "ours torch, prune=True",
    "ours torch, TF32",
    "cuBLAS floor",
    "cuBLAS floor, TF32",
]

pytestmark = [
    pytest.mark.slow,  # runs the GPU check script end to end on the CPU (make test-slow)
    pytest.mark.skipif(not keops.available(), reason="pykeops unavailable (the dry run compiles for the CPU)"),
]


def run_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "GPU_CHECK_PYTHON": sys.executable, **env}
    full.pop("VQ_TEST_DEVICE", None)
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-dry")
    return run_check(out), out


def test_dry_run_passes_and_writes_every_file(dry_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for name in (
        "gpu_check.log",
        "nvidia-smi.txt",
        "keops_check.txt",
        "pytest.txt",
        "gpu_bench.md",
        "gpu_bench.json",
        "summary.txt",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = (out / "summary.txt").read_text()
    assert "dry run: no GPU needed" in summary
    assert "FAIL" not in summary
    assert "carried wheels: resolve offline" in summary
    assert "keops cpu argmin mismatches: 0" in summary
    pytest_line = next(line for line in summary.splitlines() if line.startswith("pytest -m gpu:"))
    assert "rc=0" in pytest_line and " passed" in pytest_line and "skipped" not in pytest_line, pytest_line
    assert f"gpu_bench.py: rc=0 {len(DRY_SHAPES) * 2 * len(METHODS)} rows, 0 errors" in summary
    assert "done in" in (out / "gpu_check.log").read_text()


def test_dry_run_bench_json_has_every_row_exact(dry_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:]
    res = json.loads((out / "gpu_bench.json").read_text())
    assert res["dry_run"] is True and res["n_iter"] == 2
    seen = {(r["n"], r["dim"], r["k"], r["metric"], r["method"]) for r in res["rows"]}
    want = {(n, d, k, m, meth) for n, d, k in DRY_SHAPES for m in ("l2", "cosine") for meth in METHODS}
    assert seen == want and len(res["rows"]) == len(want)
    for r in res["rows"]:
        assert "error" not in r, r
        times = [r["ms_per_iter"], r["encode_rows_per_s"], *r["run_seconds"]]
        assert all(math.isfinite(t) and t > 0 for t in times), r
        mm = r["encode_mismatch"]  # against the float64 oracle, tie-aware
        assert mm["wrong"] == 0 and mm["decisive"] > 0.9 * r["n"], r
        if r["method"].startswith("ours"):  # rows skipped per pass: recorded with pruning only
            pruned = r["iteration_pruned"]
            assert (pruned is None) != r["method"].endswith("prune=True"), r
    assert (out / "gpu_bench.md").read_text().count("\n| ") == len(want) + 1  # the header and one line per row


def test_broken_steps_fail_the_dry_run(tmp_path: Path) -> None:
    # The same interpreter, but the GPU tests and the benchmark exit 3 at once: each step must be reported
    # as failed, the others still run, and the exit status is 1.
    fake = tmp_path / "python"
    fake.write_text(
        f"""#!/bin/sh
case "$*" in "-m pytest -m gpu"*|benchmarks/gpu_bench.py*) echo broken; exit 3;; esac
exec {sys.executable} "$@"
"""
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = run_check(out, GPU_CHECK_PYTHON=str(fake))
    assert proc.returncode == 1, proc.stdout[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "pytest -m gpu: rc=3" in summary and "FAIL gpu_bench.py rc=3" in summary
    assert "keops cpu argmin mismatches: 0" in summary  # the steps before still ran and passed


def test_no_python_with_torch_fails_the_dry_run(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = run_check(tmp_path / "out", GPU_CHECK_PYTHON=str(fake))
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "FAIL: no python with torch" in (tmp_path / "out" / "summary.txt").read_text()
