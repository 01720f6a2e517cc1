"""The thrift compact protocol of parquet footers and page headers: read into plain values, and written back.

A struct is read as ``{field id: (type, value)}``, a list or set as ``(element type, [values])``, a map
as ``(key type, value type, [(key, value)])``; :func:`thrift_bytes` writes such values back, so
:mod:`vq_pipeline.io.parquet_pages` can build a footer from one it has read. Data that is not valid
thrift raises :func:`layout_error`'s :class:`InvalidInputError` (a ``ValueError``).
"""

from __future__ import annotations

import struct
from typing import Any

from vq_pipeline.errors import InvalidInputError

STOP, TRUE, FALSE, I8, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)
_MAX_DEPTH = 32


def layout_error(what: str) -> InvalidInputError:
    """A parquet layout the page reader cannot follow: :meth:`ParquetPages.open` then leaves the file
    to polars alone; met while reading rows, the file is named as unreadable there."""
    return InvalidInputError(f"parquet layout: {what}")


class ThriftReader:
    """Thrift compact protocol, read into plain values: a struct is ``{field id: (type, value)}``."""

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def _byte(self) -> int:
        if self.pos >= len(self.buf):
            raise layout_error("truncated thrift data")
        self.pos += 1
        return self.buf[self.pos - 1]

    def _varint(self) -> int:
        result = shift = 0
        while True:
            b = self._byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise layout_error("thrift varint too long")

    def _zigzag(self) -> int:
        n = self._varint()
        return (n >> 1) ^ -(n & 1)

    def _value(self, t: int, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise layout_error("thrift data nested too deep")
        if t in (TRUE, FALSE):  # inside a container, a bool is a byte of its own
            return self._byte() == 1
        if t == I8:
            return self._byte()
        if t in (I16, I32, I64):
            return self._zigzag()
        if t == DOUBLE:
            self.pos += 8
            if self.pos > len(self.buf):
                raise layout_error("truncated thrift data")
            return struct.unpack_from("<d", self.buf, self.pos - 8)[0]
        if t == BINARY:
            n = self._varint()
            if n > len(self.buf) - self.pos:
                raise layout_error("truncated thrift data")
            self.pos += n
            return bytes(self.buf[self.pos - n : self.pos])
        if t in (LIST, SET):
            head = self._byte()
            n, et = head >> 4, head & 15
            if n == 15:
                n = self._varint()
            if n > len(self.buf) - self.pos:  # every element takes at least a byte
                raise layout_error("thrift list longer than its data")
            return et, [self._value(et, depth + 1) for _ in range(n)]
        if t == MAP:
            n = self._varint()
            if n == 0:
                return 0, 0, []
            if 2 * n > len(self.buf) - self.pos:
                raise layout_error("thrift map longer than its data")
            head = self._byte()
            kt, vt = head >> 4, head & 15
            return kt, vt, [(self._value(kt, depth + 1), self._value(vt, depth + 1)) for _ in range(n)]
        if t == STRUCT:
            return self.struct(depth + 1)
        raise layout_error(f"unknown thrift type {t}")

    def struct(self, depth: int = 0) -> dict[int, tuple[int, Any]]:
        fields: dict[int, tuple[int, Any]] = {}
        last = 0
        while True:
            head = self._byte()
            if head == STOP:
                return fields
            delta, t = head >> 4, head & 15
            last = last + delta if delta else self._zigzag()
            fields[last] = (TRUE, t == TRUE) if t in (TRUE, FALSE) else (t, self._value(t, depth))


def thrift_bytes(fields: dict[int, tuple[int, Any]]) -> bytes:
    """The thrift compact encoding of a struct read by :class:`ThriftReader` (or built like one)."""
    out = bytearray()

    def varint(n: int) -> None:
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)

    def value(t: int, v: Any) -> None:
        if t in (TRUE, FALSE):
            out.append(1 if v else 2)
        elif t == I8:
            out.append(v & 0xFF)
        elif t in (I16, I32, I64):
            varint((v << 1) ^ (v >> 63))
        elif t == DOUBLE:
            out.extend(struct.pack("<d", v))
        elif t == BINARY:
            varint(len(v))
            out.extend(v)
        elif t in (LIST, SET):
            et, items = v
            out.append(len(items) << 4 | et if len(items) < 15 else 0xF0 | et)
            if len(items) >= 15:
                varint(len(items))
            for item in items:
                value(et, item)
        elif t == MAP:
            kt, vt, items = v
            varint(len(items))
            if items:
                out.append(kt << 4 | vt)
            for k, item in items:
                value(kt, k)
                value(vt, item)
        else:
            struct_(v)

    def struct_(f: dict[int, tuple[int, Any]]) -> None:
        last = 0
        for fid in sorted(f):
            t, v = f[fid]
            wire = (TRUE if v else FALSE) if t in (TRUE, FALSE) else t
            if 0 < fid - last <= 15:
                out.append((fid - last) << 4 | wire)
            else:
                out.append(wire)
                varint((fid << 1) ^ (fid >> 63))
            if t not in (TRUE, FALSE):
                value(t, v)
            last = fid
        out.append(STOP)

    struct_(fields)
    return bytes(out)


def field(fields: dict[int, tuple[int, Any]], fid: int, default: Any = None) -> Any:
    return fields[fid][1] if fid in fields else default


__all__ = [
    "BINARY",
    "DOUBLE",
    "FALSE",
    "I8",
    "I16",
    "I32",
    "I64",
    "LIST",
    "MAP",
    "SET",
    "STOP",
    "STRUCT",
    "TRUE",
    "ThriftReader",
    "field",
    "layout_error",
    "thrift_bytes",
]
