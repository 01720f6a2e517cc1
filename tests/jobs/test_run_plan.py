"""The scheduled pipeline's decisions, as plain library functions (vq_pipeline.jobs.run_plan): hand-built
cases with the answers written out, no Prefect needed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import write_parts
from hypothesis import given, settings

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.jobs.encode_state import state_dir
from vq_pipeline.jobs.run_plan import (
    encode_settings_change,
    fired_reason,
    first_action,
    refit_decision,
    with_alignment,
)
from vq_pipeline.jobs.scheduled import check_run, run_once
from vq_pipeline.settings import EncodeSettings, PipelineSettings

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


# ----------------------------------------------------------------------------- deploy-time checks (check_run)


def _settings_dicts():
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        {
            "column": st.sampled_from(["embedding", "e"]),
            "id_column": st.sampled_from([None, "id"]),
            "top_k": st.integers(1, 3),
            "with_distance": st.booleans(),
            "code_dtype": st.sampled_from([None, "uint8", "uint32", "int64"]),
            "beam": st.integers(1, 2),
        }
    )


@settings(max_examples=200, deadline=None)
@given(a=_settings_dicts(), b=_settings_dicts())
def test_encode_settings_change_names_exactly_the_fields_that_differ(a, b) -> None:
    """Against the settings objects themselves: equal to_dict() is no change; otherwise the change names
    each differing field with its two values (a field at its default, left out of to_dict(), included)."""
    old, new = EncodeSettings(**a), EncodeSettings(**b)
    change = encode_settings_change(old.to_dict(), new.to_dict())
    assert change == {k: (a[k], b[k]) for k in sorted(a) if a[k] != b[k]}
    assert (change == {}) == (old.to_dict() == new.to_dict())


def test_check_run_refuses_what_every_run_would_refuse_and_writes_nothing(tmp_path: Path) -> None:
    """Each refusal of check_run is run_once's own (the same message), made before anything is written."""
    root = tmp_path / "in"
    write_parts(root, {"date=2026-11-01/part-0.parquet": 400}, dim=6)
    (tmp_path / "file").write_text("x")
    cases = [
        (root, root / "work", PipelineSettings("embedding", 8), "inside the input folder"),
        (tmp_path / "later", tmp_path / "later" / "work", PipelineSettings("embedding", 8), "does not exist yet"),
        (root, tmp_path / "file", PipelineSettings("embedding", 8), "is a file"),
        (root, tmp_path / "w1", PipelineSettings("embedding", 300, code_dtype="uint8"), "holds codes up to 255"),
        (root, tmp_path / "w2", PipelineSettings("embedding", 8, sample=4), "sample=4 with n_codes=8"),
    ]
    before = sorted(p for p in tmp_path.rglob("*"))
    for input_root, work_dir, settings_, fragment in cases:
        with pytest.raises(InvalidInputError, match=re.escape(fragment)) as checked:
            check_run(input_root, work_dir, settings_)
        with pytest.raises(InvalidInputError) as ran:
            run_once(input_root, work_dir, settings_)
        assert str(ran.value) == str(checked.value) and "Fix:" in str(checked.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    check_run(root, tmp_path / "work", PipelineSettings("embedding", 8))  # a good deployment passes


def test_another_code_dtype_on_a_work_dir_gives_a_fix_the_pipeline_can_apply(tmp_path: Path) -> None:
    """A second run with another code_dtype is refused, by check_run and run_once alike, with fixes the
    pipeline's user has (no --overwrite, which the pipeline lacks); each fix then works."""
    root, work = tmp_path / "in", tmp_path / "work"
    write_parts(root, {"date=2026-11-01/part-0.parquet": 300, "date=2026-11-02/part-0.parquet": 200}, dim=6)
    first = run_once(root, work, PipelineSettings("embedding", 8, id_column="id"))
    wider = PipelineSettings("embedding", 8, id_column="id", code_dtype="uint32")
    with pytest.raises(InvalidInputError) as checked:
        check_run(root, work, wider)
    with pytest.raises(InvalidInputError) as ran:
        run_once(root, work, wider)
    message = str(ran.value)
    assert message == str(checked.value) and "--overwrite" not in message and "overwrite=True" not in message
    codes, state = first["codes_dir"], str(state_dir(first["codes_dir"]))
    assert f"codes_dir={codes!r} holds codes written with other encode settings (code_dtype None → 'uint32')" in message
    assert f"Fix: run with code_dtype=None again; or, to encode every table anew with the new settings, delete {codes} and {state}" in message
    # Fix 1: the settings the folder was written with.
    assert run_once(root, work, PipelineSettings("embedding", 8, id_column="id"))["action"] == "none"
    # Fix 2: delete the codes folder and its bookkeeping; the next run encodes every table with the new settings.
    shutil.rmtree(codes)
    shutil.rmtree(state)
    again = run_once(root, work, wider)
    assert again["fingerprint"] == first["fingerprint"] and again["codes_dir"] == codes
    assert pl.read_parquet(Path(codes) / "**" / "*.parquet").schema["code"] == pl.UInt32
    assert sorted(again["encode"][0]["encoded"]) == ["date=2026-11-01/part-0.parquet", "date=2026-11-02/part-0.parquet"]
    # Fix 3: a new work_dir.
    assert run_once(root, tmp_path / "work2", PipelineSettings("embedding", 8, id_column="id", code_dtype="int64"))["action"] == "fit"


def test_a_balanced_pipeline_caps_its_codes_and_a_change_of_balance_refits(tmp_path: Path) -> None:
    from vq_pipeline.codebook import Codebook
    from vq_pipeline.compute.balanced import code_cap

    write_parts(tmp_path / "in", {"day=1/part-0.parquet": 1200}, dim=8, n_topics=3)
    common = dict(id_column="id", usage_threshold=None, drift_threshold=10.0, refit_every_hours=None, seed=0)
    balanced = PipelineSettings("embedding", 8, balance=0.05, **common)
    first = run_once(tmp_path / "in", tmp_path / "work", balanced)
    cb = Codebook.load(first["codebook"])
    assert first["action"] == "fit" and cb.settings["balance"] == 0.05
    assert int(cb.counts.sum()) == 1200 and int(cb.counts.max()) <= code_cap(1200, 8, 0.05) == 158
    again = run_once(tmp_path / "in", tmp_path / "work", balanced)
    assert again["action"] == "none", again["reason"]
    plain = run_once(tmp_path / "in", tmp_path / "work", PipelineSettings("embedding", 8, **common))
    assert plain["action"] == "fit" and "balance 0.05 → None" in plain["reason"]
    unbalanced = Codebook.load(plain["codebook"])
    assert "balance" not in unbalanced.settings and int(unbalanced.counts.max()) > 158  # the cap binds
    with pytest.raises(InvalidInputError, match=r"balance=-1.*Fix"):
        PipelineSettings("embedding", 8, balance=-1)
