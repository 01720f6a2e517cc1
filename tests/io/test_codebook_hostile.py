"""Hostile and huge codebook files: bounded reading, non-regular paths, deep or mistyped metadata,
and a ``vq inspect`` report that no file string can drive the terminal or forge a line of."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import stat
import struct
import threading
import tracemalloc
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vq_flows import cli

from vq_pipeline import Codebook, CodebookFileError, fit_codebook
from vq_pipeline.io.codebook_file import CodebookInfo, is_codebook_file, load_info
from vq_pipeline.jobs.display import safe_text

UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
LOADERS: dict[str, Callable[[Path], Any]] = {"Codebook.load": Codebook.load, "load_info": load_info}


@pytest.fixture(scope="module", params=["flat", "residual"])
def codebook(request: pytest.FixtureRequest) -> Codebook:
    """A flat codebook (format 1.0) and a multi-level one (format 1.1): every hostile case covers both."""
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    levels = 1 if request.param == "flat" else 2
    return fit_codebook(
        x,
        6,
        codec=request.param,
        levels=levels,
        engine="torch",
        device="cpu",
        sources=("s3://b/p0.parquet",),
        column="embedding",
    )


def rewrite(data: bytes, mutate: Callable[[dict], None], *, tail: bytes | None = None) -> bytes:
    """A codebook's bytes with its header rewritten by ``mutate(header)`` (and its data by ``tail``)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + (data[8 + n :] if tail is None else tail)


def refused(fn: Callable[[], Any]) -> tuple[str, int]:
    """The CodebookFileError message of ``fn()`` and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        with pytest.raises(CodebookFileError) as info:
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak


# ----------------------------------------------------------------------------- huge files, bounded reads

HUGE = 256 * 2**20  # sparse: costs no disk, but a reader that trusts the file would hold it all


def huge_files(data: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (first bytes of a HUGE-byte file, what the refusal must say)."""
    return {
        "zeros": (b"", "does not start with|not a codebook"),
        "random": (np.random.default_rng(3).bytes(4096), "not a codebook|truncated"),
        "absurd-header-length": (struct.pack("<Q", 200 * 2**20) + b"{", r"header length=209715200 bytes; expected at most"),
        "valid-codebook-then-junk": (data, r"follow the tensor data"),
    }


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", ["zeros", "random", "absurd-header-length", "valid-codebook-then-junk"])
def test_huge_files_are_refused_reading_only_their_first_bytes(
    codebook: Codebook, tmp_path: Path, kind: str, loader: str
) -> None:
    head, message = huge_files(codebook.to_bytes())[kind]
    path = tmp_path / f"{kind}.safetensors"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(HUGE)
    error, peak = refused(lambda: LOADERS[loader](path))
    assert peak < 20 * 2**20, f"refusing a {HUGE:,}-byte file allocated {peak:,} bytes"
    assert re.search(message, error) and str(path) in error, error


@pytest.mark.parametrize("where", ["header", "metadata"])
def test_dense_json_headers_are_refused_before_parsing(codebook: Codebook, tmp_path: Path, where: str) -> None:
    """16 MiB of ``{},{},...`` would parse into millions of objects (about 400 MiB): refused from a count,
    also when the metadata string hides its commas and braces as ``\\u`` escapes from the outer count."""
    cap = 16 * 2**20
    data = codebook.to_bytes()
    if where == "header":
        header, tail = b'{"x":[' + b"{}," * ((cap - 4096) // 3) + b"{}]}", b""
    else:  # an otherwise valid codebook, so that only the stats entry is left to parse
        blob = rewrite(data, lambda h: h["__metadata__"].update(stats="DENSE"))
        (n,) = struct.unpack("<Q", blob[:8])
        escaped = b"[" + b"\\u007b}\\u002c" * ((cap - 4096) // 13) + b"\\u007b}]"
        header, tail = blob[8 : 8 + n].replace(b'"DENSE"', b'"' + escaped + b'"'), blob[8 + n :]
        header += b" " * (-len(header) % 8)
    path = tmp_path / "dense.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + tail)
    error, peak = refused(lambda: load_info(path))
    assert peak < 3 * cap, f"refusing a {len(header):,}-byte header allocated {peak:,} bytes"
    assert re.search(rf"{where} holds \d+ JSON separators and brackets; expected at most \d+.*Fix", error), error


def test_valid_codebook_reads_no_more_than_it_is(codebook: Codebook, tmp_path: Path) -> None:
    """Loading a real codebook allocates about its size (the oracle), not more."""
    big = Codebook(
        centroids=torch.randn(4096, 512, generator=torch.Generator().manual_seed(1)),
        counts=torch.ones(4096, dtype=torch.int64),
        metric="l2",
    )
    path = big.save(tmp_path / "big.safetensors")
    size = path.stat().st_size  # ~8 MiB
    tracemalloc.start()
    try:
        info = load_info(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(info.centroids, big.centroids.numpy())
    assert peak < 3 * size + 2**20, f"loading a {size:,}-byte codebook allocated {peak:,} bytes"


@pytest.mark.parametrize("loader", LOADERS)
def test_trailing_junk_gaps_and_overlaps_are_refused(codebook: Codebook, tmp_path: Path, loader: str) -> None:
    data = codebook.to_bytes()
    n_centroids, n_counts = codebook.centroids.numel() * 4, codebook.counts.numel() * 8
    cases = {
        "junk": (data + b"junk", r"is \d+ bytes long but its header describes \d+ bytes .*4 bytes follow the tensor data"),
        "one-byte": (data + b"\0", r"1 bytes follow the tensor data.*Fix:"),
        # counts moved 8 bytes on, leaving a gap after the centroids (the file is as long as the offsets say)
        "gap": (
            rewrite(
                data,
                lambda h: h["counts"].update(data_offsets=[n_centroids + 8, n_centroids + 8 + n_counts]),
                tail=data[-(n_centroids + n_counts) :][:n_centroids] + b"\0" * 8 + data[-n_counts:],
            ),
            "no gap or overlap",
        ),
    }
    for name, (blob, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(CodebookFileError, match=message) as info:
            LOADERS[loader](path)
        assert str(path) in str(info.value), name
        with pytest.raises(CodebookFileError, match=message):
            Codebook.from_bytes(blob)


# ----------------------------------------------------------------------------- paths that are not regular files


def in_thread(fn: Callable[[], Any], timeout: float = 600.0) -> BaseException | None:
    """Run ``fn`` in a daemon thread; return what it raised. Fails if it has not returned by ``timeout``."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "reading the path blocked"
    return outcome[0]


def non_regular_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    paths = {"folder": (tmp_path, "a folder")}
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.safetensors")
        paths["fifo"] = (tmp_path / "fifo.safetensors", r"a FIFO \(named pipe\)")
    if Path("/dev/zero").exists() and stat.S_ISCHR(os.stat("/dev/zero").st_mode):
        paths["/dev/zero"] = (Path("/dev/zero"), "a character device")
    return paths


@pytest.mark.parametrize("loader", LOADERS)
def test_devices_fifos_and_folders_are_not_regular_files(tmp_path: Path, loader: str) -> None:
    for name, (path, kind) in non_regular_paths(tmp_path).items():
        error = in_thread(lambda path=path: LOADERS[loader](path))
        assert isinstance(error, CodebookFileError), (name, error)
        pattern = rf"codebook path={re.escape(repr(str(path)))} is {kind}, not a regular file; .*Fix: "
        assert re.search(pattern, str(error)), str(error)
        assert "does not exist" not in str(error)
        assert in_thread(lambda path=path: is_codebook_file(path)) is None and not is_codebook_file(path)


def test_symlinked_codebooks_still_load_and_missing_paths_are_named(codebook: Codebook, tmp_path: Path) -> None:
    real = codebook.save(tmp_path / "real.safetensors")
    (tmp_path / "link.safetensors").symlink_to(real)
    assert load_info(tmp_path / "link.safetensors").fingerprint == codebook.fingerprint
    assert is_codebook_file(tmp_path / "link.safetensors") and is_codebook_file(real)
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(CodebookFileError, match=r"dangling.safetensors' does not exist.*Fix"):
        load_info(tmp_path / "dangling.safetensors")
    (tmp_path / "junk").write_bytes(b"not a codebook at all")
    assert not is_codebook_file(tmp_path / "junk") and not is_codebook_file(tmp_path / "gone")


# ----------------------------------------------------------------------------- deep and mistyped metadata


def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda h: h["__metadata__"].update(fit=deep(100_000)), "metadata fit"),
        (lambda h: h["__metadata__"].update(stats=json.dumps({"history": json.loads(deep(40))})), "metadata stats"),
    ],
)
def test_deeply_nested_metadata_is_refused_naming_the_field(
    codebook: Codebook, tmp_path: Path, mutate: Callable[[dict], None], field: str
) -> None:
    path = tmp_path / "deep.safetensors"
    path.write_bytes(rewrite(codebook.to_bytes(), mutate))
    for load in LOADERS.values():
        with pytest.raises(CodebookFileError, match=rf"{re.escape(str(path))}.*{field} nests JSON .* deep.*Fix"):
            load(path)


def test_deeply_nested_header_is_refused(codebook: Codebook, tmp_path: Path) -> None:
    data = codebook.to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + n].rstrip()
    raw = raw[:-1] + b',"x":' + deep(100_000).encode() + b"}"  # the JSON header itself nests too deeply
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "deep-header.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    for load in LOADERS.values():
        with pytest.raises(CodebookFileError, match=rf"{re.escape(str(path))}.*the header nests JSON"):
            load(path)


def typed(key: str, value: Any) -> Callable[[dict], None]:
    """Set ``stats``/``timings`` entry ``key`` (as ``"stats.n_rows"``) or a metadata string."""

    def mutate(header: dict) -> None:
        meta = header["__metadata__"]
        if "." in key:
            field, entry = key.split(".")
            meta[field] = json.dumps({**json.loads(meta[field]), entry: value})
        else:
            meta[key] = value

    return mutate


WRONG_TYPES = {
    "fit-array": (typed("fit", "[1, 2]"), r"metadata fit=\[1, 2\] is an array; expected an object"),
    "fit-number": (typed("fit", "3"), r"metadata fit=3 is an integer; expected an object"),
    "stats-string": (typed("stats", '"abc"'), r"metadata stats='abc' is a string; expected an object"),
    "n_rows-string": (typed("stats.n_rows", "abc"), r"stats.n_rows='abc' is a string; expected an integer >= 0"),
    "n_rows-bool": (typed("stats.n_rows", True), r"stats.n_rows=True is a boolean; expected an integer >= 0"),
    "n_rows-negative": (typed("stats.n_rows", -1), r"stats.n_rows=-1 is an integer; expected an integer >= 0"),
    "inertia-string": (typed("stats.inertia", "x"), r"stats.inertia='x' is a string; expected a number"),
    "iterations-float": (typed("stats.iterations", 2.5), r"stats.iterations=2.5 is a number; expected an integer"),
    "converged-int": (typed("stats.converged", 1), r"stats.converged=1 is an integer; expected a boolean"),
    "mode-null": (typed("stats.mode", None), r"stats.mode=None is null; expected a string"),
    "fit_seconds-string": (typed("timings.fit_seconds", "slow"), r"timings.fit_seconds='slow' is a string; expected a number"),
    "sources-object": (typed("sources", "{}"), r"metadata sources=\{\} is an object; expected an array"),
    "sources-number-item": (typed("sources", '["a", 3]'), r"metadata sources holds 3, an integer; expected an array of strings"),
    "versions-number": (typed("versions", '{"torch": 2}'), r"metadata versions holds 2, an integer; expected an object whose"),
    "metric-number": (typed("metric", 3), r"metadata metric=3 is an integer; expected a string"),
    "metric-list": (typed("metric", ["l2"]), r"metadata metric=\['l2'\] is an array; expected a string"),
    "n_codes-negative": (typed("n_codes", "-6"), r"n_codes='-6', dim='5'; expected positive integers"),
    "dim-float": (typed("dim", "5.0"), r"dim='5.0'; expected positive integers"),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_wrongly_typed_metadata_is_refused_naming_field_and_types(codebook: Codebook, tmp_path: Path, case: str) -> None:
    mutate, message = WRONG_TYPES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(rewrite(codebook.to_bytes(), mutate))
    for load in LOADERS.values():
        with pytest.raises(CodebookFileError, match=rf"{re.escape(str(path))}.*{message}.*Fix:"):
            load(path)


def test_correctly_typed_optional_entries_and_unknown_ones_load(codebook: Codebook, tmp_path: Path) -> None:
    """Absent entries (older files) and entries this release does not know (newer minor versions) load."""
    stats = {"n_rows": 300, "future_entry": {"any": ["json"]}}
    path = tmp_path / "sparse.safetensors"
    path.write_bytes(rewrite(codebook.to_bytes(), lambda h: h["__metadata__"].update(stats=json.dumps(stats), timings="")))
    info = load_info(path)
    assert info.stats == stats and info.timings == {}
    text = cli.describe(info, title="t")
    assert re.search(r"^  training rows +300$", text, re.M) and "iterations" not in text and "fit time" not in text


# ----------------------------------------------------------------------------- safe display


def test_safe_text_escapes_controls_and_keeps_printable_unicode() -> None:
    cases = {
        "\x1b[2J\x1b[H": "\\x1b[2J\\x1b[H",
        "a\nb\rc\td": "a\\x0ab\\x0dc\\x09d",
        "\x00\x07\x7f\x85\x9b": "\\x00\\x07\\x7f\\x85\\x9b",
        "abc\u202edcba\u200b\u2066": "abc\\u202edcba\\u200b\\u2066",
        "x\u2028y\u2029z": "x\\u2028y\\u2029z",
        "\ud800": "\\ud800",
        "\U000e0041\U0001d173": "\\U000e0041\\U0001d173",
        "café 漢字 😀 ñ": "café 漢字 😀 ñ",
        "C:\\data\\x1b": "C:\\data\\x1b",
        "": "",
    }
    for raw, expected in cases.items():
        assert safe_text(raw) == expected, raw


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_safe_text_leaves_no_unsafe_character_and_changes_nothing_safe(s: str) -> None:
    out = safe_text(s)
    assert not any(unicodedata.category(ch) in UNSAFE for ch in out)
    if not any(unicodedata.category(ch) in UNSAFE for ch in s):
        assert out == s
    out.encode("utf-8")  # no lone surrogate is left to break the terminal's encoder


LABELS = [
    "fingerprint", "metric", "codec", "codes", "fit", "training rows", "inertia", "iterations", "repairs",
    "empty codes", "error (mse)", "semantic ids", "per level", "cluster sizes", "sources", "column",
    "data fingerprint", "parent", "versions", "created_at", "fit time",
]  # fmt: skip
MULTI_LEVEL_LABELS = ("codec", "error (mse)", "semantic ids", "per level")  # residual and product only
CONTINUED = ("sources", "per level")  # labels whose value may go on over unlabelled lines


def check_report(text: str, title: str) -> None:
    """No control character but the report's own newlines; the title, then one labelled line per row,
    with unlabelled lines only as continuations of ``sources`` (and of a multi-level codebook's
    ``per level`` table)."""
    assert not any(unicodedata.category(ch) in UNSAFE for ch in text.replace("\n", "")), ascii(text)
    first, *lines = text.split("\n")
    assert first == safe_text(title)
    width = max(len(label) for label in LABELS if re.search(rf"^  {re.escape(label)}  ", text, re.M)) + 2
    seen, previous = [], None
    for line in lines:
        label = line[2 : 2 + width].rstrip()
        assert line.startswith("  ") and (label in LABELS or (label == "" and previous in CONTINUED)), ascii(line)
        if label:
            seen.append(label)
            previous = label
    core = [label for label in seen if label != "codec"]  # multi-level codebooks add their codec
    assert len(seen) == len(set(seen)) and core[:4] == ["fingerprint", "metric", "codes", "fit"], seen


text_st = st.text(max_size=20)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | text_st


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    title=text_st,
    strings=st.fixed_dictionaries({k: text_st for k in ("column", "data_fingerprint", "parent_fingerprint", "created_at")}),
    sources=st.lists(text_st, max_size=8),
    fit=st.dictionaries(text_st, json_scalar, max_size=4),
    versions=st.dictionaries(text_st, text_st, max_size=3),
    mode=text_st,
)
def test_describe_of_a_file_with_arbitrary_strings_is_one_labelled_line_per_row(
    tmp_path: Path, title: str, strings: dict[str, str], sources: list[str], fit: dict, versions: dict, mode: str
) -> None:
    base = Codebook(centroids=torch.eye(3), counts=torch.tensor([2, 0, 1]), metric="l2")
    cb = Codebook(
        centroids=base.centroids,
        counts=base.counts,
        metric="l2",
        settings=fit,
        stats={"n_rows": 3, "mode": mode, "inertia": 1.5, "iterations": 2, "converged": True},
        sources=tuple(sources),
        versions=versions,
        timings={"fit_seconds": 0.25},
        **strings,
    )
    path = cb.save(tmp_path / "cb.safetensors")
    info = load_info(path)
    text = cli.describe(info, title=title)
    check_report(text, title)
    flat_rows = len(LABELS) - len(MULTI_LEVEL_LABELS)
    assert text.count("\n") == flat_rows + max(0, min(len(sources), cli.MAX_SOURCES_SHOWN + 1) - 1)
    assert f"  training rows     3 ({safe_text(mode)})" in text or mode == ""
    for s in sources[: cli.MAX_SOURCES_SHOWN]:
        assert safe_text(s) in text


@settings(max_examples=50, deadline=None)
@given(
    stats=st.dictionaries(
        st.sampled_from(["n_rows", "rows_total", "mode", "sample_seed", "inertia", "iterations", "converged", "n_repairs"]),
        json_scalar | st.lists(json_scalar, max_size=2) | st.dictionaries(text_st, json_scalar, max_size=2),
    ),
    fit=json_scalar | st.lists(json_scalar, max_size=3) | st.dictionaries(text_st, json_scalar, max_size=3),
    fit_seconds=json_scalar | st.lists(json_scalar, max_size=2),
    versions=st.dictionaries(text_st, json_scalar, max_size=2) | text_st,
)
def test_describe_never_fails_on_informational_fields_of_any_type(stats: dict, fit: Any, fit_seconds: Any, versions: Any) -> None:
    """A codebook built in memory is not checked like a file is: describing it still works."""
    info = CodebookInfo(
        centroids=np.eye(2, dtype=np.float32),
        counts=np.array([1, 1]),
        metric="l2",
        settings=fit,
        stats=stats,
        versions=versions,
        timings={"fit_seconds": fit_seconds},
    )
    check_report(cli.describe(info, title="cb"), "cb")


def test_vq_inspect_escapes_the_file_name_and_every_file_string(codebook: Codebook, tmp_path: Path) -> None:
    hostile = "\x1b[2J\x1b[H\n  metric            forged"
    cb = Codebook(
        centroids=codebook.centroids,
        counts=codebook.counts,
        metric="l2",
        codec=codebook.codec,
        settings={"init\x1b]0;title\x07": "k-means++\r\u202e"},
        stats={"n_rows": 300, "mode": hostile},
        sources=(f"s3://b/{hostile}",),
        column=hostile,
        versions={"torch": hostile},
        created_at="\u2028now",
    )
    name = tmp_path / f"cb{hostile}.safetensors"
    cb.save(name)
    out = io.StringIO()
    console = cli.Console(quiet=True, stdout=out, stderr=io.StringIO())
    assert cli.cmd_inspect(argparse.Namespace(codebook=str(name), json=False), console) == 0
    text = out.getvalue().removesuffix("\n")
    check_report(text, str(name))
    assert "\x1b" not in text and "\r" not in text and "\\x1b[2J\\x1b[H\\x0a  metric" in text
    assert len(re.findall(r"^  metric ", text, re.M)) == 1
    out = io.StringIO()
    console = cli.Console(quiet=True, stdout=out, stderr=io.StringIO())
    assert cli.cmd_inspect(argparse.Namespace(codebook=str(name), json=True), console) == 0
    assert json.loads(out.getvalue())["column"] == hostile and "\x1b" not in out.getvalue()
