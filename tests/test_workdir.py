"""The work_dir without Prefect: what a second orchestrator (cron, Airflow) would call."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
import torch

from vq_pipeline import EncodeLockedError, PipelineStateError, fit_codebook, workdir


def test_current_pointer_link_and_lock_without_prefect(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert workdir.read_current(work) is None
    cb = fit_codebook(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), 8)
    path = cb.save(workdir.codebook_path(work, cb.fingerprint))
    now = dt.datetime.now(dt.UTC)
    workdir.set_current(work, str(path), cb.fingerprint, "no current codebook", now.isoformat())
    current = workdir.read_current(work)
    assert current["fingerprint"] == cb.fingerprint and current["path"] == str(path) and current["n_codes"] == 8
    assert os.readlink(work / workdir.CODES_LINK) == cb.fingerprint[:12]
    assert workdir.refit_reason(
        created_at=current["created_at"], last_fit_at=current["last_fit_at"], now=now + dt.timedelta(hours=2),
        refit_every_hours=1, drift=None, drift_threshold=0.25, usage_threshold=0.1,
    ).startswith("schedule: the codebook is 2.0 h old")
    noon = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    assert workdir.report_path(work, noon, "0123456789abcdef").name == "2026-11-29T12-00-00Z-01234567.md"
    with workdir.lock(work):
        with pytest.raises(EncodeLockedError, match=r"is locked by another run"):
            with workdir.lock(work):
                pass
    other = fit_codebook(torch.randn(200, 4, generator=torch.Generator().manual_seed(1)), 8)
    other.save(path)  # a codebook file that changed under the pointer
    with pytest.raises(PipelineStateError, match=r"has fingerprint .* but .* records .*Fix"):
        workdir.read_current(work)
