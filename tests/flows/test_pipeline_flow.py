"""The scheduled vq-pipeline flow: refit rules (code usage), the baseline run, per-work_dir report
artifacts, the ``codes/current`` link, the default metric, and state errors that are not retried.

Real flow runs on the session's Prefect test harness, on real parquet partitions (dim 12, 8 codes).
Run this file as a script to repeat the code-usage measurements behind ``DEFAULT_USAGE_THRESHOLD``::

    .venv/bin/python tests/flows/test_pipeline_flow.py
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import polars as pl
import pytest
import torch
from conftest import write_parts
from vq_flows.deploy import parse_args  # noqa: I001 - flows after the library
from vq_flows.encode import retry_transient
from vq_flows.pipeline import drift_artifact_key, report_artifact_key, vq_pipeline_flow

from vq_pipeline.errors import PipelineStateError
from vq_pipeline.jobs.workdir import CODES_LINK, CURRENT_NAME, codes_dir, refit_checks, refit_reason, usage_min_rows

from vq_pipeline import Codebook, VQError, fit_codebook
from vq_pipeline.io.fileio import temporary_name
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.io.tables import read_table
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.drift import drift_report
from vq_pipeline.settings import DEFAULT_METRIC, DEFAULT_USAGE_THRESHOLD, PipelineSettings

ROOT = Path(__file__).resolve().parents[2]
DIM, N_TOPICS, N_CODES = 12, 10, 8
PARTS = {
    "date=2026-11-01/part-0.parquet": 900,
    "date=2026-11-02/part-0.parquet": 700,
    "date=2026-11-03/part-0.parquet": 600,
}
BASELINE = "baseline: the codebook was fitted on these rows"


def make_parts(root: Path) -> int:
    write_parts(root, PARTS, dim=DIM, n_topics=N_TOPICS)
    return sum(PARTS.values())


def params(root: Path, work: Path, **extra: Any) -> dict[str, Any]:
    """The pipeline flow's arguments: the folders, and the settings with ``extra`` fields."""
    settings = PipelineSettings(**{"column": "embedding", "n_codes": N_CODES, "id_column": "id", **extra})
    return dict(input_root=str(root), work_dir=str(work), settings=settings)


def read_artifacts(**filters: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    if "key" in filters:
        f = ArtifactFilter(key=ArtifactFilterKey(any_=[filters["key"]]))
    else:
        f = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(filters["flow_run_id"])]))
    with get_client(sync_client=True) as client:
        return list(client.read_artifacts(artifact_filter=f))


def report_of(summary: dict[str, Any]) -> str:
    (artifact,) = [a for a in read_artifacts(flow_run_id=summary["flow_run_id"]) if a.key == summary["artifact_key"]]
    assert artifact.data == Path(summary["report"]).read_text()
    return artifact.data


def rules(summary: dict[str, Any]) -> dict[str, str]:
    return {c["rule"]: c["status"] for c in summary["refit_rules"]}


def shifted_rows(codebook: Codebook, n_rows: int, *, seed: int) -> np.ndarray:
    """Rows of the training mixture from the topics of 2 of the 8 codes, half from each: a topic shift
    at modest distortion (the pair whose rows' mean distance is nearest 1.1 x the training mean's),
    like the reported single-topic batch that moved code usage at a distortion ratio of 1.145."""
    x = generate_embeddings(20 * n_rows, DIM, N_TOPICS, seed=seed)
    codes, dist = codebook.encode(torch.from_numpy(x), return_distances=True)
    codes, dist = codes.numpy(), dist.numpy()
    train_mean = codebook.stats["inertia"] / codebook.counts.sum().item()
    ratio = [dist[codes == k].mean() / train_mean if (codes == k).sum() >= n_rows else np.inf for k in range(N_CODES)]
    pairs = [(a, b) for a in range(N_CODES) for b in range(a + 1, N_CODES)]
    a, b = min(pairs, key=lambda ab: abs((ratio[ab[0]] + ratio[ab[1]]) / 2 - 1.1))
    return np.concatenate([x[codes == a][: n_rows // 2], x[codes == b][: n_rows - n_rows // 2]])


# ----------------------------------------------------------------------------- 1. code usage as a refit rule


@pytest.mark.slow
def test_usage_rule_refits_on_a_topic_shift_that_distortion_misses(prefect_api, tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    n_train = make_parts(root)
    first = vq_pipeline_flow(**params(root, work))
    cb = Codebook.load(first["codebook"])

    # The training mixture again: the usage rule is evaluated (500 >= 100 rows) and does not fire.
    write_embeddings(
        root / "date=2026-11-04/part-0.parquet",
        np.arange(500) + 400_000,
        generate_embeddings(500, DIM, N_TOPICS, seed=7),
    )
    second = vq_pipeline_flow(**params(root, work))
    assert second["action"] == "none" and rules(second) == {
        "schedule": "not fired",
        "distortion": "not fired",
        "usage": "not fired",
    }
    assert second["drift"]["usage_divergence_excess"] < DEFAULT_USAGE_THRESHOLD / 2

    # Rows from 2 of the 8 codes' topics at a distortion ratio near 1.1: usage moves, distortion stays under 1.25.
    shifted = shifted_rows(cb, 400, seed=8)
    write_embeddings(root / "date=2026-11-05/part-0.parquet", np.arange(len(shifted)) + 500_000, shifted)
    third = vq_pipeline_flow(**params(root, work))
    drift = third["drift"]
    assert drift["rows"] == len(shifted) >= usage_min_rows(N_CODES) and 1.0 < drift["distortion_ratio"] <= 1.25, drift
    assert drift["usage_divergence_excess"] > DEFAULT_USAGE_THRESHOLD, drift
    assert third["action"] == "refit" and third["fired"] == ["usage"] and third["reason"].startswith("usage:"), third[
        "reason"
    ]
    assert rules(third) == {"schedule": "not fired", "distortion": "not fired", "usage": "fired"}
    assert Codebook.load(third["codebook"]).parent_fingerprint == cb.fingerprint
    assert third["params"]["usage_threshold"] == DEFAULT_USAGE_THRESHOLD

    report = report_of(third)
    rules_section = report.split("## Refit rules")[1].split("##")[0]
    assert "- distortion: distortion ratio > 1.25 (1 + drift_threshold)" in rules_section
    assert (
        f"- code usage: code-usage JS divergence above its finite-sample bias > {DEFAULT_USAGE_THRESHOLD:g} bits"
        in rules_section
    )
    assert "| code usage | **fired** |" in rules_section and "Fired: code usage." in rules_section
    # The refitted codebook's column is its baseline (it was fitted on these rows), not drift.
    assert third["drift_after_refit"]["baseline"] and third["drift_after_refit"][
        "baseline_rows"
    ] == n_train + 500 + len(shifted)
    assert "| distortion ratio (new / training) | " in report and " | baseline |" in report

    # The drift chart is redrawn by every run, from every run's summary so far, and linked from the report.
    chart = Path(third["drift_chart"])
    assert chart == work / "reports" / "drift.png" and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"drift over time (distortion, code usage, churn per run): `{chart}`" in report
    assert first["drift_chart"] == second["drift_chart"] == str(chart)
    from matplotlib.image import imread

    pixels = imread(chart)  # (h, w, channels): drawn, not a blank canvas
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.05

    # codes/current follows the refit.
    link = work / CODES_LINK
    assert os.readlink(link) == third["fingerprint"][:12]
    current = pl.scan_parquet(link).collect()
    assert current.height == n_train + 500 + len(shifted)
    assert (
        current.sort("id")["code"].to_list()
        == pl.scan_parquet(codes_dir(work, third["fingerprint"])).collect().sort("id")["code"].to_list()
    )


def test_refit_checks_usage_rule() -> None:
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
    base = dict(
        created_at=(now - dt.timedelta(hours=1)).isoformat(),
        last_fit_at=None,
        now=now,
        refit_every_hours=168,
        drift_threshold=0.25,
        usage_threshold=0.1,
    )
    drift = dict(
        rows=5000,
        n_codes=64,
        distortion_ratio=1.1,
        usage_divergence=0.30,
        usage_divergence_expected=0.004,
        baseline=False,
    )
    reason = refit_reason(drift=drift, **base)
    assert reason.startswith("usage:") and "0.296 > usage_threshold (0.1)" in reason, reason
    # The bias is subtracted: the same divergence with a large expected value does not fire.
    assert refit_reason(drift={**drift, "usage_divergence_expected": 0.25}, **base) is None
    # Too few rows for the bias estimate (fewer than max(100, 5 * n_codes)): not evaluated, whatever the divergence.
    assert usage_min_rows(64) == 320 and usage_min_rows(8) == 100
    (usage,) = [c for c in refit_checks(drift={**drift, "rows": 319}, **base) if c["rule"] == "usage"]
    assert usage["status"] == "not evaluated" and not usage["fired"] and usage["value"] == "319 rows pending < 320"
    # Off.
    assert refit_reason(drift=drift, **{**base, "usage_threshold": None}) is None
    # Both drift rules fire together, and both are named.
    both = refit_reason(drift={**drift, "distortion_ratio": 1.5}, **base)
    assert both.startswith("drift:") and "; usage:" in both
    # A baseline (the rows the codebook was fitted on) evaluates nothing, not even a due schedule.
    checks = refit_checks(
        drift={"baseline": True, "note": BASELINE, "n_codes": 64, "rows": 0}, **{**base, "refit_every_hours": 0}
    )
    assert [c["status"] for c in checks] == ["not evaluated"] * 3 and {c["value"] for c in checks} == {"baseline"}


def test_usage_divergence_bias_matches_batches_of_the_training_distribution() -> None:
    """The expected JS of an unshifted batch (the bias the usage rule subtracts) is what batches of
    the training mixture score on average, from 5 rows per code on."""
    cb = fit_codebook(generate_embeddings(20_000, 64, 48, seed=1), 64, seed=0, engine="torch")
    for n in (320, 1280, 5000):
        reports = [drift_report(cb, [_receipt(cb, generate_embeddings(n, 64, 48, seed=100 + r))]) for r in range(8)]
        expected = reports[0]["usage_divergence_expected"]
        mean = float(np.mean([r["usage_divergence"] for r in reports]))
        assert expected == pytest.approx(mean, rel=0.25), (n, expected, mean)
        assert max(r["usage_divergence_excess"] for r in reports) < DEFAULT_USAGE_THRESHOLD / 3
        assert expected == pytest.approx(63 / (8 * np.log(2)) * (1 / n + 1 / 20_000))


def _receipt(cb: Codebook, x: np.ndarray) -> dict[str, Any]:
    """What an encode receipt carries for drift: rows, distance sum, code counts."""
    codes, dist = cb.encode(torch.from_numpy(x), return_distances=True, engine="torch")
    counts = np.bincount(codes.numpy(), minlength=cb.n_codes)
    return {"rows": len(x), "distance_sum": float(dist.double().sum()), "code_counts": counts.tolist()}


# ----------------------------------------------------------------------------- 2. the baseline run


@pytest.mark.slow
def test_first_run_reports_a_baseline_not_drift(prefect_api, tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    n_rows = make_parts(root)
    # Rules that would fire on anything if they were evaluated: a due schedule, zero thresholds.
    first = vq_pipeline_flow(**params(root, work, refit_every_hours=0, drift_threshold=0.0, usage_threshold=0.0))
    assert first["action"] == "fit" and first["reason"] == "no current codebook" and first["fired"] == []
    drift = first["drift"]
    assert drift["baseline"] and drift["note"] == BASELINE and drift["rows"] == 0 and drift["baseline_rows"] == n_rows
    assert drift["distortion_ratio"] is None and drift["usage_divergence"] is None and drift["codes_used"] == N_CODES
    assert set(rules(first).values()) == {"not evaluated"}
    saved = json.loads(Path(first["report"]).with_suffix(".json").read_text())
    assert saved["drift"]["note"] == BASELINE and saved["drift"]["distortion_ratio"] is None

    report = report_of(first)
    assert "## Baseline" in report and f"Baseline: the codebook was fitted on these rows ({n_rows} rows" in report
    assert "distortion ratio (new / training)" not in report and "## Drift" not in report
    assert f"No rule was evaluated: this run fitted the codebook ({BASELINE})." in report

    # The next run measures drift for real, on its new rows only.
    write_embeddings(
        root / "date=2026-11-04/part-0.parquet",
        np.arange(300) + 400_000,
        generate_embeddings(300, DIM, N_TOPICS, seed=5),
    )
    second = vq_pipeline_flow(**params(root, work))
    assert (
        not second["drift"]["baseline"] and second["drift"]["rows"] == 300 and second["drift"]["distortion_ratio"] > 0
    )
    assert "## Drift of the newly encoded rows" in report_of(second) and BASELINE not in report_of(second)


# ----------------------------------------------------------------------------- 3. artifact keys per work_dir


@pytest.mark.slow
def test_report_artifacts_are_keyed_per_work_dir(prefect_api, tmp_path: Path) -> None:
    root, work_a, work_b = tmp_path / "in", tmp_path / "work-a", tmp_path / "work-b"
    make_parts(root)
    runs = [
        vq_pipeline_flow(**params(root, work_a)),
        vq_pipeline_flow(**params(root, work_b)),
        vq_pipeline_flow(**params(root, work_a)),
    ]
    key_a, key_b = report_artifact_key(work_a), report_artifact_key(work_b)
    assert key_a != key_b and [r["artifact_key"] for r in runs] == [key_a, key_b, key_a]
    for work, key in ((work_a, key_a), (work_b, key_b)):
        assert re.fullmatch(r"vq-pipeline-report-[0-9a-f]{10}", key)
        assert key == "vq-pipeline-report-" + hashlib.sha256(str(work.absolute()).encode()).hexdigest()[:10]
    history_a, history_b = read_artifacts(key=key_a), read_artifacts(key=key_b)
    assert len(history_a) == 2 and len(history_b) == 1
    assert all(f"work_dir: `{work_a}`" in a.data and str(work_b) not in a.data for a in history_a)
    assert f"work_dir: `{work_b}`" in history_b[0].data and str(work_a) not in history_b[0].data
    assert {str(a.flow_run_id) for a in history_a} == {runs[0]["flow_run_id"], runs[2]["flow_run_id"]}


@pytest.mark.slow
def test_drift_history_is_a_table_artifact(prefect_api, tmp_path: Path) -> None:
    root, work, other = tmp_path / "in", tmp_path / "work", tmp_path / "other"
    make_parts(root)
    first = vq_pipeline_flow(**params(root, work))
    write_embeddings(
        root / "date=2026-11-04/source=a/part-0.parquet",
        np.arange(60) + 400_000,
        generate_embeddings(60, DIM, N_TOPICS, seed=7),
    )
    second = vq_pipeline_flow(**params(root, work))
    vq_pipeline_flow(**params(root, other))  # another work_dir: another history
    key = drift_artifact_key(work)
    assert re.fullmatch(r"vq-pipeline-drift-[0-9a-f]{10}", key) and key != drift_artifact_key(other)
    history = sorted(read_artifacts(key=key), key=lambda a: a.created)
    assert [a.type for a in history] == ["table", "table"]
    assert [str(a.flow_run_id) for a in history] == [first["flow_run_id"], second["flow_run_id"]]
    latest = history[-1].data
    table = json.loads(latest) if isinstance(latest, str) else latest
    assert [row["action"] for row in table] == ["fit", "none"]
    assert [row["new rows"] for row in table] == ["baseline", "60"]
    assert table[1]["distortion"] == f"{second['drift']['distortion_ratio']:.3f}"
    # 60 new rows are too few for the usage rule (100 at 8 codes): pending, not judged.
    assert table[1]["usage excess"] == "—" and table[1]["pending"] == "60" and table[1]["fired"] == "—"
    assert "Code usage: 60 rows pending (from 1 run, since" in report_of(second)


# ----------------------------------------------------------------------------- 4. codes/current


@pytest.mark.slow
def test_codes_current_is_a_relative_symlink_to_the_current_codes(prefect_api, tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    n_rows = make_parts(root)
    first = vq_pipeline_flow(**params(root, work))
    link, fp12 = work / CODES_LINK, first["fingerprint"][:12]
    assert link.is_symlink() and os.readlink(link) == fp12 and first["codes_link"] == str(link)
    pointer = json.loads((work / CURRENT_NAME).read_text())
    assert pointer["codes_link"] == CODES_LINK and pointer["codes"] == f"codes/{fp12}"
    codes = pl.scan_parquet(work / "codes" / "current").collect()
    assert codes.height == n_rows and codes["id"].n_unique() == n_rows
    by_file = pl.concat(
        [read_table(codes_dir(work, first["fingerprint"]) / key).select("id", "code") for key in sorted(PARTS)]
    )
    assert codes.select("id", "code").sort("id").equals(by_file.sort("id"))
    assert sorted(p.name for p in link.parent.iterdir()) == sorted([fp12, f"{fp12}.vq", "current"])  # no temporaries

    # A work_dir whose link went missing (or predates it) gets it back; a crashed switch's temporary is replaced.
    link.unlink()
    leftover = link.with_name(temporary_name(link))
    os.symlink("nowhere", leftover)
    vq_pipeline_flow(**params(root, work))
    assert os.readlink(link) == fp12 and not leftover.is_symlink()
    assert pl.scan_parquet(link).collect().height == n_rows


# ----------------------------------------------------------------------------- 5. one default metric


def test_flow_and_deployment_default_to_the_library_metric(prefect_api, tmp_path: Path) -> None:
    assert DEFAULT_METRIC == "l2"
    assert PipelineSettings("embedding", 8).metric == DEFAULT_METRIC
    _, _, deployed = parse_args(
        [
            "--cron",
            "0 * * * *",
            "--input-root",
            str(tmp_path / "in"),
            "--work-dir",
            str(tmp_path / "work"),
            "--column",
            "embedding",
            "--codes",
            "16",
        ]
    )
    settings = deployed["settings"]
    assert settings["metric"] == DEFAULT_METRIC and settings["usage_threshold"] == DEFAULT_USAGE_THRESHOLD
    assert (
        parse_args(
            [
                "--cron",
                "0 * * * *",
                "--input-root",
                "i",
                "--work-dir",
                "w",
                "--column",
                "e",
                "--codes",
                "4",
                "--usage-threshold",
                "off",
            ]
        )[2]["settings"]["usage_threshold"]
        is None
    )
    root, work = tmp_path / "in", tmp_path / "work"
    make_parts(root)
    summary = vq_pipeline_flow(**params(root, work))
    assert Codebook.load(summary["codebook"]).metric == DEFAULT_METRIC and summary["params"]["metric"] == DEFAULT_METRIC

    # The demo chooses cosine on purpose and must say so.
    tree = ast.parse((ROOT / "flows" / "demo.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "PipelineSettings"]
    assert calls and all("metric" in {k.arg for k in c.keywords} for c in calls)


def test_deploy_help_names_the_default_metric(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: l2, vq_pipeline.PipelineSettings.metric" in text and "--usage-threshold" in text


# ----------------------------------------------------------------------------- 6. state errors are not retried


def test_a_current_json_pointing_at_a_missing_codebook_fails_at_once(prefect_api, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    root, work = tmp_path / "in", tmp_path / "work"
    make_parts(root)
    (work / "codebooks").mkdir(parents=True)
    (work / CURRENT_NAME).write_text(
        json.dumps({"codebook": "codebooks/0123456789ab.safetensors", "fingerprint": "0123456789ab" * 5})
    )
    assert issubclass(PipelineStateError, VQError) and issubclass(PipelineStateError, RuntimeError)

    state = vq_pipeline_flow(**params(root, work), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PipelineStateError) and "codebook='codebooks/0123456789ab.safetensors'" in str(error)
    assert "Fix:" in str(error)
    # Task runs reach the API through an events worker, a moment after the flow returns: poll for them.
    deadline, reads = time.monotonic() + 600, []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        reads = [t for t in task_runs if t.name.startswith("read-current-codebook")]
        if reads and reads[0].state is not None and reads[0].state.is_final():
            break
        time.sleep(0.5)
    (read,) = reads
    assert read.run_count == 1 and read.state.is_failed()
    assert not retry_transient(None, None, state)  # the policy itself says: do not retry

    (work / CURRENT_NAME).write_text("{not json")
    with pytest.raises(PipelineStateError, match="Fix:"):
        vq_pipeline_flow(**params(root, work))


# ----------------------------------------------------------------------------- measurements


@pytest.mark.slow
def test_pinned_code_dtype_reaches_the_codes_and_the_deployment(prefect_api, tmp_path: Path) -> None:
    make_parts(tmp_path / "in")
    vq_pipeline_flow(**params(tmp_path / "in", tmp_path / "work", code_dtype="int64"))
    codes = pl.read_parquet(tmp_path / "work" / CODES_LINK / "**" / "*.parquet")
    assert codes.schema["code"] == pl.Int64 and codes.height == sum(PARTS.values())
    _, _, deployed = parse_args(
        ["--cron", "0 * * * *", "--input-root", "in", "--work-dir", "work", "--column", "e", "--codes", "8", "--code-dtype", "uint32"]
    )
    assert deployed["settings"]["code_dtype"] == "uint32"


# ----------------------------------------------------------------------------- 7. stable code numbers


def blob_parts(root: Path) -> np.ndarray:
    """12 well-separated blobs in dim 12 (centres 6 e_k, noise 0.5), 2,400 rows in 3 partitions;
    returns each row's blob, indexed by id."""
    rng = np.random.default_rng(0)
    blob = rng.integers(12, size=2400)
    x = (6 * np.eye(12)[blob] + 0.5 * rng.standard_normal((2400, 12))).astype(np.float32)
    for i in range(3):
        write_embeddings(root / f"date=2026-12-0{i + 1}/part-0.parquet", np.arange(800 * i, 800 * (i + 1)), x[800 * i : 800 * (i + 1)])
    return blob


def codes_by_id(folder: Path) -> np.ndarray:
    return pl.scan_parquet(folder).collect().sort("id")["code"].to_numpy().astype(np.int64)


@pytest.mark.slow
def test_a_refit_keeps_the_codes_of_unchanged_rows(prefect_api, tmp_path: Path) -> None:
    """12 codes on 12 blobs, then a cold fit of 13 codes (another seed): it splits one blob and,
    numbered as fitted, would give most rows another code. Renumbered to agree with the codebook it
    replaces, every row of the 11 blobs that kept their cell keeps its code; only half of the split
    blob (the rows beyond the boundary that moved) changes."""
    root, work = tmp_path / "in", tmp_path / "work"
    blob = blob_parts(root)
    first = vq_pipeline_flow(**params(root, work, n_codes=12))
    assert first["alignment"] is None
    second = vq_pipeline_flow(**params(root, work, n_codes=13, seed=1))
    assert second["action"] == "fit" and second["reason"].startswith("settings changed")
    a = second["alignment"]
    assert a["aligned"] and a["method"] == "cooccurrence" and a["rows"] == 2400 and a["reference"] == first["fingerprint"]
    assert a["kept_unaligned"] < 0.25, a  # a cold refit renumbers: without the alignment most codes change
    assert a["fingerprint"] == second["fingerprint"] and a["path"] == second["codebook"]
    cb = Codebook.load(second["codebook"])
    assert cb.stats["alignment"]["reference"] == first["fingerprint"] and cb.n_codes == 13

    before, after = codes_by_id(codes_dir(work, first["fingerprint"])), codes_by_id(codes_dir(work, second["fingerprint"]))
    changed = before != after
    per_blob = np.bincount(blob[changed], minlength=12)
    assert (per_blob == 0).sum() == 11, per_blob  # 11 blobs keep every code
    split = int(np.argmax(per_blob))
    assert 0 < per_blob[split] < (blob == split).sum() and len(set(before[blob == split])) == 1
    assert a["kept"] == pytest.approx(1 - changed.mean()) and a["churn"] == pytest.approx(changed.mean()) and a["kept"] > 0.9
    # Only the aligned codebook stays: the refit as numbered by its fit never became current.
    assert sorted(p.name for p in (work / "codebooks").glob("*.safetensors")) == sorted(
        Path(r["codebook"]).name for r in (first, second)
    )
    report = report_of(second)
    section = report.split("## Code churn")[1].split("##")[0]
    assert f"(`{first['fingerprint'][:12]}`)" in section and f"to `{second['fingerprint'][:12]}`" in section
    assert f"| rows that keep their code | {100 * a['kept']:.2f}% |" in section
    assert f"| churn (rows whose code changed) | {100 * a['churn']:.2f}% |" in section
    assert f"| codes renumbered | {a['renumbered']} of 13 (previous codebook: 12) |" in section

    # A warm refit (the schedule is due) starts from these centroids: the same cells in the same order,
    # nothing to renumber, and the file records that it was checked. Lloyd goes on from where the
    # tolerance stopped the cold fit, so only rows at the boundary inside the split blob may move.
    third = vq_pipeline_flow(**params(root, work, n_codes=13, seed=1, refit_every_hours=0))
    assert third["action"] == "refit" and third["fired"] == ["schedule"]
    a3 = third["alignment"]
    assert a3["aligned"] and a3["renumbered"] == 0 and a3["kept"] > 0.99, a3
    assert Codebook.load(third["codebook"]).stats["alignment"]["reference"] == second["fingerprint"]
    moved = codes_by_id(codes_dir(work, third["fingerprint"])) != after
    assert set(blob[moved].tolist()) <= {split} and a3["kept"] == pytest.approx(1 - moved.mean())


def _topic_rows(n: int, dim: int, n_topics: int, seed: int, topics: list[int] | None) -> np.ndarray:
    """generate_embeddings' mixture, or its rows from ``topics`` only (the same topic centres)."""
    if topics is None:
        return generate_embeddings(n, dim, n_topics, seed=seed)
    pool = generate_embeddings(2 * n * n_topics // len(topics) + 1000, dim, n_topics, seed=seed)
    centres = np.random.default_rng(12345).standard_normal((n_topics, dim))  # generate_embeddings' topics
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    nearest = np.argmax(pool @ centres.T, axis=1)
    return pool[np.isin(nearest, topics)][:n]


def measure() -> None:
    """Code-usage divergence and distortion of new batches against a codebook fitted on the full mixture."""
    rng = np.random.default_rng(7)
    for dim, n_topics, n_codes, metric, sizes in [
        (64, 48, 64, "l2", (64, 320, 1000, 5000, 20_000)),
        (64, 48, 64, "cosine", (320, 5000)),
        (64, 48, 256, "l2", (256, 1280, 5000, 20_000)),
        (12, 10, 8, "l2", (40, 100, 500, 2000)),
    ]:
        cb = fit_codebook(
            generate_embeddings(20_000, dim, n_topics, seed=1), n_codes, metric=metric, seed=0, engine="torch"
        )
        print(f"\n{dim=} {n_topics=} {n_codes=} {metric=}: fitted on 20,000 rows of the full mixture; 5 batches each")
        print(f"{'batch':<16}{'rows':>7}{'ratio':>8}{'JS':>8}{'bias':>8}{'excess':>8}{'max':>8}")
        for name, k in [("same mixture", None), ("1 topic", 1), ("3 topics", 3), ("half + 1 topic", -1)]:
            for n in sizes:
                out = []
                for r in range(5):
                    seed = 1000 + 17 * r + n
                    if k is None:
                        x = _topic_rows(n, dim, n_topics, seed, None)
                    elif k == -1:
                        one = [int(rng.integers(n_topics))]
                        x = np.concatenate(
                            [
                                _topic_rows(n - n // 2, dim, n_topics, seed, None),
                                _topic_rows(n // 2, dim, n_topics, seed + 1, one),
                            ]
                        )
                    else:
                        x = _topic_rows(n, dim, n_topics, seed, list(rng.choice(n_topics, k, replace=False)))
                    out.append(drift_report(cb, [_receipt(cb, x)]))

                def get(key: str, out: list[dict[str, Any]] = out) -> np.ndarray:
                    return np.array([d[key] for d in out])

                print(
                    f"{name:<16}{n:>7}{get('distortion_ratio').mean():>8.3f}{get('usage_divergence').mean():>8.3f}"
                    f"{get('usage_divergence_expected').mean():>8.3f}{get('usage_divergence_excess').mean():>8.3f}"
                    f"{get('usage_divergence_excess').max():>8.3f}"
                )


if __name__ == "__main__":
    torch.manual_seed(0)
    measure()
