"""Residual codes are encoded greedily by default; ``vq inspect`` and ``vq encode`` say how to get FAISS-default
quality, with the figures of the committed ``benchmarks/codecs.py`` run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from vq_flows import cli
from vq_flows.cli.inspection import FAISS_QUALITY

from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.settings import EncodeSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((600, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def books(rows: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("books")
    fits = {
        "residual": dict(codec="residual", levels=3),
        "residual-tb3": dict(codec="residual", levels=3, train_beam=3),
        "product": dict(codec="product", levels=2),
        "flat": {},
    }
    return {name: fit_codebook(rows, 8, seed=0, n_iter=5, **kw).save(folder / f"{name}.safetensors") for name, kw in fits.items()}


def test_default_encode_is_still_greedy() -> None:
    # The benchmark found no encode width that reaches FAISS's default error on a default fit (train_beam=1).
    assert EncodeSettings("embedding").beam == 1


def test_the_hint_quotes_the_committed_benchmark() -> None:
    runs = sorted((REPO / "benchmarks" / "results").glob("codecs-*.json"))
    assert runs, "the codecs benchmark behind the hint is committed under benchmarks/results/"
    rows = {(r["method"], r["variant"]): r for r in json.loads(runs[-1].read_text())["rows"]}
    tb5_beam2, faiss, greedy = rows[("ours-rq4-tb5-tol4", "beam=2")], rows[("faiss-rq4", "default")], rows[("ours-rq4", "greedy")]
    tb5_beam5 = rows[("ours-rq4-tb5", "beam=5")]
    quoted = [float(v) for v in re.findall(r"\b\d+\.\d\b", FAISS_QUALITY)]
    assert quoted == [round(r["new_mse"], 1) for r in (tb5_beam2, faiss, greedy, tb5_beam5)]
    # what the hint promises: that width and training reach FAISS's default error at no more encode time
    assert tb5_beam2["new_mse"] <= faiss["new_mse"] and tb5_beam2["encode_s"] <= faiss["encode_s"]
    # and, at the default tol, FAISS's own width (5) reaches it too
    assert tb5_beam5["new_mse"] <= faiss["new_mse"]
    # and why greedy stays the default: no width up to FAISS's (5) does so on a codebook fitted at the defaults
    for b in ("greedy", "beam=2", "beam=3", "beam=5"):
        row = rows[("ours-rq4", b)]
        assert row["new_mse"] > faiss["new_mse"] or row["encode_s"] > faiss["encode_s"], b


def test_inspect_says_how_residual_codes_get_faiss_default_quality(books: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    greedy = "residual codes are encoded greedily by default (--beam 1)"
    want = {
        "residual": [f"{greedy}. {FAISS_QUALITY}"],
        "residual-tb3": [f"{greedy}; this codebook was fitted with train_beam=3: encode with --beam 2 or wider. {FAISS_QUALITY}"],
        "product": [],
        "flat": [],
    }
    for name, path in books.items():
        assert cli.main(["inspect", str(path)]) == 0
        out, err = capsys.readouterr()
        assert err.splitlines() == want[name], name
        assert out == cli.describe(Codebook.load(path), title=str(path)) + "\n", "the description itself is unchanged"
        assert cli.main(["inspect", str(path), "--quiet"]) == 0 and capsys.readouterr().err == ""
        assert cli.main(["inspect", str(path), "--json"]) == 0 and capsys.readouterr().err == ""


def test_a_greedy_residual_encode_logs_the_hint(books: dict[str, Path], rows: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = write_embeddings(tmp_path / "in" / "part-0.parquet", np.arange(len(rows)), rows)
    hint = f"residual codes encoded greedily (--beam 1). {FAISS_QUALITY}"
    runs = [
        ("residual", [], True),
        ("residual", ["--beam", "2"], False),
        ("residual", ["--quiet"], False),
        ("product", [], False),
        ("flat", [], False),
    ]
    for i, (name, extra, shown) in enumerate(runs):
        argv = ["encode", str(table), "--codebook", str(books[name]), "--column", "embedding", "--out", str(tmp_path / f"out{i}")]
        assert cli.main([*argv, *extra]) == 0
        err = capsys.readouterr().err
        assert (hint in err.splitlines()) == shown, (name, extra, err)
