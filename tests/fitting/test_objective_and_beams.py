"""One cosine objective for every codec, beams refused where they cannot change anything, a warning
when a residual level makes the codes worse, and multi-level errors that name the rows they are about.

Oracles: the float64 sum of ``1 - cos`` between each unit row and its unit reconstruction (what
encode's distances mean), recomputed here from the codes and centroids; brute-force beam widths."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from vq_pipeline import Codebook, InvalidInputError, TooFewPointsError, fit_codebook
from vq_pipeline.compute.levels import beam_width, encode_multilevel
from vq_pipeline.fitting.multilevel import stated_objective
from vq_pipeline.jobs.drift import drift_report
from vq_pipeline.jobs.fit_file import FitJob, FitSummary
from vq_pipeline.settings import FitSettings, TableSettings
from vq_pipeline.validate import check_beam, max_beam

KW = dict(engine="torch", device="cpu", seed=0)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().data.astype(np.float32) + 1.0  # (1797, 64) real digits, no all-zero row


def cosine_oracle(x: np.ndarray, cb: Codebook) -> float:
    """sum over rows of 1 - cos(row, reconstruction), in float64, from encode's codes."""
    codes = cb.encode(x)
    c = cb.centroids.numpy().astype(np.float64)
    if cb.codec == "flat":
        y = c[codes]
    elif cb.codec == "residual":
        y = sum(c[lv][codes[:, lv]] for lv in range(cb.levels))
    else:
        y = np.concatenate([c[lv][codes[:, lv]] for lv in range(cb.levels)], axis=1)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    return float((1.0 - (xn * yn).sum(axis=1)).sum())


CODECS = [("flat", 1), ("residual", 1), ("residual", 3), ("product", 4)]


@pytest.mark.parametrize(("codec", "levels"), CODECS)
def test_cosine_inertia_is_the_sum_of_one_minus_cos_for_every_codec(
    digits: np.ndarray, codec: str, levels: int, tmp_path: Path
) -> None:
    cb = fit_codebook(digits, 8, metric="cosine", codec=codec, levels=levels, **KW)
    want = cosine_oracle(digits, cb)
    _, dist = cb.encode(digits, return_distances=True)
    assert float(dist.astype(np.float64).sum()) == pytest.approx(want, rel=1e-5)
    assert cb.stats["inertia"] == pytest.approx(want, rel=1e-5)
    n = digits.shape[0]
    if codec != "flat":
        assert cb.stats["objective"] == "1 - cos" and cb.stats["mse"] == pytest.approx(want / n, rel=1e-5)
    # the saved file, the fit summary and drift's training baseline all say the same
    back = Codebook.load(cb.save(tmp_path / "cb.safetensors"))
    assert stated_objective(back) == pytest.approx(want, rel=1e-5)
    summary = FitSummary.of(back, tmp_path / "cb.safetensors", kept=False, init="auto", seconds=0.0)
    assert summary.inertia == pytest.approx(want, rel=1e-5)
    assert summary.mean_distance == pytest.approx(want / n, rel=1e-5)
    records = [{"rows": n, "distance_sum": float(dist.sum()), "code_counts": back.counts.flatten().tolist()}]
    report = drift_report(back, records)
    assert report["train_mean_distance"] == pytest.approx(want / n, rel=1e-5)
    assert report["distortion_ratio"] == pytest.approx(1.0, rel=1e-4)


def test_a_one_level_residual_codebook_reports_what_its_flat_twin_reports(digits: np.ndarray) -> None:
    flat = fit_codebook(digits, 8, metric="cosine", init="k-means++", **KW)
    one = fit_codebook(digits, 8, metric="cosine", codec="residual", levels=1, init="k-means++", **KW)
    assert np.array_equal(one.centroids[0].numpy(), flat.centroids.numpy())
    assert one.stats["inertia"] == pytest.approx(flat.stats["inertia"], rel=1e-5)


def test_multi_level_cosine_files_written_with_the_doubled_figure_are_read_as_one_minus_cos(
    digits: np.ndarray,
) -> None:
    cb = fit_codebook(digits, 8, metric="cosine", codec="residual", levels=2, **KW)
    legacy_stats = {k: v for k, v in cb.stats.items() if k != "objective"}
    legacy_stats.update(inertia=2 * cb.stats["inertia"], mse=2 * cb.stats["mse"])
    legacy = Codebook(
        centroids=cb.centroids, counts=cb.counts, metric="cosine", codec="residual", stats=legacy_stats
    )
    assert stated_objective(legacy) == pytest.approx(cb.stats["inertia"], rel=1e-12)
    assert stated_objective(legacy, "mse") == pytest.approx(cb.stats["mse"], rel=1e-12)
    l2 = fit_codebook(digits, 8, codec="residual", levels=2, **KW)
    assert stated_objective(l2) == l2.stats["inertia"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    levels=st.integers(1, 3),
    codec=st.sampled_from(["residual", "product"]),
    metric=st.sampled_from(["l2", "cosine"]),
)
def test_multi_level_error_is_the_mean_of_encodes_distances(seed: int, levels: int, codec: str, metric: str) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, 6)).astype(np.float32) + rng.normal(size=6).astype(np.float32)
    cb = fit_codebook(x, 4, metric=metric, codec=codec, levels=levels if codec == "residual" else 2, n_iter=5, **KW)
    _, dist = cb.encode(x, return_distances=True)
    total = float(dist.astype(np.float64).sum())
    assert cb.stats["inertia"] == pytest.approx(total, rel=1e-4, abs=1e-6)
    if metric == "cosine":
        assert total == pytest.approx(cosine_oracle(x, cb), rel=1e-4, abs=1e-6)
    if codec == "residual":  # the error after the last level is the codebook's
        assert cb.stats["levels"][-1]["mse"] == pytest.approx(cb.stats["mse"], rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------ beams


def test_max_beam_is_the_widest_beam_a_search_can_keep() -> None:
    assert [max_beam(16, lv) for lv in (1, 2, 3)] == [1, 16, 256]


@given(n_codes=st.integers(1, 12), levels=st.integers(1, 4), beam=st.integers(1, 3000))
def test_check_beam_accepts_exactly_the_beams_that_change_the_search(n_codes: int, levels: int, beam: int) -> None:
    limit = max_beam(n_codes, levels)
    # the widths a search keeps before each level: any beam from the limit on keeps every tuple
    widths = [beam_width(beam, n_codes, lv) for lv in range(levels)]
    assert widths == [beam_width(min(beam, limit), n_codes, lv) for lv in range(levels)]
    if beam <= limit:
        assert check_beam("beam", beam, n_codes=n_codes, levels=levels) == beam
    else:
        with pytest.raises(InvalidInputError, match=rf"^beam={beam} exceeds {limit}, .*Fix: pass beam between 1 and {limit}"):
            check_beam("beam", beam, n_codes=n_codes, levels=levels)


def test_train_beam_and_beam_above_what_a_search_keeps_are_refused(digits: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"train_beam=17 exceeds 16, .*levels=2 .*n_codes=16.*Fix: pass train_beam between 1 and 16"):
        fit_codebook(digits, 16, codec="residual", levels=2, train_beam=17, **KW)
    job = dict(inputs=("a.parquet",), out=str(tmp_path / "cb.safetensors"), reading=TableSettings("embedding"))
    with pytest.raises(InvalidInputError, match=r"train_beam=9 exceeds 8"):
        FitJob(n_codes=8, settings=FitSettings(codec="residual", levels=2, train_beam=9), **job)
    FitJob(n_codes=8, settings=FitSettings(codec="residual", levels=2, train_beam=8), **job)  # the widest is fine
    FitJob(n_codes=4, settings=FitSettings(codec="product", levels=2), **job)
    cb = fit_codebook(digits, 4, codec="residual", levels=3, n_iter=3, **KW)
    with pytest.raises(InvalidInputError, match=r"beam=17 exceeds 16, .*Fix: pass beam between 1 and 16"):
        cb.encode(digits, beam=17)
    assert cb.encode(digits, beam=16).shape == (1797, 3)  # 16 of the 64 three-level tuples: allowed


def test_a_residual_level_that_raises_the_error_warns_naming_the_level_and_both_errors(
    digits: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vq_pipeline.fitting.multilevel"):
        cb = fit_codebook(digits, 16, codec="residual", levels=2, train_beam=16, **KW)
    before, after = (level["mse"] for level in cb.stats["levels"])
    assert after > before  # what the warning is about, by the codebook's own figures
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and re.search(r"residual level 1 raises .* from [0-9.]+ \(levels 0..0\) to [0-9.]+", warned[0])
    assert f"{before:.6g}" in warned[0] and f"{after:.6g}" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vq_pipeline.fitting.multilevel"):
        greedy = fit_codebook(digits, 16, codec="residual", levels=2, **KW)
    assert greedy.stats["levels"][1]["mse"] < greedy.stats["levels"][0]["mse"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ messages


def test_a_residual_level_with_too_few_distinct_rows_is_named_with_the_column_and_the_level() -> None:
    x = np.repeat(np.array([[0, 0], [1, 0], [0, 5]], np.float32), 4, axis=0)  # 3 distinct rows
    for init in ("auto", "k-means++", "first"):
        with pytest.raises(
            TooFewPointsError,
            match=r"^residual level 1 \(what level 0 leaves of the 12 rows of embedding\) has only 1 distinct rows "
            r"but n_codes=3.*Fix: fit levels=1 ",
        ):
            fit_codebook(x, 3, codec="residual", levels=2, init=init, column="embedding", **KW)


def test_multi_level_encode_names_the_column_and_the_absolute_row() -> None:
    cb = fit_codebook(np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32), 4, codec="residual", levels=2, **KW)
    y = np.ones((300, 4), np.float32)
    y[277, 3] = np.nan
    with pytest.raises(InvalidInputError, match=r"^embedding\[777, 3\]=nan"):
        encode_multilevel(cb.centroids, "residual", "l2", y, memory_budget=2**20, name="embedding", row_offset=500)
    y[277, 3] = 1.0
    y[12] = 0.0
    cos = fit_codebook(np.random.default_rng(1).normal(size=(200, 4)).astype(np.float32), 4, metric="cosine", codec="product", levels=2, **KW)
    with pytest.raises(InvalidInputError, match=r"^embedding\[512\] has norm 0"):
        encode_multilevel(cos.centroids, "product", "cosine", y, memory_budget=2**20, name="embedding", row_offset=500)
