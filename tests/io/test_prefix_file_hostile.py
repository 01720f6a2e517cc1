"""The prefix-table file: byte-exact round trips, and hostile files refused with a CodebookFileError
(never another exception, never a table whose queries could index outside its arrays)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline.compute.prefix_table import PrefixTable
from vq_pipeline.compute.semantic_ids import unique_suffix
from vq_pipeline.errors import CodebookFileError, StateError, UnsupportedFormatError
from vq_pipeline.io.prefix_file import prefix_file_bytes, read_prefix_file, write_prefix_file

FP = "ab" * 32
CODES = np.random.default_rng(0).integers(0, 5, (120, 3))
TABLE = PrefixTable.build(CODES, unique_suffix(CODES), n_codes=5)
ARRAYS = TABLE.to_arrays()
GOOD = prefix_file_bytes(ARRAYS, codebook_fingerprint=FP, id_version=3)


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "ids.prefix.safetensors"
    path.write_bytes(data)
    return path


def test_round_trip_is_byte_exact_and_plain_safetensors(tmp_path: Path) -> None:
    path = write_prefix_file(tmp_path / "p.safetensors", ARRAYS, codebook_fingerprint=FP, id_version=3)
    assert path.read_bytes() == GOOD
    arrays, meta = read_prefix_file(path, codebook_fingerprint=FP, id_version=3)
    assert meta["id_version"] == "3" and meta["codebook_fingerprint"] == FP and meta["n_items"] == "120"
    assert set(arrays) == set(ARRAYS) and all(np.array_equal(arrays[k], ARRAYS[k]) for k in ARRAYS)
    assert all(arrays[k].dtype == ARRAYS[k].dtype for k in ARRAYS)
    from safetensors.numpy import load_file

    assert all(np.array_equal(v, ARRAYS[k]) for k, v in load_file(path).items())
    table = PrefixTable.from_arrays(arrays)
    prefixes = torch.tensor(CODES[:, :2])
    assert torch.equal(table.next_mask(prefixes), TABLE.next_mask(prefixes))


def test_a_table_of_another_codebook_or_version_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(
        StateError, match=r"was built for codebook_fingerprint='abab.*expected codebook_fingerprint='cdcd"
    ):
        read_prefix_file(path, codebook_fingerprint="cd" * 32)
    with pytest.raises(StateError, match=r"was built for id_version='3'; expected id_version='4'"):
        read_prefix_file(path, id_version=4)


def retyped(name: str, dtype: str) -> dict[str, np.ndarray]:
    return {**ARRAYS, name: ARRAYS[name].astype(dtype)}


def changed(name: str, edit) -> dict[str, np.ndarray]:
    a = ARRAYS[name].copy()
    edit(a)
    return {**ARRAYS, name: a}


# Tables whose bytes and hash are consistent but whose trie is not: each would let a query index outside
# an array or yield an id the table does not hold.
BROKEN_TRIES = {
    "offsets not from 0": (changed("offsets_1", lambda a: a.__setitem__(0, 1)), r"offsets_1 does not run from 0"),
    "offsets past the end": (changed("offsets_2", lambda a: a.__setitem__(-1, a[-1] + 1)), r"offsets_2 does not run"),
    "a node without children": (changed("offsets_1", lambda a: a.__setitem__(2, a[1])), r"offsets_1 does not run"),
    "offsets one short": (
        changed("offsets_1", lambda a: None) | {"offsets_1": ARRAYS["offsets_1"][:-1]},
        r"offsets_1 has",
    ),
    "a code past its level": (
        changed("children_0", lambda a: a.__setitem__(-1, 5)),
        r"children_0 holds codes outside 0..4",
    ),
    "codes out of order": (changed("children_2", lambda a: a.__setitem__(slice(0, 2), a[1::-1])), r"does not increase"),
    "an item row past the end": (changed("item_rows", lambda a: a.__setitem__(0, 120)), r"not a permutation"),
    "an item twice": (changed("item_rows", lambda a: a.__setitem__(0, a[1])), r"not a permutation"),
    "a size of zero": (changed("sizes", lambda a: a.__setitem__(0, 0)), r"expected level sizes in 1..2\*\*31-1"),
    "leaf offsets where leaves hold one item": (
        {**ARRAYS, "leaf_offsets": np.arange(10, dtype=np.int32)},
        r"leaf_offsets does not run",
    ),
    "item rows of another count": ({**ARRAYS, "item_rows": ARRAYS["item_rows"][:-1]}, r"item_rows has 119 values"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TRIES))
def test_a_broken_trie_is_refused(tmp_path: Path, case: str) -> None:
    arrays, message = BROKEN_TRIES[case]
    path = write(tmp_path, prefix_file_bytes(arrays, codebook_fingerprint=FP, id_version=3))
    with pytest.raises(CodebookFileError, match=message):
        read_prefix_file(path)


def raw_header(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def header_edit(edit) -> bytes:
    header, body = split(GOOD)
    edit(header)
    return join(header, body)


HOSTILE = {
    "empty": (b"", r"declares a header of None bytes"),
    "a pickle": (b"\x80\x04\x95" + bytes(64), r"expected a safetensors header"),
    "a huge header length": (struct.pack("<Q", 2**62) + b"{}", r"declares a header of 4611686018427387904 bytes"),
    "not JSON": (struct.pack("<Q", 8) + b"{not js}", r"the header is not UTF-8 JSON"),
    "not UTF-8": (struct.pack("<Q", 8) + b"{\xff\xfe    }", r"the header is not UTF-8 JSON"),
    "no metadata": (join({}, b""), r"the header has no metadata object"),
    "another format": (header_edit(lambda h: h["__metadata__"].update(format="vq-pipeline.codebook")), r"format="),
    "a later major": (header_edit(lambda h: h["__metadata__"].update(format_version="2.0")), r"format_version='2.0'"),
    "depth past the cap": (header_edit(lambda h: h["__metadata__"].update(depth="100000")), r"metadata depth='100000'"),
    "a depth of text": (header_edit(lambda h: h["__metadata__"].update(depth="four")), r"metadata depth='four'"),
    "a short fingerprint": (
        header_edit(lambda h: h["__metadata__"].update(codebook_fingerprint="ab")),
        r"metadata codebook_fingerprint='ab'; expected 64 hex digits",
    ),
    "a metadata number": (header_edit(lambda h: h["__metadata__"].update(depth=4)), r"a value that is not a string"),
    "a missing tensor": (header_edit(lambda h: h.pop("item_rows")), r"tensors=.*expected exactly"),
    "an extra tensor": (
        header_edit(lambda h: h.update(extra={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})),
        r"tensors=.*expected exactly",
    ),
    "a float tensor": (header_edit(lambda h: h["children_0"].update(dtype="F32")), r"tensor 'children_0' is"),
    "a 2-D tensor": (header_edit(lambda h: h["sizes"].update(shape=[2, 2])), r"tensor 'sizes' is"),
    "a shape larger than its bytes": (
        header_edit(lambda h: h["item_rows"].update(shape=[10**9])),
        r"tensor 'item_rows' has data_offsets=.*expected 4000000000 bytes",
    ),
    "overlapping tensors": (
        header_edit(lambda h: h["sizes"].update(data_offsets=[0, 32])),
        r"starts at data byte|expected .* bytes",
    ),
    "bytes after the data": (GOOD + b"\0" * 8, r"the tensors fill .* data bytes but .* follow the header"),
    "truncated data": (GOOD[:-4], r"data_offsets|the tensors fill"),
    "a flipped data byte": (GOOD[:-1] + bytes([GOOD[-1] ^ 1]), r"do not hash to metadata content_sha256"),
    "deep JSON": (raw_header(b'{"__metadata__":{},"x":' + b"[" * 4000 + b"]" * 4000 + b"}"), r"not UTF-8 JSON"),
    "a flood of JSON values": (raw_header(b'{"__metadata__":{},"x":[' + b"{}," * 10**5 + b"{}]}"), r"more JSON values"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_is_refused(tmp_path: Path, case: str) -> None:
    data, message = HOSTILE[case]
    with pytest.raises(CodebookFileError, match=message):
        read_prefix_file(write(tmp_path, data))


def test_another_format_is_an_unsupported_format(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError):
        read_prefix_file(write(tmp_path, HOSTILE["another format"][0]))


def test_what_is_not_a_regular_file_is_never_read(tmp_path: Path) -> None:
    with pytest.raises(CodebookFileError, match=r"does not exist"):
        read_prefix_file(tmp_path / "missing")
    with pytest.raises(CodebookFileError, match=r"is not a regular file"):
        read_prefix_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CodebookFileError, match=r"is not a regular file"):
        read_prefix_file(fifo)  # refused without blocking on the pipe


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_harmless(tmp_path_factory, position: int, flip: int) -> None:
    """A file with one byte changed either loads the same arrays (a change in padding or in metadata
    that only names things) or is refused with a CodebookFileError; nothing else escapes."""
    data = bytearray(GOOD)
    data[position] ^= flip
    path = write(tmp_path_factory.mktemp("flip"), bytes(data))
    try:
        arrays, _ = read_prefix_file(path)
    except CodebookFileError:
        return
    assert all(np.array_equal(arrays[k], ARRAYS[k]) for k in ARRAYS)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(GOOD)))
def test_every_truncation_is_refused(tmp_path_factory, cut: int) -> None:
    if cut == len(GOOD):
        return
    with pytest.raises(CodebookFileError):
        read_prefix_file(write(tmp_path_factory.mktemp("cut"), GOOD[:cut]))
