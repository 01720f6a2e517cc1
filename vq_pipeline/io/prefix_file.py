"""The prefix-table file: one safetensors file of the CSR arrays of
:class:`vq_pipeline.compute.prefix_table.PrefixTable`, fingerprinted to the codebook and the id
version that issued its ids, written and read with numpy only (no torch, no safetensors package:
the header is written and checked by hand, so the file is plain safetensors that any reader opens).

Tensors (all 1-D, little-endian): ``sizes`` (depth,) I64; ``offsets_<d>`` and ``children_<d>`` for
each level ``d`` (I32 or I64 offsets; U8, I16 or I32 codes); ``leaf_offsets`` (I32/I64, empty when every
leaf holds one item); ``item_rows`` (I32/I64). String metadata: ``format`` (:data:`FORMAT_NAME`),
``format_version`` (:data:`FORMAT_VERSION`), ``codebook_fingerprint`` (64 hex digits), ``id_version``
(an integer >= 1), ``depth``, ``n_items`` and ``content_sha256`` (the sha256 of the tensors' names,
types, shapes and bytes).

Nothing in a file is trusted (:func:`read_prefix_file`): only a regular file is opened; the length field,
a header of at most :data:`MAX_HEADER_BYTES` and its JSON are checked before any tensor data is read;
the file must be exactly as long as its header says, its tensors must tile the data with no gap or
overlap, and its content must hash to ``content_sha256``. Then the trie itself is checked, so that a
query never indexes outside an array and never yields an id that the table does not hold: offsets start
at 0, never decrease and end at the next level's length; every node above the leaves has a child;
children increase within each parent and lie below their level's size; leaf offsets increase; and the
item rows are exactly ``0..n_items-1``, each once.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np

from vq_pipeline.errors import CodebookFileError, InvalidInputError, StateError, UnsupportedFormatError
from vq_pipeline.io.fileio import atomic_write_bytes
from vq_pipeline.io.codebook_file import read_up_to

FORMAT_NAME = "vq-pipeline.prefix-table"
FORMAT_VERSION = "1.0"
#: Most levels of a table: 256 code levels (a codebook's MAX_LEVELS) and the suffix.
MAX_DEPTH = 257
#: A header holds about 60 bytes per tensor: 2 tensors per level, so well under this.
MAX_HEADER_BYTES = 2**20
#: Most ids (and entries of any array) a file may hold: offsets are int64 at most.
MAX_ENTRIES = 2**40
_DTYPES = {"U8": np.dtype("<u1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}
_NAMES = {np.dtype("u1"): "U8", np.dtype("i2"): "I16", np.dtype("i4"): "I32", np.dtype("i8"): "I64"}
_INDEX_TYPES = ("I32", "I64")
_CODE_TYPES = ("U8", "I16", "I32")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIX = "Fix: rebuild the prefix table from the registry (vq_pipeline.jobs.registry.write_prefix_table)."


def _error(source: str, text: str) -> CodebookFileError:
    return CodebookFileError(f"{source}: {text} The file is corrupt or not a prefix table. {_FIX}")


def _tensor_kinds(depth: int) -> dict[str, tuple[str, ...]]:
    """The tensors of a table of ``depth`` levels and the types each may have."""
    kinds: dict[str, tuple[str, ...]] = {"sizes": ("I64",), "leaf_offsets": _INDEX_TYPES, "item_rows": _INDEX_TYPES}
    for d in range(depth):
        kinds[f"offsets_{d}"] = _INDEX_TYPES
        kinds[f"children_{d}"] = _CODE_TYPES
    return kinds


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the tensors' names, types, shapes and little-endian bytes, in name order."""
    h = hashlib.sha256(FORMAT_NAME.encode())
    for name in sorted(arrays):
        a = arrays[name]
        kind = _NAMES[a.dtype.newbyteorder("=")]
        h.update(f"|{name}|{kind}|{list(a.shape)}|".encode())
        h.update(np.ascontiguousarray(a, dtype=_DTYPES[kind]).tobytes())
    return h.hexdigest()


def prefix_file_bytes(arrays: dict[str, np.ndarray], *, codebook_fingerprint: str, id_version: int) -> bytes:
    """The safetensors bytes of a prefix table's ``arrays`` (``PrefixTable.to_arrays()``), with its
    metadata; a deterministic header (sorted keys)."""
    if not (isinstance(codebook_fingerprint, str) and _HEX64.fullmatch(codebook_fingerprint)):
        raise InvalidInputError(
            f"codebook_fingerprint={codebook_fingerprint!r}; expected the 64 hex digits of a codebook's fingerprint. "
            f"Fix: pass codebook.fingerprint of the codebook that issued the ids."
        )
    if isinstance(id_version, bool) or not isinstance(id_version, int) or id_version < 1:
        raise InvalidInputError(
            f"id_version={id_version!r}; expected an integer >= 1. Fix: pass the registry's id version."
        )
    depth = int(arrays["sizes"].shape[0])
    header: dict[str, Any] = {
        "__metadata__": {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "codebook_fingerprint": codebook_fingerprint,
            "id_version": str(id_version),
            "depth": str(depth),
            "n_items": str(int(arrays["item_rows"].shape[0])),
            "content_sha256": content_sha256(arrays),
        }
    }
    chunks, position = [], 0
    for name in sorted(arrays):
        a = arrays[name]
        kind = _NAMES[a.dtype.newbyteorder("=")]
        data = np.ascontiguousarray(a, dtype=_DTYPES[kind]).tobytes()
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [position, position + len(data)]}
        chunks.append(data)
        position += len(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def write_prefix_file(
    path: str | os.PathLike[str], arrays: dict[str, np.ndarray], *, codebook_fingerprint: str, id_version: int
) -> Path:
    """Write a prefix table's ``arrays`` to ``path`` atomically (see :func:`prefix_file_bytes`)."""
    data = prefix_file_bytes(arrays, codebook_fingerprint=codebook_fingerprint, id_version=id_version)
    return atomic_write_bytes(path, data)


def _read_regular(path: Path, source: str) -> io.FileIO:
    """``path`` opened read-only, refused unless it is a regular file (a FIFO or device is never read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CodebookFileError(
            f"{source} does not exist; expected a prefix-table file (.safetensors). {_FIX}"
        ) from None
    except OSError as exc:
        raise CodebookFileError(f"{source} cannot be opened ({exc.strerror or exc}). {_FIX}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CodebookFileError(f"{source} is not a regular file; expected a prefix-table file. {_FIX}")
    return io.FileIO(fd, "rb", closefd=True)


def _positive_int(meta: dict[str, str], key: str, source: str, top: int, low: int = 1) -> int:
    text = meta.get(key, "")
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 19) or not (
        low <= int(text) <= top
    ):
        raise _error(source, f"metadata {key}={text!r}; expected an integer in {low}..{top}.")
    return int(text)


def _parse_header(raw: bytes, n_after: int, source: str) -> tuple[dict[str, str], dict[str, tuple[str, int, int, int]]]:
    """The metadata and the tensors (type, length, start, end) of a header, checked; ``n_after``: the
    bytes that follow the header in the file."""
    if raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{") > 16 * (2 * MAX_DEPTH + 10):
        raise _error(source, "the header holds more JSON values than a prefix table of MAX_DEPTH levels.")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _error(source, f"the header is not UTF-8 JSON ({type(exc).__name__}).") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _error(source, "the header has no metadata object.")
    meta = header.pop("__metadata__")
    if not all(isinstance(v, str) for v in meta.values()):
        raise _error(source, "the metadata holds a value that is not a string.")
    if meta.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(
            f"{source}: format={str(meta.get('format'))[:80]!r}; expected {FORMAT_NAME!r}. {_FIX}"
        )
    version = meta.get("format_version", "")
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise UnsupportedFormatError(
            f"{source}: format_version={version[:20]!r}; this release reads major version "
            f"{FORMAT_VERSION.split('.')[0]} ({FORMAT_VERSION}). Fix: upgrade vq-pipeline, or rebuild the table."
        )
    depth = _positive_int(meta, "depth", source, MAX_DEPTH)
    _positive_int(meta, "id_version", source, 2**31 - 1)
    _positive_int(meta, "n_items", source, MAX_ENTRIES, low=0)
    for key in ("codebook_fingerprint", "content_sha256"):
        if not _HEX64.fullmatch(meta.get(key, "")):
            raise _error(source, f"metadata {key}={meta.get(key, '')[:80]!r}; expected 64 hex digits.")
    kinds = _tensor_kinds(depth)
    if set(header) != set(kinds):
        names = sorted(header)
        shown = names if len(names) <= 8 else [*names[:8], "..."]
        raise _error(source, f"tensors={shown}; expected exactly {sorted(kinds)[:8]}... for depth={depth}.")
    tensors, spans = {}, []
    for name, allowed in kinds.items():
        info = header[name]
        ok = isinstance(info, dict) and info.get("dtype") in allowed
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ok = (
            ok
            and isinstance(shape, list)
            and len(shape) == 1
            and type(shape[0]) is int
            and 0 <= shape[0] <= MAX_ENTRIES
        )
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
        if not ok:
            raise _error(
                source, f"tensor {name!r} is {str(info)[:120]}; expected a 1-D tensor of type {' or '.join(allowed)}."
            )
        n_bytes = _DTYPES[info["dtype"]].itemsize * shape[0]
        if offsets[1] - offsets[0] != n_bytes or offsets[1] > n_after:
            raise _error(
                source,
                f"tensor {name!r} has data_offsets={offsets}; expected {n_bytes} bytes for {shape[0]} values of "
                f"{info['dtype']} within the {n_after} data bytes.",
            )
        tensors[name] = (info["dtype"], shape[0], offsets[0], offsets[1])
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    at = 0
    for start, end, name in spans:
        if start != at:
            raise _error(source, f"tensor {name!r} starts at data byte {start}; expected {at} (no gap, no overlap).")
        at = end
    if at != n_after:
        raise _error(source, f"the tensors fill {at} data bytes but {n_after} follow the header.")
    if tensors["sizes"][1] != depth:
        raise _error(source, f"tensor 'sizes' has {tensors['sizes'][1]} values; expected depth={depth}.")
    return meta, tensors


def _check_trie(arrays: dict[str, np.ndarray], depth: int, source: str) -> None:
    """The invariants every query relies on (see the module docstring)."""
    sizes = arrays["sizes"]
    if sizes.min() < 1 or sizes.max() >= 2**31:
        raise _error(source, f"sizes={sizes.tolist()[:8]} ; expected level sizes in 1..2**31-1.")
    n_nodes = 1  # the root
    for d in range(depth):
        offsets, children = arrays[f"offsets_{d}"].astype(np.int64), arrays[f"children_{d}"].astype(np.int64)
        if offsets.shape[0] != n_nodes + 1:
            raise _error(
                source, f"offsets_{d} has {offsets.shape[0]} values; expected {n_nodes + 1} (one per node + 1)."
            )
        steps = np.diff(offsets)
        empty_root = d == 0 and offsets[1] == 0
        if offsets[0] != 0 or offsets[-1] != children.shape[0] or (steps < (0 if empty_root else 1)).any():
            raise _error(
                source,
                f"offsets_{d} does not run from 0 to {children.shape[0]} in steps of at least 1; expected every "
                f"node above the leaves to have a child.",
            )
        if children.size and (children.min() < 0 or children.max() >= sizes[d]):
            raise _error(source, f"children_{d} holds codes outside 0..{int(sizes[d]) - 1} (sizes[{d}]).")
        starts = np.zeros(children.shape[0], dtype=bool)
        starts[offsets[:-1][steps > 0]] = True
        if children.size > 1 and not (np.diff(children)[~starts[1:]] > 0).all():
            raise _error(source, f"children_{d} does not increase within a parent; expected sorted, distinct codes.")
        n_nodes = children.shape[0]
    leaf_offsets, rows = arrays["leaf_offsets"].astype(np.int64), arrays["item_rows"].astype(np.int64)
    if leaf_offsets.size == 0:
        if rows.shape[0] != n_nodes:
            raise _error(source, f"item_rows has {rows.shape[0]} values; expected one per leaf ({n_nodes}).")
    elif (
        leaf_offsets.shape[0] != n_nodes + 1
        or leaf_offsets[0] != 0
        or leaf_offsets[-1] != rows.shape[0]
        or (np.diff(leaf_offsets) < 1).any()
    ):
        raise _error(
            source, f"leaf_offsets does not run from 0 to {rows.shape[0]} over {n_nodes} leaves in steps >= 1."
        )
    seen = np.zeros(rows.shape[0], dtype=bool)
    inside = (rows >= 0) & (rows < rows.shape[0])
    seen[rows[inside]] = True
    if not inside.all() or not seen.all():
        raise _error(source, f"item_rows is not a permutation of 0..{rows.shape[0] - 1}; expected each item once.")


def read_prefix_file(
    path: str | os.PathLike[str], *, codebook_fingerprint: str | None = None, id_version: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read and check a prefix-table file (see the module docstring).

    Args:
        codebook_fingerprint, id_version: when given, the file must have been built for them.

    Returns:
        (arrays, metadata): the arrays ``PrefixTable.from_arrays`` takes, and the string metadata.

    Raises:
        CodebookFileError: a missing, truncated, corrupt or hostile file (UnsupportedFormatError: not a
            prefix table, or a major version this release cannot read).
        StateError: a table built for another codebook or id version than the ones asked for.
    """
    p = Path(path)
    source = f"prefix file {str(p)!r}"
    with _read_regular(p, source) as f:
        size = os.fstat(f.fileno()).st_size
        head = read_up_to(f, 9)
        (n_header,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (None,)
        if n_header is None or n_header > min(size - 8, MAX_HEADER_BYTES) or head[8:9] != b"{":
            raise _error(
                source,
                f"the file is {size} bytes long and declares a header of {n_header} bytes; expected a safetensors "
                f"header of at most {MAX_HEADER_BYTES} bytes starting with '{{'.",
            )
        f.seek(8)
        meta, tensors = _parse_header(read_up_to(f, n_header), size - 8 - n_header, source)
        data = read_up_to(f, size - 8 - n_header)
        if len(data) != size - 8 - n_header or f.read(1):
            raise CodebookFileError(f"{source} changed while it was being read. Fix: read it again once it is written.")
    arrays = {
        name: np.frombuffer(data, dtype=_DTYPES[kind], count=count, offset=start).astype(
            _DTYPES[kind].newbyteorder("=")
        )
        for name, (kind, count, start, _) in tensors.items()
    }
    if content_sha256(arrays) != meta["content_sha256"]:
        raise _error(source, "the tensors do not hash to metadata content_sha256.")
    depth = int(meta["depth"])
    _check_trie(arrays, depth, source)
    if int(meta["n_items"]) != arrays["item_rows"].shape[0]:
        raise _error(source, f"metadata n_items={meta['n_items']} but item_rows holds {arrays['item_rows'].shape[0]}.")
    for key, wanted in (("codebook_fingerprint", codebook_fingerprint), ("id_version", id_version)):
        if wanted is not None and meta[key] != str(wanted):
            raise StateError(
                f"{source} was built for {key}={meta[key]!r}; expected {key}={str(wanted)!r}. Fix: use the prefix "
                f"table of that codebook and id version, or rebuild it from the registry."
            )
    return arrays, meta


def table_bytes_per_id(arrays: dict[str, np.ndarray]) -> float:
    """Bytes of the arrays per item (``math.inf`` for a table of no item)."""
    n = arrays["item_rows"].shape[0]
    return sum(a.nbytes for a in arrays.values()) / n if n else math.inf


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_HEADER_BYTES",
    "content_sha256",
    "prefix_file_bytes",
    "read_prefix_file",
    "table_bytes_per_id",
    "write_prefix_file",
]
