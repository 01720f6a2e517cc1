"""Balanced fits: every code of every level holds at most ceil((1 + balance) * n_rows / n_codes) training
rows, in memory and streamed; the codebook records the cap, the largest code and the stated gap; the
error stays close to the unconstrained fit's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import fit_tables, write_parts
from sklearn.datasets import load_digits

from vq_pipeline import InvalidInputError, fit_codebook
from vq_pipeline.compute.balanced import code_cap

CPU = dict(engine="torch", device="cpu")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.tensor(load_digits().data, dtype=torch.float32)


def test_flat_fit_caps_every_code_and_records_it(digits: torch.Tensor) -> None:
    plain = fit_codebook(digits, 16, seed=0, n_iter=15, **CPU)
    balanced = fit_codebook(digits, 16, seed=0, n_iter=15, balance=0.05, **CPU)
    cap = math.ceil(1.05 * digits.shape[0] / 16)
    assert int(plain.counts.max()) > cap  # the cap binds on digits
    assert int(balanced.counts.max()) <= cap and int(balanced.counts.sum()) == digits.shape[0]
    s = balanced.stats["balance"]
    assert (s["balance"], s["cap"], s["max_code_size"]) == (0.05, cap, int(balanced.counts.max()))
    assert s["bound"] <= s["cost"] and s["gap"] == pytest.approx(s["cost"] - s["bound"])
    assert balanced.settings["balance"] == 0.05 and "balance" not in plain.settings
    # The error under the cap stays within 5% of the unconstrained fit's (measured: 1.02x).
    assert balanced.stats["inertia"] <= 1.05 * plain.stats["inertia"]
    assert "balance" not in plain.stats


def test_balanced_cosine_fit_caps_codes(digits: torch.Tensor) -> None:
    cb = fit_codebook(digits[:600] + 0.1, 8, metric="cosine", seed=1, n_iter=8, balance=0.0, **CPU)
    assert int(cb.counts.max()) <= code_cap(600, 8, 0.0) == 75


@pytest.mark.parametrize("codec", ["residual", "product"])
def test_every_level_of_a_multilevel_fit_is_capped(digits: torch.Tensor, codec: str) -> None:
    cb = fit_codebook(digits[:800], 8, codec=codec, levels=2, seed=0, n_iter=8, balance=0.1, **CPU)
    cap = code_cap(800, 8, 0.1)
    for level in cb.stats["levels"]:
        assert level["balance"]["cap"] == cap and level["balance"]["max_code_size"] <= cap


def test_streamed_balanced_fit_caps_codes_and_matches_in_memory(tmp_path) -> None:
    rows = write_parts(tmp_path / "in", {"a.parquet": 700, "b.parquet": 500}, dim=8, seed=2)
    x = torch.from_numpy(np.concatenate([rows[k] for k in sorted(rows)]))
    init = x[::100][:12].clone()
    common = dict(column="embedding", n_codes=12, init=init, n_iter=6, tol=0.0, balance=0.05, **CPU)
    memory = fit_tables([tmp_path / "in"], **common)
    streamed = fit_tables([tmp_path / "in"], data_budget=0, batch_rows=97, **common)
    assert streamed.stats["mode"] == "streamed"
    cap = code_cap(1200, 12, 0.05)
    assert int(streamed.counts.max()) <= cap and int(memory.counts.max()) <= cap
    torch.testing.assert_close(streamed.centroids, memory.centroids, rtol=0, atol=1e-4)
    assert streamed.stats["balance"]["cap"] == cap
    # Partitioned: the capped assignment reads the partitions where the fit runs; the same codebook.
    from vq_pipeline.jobs.mappers import serial

    partitioned = fit_tables([tmp_path / "in"], mapper=serial, scratch=tmp_path, **common)
    assert partitioned.stats["mode"] == "partitioned" and int(partitioned.counts.max()) <= cap
    torch.testing.assert_close(partitioned.centroids, memory.centroids, rtol=0, atol=1e-4)


def test_bad_balance_is_refused_before_fitting(digits: torch.Tensor) -> None:
    with pytest.raises(InvalidInputError, match=r"balance=-1; expected None \(off\) or a number >= 0"):
        fit_codebook(digits, 4, balance=-1, **CPU)
