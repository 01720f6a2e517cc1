"""Outputs never touch inputs or strangers' files, and one fit writes one output at a time.

The rule lives in :mod:`vq_pipeline.io.paths`; the library (``encode_tables``, ``fit_from_tables``'s
checkpoint), the ``vq`` command and the flows all call it. The property test builds input and output
paths related in every way a careless user can relate them (the same folder, inside, around, through
a symlink, through ``..``, an empty ``--out`` run inside the data) and checks the invariant on real
runs: either the run is refused before it writes anything anywhere, or it succeeds and every input is
byte-identical, with no output inside an input folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vq_flows import cli

from vq_pipeline import Codebook, InvalidInputError, OutputLockedError, StateError, fit_codebook
from vq_pipeline.fitting.checkpoint import FitCheckpoint
from vq_pipeline.io.paths import check_output_file, check_output_folder, lock_path, output_lock
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.validate import TINY_SCALE
from vq_pipeline.settings import EncodeOptions, EncodeSettings, FitSettings, TableSettings

DIM = 4


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` (symlinks not followed) with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def codebook_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = torch.randn(200, DIM, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("cb") / "cb.safetensors"
    fit_codebook(x, 4, engine="torch").save(path)
    return path


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    data = root / "data"
    write_embeddings(data / "a.parquet", np.arange(30), rng.normal(size=(30, DIM)).astype(np.float32))
    write_embeddings(data / "sub" / "b.parquet", np.arange(30, 50), rng.normal(size=(20, DIM)).astype(np.float32))
    (root / "link").symlink_to(data)
    (root / "elsewhere").mkdir()
    return data


# How DATA is given, and where --out points, relative to the working folder ``root``.
INPUTS = ["data", "data/", "link", "data/a.parquet", "link/a.parquet", "data/*.parquet", "data/**/*.parquet"]
OUTS = [
    "data",
    "data/",
    "link",
    "data/codes",
    "link/codes",
    "data/sub",
    "elsewhere/../data/codes",
    ".",
    "",
    "codes",
    "elsewhere/codes",
    "data-codes",
]


def expected_refusal(given: str, out: str) -> bool:
    """The rule, stated independently of the implementation: outputs may not share a folder tree
    with a searched input folder, may not be the folder of an input file, and may not contain one."""
    if out == "":
        return True
    folder_input = not given.endswith(".parquet") or "*" in given
    o = os.path.normpath(out.replace("link", "data"))
    if folder_input:
        return o == "data" or o.startswith("data/") or o == "."
    return o in ("data", ".")  # the input file's folder, or a folder above it


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(given_=st.sampled_from(INPUTS), out=st.sampled_from(OUTS))
def test_encode_never_writes_over_or_among_inputs(
    given_: str, out: str, codebook_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("paths")
    data = make_data(root)
    inputs_before = tree(data)
    before = tree(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = cli.main(["--quiet", "encode", given_, "--codebook", str(codebook_file), "--column", "embedding",
                       "--engine", "torch", "--out", out])
    finally:
        os.chdir(cwd)
    after = tree(data)
    assert {k: after.get(k) for k in inputs_before} == inputs_before  # no input changed
    if not given_.endswith(".parquet") or "*" in given_:
        assert after == inputs_before  # nothing written inside a searched folder
    if expected_refusal(given_, out):
        assert rc == 1
        assert tree(root) == before and sorted(p.name for p in root.iterdir()) == ["data", "elsewhere", "link"]
    else:
        assert rc == 0
        assert tree(root) != before


def test_library_encode_refuses_the_input_folder(codebook_file: Path, tmp_path: Path) -> None:
    data = make_data(tmp_path)
    before = tree(tmp_path)
    for out in (data, tmp_path / "link", data / "codes", tmp_path):
        with pytest.raises(InvalidInputError, match=r"out_dir=.*(is the input folder|inside the input|contains)"):
            encode_tables([str(data)], str(codebook_file), str(out), EncodeSettings(column="embedding"), EncodeOptions(engine="torch"))
    assert tree(tmp_path) == before


def test_pipeline_work_dir_symlinked_into_the_inputs_is_refused(tmp_path: Path) -> None:
    """The work_dir guard resolves symlinks (it compared absolute paths before)."""
    data = make_data(tmp_path)
    (tmp_path / "work").symlink_to(data / "sub")
    with pytest.raises(InvalidInputError, match="work_dir=.*is inside the input folder"):
        check_output_folder("work_dir", tmp_path / "work", [str(data)])


# ----------------------------------------------------------------------------- fit outputs


def fit_argv(out: str, *extra: str) -> list[str]:
    return ["--quiet", "fit", "data", "--column", "embedding", "--codes", "4", "--engine", "torch", "--iters", "3",
            "--out", out, *extra]


@pytest.mark.parametrize(
    "option, make, fragment",
    [
        ("--out", lambda p: p.write_text("my notes\n"), "is an existing file that is not a codebook written by vq"),
        ("--checkpoint", lambda p: p.write_text("my notes\n"), "is an existing file that is not a fit checkpoint"),
        ("--out", lambda p: p.mkdir(), "is a folder"),
        ("--checkpoint", lambda p: os.mkfifo(p), "exists and is not a regular file"),
    ],
)
def test_fit_never_replaces_a_file_it_did_not_write(
    option: str, make: Any, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "precious.txt"
    make(target)
    before = tree(tmp_path)
    argv = fit_argv(str(target)) if option == "--out" else fit_argv("cb.safetensors", "--checkpoint", str(target))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Fix: " in err, err
    assert tree(tmp_path) == before and not (tmp_path / "cb.safetensors").exists()


def test_fit_replaces_its_own_codebook_and_resumes_its_own_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(fit_argv("cb.safetensors", "--seed", "1")) == 0
    first = Codebook.load("cb.safetensors").fingerprint
    assert cli.main(fit_argv("cb.safetensors", "--seed", "2")) == 0  # a codebook vq wrote is replaced
    assert Codebook.load("cb.safetensors").fingerprint != first


def test_fit_output_under_a_regular_file_is_refused_before_the_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    Path("notes").write_text("a file, not a folder\n")
    before = tree(tmp_path)
    assert cli.main(fit_argv("notes/cb.safetensors")) == 1
    err = capsys.readouterr().err
    assert "lies under" in err and "which is a file, not a folder" in err, err
    assert tree(tmp_path) == before  # no checkpoint either: nothing ran


def test_fit_output_name_too_long_is_refused_before_the_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert cli.main(fit_argv("c" * (limit - 11) + ".safetensors")) == 1  # one byte over
    assert f"expected at most {limit} bytes" in capsys.readouterr().err
    assert cli.main(fit_argv("c" * (limit - 12) + ".safetensors", "--checkpoint", "none")) == 0  # fits exactly


@pytest.mark.parametrize("option", ["--out", "--checkpoint"])
def test_fit_refuses_a_file_inside_an_input_folder(
    option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    target = "link/sub/new.bin"
    argv = fit_argv(target) if option == "--out" else fit_argv("cb.safetensors", "--checkpoint", target)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{option}={target!r} lies inside the input folder 'data'" in err, err
    assert tree(tmp_path) == before


def test_a_second_fit_into_the_same_output_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two fits into one --out both exited 0 before, and one reported a fingerprint not on disk."""
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    with output_lock(tmp_path / "cb.safetensors", what="codebook"):  # as a running fit holds it
        assert cli.main(fit_argv("cb.safetensors")) == 1
        err = capsys.readouterr().err
        assert "codebook" in err and "is being written by another run" in err, err
        assert not (tmp_path / "cb.safetensors").exists()
    assert cli.main(fit_argv("cb.safetensors")) == 0  # released


def test_the_lock_file_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    lock_path(tmp_path / "cb.safetensors").symlink_to(victim)
    with pytest.raises(StateError, match="is a symlink"):
        with output_lock(tmp_path / "cb.safetensors", what="codebook"):
            pass
    assert victim.read_text() == "keep me\n"


def test_library_checkpoint_is_checked_and_locked(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    with pytest.raises(InvalidInputError, match="checkpoint=.*is the input table"):
        fit_from_tables([str(data)], 4, TableSettings(column="embedding"), FitSettings(engine="torch"), checkpoint=data / "a.parquet")
    stranger = tmp_path / "notes.txt"
    stranger.write_text("x")
    with pytest.raises(InvalidInputError, match="not a fit checkpoint written by vq"):
        fit_from_tables([str(data)], 4, TableSettings(column="embedding"), FitSettings(engine="torch"), checkpoint=stranger)
    ckpt = tmp_path / "fit.ckpt"
    with FitCheckpoint(ckpt).locked():
        with pytest.raises(OutputLockedError, match="fit checkpoint .* is being written by another run"):
            fit_from_tables([str(data)], 4, TableSettings(column="embedding"), FitSettings(engine="torch"), checkpoint=ckpt)
    assert stranger.read_text() == "x" and not ckpt.exists()


def test_check_output_file_accepts_a_new_path_and_its_own_files(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    out = tmp_path / "models" / "cb.safetensors"
    assert check_output_file("out", out, [str(data)], ours=lambda p: False, what="codebook", suffix=".x") == out
    out.parent.mkdir()
    out.write_bytes(b"ours")
    assert check_output_file("out", out, [str(data)], ours=lambda p: True, what="codebook", suffix=".x") == out


# ----------------------------------------------------------------------------- values at the extremes of float32


def test_rows_too_small_for_float32_distances_say_so() -> None:
    """Values near 1e-30 used to give "only 1 distinct rows" with advice to lower n_codes."""
    x = torch.randn(300, DIM, generator=torch.Generator().manual_seed(0)) * 1e-30
    with pytest.raises(InvalidInputError, match=r"no value larger than .*underflow float32.*multiply the embeddings"):
        fit_codebook(x, 8, engine="torch")
    assert float(x.abs().max()) < TINY_SCALE
    assert fit_codebook(x * 1e30, 8, engine="torch").n_codes == 8  # rescaled as the message says, it fits


def test_denormal_rows_have_a_direction_under_cosine() -> None:
    """Rows of denormal floats used to be refused as "norm 0" (their squares underflow)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, DIM, generator=g)
    x = (centres.repeat(50, 1) + 0.01 * torch.randn(200, DIM, generator=g)) * 1e-40  # denormal in float32
    assert bool((x.abs() < torch.finfo(torch.float32).tiny).all())
    codes = fit_codebook(x, 4, metric="cosine", engine="torch", seed=0).encode(x)  # (200,)
    labels = torch.arange(200) % 4  # the direction each row was drawn around
    pairs = set(zip(labels.tolist(), codes.tolist()))
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4  # the same partition as the directions
    zero = torch.zeros(3, DIM)
    with pytest.raises(InvalidInputError, match=r"x\[0\] has norm 0"):
        fit_codebook(torch.cat([zero, x]), 4, metric="cosine", engine="torch")


def test_encode_out_under_a_regular_file_is_refused_before_any_work(codebook_file: Path, tmp_path: Path) -> None:
    data = make_data(tmp_path)
    (tmp_path / "notes").write_text("a file\n")
    before = tree(tmp_path)
    with pytest.raises(InvalidInputError, match=r"out_dir=.*lies under .*notes.*which is a file, not a folder"):
        encode_tables([str(data)], str(codebook_file), str(tmp_path / "notes" / "codes"), EncodeSettings(column="embedding"))
    with pytest.raises(InvalidInputError, match=r"out_dir=.*notes.* is a file; expected a folder"):
        encode_tables([str(data)], str(codebook_file), str(tmp_path / "notes"), EncodeSettings(column="embedding"))
    assert tree(tmp_path) == before


def test_encode_out_inside_a_symlinked_input_folder_is_refused(codebook_file: Path, tmp_path: Path) -> None:
    """Discovery follows symlinked folders, so a folder they lead to is an input folder too."""
    data = make_data(tmp_path)
    rng = np.random.default_rng(1)
    outside = tmp_path / "elsewhere" / "part"
    write_embeddings(outside / "c.parquet", np.arange(100, 110), rng.normal(size=(10, DIM)).astype(np.float32))
    (data / "part").symlink_to(outside)
    before = tree(tmp_path)
    with pytest.raises(InvalidInputError, match=r"out_dir=.*a folder the inputs reach.*symlinked folder"):
        encode_tables([str(data)], str(codebook_file), str(outside / "codes"), EncodeSettings(column="embedding"), EncodeOptions(engine="torch"))
    assert tree(tmp_path) == before and not (outside / "codes").exists()
    result = encode_tables([str(data)], str(codebook_file), str(tmp_path / "codes"), EncodeSettings(column="embedding"), EncodeOptions(engine="torch"))
    assert sorted(result.encoded) == ["a.parquet", "part/c.parquet", "sub/b.parquet"]
