"""Scalar, binary and rotated codecs through ``vq`` (fit, encode, inspect).

``vq`` runs in-process (:func:`vq_flows.cli.main`) on a real parquet file of the scikit-learn digits (1,797
rows, dim 64), and once as a real subprocess (``python -m vq_flows.cli``) from fit to inspect. Oracles: the
library's own table fit with the same settings, and numpy's packing of ``Codebook.encode``'s codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from vq_flows import cli

from vq_pipeline import Codebook
from vq_pipeline.io.table_writer import packed_codes, write_embeddings
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import FitSettings, TableSettings


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("codec_cli")
    x = load_digits().data.astype(np.float32)
    x = x + np.random.default_rng(1).normal(0, 0.25, x.shape).astype(np.float32)  # (1797, 64), no constant column
    write_embeddings(root / "in" / "digits.parquet", np.arange(len(x), dtype=np.int64), x)
    return {"root": root, "data": str(root / "in" / "digits.parquet"), "x": x}


def vq(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def fit_args(digits: dict[str, Any], out: Path, *extra: Any) -> list[Any]:
    return ["fit", digits["data"], "--column", "embedding", "--out", out, "--quiet", "--seed", 3, *extra]


def oracle_pack(codes: np.ndarray, codec: str, bits: int) -> np.ndarray:
    codes = codes.astype(np.uint8)
    if codec == "binary":
        return np.packbits(codes, axis=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4) if bits == 4 else codes


# (options, codec, n_codes, levels, rotation, bits)
CASES = {
    "scalar4": (["--codec", "scalar", "--bits", 4], "scalar", 16, 64, "none", 4),
    "binary-itq": (["--codec", "binary", "--rotation", "itq"], "binary", 2, 64, "itq", 1),
    "product-opq": (["--codec", "product", "--levels", 4, "--codes", 16, "--rotation", "opq"], "product", 16, 4, "opq", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fit_encode_inspect(digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    options, codec, n_codes, levels, rotation, bits = CASES[case]
    out = tmp_path / "cb.safetensors"
    code, stdout, err = vq(capsys, *fit_args(digits, out, *options, "--json"))
    assert code == 0, err
    cb = Codebook.load(out)
    assert (cb.codec, cb.n_codes, cb.levels, cb.dim) == (codec, n_codes, levels, 64)
    assert cb.settings.get("rotation", "none") == rotation
    assert (cb.rotation is not None) == (rotation != "none")
    # the command fits what the library fits with the same settings
    settings = FitSettings(seed=3, codec=codec, levels=1 if codec in ("scalar", "binary") else levels, rotation=rotation, **({"bits": bits} if codec == "scalar" else {}))
    oracle = fit_from_tables([digits["data"]], n_codes, TableSettings(column="embedding"), settings)
    assert torch.equal(cb.centroids, oracle.centroids) and torch.equal(cb.counts, oracle.counts)
    summary = json.loads(stdout)
    assert (summary["codec"], summary["levels"], summary["fingerprint"]) == (codec, levels, cb.fingerprint)

    code, stdout, err = vq(capsys, "encode", digits["data"], "--codebook", out, "--column", "embedding", "--out", tmp_path / "codes", "--id-column", "id", "--with-distance", "--quiet")
    assert code == 0, err
    frame = pl.read_parquet(tmp_path / "codes" / "digits.parquet").sort("id")
    want, dist = cb.encode(digits["x"], return_distances=True)
    want = np.asarray(want)
    assert np.array_equal(frame["distance"].to_numpy(), np.asarray(dist))
    if codec in ("scalar", "binary"):
        got = packed_codes(frame)
        assert got.shape == (len(want), {4: 32, 1: 8}[bits])
        assert np.array_equal(got, oracle_pack(want, codec, bits))
    else:
        assert np.array_equal(frame["codes"].to_numpy(), want)

    code, text, err = vq(capsys, "inspect", out)
    assert code == 0, err
    lines = {line.split()[0]: " ".join(line.split()[1:]) for line in text.splitlines()[1:] if line.startswith("  ") and line.split()}
    if codec == "scalar":
        assert lines["codec"] == "scalar, 4 bits per dimension, range minmax"
        assert lines["codes"] == "16 values per dimension x dim 64, 32 bytes per row"
        assert lines["clipped"] == f"{cb.stats['clipped']:.3%} of training values outside the range"
        assert "rotation" not in lines
    if codec == "binary":
        assert lines["codec"] == "binary, 1 bit per dimension"
        assert lines["codes"] == "2 values per dimension x dim 64, 8 bytes per row"
        assert lines["rotation"] == "itq (20 iterations), 64 x 64 orthogonal matrix"
        assert "bit balance" in text
    if codec == "product":
        assert lines["rotation"] == "opq (20 iterations), 64 x 64 orthogonal matrix"


def test_fit_summary_line_names_the_codec_and_bits(digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s8.safetensors"
    code, line, err = vq(capsys, *fit_args(digits, out, "--codec", "scalar", "--codes", 256))
    assert code == 0, err
    cb = Codebook.load(out)
    assert (cb.codec, cb.n_codes) == ("scalar", 256)
    assert "fitted scalar codes, 8 bits per dimension (dim 64, l2)" in line and f"mse {cb.stats['mse']:.4g}" in line


@pytest.mark.parametrize(
    "options, message",
    [
        (["--codec", "scalar", "--bits", 4, "--codes", 256], "--codes 256 with --codec scalar; --bits 4 gives 16 codes"),
        (["--codec", "binary", "--codes", 4], "--codes 4 with --codec binary; one bit gives 2 codes"),
        (["--codec", "product", "--levels", 4, "--codes", 16, "--rotation", "itq"], "rotation='itq' with codec='product'"),
        (["--codec", "binary", "--bits", 4], "bits=4 with codec='binary'"),
    ],
)
def test_fit_refuses_what_the_codec_cannot_take(
    digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[Any], message: str
) -> None:
    out = tmp_path / "cb.safetensors"
    code, stdout, err = vq(capsys, *fit_args(digits, out, *options))
    assert code == 1 and stdout == "" and message in err and "Fix: " in err, err
    assert not out.exists()


@pytest.mark.parametrize("codec", ["flat", "product"])
def test_codes_is_a_required_option_but_for_scalar_and_binary(
    digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], codec: str
) -> None:
    code, stdout, err = vq(capsys, *fit_args(digits, tmp_path / "cb.safetensors", "--codec", codec))
    assert code == 2 and stdout == "" and "the following arguments are required: --codes" in err
    assert f"of --codec {codec}; only --codec scalar and binary take none). Fix: pass --codes K" in err


def test_encode_refuses_unique_with_scalar_codes(digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cb.safetensors"
    assert vq(capsys, *fit_args(digits, out, "--codec", "scalar"))[0] == 0
    code, stdout, err = vq(capsys, "encode", digits["data"], "--codebook", out, "--column", "embedding", "--out", tmp_path / "codes", "--id-column", "id", "--unique")
    assert code == 1 and stdout == "" and "unique=True with a scalar codebook" in err and "Fix: " in err
    assert not (tmp_path / "codes").exists()


@pytest.mark.slow
def test_the_real_command_from_fit_to_inspect(digits: dict[str, Any], tmp_path: Path) -> None:
    """``python -m vq_flows.cli`` as a user runs it: binary codes with a random rotation."""
    env = dict(os.environ)

    def run(*args: Any) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "vq_flows.cli", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    out = tmp_path / "cb.safetensors"
    fit = run("fit", digits["data"], "--column", "embedding", "--codec", "binary", "--rotation", "random", "--out", out, "--json")
    assert fit.returncode == 0, fit.stderr
    cb = Codebook.load(out)
    assert json.loads(fit.stdout)["fingerprint"] == cb.fingerprint and cb.codec == "binary"
    enc = run("encode", digits["data"], "--codebook", out, "--column", "embedding", "--out", tmp_path / "codes", "--id-column", "id", "--json")
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout)["codec"] == "binary"
    frame = pl.read_parquet(tmp_path / "codes" / "digits.parquet").sort("id")
    assert np.array_equal(packed_codes(frame), np.packbits(np.asarray(cb.encode(digits["x"])).astype(np.uint8), axis=1))
    inspect = run("inspect", out)
    assert inspect.returncode == 0 and "rotation" in inspect.stdout and "random" in inspect.stdout, inspect.stderr


def test_debug_shows_each_progress_line_once(digits: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--debug`` shows the library's log, which holds a fit's progress lines with their times: the plain
    copies of those lines are left out, so each shows once; without ``--debug`` the plain lines are there."""
    args = ["fit", digits["data"], "--column", "embedding", "--codes", 8, "--seed", 3, "--iters", 4, "--tol", 0]
    code, _, err = vq(capsys, "--debug", *args, "--out", tmp_path / "debug.safetensors")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "iteration 2/4: objective" in ln]
    assert len(lines) == 1 and " DEBUG " in lines[0], lines  # the log's line, with its time and level
    code, _, err = vq(capsys, *args, "--out", tmp_path / "plain.safetensors")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "iteration 2/4: objective" in ln]
    assert len(lines) == 1 and lines[0].startswith("iteration 2/4"), lines
