"""The ``vq`` command, run as a real subprocess on real parquet files.

Each ``fit`` or ``encode`` subprocess pays about two seconds of imports (torch, polars), so the data
are small and one fitted codebook is shared by the module. Checks of the error plumbing, of the
paths a command refuses, of the progress display and of the options call
:func:`vq_flows.cli.main` in-process. Start-up and Ctrl-C: tests/cli/test_cli_startup.py.
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
from conftest import snapshot
from vq_flows import cli

import vq_pipeline
from vq_pipeline import Codebook, fit_codebook
from vq_pipeline.jobs import fit_tables
from vq_pipeline.compute.lloyd import IterationProgress
from vq_pipeline.compute.seeding import InitProgress
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.encode_state import manifest_path

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
        cmd = [sys.executable, "-m", "vq_flows.cli"]
    # conftest.py has set the KeOps cache and Prefect variables in os.environ; children inherit them.
    env = dict(os.environ)
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


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
             "--seed", 3, "--out", codebook, "--json", "--prune-search")
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
    assert cb.column == "embedding" and len(cb.sources) == len(PARTS) and cb.settings["seed"] == 3
    # Progress on stderr, in the documented shapes: what is read, the start and end of seeding (fast
    # seeding shows no line between them), one line per iteration, then how the run ended.
    reading, start, seeding, *lines, end = fit.stderr.strip().splitlines()
    assert reading == f"reading 3,000 rows (dim {DIM}) from 2 tables"
    assert start == f"seeding {N_CODES} initial centroids (k-means|| from 3,000 rows)", start
    assert re.fullmatch(rf"seeding: {N_CODES}/{N_CODES} initial centroids \(\d+\.\d s\)", seeding), seeding
    # As many iteration lines as the summary's iterations, numbered 1..n of n_iter, and the end says so too.
    assert [int(re.match(r"iteration (\d+)/50: ", line)[1]) for line in lines] == list(range(1, summary["iterations"] + 1))
    assert re.fullmatch(rf"(converged|stopped) after {summary['iterations']} iterations?\b.*", end), end
    pruned = r"(, [\d,]+ rows? proven unchanged)"  # --prune-search: every iteration says it
    assert all(re.fullmatch(rf"iteration \d+/50: objective [\d.e+-]+( \([-+]\S+%\))?{pruned}, \d+\.\d s elapsed(, ETA at most \S+ s)?", line) for line in lines), lines
    assert len(cb.timings["iteration_pruned"]) == len(lines) + 1  # the last E step, on the final centroids, too
    assert "\r" not in fit.stderr and "\x1b" not in fit.stderr  # stderr is a log here: plain lines, no redraws
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
        cb.fingerprint, "cosine", f"{N_CODES} x dim {DIM}", "init=k-means||", "seed=3", "3,000", "in-memory",
        f"min {int(counts.min()):,}", f"max {int(counts.max()):,}", "empty codes", "repairs", "parent",
        str(work["root"] / "in" / "a.parquet"), "embedding", "created_at", cb.created_at, "torch",
    ]:
        assert fragment in out, (fragment, out)
    assert ("not converged" in out) != cb.stats["converged"]


def read_png(path: Path, size: tuple[int, int]) -> None:
    """A PNG file of ``size`` (height, width) pixels that is not one flat colour."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)  # (height, width, 4) float32
    assert image.shape[:2] == size and len(np.unique((image * 255).astype(np.uint8).view(np.uint32))) > 50


def test_inspect_plot_writes_the_codebook_picture(work: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "pictures" / "cb.png"  # its folder is created
    proc = vq("inspect", work["codebook"], "--plot", png, "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)["plot"] == str(png.resolve())
    read_png(png, (480, 1200))
    png.write_bytes(b"")  # an empty file under the name is not a picture vq wrote
    assert cli.main(["inspect", str(work["codebook"]), "--plot", str(png)]) == 1
    assert "--plot=" in capsys.readouterr().err and png.read_bytes() == b""
    png.unlink()
    assert cli.main(["inspect", str(work["codebook"]), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(work["codebook"])) and out.endswith(f"\npicture -> {png.resolve()}\n")
    read_png(png, (480, 1200))
    assert sorted(p.name for p in png.parent.iterdir()) == ["cb.png"]


def test_inspect_plot_refuses_the_codebook_itself_and_other_names(work: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    named = tmp_path / "cb.png"  # a codebook whose name looks like a picture
    named.write_bytes(work["codebook"].read_bytes())
    for argv, fragment in [
        (["inspect", str(named), "--plot", str(named)], "is the input"),
        (["inspect", str(work["codebook"]), "--plot", str(tmp_path / "cb.jpg")], "expected a .png file"),
    ]:
        assert cli.main(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: --plot=") and fragment in captured.err, captured
    assert named.read_bytes() == work["codebook"].read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == ["cb.png"]


def test_encode_matches_library_and_rerun_is_a_noop(work: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "codes"
    first = vq("encode", work["root"] / "in", "--codebook", work["codebook"], "--column", "embedding", "--id-column", "id",
               "--with-distance", "--batch-rows", 700, "--engine", "torch", "--out", out, "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["encoded"] == sorted(PARTS) and result["skipped"] == []
    assert result["rows_encoded"] == result["rows_total"] == sum(PARTS.values())
    assert result["manifest"] == str(manifest_path(out)) and manifest_path(out).is_file()
    cb = Codebook.load(work["codebook"])
    assert result["codebook_fingerprint"] == cb.fingerprint
    # stderr is not a TTY here: plain progress lines, and one at each file's end, with the run's totals.
    for key, n in PARTS.items():
        assert f"{key}: {n:,}/{n:,} rows (100%" in first.stderr, first.stderr
    last = first.stderr.strip().splitlines()[-1]
    assert re.search(r"; overall 2/2 files, 3,000/3,000 rows \(100%\) in \S+ s, [\d,]+ rows/s$", last), last
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
    assert again.stdout == f"encoded 0 files (0 rows), skipped {len(PARTS)} already complete -> {manifest_path(out)}\n"
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
        rf"inertia \S+, scorecard on 1,000 training rows: error \S+, recall@10 \S+ -> {re.escape(str(other))}\n",
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
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["codebook_fingerprint"] == Codebook.load(other).fingerprint
    ids, x = work["rows"]["a.parquet"]
    table = pl.read_parquet(out / "a.parquet")
    assert table.columns == ["row", "code"]  # no --id-column: row positions
    assert np.array_equal(table["code"].to_numpy().astype(np.int64), Codebook.load(other).encode(x, engine="torch"))


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
        assert not manifest_path(out).exists()
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

    def fake_fit(inputs: Any, n_codes: int, reading: Any, settings: Any, **kwargs: Any) -> Codebook:
        seen.update(kwargs, inputs=inputs, n_codes=n_codes, reading=reading, settings=settings)
        return codebook

    monkeypatch.setattr(fit_tables, "fit_from_tables", fake_fit)  # cmd_fit imports it when it runs
    out = tmp_path / "cb.safetensors"
    argv = ["--storage-option", "region=eu", "fit", "s3://b/t/", "more.parquet", "--column", "e", "--codes", "3",
            "--iters", "7", "--tol", "0", "--init", "random", "--n-init", "2", "--sample", "40", "--device", "cpu",
            "--batch-rows", "10", "--out", str(out), "--storage-option", "token=a=b", "--quiet"]
    assert cli.main(argv) == 0
    reading, settings = seen["reading"], seen["settings"]
    assert seen["inputs"] == ["s3://b/t/", "more.parquet"] and seen["n_codes"] == 3
    assert reading == vq_pipeline.settings.TableSettings("e", sample=40, batch_rows=10, storage_options={"region": "eu", "token": "a=b"})
    assert (settings.n_iter, settings.tol, settings.init, settings.n_init) == (7, 0.0, "random", 2)
    assert (settings.device, settings.engine, settings.metric) == ("cpu", "auto", "l2")
    assert settings == vq_pipeline.FitSettings(n_iter=7, tol=0.0, init="random", n_init=2, device="cpu")
    assert seen["checkpoint"] == out.with_name(out.name + ".ckpt") and callable(seen["progress"])
    assert Codebook.load(out).fingerprint == codebook.fingerprint
    assert capsys.readouterr().out.startswith("fitted 3 codes (dim 4, l2) on 50 rows")


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_errors_and_interrupts(debug: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*(["--debug"] if debug else []), "inspect", "cb.safetensors"]

    import vq_pipeline.io.codebook_file as codebook_file

    def boom(path: Any) -> Codebook:
        raise RuntimeError("boom")

    monkeypatch.setattr(codebook_file, "load_info", boom)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    if debug:
        assert "Traceback" in err and err.strip().splitlines()[-1] == "error: unexpected RuntimeError: boom"
    else:
        assert err == "error: unexpected RuntimeError: boom (run with --debug for the traceback)\n"

    def interrupted(path: Any) -> Codebook:
        raise KeyboardInterrupt

    monkeypatch.setattr(codebook_file, "load_info", interrupted)
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


ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen_lines(text: str) -> list[str]:
    """What a terminal shows of ``text``, piece by piece: escape sequences removed, cut at each line end
    and carriage return."""
    return [part for part in re.split(r"[\r\n]", ESCAPES.sub("", text)) if part]


def test_encode_progress_without_a_plan_in_a_log_is_throttled() -> None:
    err, clock = io.StringIO(), _Clock()
    progress = cli.EncodeProgress(cli.Console(quiet=False, stderr=err), tty=False, clock=clock)
    for done in range(100, 1001, 100):  # one batch a second
        clock.now += 1.0
        progress("part-0.parquet", done, 1000)
    lines = err.getvalue().splitlines()
    # The first batch, one line per 5 s, and the file's end.
    assert [line.split(" rows")[0] for line in lines] == ["part-0.parquet: 100/1,000", "part-0.parquet: 600/1,000", "part-0.parquet: 1,000/1,000"]
    assert lines[-1].endswith("in 10.0 s")


def test_quiet_hides_progress_and_starts_no_display() -> None:
    err = io.StringIO()
    console = cli.Console(quiet=True, stderr=err)
    encode = cli.EncodeProgress(console, tty=True)
    encode.plan({"a.parquet": 10}, [])
    encode("a.parquet", 10, 10)
    fit = cli.FitProgress(console, tty=True)
    fit(InitProgress(chosen=64, n_codes=64, seconds=0.1))
    fit(_iteration(1))
    assert err.getvalue() == "" and encode.bars is None and fit.bars is None


def test_quiet_commands_print_their_result_and_nothing_on_stderr(work: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    codebook = tmp_path / "cb.safetensors"
    common = ["--column", "embedding", "--engine", "torch", "--quiet"]
    assert cli.main(["fit", str(work["root"] / "in"), "--codes", "4", "--out", str(codebook), *common]) == 0
    fit = capsys.readouterr()
    assert fit.err == "" and fit.out.startswith("fitted 4 codes (dim 16, l2) on 3,000 rows"), fit
    assert cli.main(["encode", str(work["root"] / "in"), "--codebook", str(codebook), "--out", str(tmp_path / "codes"), *common]) == 0
    encode = capsys.readouterr()
    assert encode.err == "" and encode.out.startswith("encoded 2 files (3,000 rows) -> "), encode


def test_encode_progress_in_a_log_shows_the_run() -> None:
    err, clock = io.StringIO(), _Clock()
    progress = cli.EncodeProgress(cli.Console(quiet=False, stderr=err), tty=False, clock=clock)
    progress.plan({"a.parquet": 1000, "b.parquet": 6000}, ["done-before.parquet"])
    for key, total in [("a.parquet", 1000), ("b.parquet", 6000)]:
        for done in range(500, total + 1, 500):  # 500 rows a second
            clock.now += 1.0
            progress(key, done, total)
    # Each file's first batch, one line per 5 s, and each file's end; the run's files, rows, rate and
    # ETA (H:MM:SS, as the time-left column of the terminal's bars shows it).
    assert err.getvalue().splitlines() == [
        "a.parquet: 500/1,000 rows (50%); overall 0/2 files, 500/7,000 rows (7%), 500 rows/s, ETA 0:00:13",
        "a.parquet: 1,000/1,000 rows (100%) in 2.0 s; overall 1/2 files, 1,000/7,000 rows (14%), 500 rows/s, ETA 0:00:12",
        "b.parquet: 500/6,000 rows (8%); overall 1/2 files, 1,500/7,000 rows (21%), 500 rows/s, ETA 0:00:11",
        "b.parquet: 3,000/6,000 rows (50%); overall 1/2 files, 4,000/7,000 rows (57%), 500 rows/s, ETA 0:00:06",
        "b.parquet: 5,500/6,000 rows (92%); overall 1/2 files, 6,500/7,000 rows (93%), 500 rows/s, ETA 0:00:01",
        (
            "b.parquet: 6,000/6,000 rows (100%) in 12.0 s; "
            "overall 2/2 files, 7,000/7,000 rows (100%) in 14.0 s, 500 rows/s"
        ),
    ]


def test_encode_progress_on_a_terminal_draws_bars_and_leaves_a_line_per_file() -> None:
    err, clock = io.StringIO(), _Clock()
    console = cli.Console(quiet=False, stderr=err)
    progress = cli.EncodeProgress(console, tty=True, clock=clock)
    hostile = "b\x1b[2J[bold]x.parquet"  # a file name with a terminal command and rich markup in it
    progress.plan({"a.parquet": 1000, hostile: 1000}, [])
    for key in ["a.parquet", hostile]:
        for done in (500, 1000):
            clock.now += 1.0
            progress(key, done, 1000)
    console.stop_live()
    console.error("error: x")
    text, shown = err.getvalue(), "b\\x1b[2J[bold]x.parquet"
    lines = screen_lines(text)
    # Each finished file leaves one line, the log's, printed above the bars.
    assert lines.count("a.parquet: 1,000/1,000 rows (100%) in 2.0 s; overall 1/2 files, 1,000/2,000 rows (50%), 500 rows/s, ETA 0:00:02") == 1
    assert lines.count(f"{shown}: 1,000/1,000 rows (100%) in 2.0 s; overall 2/2 files, 2,000/2,000 rows (100%) in 4.0 s, 500 rows/s") == 1
    # The bars: the run (files, rows, rate, time left) and the current file; the name escaped, not styled.
    bars = [line for line in lines if "━" in line]
    assert any(re.fullmatch(r"1/2 files +[━╸╺]+ 1,000/2,000 rows +50% 500 rows/s 0:00:02", line) for line in bars), bars
    assert any(re.fullmatch(rf"{re.escape(shown)} [━╸╺]+ 500/1,000 rows +50% 500 rows/s \S+", line) for line in bars), bars
    assert "\x1b[2J" not in text and "\x1b[1m" not in text  # no screen clear, no bold
    # At the end the bars are erased and the cursor shown again; the error line starts on an erased line.
    assert re.search(r"\x1b\[\?25h[^\n]*\x1b\[2Kerror: x\n$", text), text[-80:]
    assert lines[-1] == "error: x"


def test_encode_progress_plan_without_files_shows_nothing() -> None:
    err = io.StringIO()
    cli.EncodeProgress(cli.Console(quiet=False, stderr=err), tty=True).plan({}, ["a.parquet"])
    assert err.getvalue() == ""


def _iteration(i: int, *, restart: int = 0, n_init: int = 1, done: bool = False, prune: bool = False) -> IterationProgress:
    return IterationProgress(
        iteration=i, objective=12.0 / i, n_repairs=0 if done else i - 1, n_empty=0, imbalance=1.0, seconds=0.25,
        n_iter=3, elapsed=0.5 * i, change=None if i == 1 else (12.0 / i) / (12.0 / (i - 1)) - 1, done=done,
        converged=done, restart=restart, n_init=n_init, prune=prune,
    )


def test_fit_progress_shows_seeding_at_most_once_a_second_and_names_restarts() -> None:
    err = io.StringIO()
    clock = iter([0.0, 0.3, 0.9, 1.2, 1.5, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9] * 2)
    progress = cli.FitProgress(cli.Console(quiet=False, stderr=err), tty=False, clock=lambda: next(clock))
    for r in range(2):  # two restarts: seeding's start, k-means++ every few percent, its end, then the iterations
        progress(InitProgress(chosen=0, n_codes=64, seconds=0.0, note="k-means++ from 1,000 rows", restart=r, n_init=2))
        for chosen in (12, 24, 36, 48, 60, 64):
            progress(InitProgress(chosen=chosen, n_codes=64, seconds=chosen / 40, restart=r, n_init=2))
        for i in (1, 2, 3):
            progress(_iteration(i, restart=r, n_init=2))
        progress(_iteration(4, restart=r, n_init=2, done=True))
    # The start, a line once a second has passed since the last one, the end; every iteration; how it ended.
    expected = [
        "seeding 64 initial centroids (k-means++ from 1,000 rows)",
        "seeding: 36/64 initial centroids (0.9 s)",
        "seeding: 60/64 initial centroids (1.5 s)",
        "seeding: 64/64 initial centroids (1.6 s)",
        "iteration 1/3: objective 12, 0.5 s elapsed, ETA at most 1.0 s",
        "iteration 2/3: objective 6 (-50%), 1 empty code repaired, 1.0 s elapsed, ETA at most 0.5 s",
        "iteration 3/3: objective 4 (-33%), 2 empty codes repaired, 1.5 s elapsed",
        "converged after 3 iterations: objective 3 (-25%), 2.0 s",
    ]
    assert err.getvalue().splitlines() == [f"restart {r}/2, {line}" for r in (1, 2) for line in expected]


def test_fit_progress_names_pruning_only_when_it_is_on() -> None:
    err = io.StringIO()
    progress = cli.FitProgress(cli.Console(quiet=False, stderr=err), tty=False)
    progress(_iteration(1))
    progress(_iteration(1, prune=True))
    assert [", 0 rows proven unchanged" in line for line in err.getvalue().splitlines()] == [False, True]


def test_fit_progress_on_a_terminal_draws_a_bar_and_leaves_a_line_per_step() -> None:
    err, out = io.StringIO(), io.StringIO()
    console = cli.Console(quiet=False, stdout=out, stderr=err)
    progress = cli.FitProgress(console, tty=True)
    for chosen, seconds in [(16, 0.05), (32, 0.2), (48, 2.25), (64, 2.4)]:
        progress(InitProgress(chosen=chosen, n_codes=64, seconds=seconds))
    progress(_iteration(1))
    progress(_iteration(2))
    console.result("fitted")  # the result ends the display
    lines = screen_lines(err.getvalue())
    # The lines a log gets at the start and end of seeding and of each iteration; nothing between them but the bar.
    assert [line for line in lines if "━" not in line] == [
        "seeding 64 initial centroids",
        "seeding: 64/64 initial centroids (2.4 s)",
        "iteration 1/3: objective 12, 0.5 s elapsed, ETA at most 1.0 s",
        "iteration 2/3: objective 6 (-50%), 1 empty code repaired, 1.0 s elapsed, ETA at most 0.5 s",
    ]
    bars = [line for line in lines if "━" in line]
    assert re.fullmatch(r"seeding: 16/64 [━╸╺]+ \d:\d\d:\d\d", bars[0]), bars
    assert re.fullmatch(r"iteration 2/3 done, objective 6 [━╸╺]+ \d:\d\d:\d\d", bars[-1]), bars
    assert err.getvalue().endswith("\x1b[2K") and "\x1b[?25h" in err.getvalue() and out.getvalue() == "fitted\n"


def test_metric_default_and_its_help_come_from_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    from vq_pipeline import settings

    argv = ["fit", "x.parquet", "--column", "e", "--codes", "2", "--out", "o.safetensors"]
    assert cli.build_parser().parse_args(argv).metric == settings.DEFAULT_METRIC == settings.FitSettings.metric == "l2"
    assert cli.main(["fit", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"distance (default: {settings.DEFAULT_METRIC}, vq_pipeline.FitSettings.metric)" in help_text
    assert not [p.name for p in Path(cli.__file__).parent.glob("*.py") if 'default="l2"' in p.read_text()]


def test_encode_code_dtype_is_pinned_or_refused(work: dict[str, Any], tmp_path: Path) -> None:
    args = ("encode", work["root"] / "in", "--codebook", work["codebook"], "--column", "embedding", "--quiet")
    pinned = vq(*args, "--code-dtype", "uint32", "--out", tmp_path / "pinned")
    assert pinned.returncode == 0, pinned.stderr
    assert {pl.read_parquet(p)["code"].dtype for p in (tmp_path / "pinned").rglob("*.parquet")} == {pl.UInt32}
    bad = vq(*args, "--code-dtype", "float32", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "invalid choice: 'float32'" in bad.stderr and not (tmp_path / "bad").exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"vq {vq_pipeline.__version__}\n"


# ----------------------------------------------------------------------------- paths refused before any work


@pytest.fixture
def data(work: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the input tables as ``data/`` in a fresh working folder, and ``link`` -> ``data``."""
    for key, (ids, x) in work["rows"].items():
        write_embeddings(tmp_path / "data" / key, ids, x)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"


def files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (links not followed, so ``link`` is listed once)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(capsys: pytest.CaptureFixture[str], rc: int, *fragments: str) -> None:
    """Exit 1 and one ``error: ...`` line naming each fragment and saying how to fix it."""
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Fix: " in err and "unexpected" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("out, what", [("e/", "ends with '/', so it names a folder"), ("models", "is a folder")])
def test_fit_refuses_an_out_that_names_a_folder(
    out: str, what: str, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``Path("e/")`` is ``Path("e")``: `vq fit --out e/` used to write a codebook file named ``e``."""
    Path("models").mkdir()
    before = files(Path.cwd())
    rc = cli.main(["fit", "data", "--column", "embedding", "--codes", "4", "--engine", "torch", "--out", out])
    assert_refused(capsys, rc, f"--out={out!r} {what}", repr(str(Path(out) / "codebook.safetensors")))
    assert files(Path.cwd()) == before and not Path("e").exists()  # no codebook, no checkpoint, no folder


@pytest.mark.parametrize("option", ["--out", "--checkpoint"])
@pytest.mark.parametrize("given", ["data", "data/a.parquet", "link"])
def test_fit_refuses_to_write_over_an_input_table(
    option: str, given: str, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The input given as a folder, as the file itself, or through a symlink to its folder."""
    before = files(data)
    target = "link/a.parquet" if given == "link" else "data/a.parquet"
    paths = ["--out", target] if option == "--out" else ["--out", "cb.safetensors", "--checkpoint", target]
    rc = cli.main(["fit", given, "--column", "embedding", "--codes", "4", "--engine", "torch", *paths])
    assert_refused(capsys, rc, f"{option}={target!r} is the input table")
    assert files(data) == before and not Path("cb.safetensors").exists()


def test_encode_refuses_an_out_that_is_a_file(
    work: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "codes.parquet"
    out.write_bytes(b"not a folder")
    rc = cli.main(["encode", str(work["root"] / "in"), "--codebook", str(work["codebook"]), "--column", "embedding",
                   "--out", str(out)])
    assert_refused(capsys, rc, f"--out={str(out)!r} is a file", "expected a folder")
    assert files(tmp_path) == {"codes.parquet": b"not a folder"}


@pytest.mark.parametrize(
    "given, out, what",
    [
        ("data", "data", "is the input folder 'data'"),
        ("data", "data/", "is the input folder 'data'"),
        ("data", "data/codes", "is inside the input folder"),
        ("data", "data/date=2026-11-02/codes", "is inside the input folder"),
        ("data", "link/codes", "is inside the input folder"),  # the same folder through a symlink
        ("link", "data/codes", "is inside the input folder"),
        ("data", "elsewhere/../data/codes", "is inside the input folder"),
        ("data/*.parquet", "data/codes", "is inside the input folder"),
        ("data/a.parquet", "data", "is the folder of the input 'data/a.parquet'"),  # its codes would replace it
    ],
)
def test_encode_refuses_an_out_inside_an_input_folder(
    given: str, out: str, what: str, work: dict[str, Any], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vq encode data/ --out data/` used to write over the inputs, and `--out data/codes` made the next
    run read the codes as inputs."""
    before = files(Path.cwd())
    rc = cli.main(["encode", given, "--codebook", str(work["codebook"]), "--column", "embedding", "--out", out])
    assert_refused(capsys, rc, f"--out={out!r} {what}", f"such as --out {data.parent / 'data-codes'}")
    assert files(Path.cwd()) == before


def test_encode_next_to_an_input_file_is_allowed(
    work: dict[str, Any], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only folders (and globs) are searched below: codes beside a single input file are never read back."""
    rc = cli.main(["--quiet", "encode", "data/a.parquet", "--codebook", str(work["codebook"]), "--column", "embedding",
                   "--engine", "torch", "--out", "data/codes"])
    assert rc == 0, capsys.readouterr().err
    assert (data / "codes" / "a.parquet").is_file()


# ----------------------------------------------------------------------------- --dask on a small input


def test_dask_on_a_small_input_warns_once_then_goes_on(
    work: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The warning comes before anything of the cluster; here the run then stops at its own option checks
    (--n-init, --batch-rows are refused with --dask), before a cluster is started."""
    inputs = str(work["root"] / "in")
    fit = ["fit", inputs, "--column", "embedding", "--codes", "4", "--out", str(tmp_path / "cb.safetensors")]
    codebook = str(work["codebook"])
    encode = ["encode", inputs, "--codebook", codebook, "--column", "embedding", "--out", str(tmp_path / "c")]
    cases = [(fit + ["--n-init", "2"], "--n-init=2 with --dask"), (encode + ["--batch-rows", "10"], "--batch-rows=10")]
    for argv, refused in cases:
        assert cli.main([*argv, "--quiet", "--dask", "local:1"]) == 1
        warning, error = capsys.readouterr().err.splitlines()
        assert warning.startswith("warning: --dask='local:1' for 3,000 rows in 2 tables: the cluster's start-up"), (
            warning
        )
        assert "a local run (without --dask) would be faster" in warning
        assert error.startswith(f"error: {refused}"), error


def test_a_bad_dask_address_is_a_configuration_error(
    work: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    inputs, codebook = str(work["root"] / "in"), str(work["codebook"])
    argv = ["encode", inputs, "--codebook", codebook, "--column", "embedding", "--out", str(tmp_path / "c"), "--quiet"]
    assert cli.main([*argv, "--dask", "bogus"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: dask='bogus'") and "Fix:" in error and "unexpected" not in error, error
    assert not (tmp_path / "c").exists()


def test_dask_on_a_large_input_does_not_warn(
    work: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.options, "DASK_MIN_ROWS", sum(PARTS.values()))  # these 3,000 rows count as large
    argv = ["fit", str(work["root"] / "in"), "--column", "embedding", "--codes", "4", "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--dask", "local:1", "--n-init", "2"]) == 1
    assert capsys.readouterr().err.startswith("error: --n-init=2 with --dask")
