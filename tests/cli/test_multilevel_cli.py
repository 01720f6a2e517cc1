"""Residual and product codebooks through ``vq`` (fit, inspect, encode), the flows and the deployment.

``vq`` runs in-process (:func:`vq_flows.cli.main`) on a real parquet file of the scikit-learn digits
(1,797 rows, dim 64). Oracles: the library's own fit and encode with the same settings, and the
codebook's recorded stats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from conftest import write_parts
from vq_flows import cli

from vq_pipeline import Codebook
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.jobs.plots import PNG_MAGIC
from vq_pipeline.settings import FitSettings, PipelineSettings, TableSettings

N_CODES = 16


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("multilevel_cli")
    x = load_digits().data.astype(np.float32)  # (1797, 64)
    write_embeddings(root / "in" / "digits.parquet", np.arange(len(x), dtype=np.int64) + 500, x)
    return {"root": root, "data": str(root / "in" / "digits.parquet"), "x": x}


def vq(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def fit_args(digits: dict[str, Any], out: Path, *extra: Any) -> list[Any]:
    return ["fit", digits["data"], "--column", "embedding", "--codes", N_CODES, "--out", out, "--quiet", *extra]


@pytest.fixture(scope="module")
def residual(digits: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cb") / "residual.safetensors"
    assert cli.main([str(a) for a in fit_args(digits, out, "--codec", "residual", "--levels", 3, "--seed", 2)]) == 0
    return out


@pytest.mark.parametrize("codec, levels", [("residual", 3), ("product", 4)])
def test_vq_fit_multilevel_matches_fit_from_tables(
    digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], codec: str, levels: int
) -> None:
    out = tmp_path / f"{codec}.safetensors"
    code, stdout, err = vq(capsys, *fit_args(digits, out, "--codec", codec, "--levels", levels, "--seed", 2, "--json"))
    assert code == 0, err
    cb = Codebook.load(out)
    oracle = fit_from_tables([digits["data"]], N_CODES, TableSettings(column="embedding"), FitSettings(seed=2, codec=codec, levels=levels))
    assert (cb.codec, cb.levels, cb.n_codes, cb.dim) == (codec, levels, N_CODES, 64)
    assert cb.centroids.shape == oracle.centroids.shape == (levels, N_CODES, 64 if codec == "residual" else 64 // levels)
    assert torch.equal(cb.centroids, oracle.centroids) and torch.equal(cb.counts, oracle.counts)
    summary = json.loads(stdout)
    assert (summary["codec"], summary["levels"], summary["fingerprint"]) == (codec, levels, cb.fingerprint)
    assert summary["mse"] == pytest.approx(cb.stats["mse"]) and summary["collision_rate"] == cb.stats["collision_rate"]
    assert summary["level_mse"] == [level["mse"] for level in cb.stats["levels"]]
    # the one-line summary names the codec, the levels, the error and the collisions
    code, line, _ = vq(capsys, *fit_args(digits, out, "--codec", codec, "--levels", levels, "--seed", 2))
    assert code == 0
    assert f"{codec} {levels} levels x {N_CODES} codes" in line
    assert f"mse {cb.stats['mse']:.4g}" in line and f"collision rate {cb.stats['collision_rate']:.4g}" in line


def test_vq_fit_product_levels_must_divide_the_dim(
    digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p5.safetensors"
    code, stdout, err = vq(capsys, *fit_args(digits, out, "--codec", "product", "--levels", 5))
    assert code == 1 and stdout == ""
    assert "levels=5" in err and "dim=64" in err and "(1, 2, 4, 8, 16, 32, 64)" in err and "Fix:" in err
    assert "Traceback" not in err and not out.exists()
    # a flat codec with several levels is a usage the settings refuse as well
    code, _, err = vq(capsys, *fit_args(digits, out, "--codec", "flat", "--levels", 2))
    assert code == 1 and "levels=2 with codec='flat'" in err and not out.exists()


def test_vq_inspect_shows_the_per_level_table(residual: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cb = Codebook.load(residual)
    code, text, _ = vq(capsys, "inspect", residual)
    assert code == 0
    lines = text.splitlines()
    assert any(line.split() == ["codec", "residual,", "3", "levels"] for line in lines), text
    s = cb.stats
    (mse_line,) = [line for line in lines if line.strip().startswith("error (mse)")]
    assert mse_line.split()[-1] == f"{s['mse']:.6g}"
    (ids_line,) = [line for line in lines if line.strip().startswith("semantic ids")]
    assert f"{s['n_unique']:,} unique tuples" in ids_line and f"collision rate {s['collision_rate']:.4g}" in ids_line
    assert f"max suffix {s['max_suffix']:,}" in ids_line
    head = next(i for i, line in enumerate(lines) if line.strip().startswith("per level"))
    assert lines[head].split()[2:] == ["level", "error", "(mse)", "used", "codes", "iterations", "converged"]
    for level, line in enumerate(lines[head + 1 : head + 4]):
        st = s["levels"][level]
        converged = "yes" if st["converged"] else "no"
        assert line.split() == [str(level), f"{st['mse']:.6g}", f"{st['used_codes']}/{N_CODES}", str(st["iterations"]), converged]
    # the per-level errors of a residual codebook only fall, and the last is the codebook's
    assert [st["mse"] for st in s["levels"]] == sorted((st["mse"] for st in s["levels"]), reverse=True)

    code, text, _ = vq(capsys, "inspect", residual, "--json")
    summary = json.loads(text)
    assert (summary["codec"], summary["levels"], summary["n_codes"]) == ("residual", 3, N_CODES)
    assert summary["stats"]["collision_rate"] == s["collision_rate"] and len(summary["stats"]["levels"]) == 3


def test_vq_inspect_of_a_flat_codebook_has_no_level_rows(
    digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "flat.safetensors"
    assert vq(capsys, *fit_args(digits, out, "--iters", 3))[0] == 0
    code, text, _ = vq(capsys, "inspect", out)
    assert code == 0
    labels = {line.split()[0] for line in text.splitlines()[1:] if line.startswith("  ") and line.split()}
    assert {"codec", "error", "semantic", "per"}.isdisjoint(labels) and "codes" in labels


def test_vq_inspect_plot_of_a_multilevel_codebook(residual: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "levels.png"
    code, _, err = vq(capsys, "inspect", residual, "--plot", picture)
    assert code == 0, err
    assert picture.read_bytes()[: len(PNG_MAGIC)] == PNG_MAGIC


def test_vq_encode_beam_and_unique(
    digits: dict[str, Any], residual: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cb = Codebook.load(residual)
    out = tmp_path / "codes"
    code, stdout, err = vq(
        capsys, "encode", digits["data"], "--codebook", residual, "--column", "embedding", "--id-column", "id",
        "--out", out, "--beam", 4, "--unique", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    table = pl.read_parquet(out / "digits.parquet")
    codes = np.stack(table["codes"].to_numpy())  # (n_rows, 3)
    expected = cb.encode(torch.from_numpy(digits["x"]), beam=4).numpy()  # (n_rows, 3) the library's beam search
    assert np.array_equal(table["id"].to_numpy(), np.arange(len(digits["x"])) + 500)
    assert np.array_equal(codes, expected)
    # with the suffix, every row's tuple is unique in the folder
    keyed = np.concatenate([codes, table["suffix"].to_numpy()[:, None]], axis=1)  # (n_rows, 4)
    assert len(np.unique(keyed, axis=0)) == len(keyed)
    assert json.loads(stdout)["semantic_ids"]["n_rows"] == len(keyed)


def test_pipeline_plan_refits_on_a_codec_change_and_aligns_only_within_a_codec(residual: Path) -> None:
    from vq_pipeline.jobs.run_plan import MULTILEVEL_ALIGNMENT, alignment_unavailable, first_action, with_codec

    cb = Codebook.load(residual)
    pointer = {"path": str(residual), "fingerprint": cb.fingerprint, "metric": "l2", "n_codes": N_CODES}
    current = with_codec(pointer)  # read from the file
    assert (current["codec"], current["levels"]) == ("residual", 3)
    assert first_action(current, metric="l2", n_codes=N_CODES, codec="residual", levels=3) == ("none", None)
    action, reason = first_action(current, metric="l2", n_codes=N_CODES, codec="residual", levels=2)
    assert action == "fit" and "codec residual × 3 levels → residual × 2 levels" in reason
    assert first_action(current, metric="l2", n_codes=N_CODES)[0] == "fit"  # back to flat
    fit = {"path": "new.safetensors", "fingerprint": "ab" * 32, "n_codes": N_CODES, "codec": "flat"}
    skipped = alignment_unavailable(fit, current)
    assert skipped is not None and not skipped["aligned"] and skipped["reason"].startswith(MULTILEVEL_ALIGNMENT)
    assert (skipped["path"], skipped["fingerprint"], skipped["reference"]) == (fit["path"], fit["fingerprint"], cb.fingerprint)
    flat_ref = {**current, "codec": "flat", "levels": 1}
    assert alignment_unavailable(fit, flat_ref) is None
    assert alignment_unavailable({**fit, "codec": "residual", "levels": 3}, current) is None  # level by level


def test_deployment_takes_codec_and_levels() -> None:
    from vq_flows.deploy import parse_args

    base = ["--cron", "0 * * * *", "--input-root", "in", "--work-dir", "w", "--column", "e", "--codes", "4"]
    _, _, params = parse_args([*base, "--codec", "product", "--levels", "4"])
    assert (params["settings"]["codec"], params["settings"]["levels"]) == ("product", 4)
    with pytest.raises(SystemExit) as exc:
        parse_args([*base, "--levels", "3"])  # flat with 3 levels: refused at once
    assert exc.value.code == 2


def test_fit_flow_residual_and_pipeline_flow_product(prefect_api, tmp_path: Path) -> None:
    from vq_flows.fit import fit_codebook_flow

    from vq_pipeline.jobs.fit_file import FitSummary
    from vq_pipeline.jobs.run_report import fit_markdown
    from vq_flows.pipeline import vq_pipeline_flow

    dim, parts = 8, {"date=2026-11-01/part-0.parquet": 600, "date=2026-11-02/part-0.parquet": 400}
    write_parts(tmp_path / "in", parts, dim=dim)
    out = tmp_path / "residual.safetensors"
    summary = fit_codebook_flow([str(tmp_path / "in")], str(out), 4, TableSettings(column="embedding"), FitSettings(seed=1, codec="residual", levels=2))
    cb = Codebook.load(out)
    oracle = fit_from_tables([str(tmp_path / "in")], 4, TableSettings(column="embedding"), FitSettings(seed=1, codec="residual", levels=2))
    assert (cb.codec, cb.levels) == ("residual", 2) and torch.equal(cb.centroids, oracle.centroids)
    assert (summary["codec"], summary["levels"], summary["fingerprint"]) == ("residual", 2, cb.fingerprint)
    assert summary["level_mse"] == [level["mse"] for level in cb.stats["levels"]]
    md = fit_markdown(FitSummary.of(cb, out, kept=False, init="k-means++", seconds=0.0).to_dict())
    assert "| codec | residual, 2 levels |" in md and "## Levels" in md
    for i, level in enumerate(cb.stats["levels"]):
        assert f"| {i} | {level['mse']:.6g} | {level['used_codes']} of 4 |" in md

    result = vq_pipeline_flow(str(tmp_path / "in"), str(tmp_path / "work"), PipelineSettings(column="embedding", n_codes=4, codec="product", levels=2, refit_every_hours=None))
    current = Codebook.load(result["codebook"])
    assert (result["action"], current.codec, current.levels, current.dim) == ("fit", "product", 2, dim)
    assert result["params"]["codec"] == "product" and result["params"]["levels"] == 2
    assert result["encode"][0]["rows_encoded"] == sum(parts.values())
    codes = pl.read_parquet(Path(result["codes_dir"]), hive_partitioning=False)
    assert codes["codes"].dtype.shape == (2,)
