"""Issue 4, "Bad input: a clear error, and nothing written": one table of cases, each run through
the ``vq`` CLI (a subprocess) and through the Prefect flows (in-process, on a throwaway API).

Every case builds a real, small parquet file (dim 6, a few hundred rows) or a codebook file, then:

* CLI: exit status 1, one ``error: ...`` line on stderr that names the problem and says ``Fix``, no
  traceback, nothing on stdout;
* flows: the expected exception type (a failed task's exception is re-raised by the flow; a row error
  found while encoding a file arrives as ``EncodeFailedError`` raised *from* it), whose message names
  the problem and says ``Fix``;
* both: no output under its final name (no codebook for ``fit``; no parquet output, receipt or
  the manifest for ``encode``). Temporary files and the lock do not count.

A few cases must *work* (integer and float64 vectors, ``n_codes=1``): their results must equal the
float32 ones. The CLI subprocesses (about 2 s of imports each) run two at a time in the background
while the flow cases run in-process.

Not a case of its own: a metric mismatch through the CLI (``vq encode`` has no ``--metric``; the
codebook decides), so it is covered through the fit flow's warm start and ``Codebook.load(metric=)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from vq_pipeline import Codebook, InvalidInputError, fit_codebook
from vq_pipeline.errors import (
    CodebookFileError,
    DimensionMismatchError,
    NonFiniteError,
    TooFewPointsError,
    UnsupportedFormatError,
)
from vq_pipeline.jobs.encode_state import LOCK_NAME, manifest_path, state_dir
from vq_pipeline.settings import EncodeOptions, EncodeSettings, FitSettings, TableSettings

DIM = 6
N_ROWS = 300
N_CODES = 4
COLUMN = "embedding"
FILE = "part-0.parquet"  # every input table's file name, so messages can be checked for it
BAD_ROW, BAD_COL = 17, 2


# ----------------------------------------------------------------------------- data


def clustered(n: int = N_ROWS, *, seed: int = 0) -> np.ndarray:
    """(n, DIM) float32 rows around 5 well separated centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 5.0, (5, DIM))
    return (centres[rng.integers(0, 5, n)] + rng.normal(0.0, 0.5, (n, DIM))).astype(np.float32)


def integers(n: int = N_ROWS, *, seed: int = 0) -> np.ndarray:
    """(n, DIM) int32 rows (clustered, scaled): exactly representable in float32."""
    return np.round(clustered(n, seed=seed) * 100).astype(np.int32)


def frame(x: Any, *, dtype: Any = None, ids: Any = "default", column: str = COLUMN) -> pl.DataFrame:
    """A table with an ``id`` column and an embedding column (Array of ``dtype`` by default)."""
    if isinstance(x, np.ndarray):
        inner = dtype or {np.dtype(np.float32): pl.Float32, np.dtype(np.float64): pl.Float64, np.dtype(np.int32): pl.Int32}[x.dtype]
        emb = pl.Series(column, x, dtype=pl.Array(inner, x.shape[1]))
    else:  # a list of lists (possibly ragged or with nulls): a List column
        emb = pl.Series(column, x, dtype=dtype or pl.List(pl.Float32))
    n = len(emb)
    cols = [] if ids is None else [pl.Series("id", np.arange(n, dtype=np.int64) if isinstance(ids, str) else ids)]
    return pl.DataFrame([*cols, emb])


def with_value(value: float, *, dtype: Any = np.float32) -> Callable[[], pl.DataFrame]:
    def make() -> pl.DataFrame:
        x = clustered().astype(dtype)
        x[BAD_ROW, BAD_COL] = value
        return frame(x)

    return make


def rows_list(x: np.ndarray) -> list[list[float] | None]:
    return [list(map(float, r)) for r in x]


def null_embedding() -> pl.DataFrame:
    rows = rows_list(clustered())
    rows[BAD_ROW] = None
    return frame(rows)


def null_element() -> pl.DataFrame:
    rows = rows_list(clustered())
    rows[BAD_ROW][BAD_COL] = None
    return frame(rows)


def ragged() -> pl.DataFrame:
    rows = rows_list(clustered())
    rows[BAD_ROW] = rows[BAD_ROW][:-1]
    return frame(rows)


def zero_length() -> pl.DataFrame:
    return frame([[] for _ in range(N_ROWS)])


def zero_width() -> pl.DataFrame:
    return pl.DataFrame({"id": np.arange(N_ROWS), COLUMN: pl.Series([[]] * N_ROWS, dtype=pl.Array(pl.Float32, 0))})


def zero_row() -> pl.DataFrame:
    x = clustered()
    x[BAD_ROW] = 0.0
    return frame(x)


def strings() -> pl.DataFrame:
    return pl.DataFrame({"id": np.arange(N_ROWS), COLUMN: [",".join(map(str, r)) for r in clustered()]})


def duplicated(n_distinct: int, copies: int) -> Callable[[], pl.DataFrame]:
    """``n_distinct`` distinct rows, each ``copies`` times (``1 - 1/copies`` of the rows are duplicates)."""
    return lambda: frame(np.repeat(clustered(n_distinct), copies, axis=0))


def ids_frame(ids: Any) -> Callable[[], pl.DataFrame]:
    def make() -> pl.DataFrame:
        df = frame(clustered())
        return df.with_columns(pl.Series("id", ids, dtype=pl.Int64))

    return make


# Writers: given the case's input folder, write the input and return the path passed as DATA.


def table(make: Callable[[], pl.DataFrame]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        make().write_parquet(folder / FILE)
        return folder / FILE

    return write


def corrupt(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FILE).write_bytes(np.random.default_rng(1).bytes(5000))
    return folder / FILE


def truncated(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    frame(clustered()).write_parquet(folder / FILE)
    data = (folder / FILE).read_bytes()
    (folder / FILE).write_bytes(data[: len(data) * 2 // 3])
    return folder / FILE


def empty_folder(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("no tables here\n")
    (folder / "sub" / "notes.csv").write_text("a,b\n1,2\n")
    return folder


GOOD = table(lambda: frame(clustered()))


# ----------------------------------------------------------------------------- codebook files


def header_swap(data: bytes, mutate: Callable[[dict], None]) -> bytes:
    """Rewrite a safetensors header through ``mutate`` and keep the tensor bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def nan_centroid(data: bytes) -> bytes:
    out = bytearray(data)
    (n,) = struct.unpack("<Q", data[:8])
    out[8 + n + 4 * 3 : 8 + n + 4 * 4] = struct.pack("<f", float("nan"))  # centroids[0, 3]
    return bytes(out)


class _Exploit:
    """Unpickling this touches ``marker``: proof that a pickle was (wrongly) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One bad (or borderline) input.

    command: "fit" or "encode". write: builds the input under a folder and returns DATA.
    error: the expected exception type, or None when the input must work. fragments: what the
    message must contain besides "Fix". during_encode: the error is found while a file's rows are
    encoded (the encode flow then raises EncodeFailedError from it). codebook: which codebook
    file encode uses (a key of the ``codebooks`` fixture).
    """

    name: str
    command: str
    write: Callable[[Path], Path]
    error: type[BaseException] | None
    fragments: tuple[str, ...] = ()
    n_codes: int = N_CODES
    metric: str = "l2"
    id_column: str | None = None
    codebook: str = "l2"
    during_encode: bool = False
    absent: tuple[str, ...] = ()  # what the message must not say


def _data_cases(command: str) -> list[Case]:
    """The embedding-value cases, alike at fit and at encode time."""
    enc = command == "encode"
    row = f"row {BAD_ROW}"
    return [
        Case(f"{command}-nan", command, table(with_value(np.nan)), NonFiniteError, (FILE, row, f"column {BAD_COL}", "nan"), during_encode=enc),
        Case(f"{command}-posinf", command, table(with_value(np.inf)), NonFiniteError, (FILE, row, "inf"), during_encode=enc),
        Case(f"{command}-neginf", command, table(with_value(-np.inf)), NonFiniteError, (FILE, row, "-inf"), during_encode=enc),
        Case(f"{command}-norm-overflow", command, table(with_value(3e19)), NonFiniteError,
             (FILE, f"[{BAD_ROW}]", "squared norm", "rescale"), during_encode=enc),
        Case(f"{command}-float64-beyond-float32", command, table(with_value(1e39, dtype=np.float64)), NonFiniteError,
             (FILE, row, "float32's range"), absent=("NaN or ±Inf",), during_encode=enc),
        Case(f"{command}-null-embedding", command, table(null_embedding), InvalidInputError, (FILE, f"null at {row}"), during_encode=enc),
        Case(f"{command}-null-element", command, table(null_element), InvalidInputError, (FILE, "null element", row), during_encode=enc),
        Case(f"{command}-ragged", command, table(ragged), InvalidInputError, (FILE, f"length {DIM - 1} at {row}", f"length {DIM}"),
             during_encode=enc),
        Case(f"{command}-zero-length", command, table(zero_length), InvalidInputError, (FILE, "zero-length vector", "dim >= 1"),
             absent=("expected every vector to have length 0",), during_encode=enc),
        Case(f"{command}-zero-width-array", command, table(zero_width), InvalidInputError, (FILE, "zero-length vectors")),
        Case(f"{command}-zero-norm-cosine", command, table(zero_row), InvalidInputError, (FILE, f"[{BAD_ROW}]", "norm 0", "cosine"),
             metric="cosine", codebook="cosine", during_encode=enc),
        Case(f"{command}-missing-column", command, table(lambda: frame(clustered(), column="vector")), InvalidInputError,
             (FILE, f"column={COLUMN!r}", "'vector'")),
        Case(f"{command}-strings", command, table(strings), InvalidInputError, (FILE, "dtype=String", "Array(Float32")),
        Case(f"{command}-integers", command, table(lambda: frame(integers())), None),
        Case(f"{command}-float64", command, table(lambda: frame(clustered().astype(np.float64))), None),
        Case(f"{command}-empty-table", command, table(lambda: frame(clustered()[:0])), InvalidInputError, (FILE, "no rows")),
        Case(f"{command}-corrupt-parquet", command, corrupt, InvalidInputError, (FILE, "cannot be read")),
        Case(f"{command}-truncated-parquet", command, truncated, InvalidInputError, (FILE, "cannot be read", "truncated")),
        Case(f"{command}-folder-without-parquet", command, empty_folder, InvalidInputError, ("holds no table files",)),
    ]


CASES: list[Case] = [
    *_data_cases("fit"),
    Case("fit-fewer-rows-than-codes", "fit", table(lambda: frame(clustered(3))), TooFewPointsError, ("n_codes=4", "n_rows=3")),
    Case("fit-one-code", "fit", GOOD, None, n_codes=1),
    Case("fit-all-rows-identical", "fit", table(duplicated(1, N_ROWS)), TooFewPointsError, ("only 1 distinct rows", "n_codes=4")),
    # 250 rows, 80% of them copies: 50 distinct rows for 64 codes.
    Case("fit-80pct-duplicates", "fit", table(duplicated(50, 5)), TooFewPointsError,
         ("only 50 distinct rows", "n_codes=64", "lower n_codes to 50"), n_codes=64),
    *_data_cases("encode"),
    Case("encode-wrong-dim", "encode", table(lambda: frame(clustered()[:, :5])), DimensionMismatchError, (FILE, "dim=5", f"dim={DIM}")),
    Case("encode-wrong-dim-list", "encode", table(lambda: frame(rows_list(clustered()[:, :5]))), DimensionMismatchError,
         (FILE, "shape[1]=5", f"dim={DIM}"), during_encode=True),
    Case("encode-missing-id-column", "encode", table(lambda: frame(clustered(), ids=None)), InvalidInputError,
         (FILE, "id_column='id'", "--id-column"), id_column="id"),
    Case("encode-null-id", "encode", table(ids_frame([*range(BAD_ROW), None, *range(BAD_ROW + 1, N_ROWS)])), InvalidInputError,
         (FILE, "id_column='id'", f"null at row {BAD_ROW}"), id_column="id"),
    Case("encode-duplicate-ids", "encode", table(ids_frame([*range(N_ROWS - 1), 5])), InvalidInputError,
         ("id_column='id'", "duplicate ids", "[5]"), id_column="id"),
    Case("encode-codebook-truncated", "encode", GOOD, CodebookFileError, ("truncated.safetensors", "truncated"), codebook="truncated"),
    Case("encode-codebook-lying-header", "encode", GOOD, CodebookFileError, ("lying.safetensors", "shape [5, 6]", "inconsistent"),
         codebook="lying"),
    Case("encode-codebook-nan-centroids", "encode", GOOD, CodebookFileError, ("nan.safetensors", "NaN"), codebook="nan"),
    Case("encode-codebook-unknown-version", "encode", GOOD, UnsupportedFormatError, ("version.safetensors", "format_version='7.0'"),
         codebook="version"),
    Case("encode-codebook-pickle", "encode", GOOD, CodebookFileError, ("pickle.safetensors", "pickle", "never loaded"), codebook="pickle"),
    Case("encode-codebook-random-bytes", "encode", GOOD, CodebookFileError, ("random.safetensors",), codebook="random"),
]
CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES)


def _param(case: Case) -> Any:
    return pytest.param(case.name, id=case.name)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case's input (built once, read by both the CLI and the flow runs) and the codebooks."""
    root = tmp_path_factory.mktemp("bad-inputs")
    inputs = {c.name: c.write(root / "in" / c.name) for c in CASES}
    x = torch.from_numpy(clustered(seed=0))
    books = root / "codebooks"
    books.mkdir()
    l2 = fit_codebook(x, N_CODES, metric="l2", engine="torch", seed=0)
    cosine = fit_codebook(x, N_CODES, metric="cosine", engine="torch", seed=0)
    good = l2.to_bytes()
    marker = root / "pwned"
    files = {
        "l2": good,
        "cosine": cosine.to_bytes(),
        "truncated": good[: len(good) - 40],
        "lying": header_swap(good, lambda h: h["__metadata__"].update(n_codes="5")),
        "nan": nan_centroid(good),
        "version": header_swap(good, lambda h: h["__metadata__"].update(format_version="7.0")),
        "pickle": pickle.dumps(_Exploit(marker), protocol=4),
        "random": np.random.default_rng(7).bytes(4096),
    }
    paths = {}
    for key, data in files.items():
        paths[key] = books / f"{key}.safetensors"
        paths[key].write_bytes(data)
    return {"root": root, "inputs": inputs, "codebooks": paths, "l2": l2, "cosine": cosine, "marker": marker}


def cli_argv(case: Case, work: dict[str, Any], out: Path) -> list[str]:
    data = str(work["inputs"][case.name])
    if case.command == "fit":
        argv = ["fit", data, "--column", COLUMN, "--codes", str(case.n_codes), "--metric", case.metric]
    else:
        argv = ["encode", data, "--codebook", str(work["codebooks"][case.codebook]), "--column", COLUMN]
        if case.id_column:
            argv += ["--id-column", case.id_column]
    return [*argv, "--engine", "torch", "--device", "cpu", "--out", str(out)]


def out_path(case: Case, folder: Path) -> Path:
    """A fresh output location: the codebook file for fit (in a folder of its own), the folder for encode."""
    folder.mkdir(parents=True)
    return folder / "codebook.safetensors" if case.command == "fit" else folder / "codes"


@pytest.fixture(scope="module")
def cli_runs(work: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    """Every case through ``python -m vq_flows.cli``, two subprocesses at a time, in the background.

    Returns futures of ``(finished process, output path)`` by case name. test_flow asks for this
    fixture first, so the subprocesses (mostly imports) overlap the in-process flow runs (mostly
    waiting on the Prefect API); test_cli, later in the module, collects them.
    """
    root = tmp_path_factory.mktemp("cli-out")
    env = dict(os.environ)  # conftest.py's KeOps cache and Prefect home; children inherit them

    def run(case: Case) -> tuple[subprocess.CompletedProcess[str], Path]:
        out = out_path(case, root / case.name)
        proc = subprocess.run(
            [sys.executable, "-m", "vq_flows.cli", *cli_argv(case, work, out)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        return proc, out

    # Only the cases whose test_cli was selected (``-k``, node ids) are run.
    selected = {
        item.callspec.params["name"] for item in request.session.items
        if getattr(item, "originalname", None) == "test_cli" and item.module is request.module
    }
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {c.name: pool.submit(run, c) for c in CASES if c.name in selected}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- checks


def visible_files(folder: Path, *, lock: Path | None = None) -> list[str]:
    """Files under ``folder`` under a final name: not temporary (``.NAME.*.tmp``) and not ``lock``."""
    if not folder.exists():
        return []
    return [
        p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
        if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")) and p != lock
    ]


def assert_nothing_written(case: Case, out: Path) -> None:
    if case.command == "fit":
        assert not out.exists(), f"{case.name}: a codebook was written at {out}"
        # The default checkpoint (OUT.ckpt) is resume state, not output, but a fit refused before
        # its first iteration has none either.
        assert visible_files(out.parent) == [], visible_files(out.parent)
    else:
        assert not manifest_path(out).exists()
        assert visible_files(out) == [], visible_files(out)  # no parquet output
        state = state_dir(out)
        assert visible_files(state, lock=state / LOCK_NAME) == [], visible_files(state)  # no receipt


def assert_message(case: Case, message: str) -> None:
    assert "Fix" in message, message
    for fragment in case.fragments:
        assert fragment in message, (fragment, message)
    for fragment in case.absent:
        assert fragment not in message, (fragment, message)


def encoded_codes(out: Path) -> np.ndarray:
    return pl.read_parquet(out / FILE)["code"].to_numpy().astype(np.int64)


def float_reference(case: Case) -> torch.Tensor:
    """The float32 values the 'must work' cases hold."""
    x = integers() if case.name.endswith("integers") else clustered()
    return torch.from_numpy(x.astype(np.float32))


def assert_works(case: Case, out: Path, work: dict[str, Any]) -> None:
    """The borderline inputs that must work give the float32 input's results."""
    x = float_reference(case)
    if case.command == "fit":
        cb = Codebook.load(out)
        ref = fit_codebook(x, case.n_codes, metric=case.metric, engine="torch", device="cpu", seed=0)
        assert cb.n_codes == case.n_codes and cb.dim == DIM and cb.stats["n_rows"] == N_ROWS
        assert torch.equal(cb.centroids, ref.centroids), f"{case.name}: centroids differ from the float32 fit"
        if case.n_codes == 1:
            torch.testing.assert_close(cb.centroids[0], x.double().mean(0).float(), rtol=1e-5, atol=1e-5)
    else:
        assert manifest_path(out).is_file()
        ref = work["l2"].encode(x, engine="torch", device="cpu")
        assert np.array_equal(encoded_codes(out), ref.numpy()), f"{case.name}: codes differ from the float32 encoding"


# ----------------------------------------------------------------------------- tests: flows


def run_flow(case: Case, work: dict[str, Any], out: Path) -> Any:
    from vq_flows.encode import encode_embeddings_flow
    from vq_flows.fit import fit_codebook_flow

    data = str(work["inputs"][case.name])
    if case.command == "fit":
        return fit_codebook_flow([data], str(out), case.n_codes, TableSettings(column=COLUMN), FitSettings(metric=case.metric, engine="torch", device="cpu"))
    return encode_embeddings_flow([data], str(work["codebooks"][case.codebook]), str(out), EncodeSettings(column=COLUMN, id_column=case.id_column), EncodeOptions(engine="torch", device="cpu"))


@pytest.mark.parametrize("name", [_param(c) for c in CASES])
def test_flow(name: str, cli_runs: Any, prefect_api: None, work: dict[str, Any], tmp_path: Path) -> None:
    case = CASES_BY_NAME[name]
    out = out_path(case, tmp_path / "out")
    if case.error is None:
        run_flow(case, work, out)
        assert_works(case, out, work)
        return
    with pytest.raises(Exception) as info:
        run_flow(case, work, out)
    exc = info.value
    assert not work["marker"].exists(), "a pickle was executed"
    if case.during_encode:
        from vq_pipeline.errors import EncodeFailedError

        # The file's task failed (without retries: a VQError is about the data); the flow reports it.
        assert isinstance(exc, EncodeFailedError), repr(exc)
        assert "1 of 1 files could not be encoded" in str(exc) and FILE in str(exc)
        assert isinstance(exc.__cause__, case.error), repr(exc.__cause__)
    else:
        assert isinstance(exc, case.error), repr(exc)
    assert_message(case, str(exc))
    assert_nothing_written(case, out)


# ----------------------------------------------------------------------------- tests: CLI


@pytest.mark.parametrize("name", [_param(c) for c in CASES])
def test_cli(name: str, cli_runs: dict[str, Any], work: dict[str, Any]) -> None:
    case = CASES_BY_NAME[name]
    proc, out = cli_runs[name].result()
    assert not work["marker"].exists(), "a pickle was executed"
    if case.error is None:
        assert proc.returncode == 0, proc.stderr
        assert_works(case, out, work)
        return
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "unexpected" not in lines[-1], proc.stderr
    assert sum(line.startswith("error") for line in lines) == 1, proc.stderr
    assert_message(case, lines[-1])
    assert_nothing_written(case, out)


def test_flow_metric_mismatch_of_a_warm_start(prefect_api: None, work: dict[str, Any], tmp_path: Path) -> None:
    """A cosine fit warm-started from an l2 codebook (the flows' only metric request on a file)."""
    from vq_flows.fit import fit_codebook_flow

    out = tmp_path / "cb.safetensors"
    with pytest.raises(InvalidInputError) as info:
        fit_codebook_flow([str(work["inputs"]["fit-float64"])], str(out), N_CODES, TableSettings(column=COLUMN), FitSettings(metric="cosine", engine="torch", device="cpu"), warm_start=str(work["codebooks"]["l2"]))
    message = str(info.value)
    assert "metric='cosine' was requested" in message and "metric='l2' codebook" in message and "l2.safetensors" in message
    assert "Fix" in message and not out.exists() and list(tmp_path.iterdir()) == []


def test_library_metric_mismatch(work: dict[str, Any]) -> None:
    """`vq encode` has no --metric (the codebook decides), so a metric request is the library's
    ``Codebook.load(metric=...)``."""
    for path, asked, held in [(work["codebooks"]["l2"], "cosine", "l2"), (work["codebooks"]["cosine"], "l2", "cosine")]:
        with pytest.raises(InvalidInputError) as info:
            Codebook.load(path, metric=asked)
        message = str(info.value)
        assert f"metric={asked!r} was requested" in message and f"metric={held!r} codebook" in message and "Fix" in message
        assert Codebook.load(path, metric=held).metric == held


def test_a_header_length_that_looks_like_a_pickle_opcode_is_not_refused(work: dict[str, Any], tmp_path: Path) -> None:
    """A valid codebook file whose 8-byte header length starts with b"\\x80\\x05" (1408 bytes) must load.

    The fitted metadata (timings, stats) changes length from run to run, so about one saved codebook in
    a hundred hits one of the four lengths; here the column name is padded until the header is 1408 bytes.
    """
    base = dataclasses.replace(work["l2"], stats={}, timings={}, sources=(), column="")
    for n in range(0, 1408, 8):
        cb = dataclasses.replace(base, column="c" * n)
        if cb.to_bytes()[:8] == struct.pack("<Q", 1408):
            break
    else:
        pytest.fail("could not build a 1408-byte header")
    path = cb.save(tmp_path / "cb.safetensors")
    assert Codebook.load(path).fingerprint == cb.fingerprint
