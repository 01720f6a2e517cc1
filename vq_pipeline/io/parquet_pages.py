"""Parquet, page by page: read a range of rows of a local parquet file without decoding the whole
row group that holds them.

polars decodes a parquet row group as a whole: a slice of a file written as one large row group reads
and decompresses that whole group again for every slice. To keep memory and time proportional to the
rows asked for, :class:`ParquetPages` reads a local parquet file in page ranges instead: its footer and
page tables (the offset index when the file has one, else the page headers) say where each page starts
and which rows it holds, and the pages covering the wanted rows are handed to polars as a small parquet
file of their own (the same column chunk bytes and schema, a footer of one row group). Only the footer
and page headers are parsed here (:mod:`vq_pipeline.io.parquet_thrift`); polars does all decoding of data.
:mod:`vq_pipeline.io.tables` uses it for batches inside a row group larger than themselves.
"""

from __future__ import annotations

import bisect
import io
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from vq_pipeline.io.parquet_thrift import I32, I64, LIST, STRUCT, ThriftReader, field, layout_error, thrift_bytes

_DICTIONARY_PAGE, _DATA_PAGE, _DATA_PAGE_V2 = 2, 0, 3


def _snappy_prefix(buf: bytes, want: Callable[[bytearray], int]) -> bytearray:
    """Decompress a snappy block only until ``want(out)`` bytes are out (``want`` may grow with ``out``)."""
    pos = 0
    while pos < len(buf) and buf[pos] & 0x80:  # the uncompressed length, not needed
        pos += 1
    pos += 1
    out = bytearray()
    while len(out) < want(out):
        if pos >= len(buf):
            raise layout_error("truncated snappy data")
        tag = buf[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            n = tag >> 2
            if n >= 60:
                n, pos = int.from_bytes(buf[pos : pos + n - 59], "little"), pos + n - 59
            out.extend(buf[pos : pos + n + 1])
            pos += n + 1
            continue
        if kind == 1:
            n, off = ((tag >> 2) & 7) + 4, (tag >> 5) << 8 | buf[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            n, off = (tag >> 2) + 1, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        if not 0 < off <= len(out):
            raise layout_error("bad snappy copy offset")
        start = len(out) - off
        piece = out[start : start + n] if off >= n else (out[start:] * (n // off + 1))[:n]
        out.extend(piece)
    return out


def _page_levels_prefix(body: bytes, codec: int, uncompressed_size: int) -> bytes:
    """The repetition levels at the start of a v1 data page: 4-byte length, then the levels."""

    def want(out: bytearray) -> int:
        n = 4 + int.from_bytes(out[:4], "little") if len(out) >= 4 else 4
        if n > uncompressed_size:
            raise layout_error("repetition levels longer than their page")
        return n

    if codec == 0:  # UNCOMPRESSED
        return body[: want(bytearray(body[:4]))]
    if codec == 1:  # SNAPPY
        return bytes(_snappy_prefix(body, want))
    if codec == 2:  # GZIP
        d = zlib.decompressobj(47)
        out = bytearray(d.decompress(body, 4))
        out.extend(d.decompress(d.unconsumed_tail, max(1, want(out) - len(out))))
        return bytes(out)
    raise layout_error(f"codec {codec} is not read page by page")


def _count_records(levels: bytes, n_values: int, width: int) -> tuple[int, bool]:
    """(rows that start in a page, whether the page starts a row) from its RLE/bit-packed repetition levels."""
    data, pos, seen, zeros, first = levels[4:], 0, 0, 0, None
    mask, byte_width = (1 << width) - 1, (width + 7) // 8
    while seen < n_values:
        header = shift = 0
        while True:
            if pos >= len(data):
                raise layout_error("truncated repetition levels")
            b = data[pos]
            pos += 1
            header |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if header & 1:  # bit-packed groups of 8 values
            n, n_bytes = (header >> 1) * 8, (header >> 1) * width
            take = min(n, n_values - seen)
            bits = int.from_bytes(data[pos : pos + n_bytes], "little")
            pos += n_bytes
            if width == 1:
                zeros += take - (bits & ((1 << take) - 1)).bit_count()
            else:
                zeros += sum(1 for i in range(take) if not (bits >> (i * width)) & mask)
            value = bits & mask
        else:  # a run of one value
            n = header >> 1
            value = int.from_bytes(data[pos : pos + byte_width], "little")
            pos += byte_width
            take = min(n, n_values - seen)
            zeros += take if value == 0 else 0
        if take <= 0:
            raise layout_error("empty run in repetition levels")
        if first is None:
            first = value
        seen += take
    return zeros, first in (None, 0)


@dataclass
class _ColumnChunk:
    """Where the pages of one leaf column of one row group lie, and the rows each holds."""

    meta: dict[int, tuple[int, Any]]  # the ColumnMetaData struct
    prefix: tuple[int, int]  # (offset, length): the dictionary page before the first data page, if any
    offsets: list[int]  # data pages (a page that continues a row is merged into the one before)
    sizes: list[int]
    first_rows: list[int]

    def span(self, lo: int, hi: int, n_rows: int) -> tuple[int, int, int, int]:
        """(first page, end page, first row, end row) of the pages that hold rows [lo, hi)."""
        p0 = bisect.bisect_right(self.first_rows, lo) - 1
        p1 = bisect.bisect_left(self.first_rows, hi)
        return p0, p1, self.first_rows[p0], self.first_rows[p1] if p1 < len(self.first_rows) else n_rows


class ParquetPages:
    """Reads row ranges of some top-level columns of a local parquet file, page by page.

    :meth:`open` returns None where the file's layout is not one this reader knows (encrypted, a page
    that cannot be told which rows it holds): the caller then reads with polars alone.
    """

    _HEADER_READ = 1 << 12
    _MAX_HEADER = 1 << 24

    def __init__(
        self,
        fd: int,
        size: int,
        meta: dict[int, tuple[int, Any]],
        schema: pl.Schema,
        names: Sequence[str],
        footer_size: int,
    ) -> None:
        self.fd, self.size, self.meta, self.names = fd, size, meta, list(names)
        # A column of fixed-size arrays of plain values: with no null rows, every row is `size` values.
        self._fixed = {
            name: dtype.size
            for name in self.names
            if isinstance(dtype := schema[name], pl.Array) and len(dtype.shape) == 1 and not dtype.inner.is_nested()
        }
        # Room for the small file's footer: less than the whole file's (one row group, fewer columns).
        self._footer_reserve = footer_size + 4096
        self.schema = field(meta, 2)[1]
        self.max_rep = self._max_repetition()
        # per row group: (first row, n_rows, {top-level name: [its leaf column chunks]})
        self.row_groups: list[tuple[int, int, dict[str, list[_ColumnChunk]]]] = []
        start = 0
        for rg in field(meta, 4, (0, []))[1]:
            n = field(rg, 3)
            chunks: dict[str, list[_ColumnChunk]] = {name: [] for name in self.names}
            for cc in field(rg, 1)[1]:
                if field(cc, 8) is not None or field(cc, 9) is not None or field(cc, 1) is not None:
                    raise layout_error("encrypted column or column in another file")
                cmeta = field(cc, 3)
                path = tuple(p.decode() for p in field(cmeta, 3)[1])
                if path[0] in chunks:
                    chunks[path[0]].append(self._chunk(cc, cmeta, n, self.max_rep[path], self._fixed.get(path[0])))
            if not isinstance(n, int) or n < 0 or any(not c for c in chunks.values()):
                raise layout_error("row group without the wanted columns")
            self.row_groups.append((start, n, chunks))
            start += n
        self.n_rows = start
        self.firsts = [rg[0] for rg in self.row_groups]
        self._cache: dict[str, tuple[int, int, pl.Series]] = {}  # name -> (first row, end row, its rows)

    @classmethod
    def open(cls, path: str, names: Sequence[str], schema: pl.Schema) -> ParquetPages | None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, 8, size - 8) if size >= 12 else b""
            if len(tail) != 8 or tail[4:] != b"PAR1":
                raise layout_error("not a plain parquet file (encrypted footer?)")
            n = int.from_bytes(tail[:4], "little")
            if not 0 < n <= size - 12:
                raise layout_error("bad footer length")
            meta = ThriftReader(os.pread(fd, n, size - 8 - n)).struct()
            if field(meta, 8) is not None:
                raise layout_error("encrypted file")
            return cls(fd, size, meta, schema, names, n)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error, OverflowError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        os.close(self.fd)

    def _max_repetition(self) -> dict[tuple[str, ...], int]:
        """Each leaf's path and its maximum repetition level, from the flattened schema tree."""
        out: dict[tuple[str, ...], int] = {}

        def walk(i: int, path: tuple[str, ...], rep: int) -> int:
            el = self.schema[i]
            here = path + (field(el, 4).decode(),)
            rep += field(el, 3) == 2  # REPEATED
            n = field(el, 5, 0)
            if n == 0:
                out[here] = rep
            j = i + 1
            for _ in range(n):
                j = walk(j, here, rep)
            return j

        j = 1
        for _ in range(field(self.schema[0], 5, 0)):
            j = walk(j, (), 0)
        return out

    def _pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise layout_error("page outside the file")
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise layout_error("short read")
        return data

    def _levels(self, offset: int, size: int, codec: int, uncompressed_size: int) -> bytes:
        """The repetition levels of the v1 data page whose body is ``size`` bytes at ``offset``,
        reading only as much of the body as they take."""
        n = self._HEADER_READ * 16
        while True:
            try:
                return _page_levels_prefix(self._pread(offset, min(n, size)), codec, uncompressed_size)
            except (ValueError, zlib.error):
                if n >= size:
                    raise
                n *= 4

    def _pread_into(self, view: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(view) > self.size:
            raise layout_error("page outside the file")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise layout_error("short read")
            done += n

    def _header(self, offset: int, end: int) -> tuple[dict[int, tuple[int, Any]], int]:
        """A page header at ``offset`` and its length."""
        n = self._HEADER_READ
        while True:
            buf = self._pread(offset, min(n, end - offset))
            reader = ThriftReader(buf)
            try:
                return reader.struct(), reader.pos
            except ValueError:
                if len(buf) >= end - offset or n >= self._MAX_HEADER:
                    raise
                n *= 4

    def _chunk(self, cc: dict, cmeta: dict, n_rows: int, max_rep: int, fixed: int | None) -> _ColumnChunk:
        data_offset, dict_offset = field(cmeta, 9), field(cmeta, 11)
        start = min(data_offset, dict_offset) if dict_offset else data_offset
        end = start + field(cmeta, 7)
        if not 4 <= start <= end <= self.size:
            raise layout_error("column chunk outside the file")
        index = self._offset_index(cc, start, end, n_rows)
        if index is not None:
            offsets, sizes, first_rows = index
        else:
            if fixed and max_rep == 1 and field(cmeta, 5) != n_rows * fixed:
                fixed = None  # null rows: each is one value, not `fixed`
            offsets, sizes, first_rows = self._walk_pages(cmeta, start, end, n_rows, max_rep, fixed)
        return _ColumnChunk(cmeta, (start, offsets[0] - start), offsets, sizes, first_rows)

    def _offset_index(self, cc: dict, start: int, end: int, n_rows: int) -> tuple[list, list, list] | None:
        at, length = field(cc, 4), field(cc, 5)
        if at is None or length is None:
            return None
        pages = field(ThriftReader(self._pread(at, length)).struct(), 1)[1]
        offsets = [field(p, 1) for p in pages]
        sizes = [field(p, 2) for p in pages]
        first_rows = [field(p, 3) for p in pages]
        contiguous = all(o + s == nxt for o, s, nxt in zip(offsets, sizes, offsets[1:]))
        if (
            not pages
            or first_rows[0] != 0
            or any(b <= a for a, b in zip(first_rows, first_rows[1:]))
            or first_rows[-1] >= max(n_rows, 1)
            or not contiguous
            or not start <= offsets[0]
            or offsets[-1] + sizes[-1] > end
        ):
            return None  # the page headers say it again
        return offsets, sizes, first_rows

    def _walk_pages(
        self, cmeta: dict, start: int, end: int, n_rows: int, max_rep: int, fixed: int | None
    ) -> tuple[list, list, list]:
        offsets: list[int] = []
        sizes: list[int] = []
        first_rows: list[int] = []
        rows, pos = 0, start
        while pos < end:
            header, header_len = self._header(pos, end)
            kind, size = field(header, 1), header_len + field(header, 3)
            if size < header_len or pos + size > end:  # an empty dictionary page has no body
                raise layout_error("bad page size")
            if kind == _DICTIONARY_PAGE and not offsets:
                pos += size
                continue
            if kind == _DATA_PAGE_V2:
                n, starts = field(field(header, 8), 3), True
            elif kind == _DATA_PAGE:
                page = field(header, 5)
                n_values = field(page, 1)
                if max_rep == 0:
                    n, starts = n_values, True
                elif fixed and max_rep == 1 and n_values % fixed == 0:
                    n, starts = n_values // fixed, True
                elif field(page, 4) == 3:  # RLE repetition levels
                    levels = self._levels(pos + header_len, size - header_len, field(cmeta, 4), field(header, 2))
                    n, starts = _count_records(levels, n_values, max_rep.bit_length())
                else:
                    raise layout_error("repetition levels not RLE")
            else:
                raise layout_error(f"page type {kind} among data pages")
            if starts and n:
                offsets.append(pos)
                sizes.append(size)
                first_rows.append(rows)
            elif offsets:
                sizes[-1] += size
            else:
                raise layout_error("first data page continues a row")
            rows += n
            pos += size
        if rows != n_rows or not offsets:
            raise layout_error("pages do not hold the row group's rows")
        return offsets, sizes, first_rows

    def larger_row_group(self, lo: int, hi: int) -> bool:
        """Whether rows [lo, hi) touch a row group of more rows than that."""
        g = bisect.bisect_right(self.firsts, lo) - 1
        while g < len(self.row_groups) and self.row_groups[g][0] < hi:
            if self.row_groups[g][1] > hi - lo:
                return True
            g += 1
        return False

    def read(self, lo: int, hi: int, schema: pl.Schema) -> pl.DataFrame:
        """Rows [lo, hi) of the columns, as ``schema`` types them."""
        columns = []
        for name in self.names:
            s = self._read_column(name, lo, hi)
            columns.append(s if s.dtype == schema[name] else s.cast(schema[name]))
        return pl.DataFrame(columns)

    def _read_column(self, name: str, lo: int, hi: int) -> pl.Series:
        """Rows [lo, hi) of column ``name``: one small file holding the pages that cover them."""
        cached = self._cache.get(name)
        if cached is not None and cached[0] <= lo and hi <= cached[1]:
            return cached[2].slice(lo - cached[0], hi - lo)
        self._cache.pop(name, None)
        pieces = []  # per row group: (its leaves, each leaf's (first page, end page), rows)
        start = end = None
        g = bisect.bisect_right(self.firsts, lo) - 1
        while g < len(self.row_groups) and self.row_groups[g][0] < hi:
            first, n, chunks = self.row_groups[g]
            a, b = max(lo, first) - first, min(hi, first + n) - first
            g += 1
            if a >= b:
                continue
            leaves = chunks[name]
            while True:  # leaves of one column (struct fields) have their own pages: widen to common bounds
                spans = [leaf.span(a, b, n) for leaf in leaves]
                wider = min(sp[2] for sp in spans), max(sp[3] for sp in spans)
                if wider == (a, b):
                    break
                a, b = wider
            start = first + a if start is None else start
            end = first + b
            pieces.append((leaves, [sp[:2] for sp in spans], b - a))
        if start is None or end is None:
            raise layout_error(f"no row group holds rows {lo}..{hi - 1}")
        # The small file is built in one buffer that the pages are read straight into, and polars reads
        # that buffer without a copy: the pages' bytes are in memory once while they are decoded.
        ranges = []  # (file offset, length, buffer offset): each leaf's dictionary page, then its data pages
        pos = 4
        for leaves, spans, _ in pieces:
            for leaf, (p0, p1) in zip(leaves, spans):
                first_byte, stop = leaf.offsets[p0], leaf.offsets[p1 - 1] + leaf.sizes[p1 - 1]
                ranges += [(leaf.prefix[0], leaf.prefix[1], pos), (first_byte, stop - first_byte, pos + leaf.prefix[1])]
                pos += leaf.prefix[1] + stop - first_byte
        buf = io.BytesIO()
        buf.seek(pos + self._footer_reserve)
        buf.write(b"\0")
        row_groups = []
        with buf.getbuffer() as view:
            view[:4] = b"PAR1"
            for offset, length, at in ranges:
                self._pread_into(view[at : at + length], offset)
            at_range = iter(zip(ranges[::2], ranges[1::2]))
            for leaves, _, n_rows in pieces:
                column_chunks = []
                for leaf, ((_, prefix_len, prefix_at), (_, pages_len, pages_at)) in zip(leaves, at_range):
                    n_values, uncompressed = _pages_stats(view[pages_at : pages_at + pages_len])
                    uncompressed += _pages_stats(view[prefix_at : prefix_at + prefix_len])[1]
                    meta = {k: v for k, v in leaf.meta.items() if k in (1, 2, 3, 4, 8)}
                    meta[5], meta[6] = (I64, n_values), (I64, uncompressed)
                    meta[7], meta[9] = (I64, prefix_len + pages_len), (I64, pages_at)
                    if prefix_len:
                        meta[11] = (I64, prefix_at)
                    column_chunks.append({2: (I64, pages_at), 3: (STRUCT, meta)})
                size = sum(field(field(c, 3), 6) for c in column_chunks)
                row_groups.append({1: (LIST, (STRUCT, column_chunks)), 2: (I64, size), 3: (I64, n_rows)})
        footer = thrift_bytes(self._footer(name, row_groups, end - start))
        buf.seek(pos)
        buf.write(footer + len(footer).to_bytes(4, "little") + b"PAR1")
        buf.truncate()
        buf.seek(0)
        s = pl.read_parquet(buf).to_series()  # its one column
        del buf
        if len(s) != end - start:
            raise layout_error(f"pages of rows {start}..{end - 1} decode to {len(s)} rows")
        if end > hi:  # the next rows may be in these pages too
            self._cache[name] = (start, end, s)
        return s.slice(lo - start, hi - lo)

    def _footer(self, name: str, row_groups: list[dict], n_rows: int) -> dict[int, tuple[int, Any]]:
        """The FileMetaData of a file holding column ``name`` in ``row_groups``."""
        top, i = [], 1
        while i < len(self.schema):  # the elements of top-level column `name`: it and its descendants
            j, todo = i, 1
            while todo:
                todo += field(self.schema[j], 5, 0) - 1
                j += 1
            if field(self.schema[i], 4).decode() == name:
                top = self.schema[i:j]
            i = j
        root = {**self.schema[0], 5: (I32, 1)}
        meta = {k: v for k, v in self.meta.items() if k in (1, 5, 6)}  # version, key-value metadata, created_by
        return {**meta, 2: (LIST, (STRUCT, [root, *top])), 3: (I64, n_rows), 4: (LIST, (STRUCT, row_groups))}


def _pages_stats(buf: bytes) -> tuple[int, int]:
    """(values in the data pages, uncompressed bytes with headers) of consecutive pages."""
    n_values = uncompressed = at = 0
    while at < len(buf):
        reader = ThriftReader(buf, at)
        header = reader.struct()
        page = field(header, 5) or field(header, 8)
        n_values += field(page, 1) if page else 0
        uncompressed += reader.pos - at + field(header, 2)
        at = reader.pos + field(header, 3)
    return n_values, uncompressed


__all__ = ["ParquetPages"]
