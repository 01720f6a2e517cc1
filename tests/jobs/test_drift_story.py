"""Drift that explains itself: the codes that gained or lost share (with ids of new rows), the drift
per input partition, and code-usage counts pooled across runs until there are enough rows to judge.

Oracles: shares and Jensen-Shannon divergences computed by hand (scipy's ``jensenshannon``), the
encoded outputs read back with polars; the accumulation runs :func:`run_once` on real parquet files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from conftest import write_parts
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.errors import PipelineStateError
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.drift import code_shifts, partition_drift, partition_of
from vq_pipeline.jobs.scheduled import check_run, run_once
from vq_pipeline.jobs.workdir import (
    PENDING_NAME,
    read_current,
    read_usage_pending,
    usage_min_rows,
    write_usage_pending,
)
from vq_pipeline.settings import PipelineSettings

DIM, N_TOPICS, N_CODES = 12, 10, 8


# ----------------------------------------------------------------------------- codes that gained or lost share


def test_code_shifts_against_hand_computed_shares() -> None:
    train = np.array([[40, 30, 20, 10]])  # shares 0.4 0.3 0.2 0.1
    new = np.array([[10, 30, 40, 20]])  # shares 0.1 0.3 0.4 0.2 over 100 rows
    shifts = code_shifts(new, train)
    assert [(e["code"], e["rows"]) for e in shifts["gains"]] == [(2, 40), (3, 20)]
    assert [e["code"] for e in shifts["losses"]] == [0]  # code 1 kept its share: listed nowhere
    g = shifts["gains"][0]
    assert g["share"] == pytest.approx(0.4) and g["train_share"] == pytest.approx(0.2)
    assert g["change"] == pytest.approx(0.2) and shifts["losses"][0]["change"] == pytest.approx(-0.3)
    assert code_shifts(new, train, top=1)["gains"] == shifts["gains"][:1]
    # Multi-level: shares within each level, each entry names its level.
    two = code_shifts(np.array([[5, 5], [10, 0]]), np.array([[5, 5], [5, 5]]), multi=True)
    assert two == {
        "gains": [{"level": 1, "code": 0, "rows": 10, "share": 1.0, "train_share": 0.5, "change": 0.5}],
        "losses": [{"level": 1, "code": 1, "rows": 0, "share": 0.0, "train_share": 0.5, "change": -0.5}],
    }


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=6, max_size=6).filter(lambda c: sum(c) > 0),
    st.lists(st.integers(1, 50), min_size=6, max_size=6),
    st.integers(1, 6),
)
def test_code_shifts_are_the_largest_share_changes(new: list[int], train: list[int], top: int) -> None:
    p, q = np.array(new) / sum(new), np.array(train) / sum(train)
    change = p - q
    shifts = code_shifts(np.array([new]), np.array([train]), top=top)
    gains, losses = [e["change"] for e in shifts["gains"]], [e["change"] for e in shifts["losses"]]
    assert gains == sorted(gains, reverse=True) and all(g > 0 for g in gains)
    assert losses == sorted(losses) and all(v < 0 for v in losses)
    assert len(gains) == min(top, int((change > 0).sum())) and len(losses) == min(top, int((change < 0).sum()))
    if gains:
        assert gains[0] == pytest.approx(change.max())
    if losses:
        assert losses[0] == pytest.approx(change.min())
    for e in [*shifts["gains"], *shifts["losses"]]:
        assert e["change"] == pytest.approx(change[e["code"]]) and e["rows"] == new[e["code"]]


# ----------------------------------------------------------------------------- drift per partition


def test_partition_of_reads_hive_folders() -> None:
    assert partition_of("date=2026-11-01/source=a/part-0.parquet") == "date=2026-11-01/source=a"
    assert partition_of("date=2026-11-01/extra/part-0.parquet") == "date=2026-11-01"
    assert partition_of("part-0.parquet") == "" and partition_of("plain/part-0.parquet") == ""


def _receipt(key: str, counts: list[int], distance: float) -> dict[str, Any]:
    return {"key": key, "rows": sum(counts), "distance_sum": distance * sum(counts), "code_counts": counts}


def _codebook() -> Codebook:
    cb = fit_codebook(generate_embeddings(800, DIM, N_TOPICS, seed=1), 4, seed=0, engine="torch")
    assert int(cb.counts.sum()) == 800
    return cb


def test_partition_drift_against_hand_computed_divergence() -> None:
    cb = _codebook()
    q = cb.counts.double().numpy() / 800
    train_mean = cb.stats["inertia"] / 800
    receipts = [
        _receipt("date=2026-11-01/source=a/part-0.parquet", [30, 30, 20, 20], train_mean),
        _receipt("date=2026-11-01/source=a/part-1.parquet", [10, 10, 40, 40], train_mean),
        _receipt("date=2026-11-01/source=b/part-0.parquet", [0, 0, 0, 50], 2 * train_mean),
    ]
    parts = partition_drift(cb, receipts)
    assert [(g["partition"], g["files"], g["rows"]) for g in parts] == [
        ("date=2026-11-01/source=a", 2, 200),
        ("date=2026-11-01/source=b", 1, 50),
    ]
    for g, counts in zip(parts, ([40, 40, 60, 60], [0, 0, 0, 50]), strict=True):
        p = np.array(counts) / sum(counts)
        assert g["usage_divergence"] == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-9)
        bias = (int((q > 0).sum()) - 1) / (8 * np.log(2)) * (1 / sum(counts) + 1 / 800)
        assert g["usage_divergence_excess"] == pytest.approx(g["usage_divergence"] - bias, rel=1e-9)
    assert parts[0]["distortion_ratio"] == pytest.approx(1.0) and parts[1]["distortion_ratio"] == pytest.approx(2.0)
    # No hive folder anywhere: nothing to split by.
    assert partition_drift(cb, [_receipt("part-0.parquet", [1, 1, 1, 1], 0.1)]) == []


# ----------------------------------------------------------------------------- code usage pooled across runs


def _new_file(root: Path, name: str, n: int, seed: int, n_topics: int) -> None:
    """``n`` rows of ``n_topics`` of the training topics (fewer topics: a shift in code usage)."""
    x = generate_embeddings(n, DIM, n_topics, seed=seed)
    write_embeddings(root / name / "part-0.parquet", np.arange(n) + 1_000_000 * seed, x)


def _usage(summary: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in summary["refit_rules"] if c["rule"] == "usage")


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def test_small_runs_pool_their_code_usage_until_it_can_be_judged(tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    write_parts(root, {"date=2026-11-01/source=a/part-0.parquet": 900}, dim=DIM, n_topics=N_TOPICS)
    s = PipelineSettings("embedding", N_CODES, id_column="id", drift_threshold=10.0)  # the usage rule alone
    needed = usage_min_rows(N_CODES)
    assert needed == 100
    assert run_once(root, work, s)["action"] == "fit"
    assert not (work / PENDING_NAME).exists()  # a baseline leaves nothing pending

    # Three runs of 40 rows from 2 of the topics: 40 and 80 rows are too few; 120 are judged, and it fires.
    summaries, files, reports = [], [], []
    for i in range(3):
        _new_file(root, f"date=2026-11-0{i + 2}/source=b", 40, seed=20 + i, n_topics=2)
        summaries.append(run_once(root, work, s))
        reports.append(Path(summaries[-1]["report"]).read_text())  # two runs in one second share a report name
        files.append(json.loads((work / PENDING_NAME).read_text()) if (work / PENDING_NAME).exists() else None)
    assert [f and (f["rows"], f["runs"], sum(f["code_counts"])) for f in files] == [(40, 1, 40), (80, 2, 80), None]
    assert files[0]["fingerprint"] == files[1]["fingerprint"] == read_current(work)["parent_fingerprint"]
    first, second, third = summaries
    for summary, report, pending in ((first, reports[0], 40), (second, reports[1], 80)):
        assert summary["action"] == "none" and summary["drift"]["rows"] == 40
        usage = _usage(summary)
        assert usage["status"] == "not evaluated" and usage["pending_rows"] == pending
        assert usage["value"] == f"{pending} rows pending < {needed}"
        assert summary["usage_pending"] == {
            "rows": pending,
            "needed": needed,
            "runs": pending // 40,
            "since": first["started_at"],
            "judged": False,
        }
        plural = "s" if pending > 40 else ""
        assert f"Code usage: {pending} rows pending (from {pending // 40} run{plural}, since" in report
        assert f"the rule is judged once {needed} rows have come." in report
    pool = third["drift"]["usage_pool"]
    assert pool["rows"] == 120 and pool["pending_rows"] == 80 and pool["runs"] == 3
    assert third["action"] == "refit" and third["fired"] == ["usage"], third["refit_rules"]
    assert "pooled over 3 runs" in third["reason"] and _usage(third)["status"] == "fired"
    # The judgement: the pooled counts are those of the three new files (read back from their codes).
    cb = Codebook.load(first["codebook"])
    codes = pl.concat(
        [pl.read_parquet(Path(first["codes_dir"]) / f"date=2026-11-0{i + 2}/source=b/part-0.parquet") for i in range(3)]
    )["code"].to_numpy()
    p = np.bincount(codes, minlength=N_CODES) / 120
    q = cb.counts.double().numpy() / cb.counts.sum().item()
    assert pool["usage_divergence"] == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-9)
    # Judged (and the codebook changed): the pool starts again.
    assert not (work / PENDING_NAME).exists() and third["usage_pending"]["rows"] == 0
    report = reports[2]
    assert "Code usage: judged on 120 rows (80 of them pending from earlier runs, over 3 runs)" in report

    # Every report's tables stay narrow enough for the Prefect UI (the widest row of the old rules table was
    # over 150 characters, cut off at the right).
    for report in reports:
        rows = _table_rows(report)
        assert rows and max(len(r) for r in rows) <= 100, max(rows, key=len)


def test_report_names_the_codes_that_moved_with_ids_and_the_partitions(tmp_path: Path) -> None:
    root, work = tmp_path / "in", tmp_path / "work"
    write_parts(root, {"date=2026-11-01/source=a/part-0.parquet": 900}, dim=DIM, n_topics=N_TOPICS)
    s = PipelineSettings("embedding", N_CODES, id_column="id", drift_threshold=10.0, usage_threshold=None)
    run_once(root, work, s)
    _new_file(root, "date=2026-11-02/source=a", 150, seed=31, n_topics=N_TOPICS)
    _new_file(root, "date=2026-11-02/source=b", 150, seed=32, n_topics=1)
    summary = run_once(root, work, s)
    d = summary["drift"]
    out = pl.read_parquet(Path(summary["codes_dir"]) / "date=2026-11-02/source=b/part-0.parquet")
    shifted = pl.concat(
        [pl.read_parquet(Path(summary["codes_dir"]) / f"date=2026-11-02/source={x}/part-0.parquet") for x in "ab"]
    )
    top = d["code_shifts"]["gains"][0]
    assert top["code"] == int(np.bincount(out["code"].to_numpy()).argmax())  # the one topic of source=b
    assert top["rows"] == int((shifted["code"] == top["code"]).sum())
    for e in [*d["code_shifts"]["gains"], *d["code_shifts"]["losses"]]:
        want = shifted.filter(pl.col("code") == e["code"])["id"].to_list()
        assert e["ids"] == sorted(want)[:3] if e["rows"] else e["ids"] == []
    by_name = {g["partition"]: g for g in d["partitions"]}
    assert set(by_name) == {"date=2026-11-02/source=a", "date=2026-11-02/source=b"}
    assert by_name["date=2026-11-02/source=b"]["usage_divergence_excess"] > 0.3
    assert by_name["date=2026-11-02/source=a"]["usage_divergence_excess"] < 0.1
    report = Path(summary["report"]).read_text()
    ids = ", ".join(str(i) for i in top["ids"])
    assert f"| {top['code']} | {100 * top['share']:.2f}% | {100 * top['train_share']:.2f}% |" in report
    assert f" | {ids} |" in report and "## Drift per partition" in report
    assert "| date=2026-11-02/source=b | 150 |" in report
    # The usage rule is off: nothing is pooled, and the report says nothing of pending rows.
    assert not (work / PENDING_NAME).exists() and "rows pending" not in report


# ----------------------------------------------------------------------------- the pending file is not trusted


@pytest.fixture(scope="module")
def fitted_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, PipelineSettings]:
    tmp = tmp_path_factory.mktemp("pending")
    root, work = tmp / "in", tmp / "work"
    write_parts(root, {"date=2026-11-01/part-0.parquet": 300}, dim=DIM, n_topics=N_TOPICS)
    s = PipelineSettings("embedding", N_CODES, id_column="id")
    run_once(root, work, s)
    return root, work, s


def test_pending_counts_round_trip_and_belong_to_one_codebook(fitted_work) -> None:
    _, work, _ = fitted_work
    fp = read_current(work)["fingerprint"]
    counts = [5, 0, 0, 0, 0, 0, 0, 2]
    write_usage_pending(work, fp, {"rows": 7, "runs": 2, "code_counts": counts}, "2026-12-07T00:00:00+00:00")
    try:
        got = read_usage_pending(work, fp, levels=1, n_codes=N_CODES)
        assert got == {
            "fingerprint": fp,
            "rows": 7,
            "runs": 2,
            "code_counts": counts,
            "since": "2026-12-07T00:00:00+00:00",
        }
        # Counted for another codebook: not this one's (the pool starts again when the codebook changes).
        assert read_usage_pending(work, "ab" * 32, levels=1, n_codes=N_CODES) is None
    finally:
        (work / PENDING_NAME).unlink()
    assert read_usage_pending(work, fp, levels=1, n_codes=N_CODES) is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "holds a JSON list, not an object"),
        ({"format": "other"}, "has format='other'"),
        ({"rows": -1}, "has rows=-1, not a count"),
        ({"rows": 7, "code_counts": [7]}, "has code_counts of 1 values, not 8 counts (1 levels × 8 codes)"),
        ({"rows": 8}, "has 7 counts on level 0 for rows=8"),
        ({"runs": 0}, "has runs=0, not a count of at least 1"),
        ("symlink", "is a symlink"),
    ],
)
def test_a_damaged_pending_file_is_refused_with_its_fix(fitted_work, content: Any, problem: str) -> None:
    root, work, s = fitted_work
    fp = read_current(work)["fingerprint"]
    path = work / PENDING_NAME
    good = {
        "format": "vq-pipeline.usage-pending",
        "fingerprint": fp,
        "rows": 7,
        "runs": 1,
        "code_counts": [7] + [0] * 7,
    }
    try:
        if content == "symlink":
            (work / "elsewhere.json").write_text(json.dumps(good))
            os.symlink(work / "elsewhere.json", path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else json.dumps({**good, **content}).encode())
        with pytest.raises(PipelineStateError) as info:
            read_usage_pending(work, fp, levels=1, n_codes=N_CODES)
        message = str(info.value)
        assert message.startswith(f"usage_pending={str(path)!r} {problem}"), message
        assert message.endswith("Fix: delete it; the code-usage rule then counts new rows afresh from the next run.")
        with pytest.raises(PipelineStateError, match="Fix: delete it"):  # refused before a deployment registers
            check_run(root, work, s)
    finally:
        path.unlink(missing_ok=True)
        (work / "elsewhere.json").unlink(missing_ok=True)
