"""The scheduled pipeline's decisions, as plain library functions (vq_pipeline.run_plan): hand-built
cases with the answers written out, no Prefect needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.run_plan import check_run, fired_reason, first_action, refit_decision, with_alignment

GOOD = dict(metric="l2", seed=0, engine="auto", drift_threshold=0.25, usage_threshold=0.1)
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


def test_check_run_refuses_a_work_dir_inside_the_inputs_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(InvalidInputError, match="work_dir"):
        check_run(str(tmp_path / "in"), str(tmp_path / "in" / "work"), **GOOD)
    assert not (tmp_path / "in" / "work").exists()
    with pytest.raises(InvalidInputError, match="drift_threshold=-1"):
        check_run(str(tmp_path / "in"), str(tmp_path / "work"), **{**GOOD, "drift_threshold": -1})
    with pytest.raises(InvalidInputError, match="engine='gpu'"):
        check_run(str(tmp_path / "in"), str(tmp_path / "work"), **{**GOOD, "engine": "gpu"})
    check_run(str(tmp_path / "in"), str(tmp_path / "work"), **GOOD)
