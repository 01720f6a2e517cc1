"""Every fit records a scorecard of its codes in ``stats["scorecard"]``: the compute function's figures on the
held-out rows, or on a seeded sample of the training rows (drawn through the data source: in memory or read
from streamed tables), and never a change to the centroids.

Oracles: :func:`vq_pipeline.compute.scorecard.scorecard` (itself checked against loops) called on a sample
drawn here by hand, with codes encoded and reconstructions summed here level by level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_parts

from vq_pipeline import FitSettings, fit_codebook
from vq_pipeline.compute.data import InMemoryRows
from vq_pipeline.compute.lloyd import run_steps
from vq_pipeline.compute.scorecard import DEFAULT_SAMPLE_ROWS, sample_rows, scorecard
from vq_pipeline.fitting.flat import fit_steps
from vq_pipeline.fitting.options import SCORECARD_STREAM, fit_options, holdout_rows
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import TableSettings

CPU = dict(engine="torch", device="cpu")


def _rows(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=g) * 3
    return centres[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def _expected(cb, x: torch.Tensor) -> dict:
    """The scorecard of ``cb``'s codes of ``x``: codes by encode, reconstructions summed here per level."""
    codes = cb.encode(x, engine="torch", device="cpu")
    prefix = None
    if cb.codec == "residual":
        parts = [cb.centroids[level][codes[:, level]] for level in range(cb.levels)]
        prefix = [torch.stack(parts[: level + 1]).sum(0) for level in range(cb.levels)]
    card = scorecard(x, codes, cb.decode(codes), metric=cb.metric, codec=cb.codec, prefix_decoded=prefix)
    return {"codec": cb.codec, **card}


def _assert_card(got: dict, want: dict, sample: str) -> None:
    assert got["sample"] == sample
    assert set(got) == {"sample", *want}
    for key, value in want.items():
        assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6, abs=1e-9)), key


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_codes=16),
        dict(n_codes=8, codec="residual", levels=3),
        dict(n_codes=8, codec="product", levels=2),
        dict(codec="binary"),
        dict(codec="scalar", bits=4),
    ],
    ids=["flat", "residual", "product", "binary", "scalar"],
)
def test_a_fit_records_the_scorecard_of_a_seeded_training_sample(kw: dict) -> None:
    x = _rows(3000, 8, seed=1)
    cb = fit_codebook(x, seed=7, n_iter=15, **kw, **CPU)
    positions = sample_rows(3000, DEFAULT_SAMPLE_ROWS, [7, SCORECARD_STREAM])
    _assert_card(cb.stats["scorecard"], _expected(cb, x[torch.from_numpy(positions)]), "training")
    assert cb.stats["scorecard"]["n_rows"] == DEFAULT_SAMPLE_ROWS
    assert cb.timings["scorecard_seconds"] > 0 and "scorecard_seconds" not in cb.stats
    if kw.get("codec") == "residual":  # each level lowers the error of the reconstruction
        errors = cb.stats["scorecard"]["error_by_levels"]
        assert len(errors) == 3 and errors[0] > errors[1] > errors[2] == cb.stats["scorecard"]["error"]
    # deterministic for a given seed
    again = fit_codebook(x, seed=7, n_iter=15, **kw, **CPU)
    assert again.stats["scorecard"] == cb.stats["scorecard"]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_with_a_holdout_the_scorecard_looks_at_the_held_out_rows(metric: str) -> None:
    x = _rows(1000, 6, seed=2)
    cb = fit_codebook(x, 10, metric=metric, seed=3, holdout=0.25, n_iter=10, **CPU)
    held = x[torch.from_numpy(holdout_rows(1000, 0.25, 3, n_codes=10))]
    if metric == "cosine":
        held = torch.nn.functional.normalize(held, dim=1)
    _assert_card(cb.stats["scorecard"], _expected(cb, held), "holdout")
    assert cb.stats["scorecard"]["n_rows"] == cb.stats["holdout"]["rows"] == 250


def test_the_scorecard_leaves_the_centroids_and_the_fingerprint_alone() -> None:
    x = _rows(2500, 8, seed=4)
    cb = fit_codebook(x, 12, seed=9, n_iter=20, **CPU)
    opts = fit_options(12, FitSettings(seed=9, n_iter=20, **CPU), dim=8, n_rows=2500)
    source = InMemoryRows(x, engine="torch")
    bare = run_steps(fit_steps(source, opts, data_fingerprint=""), source.e_step)  # the flat fit, no scorecard
    assert "scorecard" in cb.stats and "scorecard" not in bare.stats
    assert torch.equal(cb.centroids, bare.centroids) and cb.fingerprint == bare.fingerprint
    assert {k: v for k, v in cb.stats.items() if k != "scorecard"} == bare.stats


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_a_table_fit_draws_its_sample_through_the_data_source(tmp_path: Path, streamed: bool) -> None:
    parts = {"date=2026-11-01/part-0.parquet": 1500, "date=2026-11-02/part-0.parquet": 1300}
    rows = write_parts(tmp_path / "in", parts, dim=6)
    x = torch.from_numpy(np.concatenate([rows[k] for k in sorted(rows)]).astype(np.float32))
    reading = TableSettings("embedding", data_budget=1000 if streamed else 10**9)
    cb = fit_from_tables([tmp_path / "in"], 8, reading, FitSettings(seed=4, n_iter=8, **CPU))
    assert cb.stats["mode"] == ("streamed" if streamed else "in-memory")
    if streamed:  # the streamed tables read the rows the generator picks
        gen = np.random.default_rng([4, SCORECARD_STREAM])
        positions = np.sort(gen.choice(2800, size=DEFAULT_SAMPLE_ROWS, replace=False))
    else:  # all rows are in memory: the sample's positions among them
        positions = sample_rows(2800, DEFAULT_SAMPLE_ROWS, [4, SCORECARD_STREAM])
    _assert_card(cb.stats["scorecard"], _expected(cb, x[torch.from_numpy(positions)]), "training")
