"""The scheduled pipeline's decisions, as plain library functions (vq_pipeline.jobs.run_plan): hand-built
cases with the answers written out, no Prefect needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_parts

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.jobs.run_plan import fired_reason, first_action, refit_decision, with_alignment
from vq_pipeline.jobs.scheduled import run_once
from vq_pipeline.settings import PipelineSettings

CURRENT = {"metric": "l2", "n_codes": 8, "path": "/w/codebooks/aaa.safetensors", "fingerprint": "a" * 64}


@pytest.mark.parametrize(
    "current, metric, n_codes, expected",
    [
        (None, "l2", 8, ("fit", "no current codebook")),
        (CURRENT, "l2", 8, ("none", None)),
        (CURRENT, "cosine", 8, ("fit", "settings changed (metric l2 → cosine, n_codes 8 → 8)")),
        (CURRENT, "l2", 16, ("fit", "settings changed (metric l2 → l2, n_codes 8 → 16)")),
    ],
)
def test_first_action(current, metric: str, n_codes: int, expected) -> None:
    assert first_action(current, metric=metric, n_codes=n_codes) == expected


def test_fired_reason_joins_the_fired_rules_only() -> None:
    checks = [
        {"rule": "schedule", "fired": True, "reason": "schedule: 170 h old"},
        {"rule": "distortion", "fired": False, "reason": None},
        {"rule": "usage", "fired": True, "reason": "usage: 0.3 bits"},
    ]
    assert fired_reason(checks) == "schedule: 170 h old; usage: 0.3 bits"
    assert fired_reason([{**c, "fired": False} for c in checks]) is None


def test_a_refit_that_reproduces_the_codebook_keeps_its_pointer() -> None:
    current = {**CURRENT, "reason": "no current codebook", "since": "2026-11-01T00:00:00+00:00"}
    same = {"path": "/w/codebooks/aaa.safetensors", "fingerprint": "a" * 64}
    assert refit_decision(current, same, "schedule: due") == (
        "refit-unchanged",
        {"path": current["path"], "fingerprint": "a" * 64, "reason": "no current codebook", "since": current["since"]},
    )
    other = {"path": "/w/codebooks/bbb.safetensors", "fingerprint": "b" * 64}
    assert refit_decision(current, other, "schedule: due") == (
        "refit",
        {"path": other["path"], "fingerprint": "b" * 64, "reason": "schedule: due"},
    )


def test_with_alignment_takes_the_aligned_codebook() -> None:
    fit = {"path": "/w/codebooks/bbb.safetensors", "fingerprint": "b" * 64, "n_codes": 8}
    aligned = {"path": "/w/codebooks/ccc.safetensors", "fingerprint": "c" * 64, "kept": 0.9}
    assert with_alignment(fit, aligned) == {**fit, "path": aligned["path"], "fingerprint": "c" * 64}


def test_run_once_refuses_a_work_dir_inside_the_inputs_and_bad_settings_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(InvalidInputError, match="work_dir"):
        run_once(tmp_path / "in", tmp_path / "in" / "work", PipelineSettings("embedding", 8))
    assert not (tmp_path / "in" / "work").exists()
    with pytest.raises(InvalidInputError, match="drift_threshold=-1"):
        PipelineSettings("embedding", 8, drift_threshold=-1)
    with pytest.raises(InvalidInputError, match="engine='gpu'"):
        PipelineSettings("embedding", 8, engine="gpu")
    with pytest.raises(InvalidInputError, match="usage_threshold=1.5"):
        PipelineSettings("embedding", 8, usage_threshold=1.5)


CRON = """
import json, sys
from vq_pipeline.jobs.scheduled import run_once
from vq_pipeline.settings import PipelineSettings
summary = run_once(sys.argv[1], sys.argv[2], PipelineSettings("embedding", 8, id_column="id"))
print(json.dumps({"action": summary["action"], "encoded": summary["encode"][-1]["encoded"],
                  "report": summary["report"], "prefect": "prefect" in sys.modules}))
"""


def test_a_cron_script_runs_the_scheduled_job_without_prefect(tmp_path: Path) -> None:
    """run_once is the whole scheduled run: a plain Python process fits and encodes, then finds nothing
    to do, writing a report each time, and never imports Prefect."""
    write_parts(tmp_path / "in", {"date=2026-11-01/part-0.parquet": 300, "date=2026-11-02/part-0.parquet": 200}, dim=6)
    argv = [sys.executable, "-c", CRON, str(tmp_path / "in"), str(tmp_path / "work")]
    runs = []
    for _ in range(2):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["action"] for r in runs] == ["fit", "none"]
    assert runs[0]["encoded"] == ["date=2026-11-01/part-0.parquet", "date=2026-11-02/part-0.parquet"]
    assert runs[1]["encoded"] == [] and not any(r["prefect"] for r in runs)
    assert all(Path(r["report"]).is_file() and Path(r["report"]).with_suffix(".json").is_file() for r in runs)
