"""The ``vq`` command, run as a real subprocess on real parquet files.

Each subprocess pays about two seconds of imports, so the data are small and one fitted codebook
is shared by the module. A few cheap checks of the error plumbing and the progress display call
:func:`vq_pipeline.cli.main` in-process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from vq_pipeline import Codebook, fit_codebook
from vq_pipeline import cli
from vq_pipeline.demo import generate_embeddings
from vq_pipeline.pipeline import MANIFEST_NAME
from vq_pipeline.tables import write_embeddings

DIM = 16
N_CODES = 8
# Input file key -> rows; the hive-style folder checks that outputs keep the input layout.
PARTS = {"a.parquet": 2000, "date=2026-11-02/b.parquet": 1000}
NAN_ROW, NAN_COL = 37, 5


def vq(*args: Any, cwd: Path | None = None, script: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``vq ARGS...`` (the installed console script when ``script``, else ``python -m``)."""
    if script:
        exe = Path(sys.executable).parent / "vq"
        if not exe.exists():
            pytest.skip("the vq console script is not installed next to this interpreter")
        cmd = [str(exe)]
    else:
        cmd = [sys.executable, "-m", "vq_pipeline.cli"]
    # conftest.py has set the KeOps cache and Prefect variables in os.environ; children inherit them.
    env = dict(os.environ)
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1, an ``error: ...`` last line on stderr naming every fragment, no traceback, nothing on stdout."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    # Progress lines may come first (files encoded before the failure); the error is the last line.
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file (its holder is rewritten by every run)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "lock"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Input tables, a table with a NaN, a garbage codebook, and a codebook fitted by ``vq fit --json``."""
    root = tmp_path_factory.mktemp("cli")
    rows = {}
    for i, (key, n) in enumerate(PARTS.items()):
        x = generate_embeddings(n, DIM, 10, seed=i + 1)
        ids = np.arange(n, dtype=np.int64) + 1_000_000 * (i + 1)  # not row positions, so ids are checked
        write_embeddings(root / "in" / key, ids, x)
        rows[key] = (ids, x)
    # A good file before a NaN one: encode writes the first, then must fail without a manifest.
    bad = generate_embeddings(100, DIM, 10, seed=9)
    bad[NAN_ROW, NAN_COL] = np.nan
    write_embeddings(root / "bad" / "a.parquet", np.arange(100), generate_embeddings(100, DIM, 10, seed=8))
    write_embeddings(root / "bad" / "b_nan.parquet", np.arange(100) + 100, bad)
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))

    codebook = root / "models" / "codebook.safetensors"
    fit = vq("fit", root / "in", "--column", "embedding", "--codes", N_CODES, "--metric", "cosine", "--engine", "torch",
             "--seed", 3, "--out", codebook, "--json")
    assert fit.returncode == 0, fit.stderr
    return {"root": root, "rows": rows, "garbage": garbage, "codebook": codebook, "fit": fit}


# ----------------------------------------------------------------------------- happy path


def test_fit_json_describes_the_saved_codebook(work: dict[str, Any]) -> None:
    fit = work["fit"]
    summary = json.loads(fit.stdout)  # stdout is exactly one JSON object
    cb = Codebook.load(work["codebook"])
    assert summary["path"] == str(work["codebook"])
    assert summary["fingerprint"] == cb.fingerprint
    assert (summary["n_codes"], summary["dim"], summary["metric"]) == (N_CODES, DIM, "cosine")
    assert summary["rows"] == sum(PARTS.values()) == cb.stats["n_rows"]
    assert summary["iterations"] == cb.stats["iterations"] and summary["converged"] == cb.stats["converged"]
    assert summary["inertia"] == pytest.approx(cb.stats["inertia"]) and summary["seconds"] > 0
    assert cb.column == "embedding" and len(cb.sources) == len(PARTS) and cb.fit["seed"] == 3
    # Progress: one line per E step on stderr, in the documented shape.
    lines = fit.stderr.strip().splitlines()
    assert len(lines) == cb.stats["iterations"] + 1
    assert all(re.fullmatch(r"iteration \d+: objective \S+ \(\d+\.\d\d s\)", line) for line in lines), lines
    assert list(work["codebook"].parent.iterdir()) == [work["codebook"]]  # no temporary files left


def test_inspect_json_and_text(work: dict[str, Any]) -> None:
    cb = Codebook.load(work["codebook"])
    as_json = vq("inspect", work["codebook"], "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == json.loads(json.dumps(cb.summary()))

    text = vq("inspect", work["codebook"], script=True)  # also checks the installed entry point
    assert text.returncode == 0, text.stderr
    out = text.stdout
    counts = cb.counts
    for fragment in [
        cb.fingerprint, "cosine", f"{N_CODES} x dim {DIM}", "init=k-means++", "seed=3", "3,000", "in-memory",
        f"min {int(counts.min()):,}", f"max {int(counts.max()):,}", "empty codes", "repairs", "parent",
        str(work["root"] / "in" / "a.parquet"), "embedding", "created_at", cb.created_at, "torch",
    ]:
        assert fragment in out, (fragment, out)
    assert ("not converged" in out) != cb.stats["converged"]


def test_encode_matches_library_and_rerun_is_a_noop(work: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "codes"
    first = vq("encode", work["root"] / "in", "--codebook", work["codebook"], "--column", "embedding", "--id-column", "id",
               "--with-distance", "--batch-rows", 700, "--engine", "torch", "--out", out, "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["encoded"] == sorted(PARTS) and result["skipped"] == []
    assert result["rows_encoded"] == result["rows_total"] == sum(PARTS.values())
    assert result["manifest"] == str(out / MANIFEST_NAME) and (out / MANIFEST_NAME).is_file()
    cb = Codebook.load(work["codebook"])
    assert result["codebook_fingerprint"] == cb.fingerprint
    # stderr is not a TTY here: plain progress lines, and one at each file's end.
    for key, n in PARTS.items():
        assert f"{key}: {n:,}/{n:,} rows (100%" in first.stderr, first.stderr
    assert "\r" not in first.stderr

    for key, (ids, x) in work["rows"].items():
        table = pl.read_parquet(out / key)  # the input's relative path, hive folder included
        assert table.columns == ["id", "code", "distance"]
        assert np.array_equal(table["id"].to_numpy(), ids)
        codes, dist = cb.encode(torch.from_numpy(x), return_distances=True, engine="torch")
        assert np.array_equal(table["code"].to_numpy().astype(np.int64), codes.numpy())
        np.testing.assert_allclose(table["distance"].to_numpy(), dist.numpy(), rtol=1e-6, atol=1e-6)

    before = snapshot(out)
    again = vq("encode", work["root"] / "in", "--codebook", work["codebook"], "--column", "embedding", "--id-column", "id",
               "--with-distance", "--engine", "torch", "--out", out)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"encoded 0 files (0 rows), skipped {len(PARTS)} already complete -> {out / MANIFEST_NAME}\n"
    assert again.stderr == ""  # nothing was encoded, so no progress
    assert snapshot(out) == before


def test_encode_refuses_another_codebooks_codes_unless_overwrite(work: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    fit = vq("--quiet", "fit", work["root"] / "in", "--column", "embedding", "--codes", 6, "--sample", 1000, "--seed", 1,
             "--iters", 5, "--out", other)
    assert fit.returncode == 0, fit.stderr
    assert fit.stderr == ""  # --quiet
    assert re.fullmatch(
        rf"fitted 6 codes \(dim {DIM}, l2\) on 1,000 rows in \d+ iterations?, (converged|not converged \(stopped at --iters 5\)); "
        rf"inertia \S+ -> {re.escape(str(other))}\n",
        fit.stdout,
    ), fit.stdout

    out = tmp_path / "codes"
    args = ["encode", work["root"] / "in", "--column", "embedding", "--out", out]
    assert vq(*args, "--codebook", work["codebook"]).returncode == 0
    before = snapshot(out)

    refused = vq(*args, "--codebook", other)
    assert_clean_error(refused, "--overwrite", str(out))
    assert snapshot(out) == before

    replaced = vq(*args, "--codebook", other, "--overwrite", "--json")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["encoded"] == sorted(PARTS)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["codebook_fingerprint"] == Codebook.load(other).fingerprint
    ids, x = work["rows"]["a.parquet"]
    table = pl.read_parquet(out / "a.parquet")
    assert table.columns == ["row", "code"]  # no --id-column: row positions
    assert np.array_equal(table["code"].to_numpy().astype(np.int64), Codebook.load(other).encode(x, engine="torch").numpy())


# ----------------------------------------------------------------------------- errors


ERROR_CASES = {
    "fit-missing-path": (["fit", "{root}/nope.parquet", "--column", "embedding", "--codes", "4"], ["nope.parquet", "does not exist"]),
    "fit-wrong-column": (["fit", "{root}/in", "--column", "emb", "--codes", "4"], ["column='emb'", "'embedding'", "--column"]),
    "fit-nan": (["fit", "{root}/bad", "--column", "embedding", "--codes", "4"], ["b_nan.parquet", f"row {NAN_ROW}", "nan"]),
    "encode-missing-path": (["encode", "{root}/nope", "--codebook", "{codebook}", "--column", "embedding"], ["nope", "does not exist"]),
    "encode-wrong-column": (["encode", "{root}/in", "--codebook", "{codebook}", "--column", "emb"], ["column='emb'", "'embedding'"]),
    "encode-nan": (["encode", "{root}/bad", "--codebook", "{codebook}", "--column", "embedding"], ["b_nan.parquet", f"row {NAN_ROW}"]),
    "encode-garbage-codebook": (["encode", "{root}/in", "--codebook", "{garbage}", "--column", "embedding"], ["garbage.safetensors"]),
    "inspect-garbage-codebook": (["inspect", "{garbage}"], ["garbage.safetensors", "not a codebook"]),
    "debug": (["--debug", "inspect", "{garbage}"], []),
    "usage": (["fit", "{root}/in", "--column", "embedding"], []),  # no --codes
}


@pytest.fixture(scope="module")
def failed_runs(work: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every ERROR_CASES command, run two at a time (each pays seconds of imports; the machine may be shared).

    Returns, per case, the finished process and the output path it was given (in a folder of its own).
    """
    paths = {"root": work["root"], "codebook": work["codebook"], "garbage": work["garbage"]}

    def run(case: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        argv = [a.format(**paths) for a in ERROR_CASES[case][0]]
        command = next(a for a in argv if not a.startswith("--"))
        out = tmp_path_factory.mktemp(case) / ("codebook.safetensors" if command == "fit" else "codes")
        if command != "inspect":
            argv += ["--out", str(out)]
        return vq(*argv), out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ERROR_CASES, pool.map(run, ERROR_CASES)))


@pytest.mark.parametrize("case", [c for c in ERROR_CASES if c not in ("debug", "usage")])
def test_errors_exit_1_with_one_line_and_write_nothing_final(case: str, failed_runs: dict[str, Any]) -> None:
    proc, out = failed_runs[case]
    assert_clean_error(proc, *ERROR_CASES[case][1])
    if case.startswith("fit"):
        assert list(out.parent.iterdir()) == []  # no codebook, no temporary file
    elif case.startswith("encode"):
        assert not (out / MANIFEST_NAME).exists()
    if case == "encode-nan":  # the good file before the bad one is done, and a rerun resumes after it
        assert (out / "a.parquet").is_file() and not (out / "b_nan.parquet").exists()
        assert "a.parquet: 100/100 rows (100%" in proc.stderr


def test_debug_shows_the_traceback(failed_runs: dict[str, Any]) -> None:
    proc, _ = failed_runs["debug"]
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "CodebookFileError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: codebook file")


def test_usage_error_exits_2(failed_runs: dict[str, Any]) -> None:
    proc, out = failed_runs["usage"]
    assert proc.returncode == 2 and "the following arguments are required: --codes" in proc.stderr
    assert "usage: vq fit" in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------- in-process: plumbing and display


@pytest.mark.parametrize(
    "argv",
    [["fit", "x.parquet", "--column", "e", "--codes", "0", "--out", "o"], ["--storage-option", "novalue", "inspect", "cb"], []],
)
def test_usage_errors_return_2_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: vq" in capsys.readouterr().err


def test_options_reach_fit_from_tables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}
    codebook = fit_codebook(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)), 3, engine="torch")

    def fake_fit(inputs: Any, **kwargs: Any) -> Codebook:
        seen.update(kwargs, inputs=inputs)
        return codebook

    monkeypatch.setattr(cli, "fit_from_tables", fake_fit)
    out = tmp_path / "cb.safetensors"
    argv = ["--storage-option", "region=eu", "fit", "s3://b/t/", "more.parquet", "--column", "e", "--codes", "3",
            "--iters", "7", "--tol", "0", "--init", "random", "--n-init", "2", "--sample", "40", "--device", "cpu",
            "--batch-rows", "10", "--out", str(out), "--storage-option", "token=a=b", "--quiet"]
    assert cli.main(argv) == 0
    assert seen["inputs"] == ["s3://b/t/", "more.parquet"]
    assert seen["storage_options"] == {"region": "eu", "token": "a=b"}
    assert (seen["n_codes"], seen["n_iter"], seen["tol"], seen["init"], seen["n_init"]) == (3, 7, 0.0, "random", 2)
    assert (seen["sample"], seen["device"], seen["batch_rows"], seen["engine"], seen["metric"]) == (40, "cpu", 10, "auto", "l2")
    assert Codebook.load(out).fingerprint == codebook.fingerprint
    assert capsys.readouterr().out.startswith("fitted 3 codes (dim 4, l2) on 50 rows")


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_errors_and_interrupts(debug: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*(["--debug"] if debug else []), "inspect", "cb.safetensors"]

    def boom(path: Any) -> Codebook:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli.Codebook, "load", boom)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    if debug:
        assert "Traceback" in err and err.strip().splitlines()[-1] == "error: unexpected RuntimeError: boom"
    else:
        assert err == "error: unexpected RuntimeError: boom (run with --debug for the traceback)\n"

    def interrupted(path: Any) -> Codebook:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Codebook, "load", interrupted)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_describe_handles_in_memory_and_sampled_codebooks() -> None:
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    cb = fit_codebook(x, 4, engine="torch")
    text = cli.describe(cb, title="cb")
    assert text.startswith("cb\n")
    assert re.search(r"^  training rows +60$", text, re.M) and re.search(r"^  sources +\(in memory\)$", text, re.M), text
    sampled = dataclasses.replace(cb, stats={**cb.stats, "mode": "sample", "rows_total": 6000, "sample_seed": 2}, sources=[f"p{i}" for i in range(7)])
    text = cli.describe(sampled)
    assert "60 (seeded sample of 6,000, seed 2)" in text and "p4" in text and "p5" not in text and "... and 2 more" in text


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_encode_progress_in_a_log_is_throttled() -> None:
    err, clock = io.StringIO(), _Clock()
    progress = cli.EncodeProgress(cli.Console(quiet=False, stderr=err), tty=False, clock=clock)
    for done in range(100, 1001, 100):  # one batch a second
        clock.now += 1.0
        progress("part-0.parquet", done, 1000)
    lines = err.getvalue().splitlines()
    # The first batch, one line per 5 s, and the file's end.
    assert [line.split(" rows")[0] for line in lines] == ["part-0.parquet: 100/1,000", "part-0.parquet: 600/1,000", "part-0.parquet: 1,000/1,000"]
    assert lines[-1].endswith("in 10.0 s")


def test_encode_progress_on_a_terminal_redraws_one_line_per_file() -> None:
    err, clock = io.StringIO(), _Clock()
    console = cli.Console(quiet=False, stderr=err)
    progress = cli.EncodeProgress(console, tty=True, clock=clock)
    for key in ["a.parquet", "b.parquet"]:
        for done in (500, 1000):
            clock.now += 1.0
            progress(key, done, 1000)
    text = err.getvalue()
    assert text.count("\n") == 2 and text.count("\r") == 4
    assert "a.parquet [############------------] 500/1,000 rows (50%" in text
    assert "b.parquet [########################] 1,000/1,000 rows (100%" in text
    console.error("error: x")  # an error after a finished bar starts on its own line
    assert err.getvalue().endswith("rows/s)\nerror: x\n")


def test_quiet_hides_progress() -> None:
    err = io.StringIO()
    progress = cli.EncodeProgress(cli.Console(quiet=True, stderr=err), tty=True)
    progress("a.parquet", 10, 10)
    assert err.getvalue() == ""
