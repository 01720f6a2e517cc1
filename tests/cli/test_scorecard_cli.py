"""``vq fit`` names the scorecard's error and recall@10; ``vq inspect`` shows the scorecard's lines, and its
JSON the whole scorecard; a codebook file without one (older releases) is described as before."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vq_flows import cli
from vq_flows.cli.inspection import describe

from vq_pipeline import Codebook
from vq_pipeline.io.table_writer import write_embeddings


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)  # (1797, 64)
    path = tmp_path_factory.mktemp("scorecard_cli") / "digits.parquet"
    write_embeddings(path, np.arange(len(x), dtype=np.int64), x)
    return str(path)


def vq(capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_vq_fit_and_vq_inspect_show_the_scorecard(data: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cb.safetensors"
    fit = ["fit", data, "--column", "embedding", "--codes", 8, "--codec", "residual", "--levels", 2, "--out", out]
    line = vq(capsys, *fit, "--quiet", "--holdout", 0.1, "--seed", 1)
    card = Codebook.load(out).stats["scorecard"]
    assert card["sample"] == "holdout" and card["n_rows"] == 180
    assert f"scorecard on 180 held-out rows: error {card['error']:.4g}, recall@10 {card['recall_at_k']:.4g}" in line
    assert json.loads(vq(capsys, *fit, "--quiet", "--holdout", 0.1, "--seed", 1, "--json"))["scorecard"] == card

    text = vq(capsys, "inspect", out)
    rows = {line.split("  ")[1].strip(): line for line in text.splitlines() if line.startswith("  ") and line[2] != " "}
    assert (
        f"180 held-out rows: error {card['error']:.4g}, recall@10 {card['recall_at_k']:.4f}, prefix coherence "
        f"{card['prefix_coherence']:.4f}, collision rate {card['collision_rate']:.4g}"
    ) in rows["scorecard"]
    sizes = " / ".join(f"{v:,.1f}" for v in card["effective_size"])
    assert f"per level {sizes} of 8 codes, tuples {card['effective_size_tuples']:,.1f}" in rows["effective size"]
    errors = " / ".join(f"{v:.4g}" for v in card["error_by_levels"])
    assert f"error {errors}, recall@10 " in rows["by levels 0..l"]
    assert json.loads(vq(capsys, "inspect", out, "--json"))["stats"]["scorecard"] == card


def test_inspect_describes_a_codebook_without_a_scorecard_as_before(data: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "flat.safetensors"
    vq(capsys, "fit", data, "--column", "embedding", "--codes", 8, "--out", out, "--quiet")
    cb = Codebook.load(out)
    old = dataclasses.replace(cb, stats={k: v for k, v in cb.stats.items() if k != "scorecard"})
    with_card, without = describe(cb).splitlines(), describe(old).splitlines()
    assert [line for line in with_card if line not in without] == [
        line for line in with_card if line.split()[0] in ("scorecard", "effective")
    ]
    assert not any(line.split()[0] in ("scorecard", "effective") for line in without)
    # a hostile scorecard (not a dict, or odd values) is described, not a crash
    odd = dataclasses.replace(cb, stats={**cb.stats, "scorecard": {"error": "\x1b[2J", "effective_size": [None]}})
    assert "\x1b" not in describe(odd)
    assert "  scorecard " in describe(dataclasses.replace(cb, stats={"scorecard": 3}))
