"""The Prefect flows on a throwaway Prefect API: artifacts, resume, scheduled-job behaviour, serving.

One temporary Prefect server serves the whole module (its start is the slow part, ~10 s); the flow
runs here are few and small (a few thousand rows, dim 12, 8 codes).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import torch
from conftest import snapshot, write_parts
from vq_flows.artifacts import scoped_key
from vq_flows.deploy import build_deployment, parse_args  # noqa: I001 - flows after the library
from vq_flows.encode import (
    PROGRESS_ARTIFACT_KEY,
    SUMMARY_ARTIFACT_KEY,
    encode_embeddings_flow,
    encode_file_task,
    retry_transient,
)
from vq_flows.fit import FIT_ARTIFACT_KEY, fit_codebook_flow, fit_task
from vq_flows.pipeline import report_artifact_key, vq_pipeline_flow

from vq_pipeline.jobs.workdir import CURRENT_NAME, codebook_path, codes_dir, refit_reason

from vq_pipeline import Codebook, InvalidInputError
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.io.tables import read_table
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import DEFAULT_METRIC, EncodeSettings, FitSettings, PipelineSettings, TableSettings

DIM = 12
N_CODES = 8
PARTS = {"date=2026-11-01/part-0.parquet": 900, "date=2026-11-02/part-0.parquet": 700, "date=2026-11-03/part-0.parquet": 600}


def write_part(root: Path, key: str, n_rows: int, *, seed: int, id_base: int, drifted: bool = False) -> np.ndarray:
    """One partition of clustered embeddings (or, ``drifted``, of unclustered random directions)."""
    if drifted:
        x = np.random.default_rng(seed).standard_normal((n_rows, DIM)).astype(np.float32)
    else:
        x = generate_embeddings(n_rows, DIM, 10, seed=seed)
    write_embeddings(root / key, np.arange(n_rows) + id_base, x)
    return x


def make_parts(root: Path, parts: dict[str, int] = PARTS) -> dict[str, np.ndarray]:
    return write_parts(root, parts, dim=DIM)


def artifacts(flow_run_id: str) -> dict[str, Any]:
    """The artifacts a flow run created, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return {a.key: a for a in found}


def table_rows(artifact: Any) -> list[dict[str, Any]]:
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return data


# ----------------------------------------------------------------------------- fit


def test_fit_flow_writes_a_loadable_codebook_and_a_markdown_report(prefect_api, tmp_path: Path) -> None:
    make_parts(tmp_path / "in")
    out = tmp_path / "cb.safetensors"
    summary = fit_codebook_flow([str(tmp_path / "in")], str(out), N_CODES, TableSettings(column="embedding"), FitSettings(metric="l2", seed=1))
    cb = Codebook.load(out)
    assert summary["path"] == str(out) and summary["fingerprint"] == cb.fingerprint
    assert (summary["n_codes"], summary["dim"], summary["metric"], summary["rows"]) == (N_CODES, DIM, "l2", sum(PARTS.values()))
    assert cb.stats["iterations"] == summary["iterations"] and cb.parent_fingerprint == ""
    assert sum(summary["cluster_sizes"][k] for k in ("min", "max")) > 0 and "history" not in summary

    md = artifacts(summary["flow_run_id"])[FIT_ARTIFACT_KEY].data
    assert f"| iterations | {cb.stats['iterations']} " in md and f"| empty-cluster repairs | {cb.stats['n_repairs']} |" in md
    assert "## Objective per iteration" in md and "## Cluster sizes" in md and cb.fingerprint in md
    history_rows = md.split("## Objective per iteration")[1].strip().splitlines()[2:]
    assert len(history_rows) == len(cb.stats["history"])


def test_task_retry_policy() -> None:
    from prefect.states import Failed

    assert encode_file_task.retries == 2 and fit_task.retries == 0
    from distributed import KilledWorker

    from vq_pipeline.errors import ConfigurationError, EncodeLockedError, PipelineStateError

    # What a retry can fix: I/O and a lost worker.
    for transient in (OSError("connection reset"), TimeoutError("read timed out"), KilledWorker("encode-a", "tcp://w:1", 3)):
        assert retry_transient(None, None, Failed(data=transient)), transient
    # Bad input, state or configuration, and bugs, fail the same way every time.
    for final in (InvalidInputError("bad rows"), PipelineStateError("current.json"), EncodeLockedError("locked"),
                  ConfigurationError("no API"), RuntimeError("a bug"), KeyError("a bug")):
        assert not retry_transient(None, None, Failed(data=final)), final


# ----------------------------------------------------------------------------- encode


def test_encode_flow_matches_in_memory_encode_and_resumes(prefect_api, tmp_path: Path) -> None:
    rows = make_parts(tmp_path / "in")
    cb = fit_from_tables([tmp_path / "in"], N_CODES, TableSettings(column="embedding"), FitSettings(metric="cosine", seed=0))
    cb_path = str(cb.save(tmp_path / "cb.safetensors"))
    out = tmp_path / "codes"
    kwargs = dict(inputs=[str(tmp_path / "in")], codebook=cb_path, out_dir=str(out), settings=EncodeSettings("embedding", id_column="id", with_distance=True))

    first = encode_embeddings_flow(**kwargs)
    assert first["encoded"] == sorted(PARTS) and first["skipped"] == [] and first["rows_total"] == sum(PARTS.values())
    assert Path(first["manifest"]).is_file() and set(first["new_receipts"]) == set(PARTS)
    for i, (key, x) in enumerate(sorted(rows.items())):
        table = read_table(out / key)
        codes, dist = cb.encode(torch.from_numpy(x), return_distances=True)
        assert table["id"].to_list() == list(range(100_000 * i, 100_000 * i + len(x)))
        assert np.array_equal(table["code"].to_numpy().astype(np.int64), codes.numpy())
        np.testing.assert_allclose(table["distance"].to_numpy(), dist.numpy(), rtol=1e-5, atol=1e-6)
    found = artifacts(first["flow_run_id"])
    assert found[scoped_key(PROGRESS_ARTIFACT_KEY, out)].data == 100
    table = table_rows(found[scoped_key(SUMMARY_ARTIFACT_KEY, out)])
    assert [r["key"] for r in table] == sorted(PARTS) and {r["status"] for r in table} == {"encoded"}
    assert all(r["rows"] == PARTS[r["key"]] and r["mean_distance"] > 0 for r in table)

    before = snapshot(out)
    second = encode_embeddings_flow(**kwargs)
    assert second["encoded"] == [] and second["skipped"] == sorted(PARTS) and second["new_receipts"] == {}
    assert snapshot(out) == before  # a finished run's rerun is a no-op

    victim = sorted(PARTS)[1]
    (out / victim).unlink()
    third = encode_embeddings_flow(**kwargs)
    assert third["encoded"] == [victim] and third["skipped"] == [k for k in sorted(PARTS) if k != victim]
    assert snapshot(out) == before  # re-encoded byte for byte, nothing else touched


# ----------------------------------------------------------------------------- the scheduled job


def test_refit_reason() -> None:
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
    week_ago = (now - dt.timedelta(hours=169)).isoformat()
    hour_ago = (now - dt.timedelta(hours=1)).isoformat()
    measured = dict(rows=500, n_codes=8, distortion_ratio=1.1, usage_divergence=0.01, usage_divergence_expected=0.003)
    common = dict(now=now, drift=measured, drift_threshold=0.25, usage_threshold=0.1)
    assert refit_reason(created_at=hour_ago, last_fit_at=None, refit_every_hours=168, **common) is None
    assert refit_reason(created_at=week_ago, last_fit_at=None, refit_every_hours=168, **common).startswith("schedule")
    assert refit_reason(created_at=week_ago, last_fit_at=None, refit_every_hours=None, **common) is None
    # A refit that reproduced the codebook restarts the clock.
    assert refit_reason(created_at=week_ago, last_fit_at=hour_ago, refit_every_hours=168, **common) is None
    recent = dict(
        created_at=hour_ago, last_fit_at=None, refit_every_hours=168, now=now, drift_threshold=0.25, usage_threshold=0.1,
    )
    drift = refit_reason(drift={**measured, "distortion_ratio": 1.3}, **recent)
    assert drift.startswith("drift") and "1.300" in drift
    nothing_new = {"rows": 0, "n_codes": 8, "distortion_ratio": None, "usage_divergence": None}
    assert refit_reason(drift=nothing_new, **recent) is None


@pytest.mark.slow
def test_pipeline_flow_fits_encodes_new_partitions_and_refits_on_drift(prefect_api, tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    make_parts(root)
    settings = PipelineSettings("embedding", N_CODES, id_column="id")
    params = dict(input_root=str(root), work_dir=str(work))

    # First run: no codebook yet -> fit, then encode every partition.
    first = vq_pipeline_flow(**params, settings=settings)
    fp1 = first["fingerprint"]
    assert first["action"] == "fit" and first["reason"] == "no current codebook"
    assert first["codebook"] == str(codebook_path(work, fp1)) and Codebook.load(first["codebook"]).fingerprint == fp1
    assert json.loads((work / CURRENT_NAME).read_text())["codebook"] == f"codebooks/{fp1[:12]}.safetensors"
    assert first["codes_dir"] == str(codes_dir(work, fp1)) and Path(first["manifest"]).is_file()
    assert first["encode"][0]["encoded"] == sorted(PARTS) and first["params"]["metric"] == DEFAULT_METRIC
    # The rows the codebook was fitted on are its baseline, not a drift measurement.
    assert first["drift"]["baseline"] and first["drift"]["rows"] == 0
    assert first["drift"]["baseline_rows"] == sum(PARTS.values())
    assert Path(first["report"]).is_file() and Path(first["report"]).with_suffix(".json").is_file()
    report = artifacts(first["flow_run_id"])[report_artifact_key(work)].data
    assert "fitted a first codebook" in report and first["manifest"] in report
    assert "baseline: the codebook was fitted on these rows" in report and f"work_dir: `{work}`" in report

    # A new partition from the same distribution: only it is encoded, and nothing is refitted.
    new_key = "date=2026-11-04/part-0.parquet"
    write_part(root, new_key, 500, seed=3, id_base=300_000)
    second = vq_pipeline_flow(**params, settings=settings)
    assert second["action"] == "none" and second["fingerprint"] == fp1 and len(second["encode"]) == 1
    assert second["encode"][0]["encoded"] == [new_key] and second["encode"][0]["skipped"] == sorted(PARTS)
    assert second["drift"]["rows"] == 500 and second["drift"]["distortion_ratio"] < 1.25 and second["fired"] == []
    assert {c["rule"]: c["status"] for c in second["refit_rules"]} == {
        "schedule": "not fired", "distortion": "not fired", "usage": "not fired",
    }
    old_codes = snapshot(codes_dir(work, fp1))

    # A partition from a very different distribution: drift -> warm-started refit, re-encode all.
    drift_key = "date=2026-11-05/part-0.parquet"
    write_part(root, drift_key, 500, seed=4, id_base=400_000, drifted=True)
    third = vq_pipeline_flow(**params, settings=dataclasses.replace(settings, drift_threshold=0.1))
    fp2 = third["fingerprint"]
    assert third["action"] == "refit" and third["reason"].startswith("drift"), third["reason"]
    assert "distortion" in third["fired"]
    assert third["drift"]["distortion_ratio"] > 1.1 and third["drift"]["rows"] == 500
    assert fp2 != fp1 and Codebook.load(third["codebook"]).parent_fingerprint == fp1 and third["parent_fingerprint"] == fp1
    assert json.loads((work / CURRENT_NAME).read_text())["fingerprint"] == fp2
    assert [e["codebook_fingerprint"] for e in third["encode"]] == [fp1, fp2]
    assert third["encode"][0]["encoded"] == [drift_key]  # first with the old codebook (to measure drift)
    everything = sorted([*PARTS, new_key, drift_key])
    assert third["encode"][1]["encoded"] == everything and third["codes_dir"] == str(codes_dir(work, fp2))
    assert third["previous_codebook"] == str(codebook_path(work, fp1)) and codebook_path(work, fp1).is_file()
    assert third["drift_after_refit"]["baseline"]
    assert third["drift_after_refit"]["baseline_rows"] == sum(PARTS.values()) + 1000
    old_after = snapshot(codes_dir(work, fp1))
    assert {k: v for k, v in old_after.items() if k in old_codes and not k.startswith("state/")} == {
        k: v for k, v in old_codes.items() if not k.startswith("state/")
    }  # the old folder's existing codes are left as they were (its manifest gains the new file)

    # The schedule falls due (0 h) with no new data: a warm-started refit on the same rows. It either
    # reproduces the converged codebook, which is then kept with its lineage, or becomes a child of it.
    fourth = vq_pipeline_flow(**params, settings=dataclasses.replace(settings, refit_every_hours=0))
    assert fourth["reason"].startswith("schedule") and fourth["encode"][0]["encoded"] == []
    assert fourth["fired"] == ["schedule"]
    if fourth["action"] == "refit-unchanged":
        assert fourth["fingerprint"] == fp2 and Codebook.load(third["codebook"]).parent_fingerprint == fp1
        assert json.loads((work / CURRENT_NAME).read_text())["last_fit_at"] == fourth["started_at"]
    else:
        assert fourth["action"] == "refit" and Codebook.load(fourth["codebook"]).parent_fingerprint == fp2


# ----------------------------------------------------------------------------- serving


def test_deployment_has_the_cron_schedule_and_parameters(tmp_path: Path) -> None:
    cron, name, params = parse_args(
        ["--cron", "0 * * * *", "--input-root", str(tmp_path / "in"), "--work-dir", str(tmp_path / "work"),
         "--column", "embedding", "--codes", "16", "--id-column", "id"]
    )
    settings = params["settings"]
    assert settings["n_codes"] == 16 and settings["metric"] == DEFAULT_METRIC and settings["refit_every_hours"] == 168
    assert settings["usage_threshold"] == 0.1 and settings["drift_threshold"] == 0.25
    deployment = build_deployment(cron, name, **params)
    assert deployment.name == name and deployment.flow_name == "vq-pipeline"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 * * * *"]
    assert deployment.parameters == params and deployment.entrypoint == "vq_flows.pipeline.vq_pipeline_flow"


def test_a_retried_encode_task_resumes_without_duplicating_work(prefect_api, tmp_path: Path, monkeypatch) -> None:
    import vq_flows.encode as encode_module

    from vq_pipeline.jobs import encode_folder
    from vq_pipeline.jobs.encode_folder import encode_tables

    root = tmp_path / "in"
    make_parts(root)
    cb = fit_from_tables([root], N_CODES, TableSettings(column="embedding"))
    cb_path = cb.save(tmp_path / "cb.safetensors")
    reference = tmp_path / "reference"
    encode_tables([root], cb, reference, EncodeSettings(column="embedding", id_column="id"))
    target = "date=2026-11-02/part-0.parquet"
    calls: dict[str, int] = {}
    real = encode_folder.encode_source

    def fails_once_after_writing(source, *args, **kwargs):
        calls[source.key] = calls.get(source.key, 0) + 1
        receipt = real(source, *args, **kwargs)
        if source.key == target and calls[source.key] == 1:
            raise ConnectionResetError("lost the connection after the output was written")
        return receipt

    monkeypatch.setattr(encode_folder, "encode_source", fails_once_after_writing)  # the unit each task runs
    monkeypatch.setattr(encode_module.encode_file_task, "retry_delay_seconds", 0)
    out = tmp_path / "out"
    encode_embeddings_flow([str(root)], str(cb_path), str(out), EncodeSettings(column="embedding", id_column="id"))
    assert calls[target] == 2 and all(n == 1 for key, n in calls.items() if key != target)
    assert snapshot(out) == snapshot(reference), "the retry rewrote the same bytes; nothing is duplicated"
