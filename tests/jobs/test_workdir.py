"""The work_dir without Prefect: what a second orchestrator (cron, Airflow) would call."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from conftest import fit_tables
import torch

from vq_pipeline import EncodeLockedError, PipelineStateError, fit_codebook
from vq_pipeline.jobs import workdir
from vq_pipeline.settings import FitSettings, TableSettings


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
    # Two runs of one second without a flow run id: the second report gets a name of its own.
    first = workdir.report_path(work, noon, None)
    assert first.name == "2026-11-29T12-00-00Z-local.md"
    first.parent.mkdir(parents=True, exist_ok=True)
    first.write_text("# first\n")
    second = workdir.report_path(work, noon, None)
    assert second.name == "2026-11-29T12-00-00Z-local_2.md"
    second.with_suffix(".json").write_text("{}")  # the summary alone also claims the name
    assert workdir.report_path(work, noon, None).name == "2026-11-29T12-00-00Z-local_3.md"
    assert first.read_text() == "# first\n"
    names = [first.with_suffix(".json").name, second.with_suffix(".json").name]
    assert sorted(names) == names  # the history of runs reads the reports in name order
    with workdir.lock(work):
        with pytest.raises(EncodeLockedError, match=r"is locked by another run"):
            with workdir.lock(work):
                pass
    other = fit_codebook(torch.randn(200, 4, generator=torch.Generator().manual_seed(1)), 8)
    other.save(path)  # a codebook file that changed under the pointer
    with pytest.raises(PipelineStateError, match=r"has fingerprint .* but .* records .*Fix"):
        workdir.read_current(work)


def test_a_cold_refit_is_renumbered_to_keep_the_codes_of_unchanged_rows(tmp_path: Path) -> None:
    """Two cold fits of the same rows (k-means++ with other seeds: from k-means|| both seeds reach the
    same centroids here) number their codes differently: without the alignment fewer than 1 row in 5
    keeps its code. Aligned on the tables (all 2,000 rows: fewer than
    the sample bound), every row keeps its code but where the cells differ, which is the best any
    renumbering can do (Hungarian on all rows, checked against brute force in tests/compute/test_align.py)."""
    import numpy as np

    from vq_pipeline import Codebook
    from vq_pipeline.compute.align import cooccurrence, kept_rows, match_by_cooccurrence
    from vq_pipeline.io.table_writer import write_embeddings
    from vq_pipeline.jobs.demo import generate_embeddings
    from vq_pipeline.jobs.fit_tables import fit_from_tables

    root, work = tmp_path / "in", tmp_path / "work"
    x = generate_embeddings(2000, 12, 10, seed=0)
    write_embeddings(root / "part-0.parquet", np.arange(1000), x[:1000])
    write_embeddings(root / "part-1.parquet", np.arange(1000, 2000), x[1000:])
    ref = fit_from_tables([str(root)], 10, TableSettings(column="embedding"), FitSettings(init="k-means++", seed=0, engine="torch"))
    new = fit_from_tables([str(root)], 10, TableSettings(column="embedding"), FitSettings(init="k-means++", seed=1, engine="torch"))
    ref_path = ref.save(workdir.codebook_path(work, ref.fingerprint))
    new_path = new.save(workdir.codebook_path(work, new.fingerprint))

    out = workdir.align_refit(work, new_path, ref_path, inputs=[str(root)], column="embedding", fresh=True, engine="torch")
    aligned = Codebook.load(out["path"])
    assert out["aligned"] and out["fingerprint"] == aligned.fingerprint != new.fingerprint
    assert Path(out["path"]) == workdir.codebook_path(work, aligned.fingerprint)
    assert not new_path.exists() and ref_path.exists()  # the unaligned refit never became current: removed
    assert aligned.stats["alignment"]["reference"] == ref.fingerprint == out["reference"] and out["rows"] == 2000
    assert torch.equal(aligned.centroids[torch.tensor(aligned.stats["alignment"]["mapping"])], new.centroids)

    ref_codes, new_codes = ref.encode(x), new.encode(x)
    kept = kept_rows(aligned.encode(x), ref_codes)
    best = kept_rows(new_codes, ref_codes, match_by_cooccurrence(cooccurrence(new_codes, ref_codes, 10, 10)))
    assert kept == best and out["kept"] == kept / 2000 and out["churn"] == 1 - kept / 2000
    assert kept / 2000 > 0.8 and kept_rows(new_codes, ref_codes) / 2000 == out["kept_unaligned"] < 0.2, out

    # A bounded sample estimates the same share; aligning again reproduces the same file, kept as it is.
    before = Path(out["path"]).read_bytes()
    again = workdir.align_refit(
        work, out["path"], ref_path, inputs=[str(root)], column="embedding", fresh=False, max_rows=500, engine="torch"
    )
    assert again["rows"] == 500 and again["fingerprint"] == out["fingerprint"] and again["renumbered"] == 0
    assert abs(again["kept"] - out["kept"]) < 0.1 and Path(out["path"]).read_bytes() == before
    assert sorted(p.name for p in (work / "codebooks").iterdir()) == sorted([ref_path.name, Path(out["path"]).name])

    # Another metric partitions another space: left as fitted, and the report says why.
    other = fit_from_tables([str(root)], 10, TableSettings(column="embedding"), FitSettings(metric="cosine", engine="torch"))
    other_path = other.save(workdir.codebook_path(work, other.fingerprint))
    skipped = workdir.align_refit(work, other_path, ref_path, inputs=[str(root)], column="embedding", fresh=True)
    assert not skipped["aligned"] and skipped["path"] == str(other_path) and other_path.exists()
    assert skipped["reason"] == "the metric changed (l2 → cosine): its codes are other cells"


def test_a_residual_refit_is_renumbered_level_by_level_and_a_codec_change_is_not(tmp_path: Path) -> None:
    import numpy as np

    from vq_pipeline import Codebook
    from vq_pipeline.io.table_writer import write_embeddings
    from vq_pipeline.jobs.demo import generate_embeddings
    from vq_pipeline.jobs.fit_tables import fit_from_tables

    root, work = tmp_path / "in", tmp_path / "work"
    x = generate_embeddings(2000, 12, 10, seed=0)
    write_embeddings(root / "part-0.parquet", np.arange(2000), x)
    kw = dict(column="embedding", n_codes=8, codec="residual", levels=2, engine="torch")
    ref = fit_tables([str(root)], seed=0, **kw)
    new = fit_tables([str(root)], seed=1, **kw)
    ref_path = ref.save(workdir.codebook_path(work, ref.fingerprint))
    new_path = new.save(workdir.codebook_path(work, new.fingerprint))
    out = workdir.align_refit(work, new_path, ref_path, inputs=[str(root)], column="embedding", fresh=True, engine="torch")
    aligned = Codebook.load(out["path"])
    assert out["aligned"] and aligned.codec == "residual" and out["kept"] >= out["kept_unaligned"]
    # the same cells: every row decodes to the same vector, only the numbers changed
    assert np.array_equal(aligned.decode(aligned.encode(x)), new.decode(new.encode(x)))
    whole = (np.asarray(aligned.encode(x)) == np.asarray(ref.encode(x))).all(axis=1).mean()
    assert out["kept"] == pytest.approx(whole) and len(out["kept_per_level"]) == 2
    flat = fit_from_tables([str(root)], 8, TableSettings(column="embedding"), FitSettings(engine="torch"))
    flat_path = flat.save(workdir.codebook_path(work, flat.fingerprint))
    skipped = workdir.align_refit(work, flat_path, out["path"], inputs=[str(root)], column="embedding", fresh=True)
    assert not skipped["aligned"] and "the codec changed (residual, 2 levels → flat, 1 levels)" in skipped["reason"]
