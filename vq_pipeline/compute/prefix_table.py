"""The prefix table of issued semantic ids: a trie in CSR arrays, for constrained decoding.

A generative model decodes an item's id ``(codes..., suffix)`` one token per step and must stay on
prefixes that some issued id has. :class:`PrefixTable` holds the issued ids as a trie of ``depth``
levels (the code levels, then the suffix when there is one), one CSR pair per level:

* ``offsets[d]``: ``(n_nodes_d + 1,)`` int32 (int64 past 2**31 ids); the children of node ``p`` at depth
  ``d`` are the nodes ``offsets[d][p]:offsets[d][p + 1]`` at depth ``d + 1`` (depth 0 is one root);
* ``children[d]``: ``(n_nodes_{d+1},)`` the code of each node at depth ``d + 1``, increasing within each
  parent (uint8 when the level has at most 256 codes, int16 up to 32768, else int32);
* ``item_rows``: ``(n_items,)`` the item row of each leaf (in leaf order), and ``leaf_offsets``:
  ``(n_leaves + 1,)``, empty when every leaf holds exactly one item (ids with a suffix are unique);
* ``sizes``: ``(depth,)`` the codes a level can hold (``n_codes``; the suffix level: the largest
  suffix + 1).

For ids of a few levels of at most 256 codes and a suffix, the last two levels dominate the size:
one code byte and one 4-byte offset per node, one 4-byte item row per id. :meth:`PrefixTable.next_mask` gives the
valid next tokens of a batch of prefixes as a bool mask on the prefixes' device, ready to add to a
beam's scores (``scores.masked_fill(~mask, -inf)``); :meth:`PrefixTable.items` maps full ids to their
items. The file format lives in :mod:`vq_pipeline.io.prefix_file`; building one from a registry in
:mod:`vq_pipeline.jobs.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vq_pipeline.errors import InvalidInputError

#: Most levels of a prefix table: a codebook's MAX_LEVELS (256) plus the suffix.
MAX_DEPTH = 257


def code_dtype(size: int) -> torch.dtype:
    """The smallest torch integer type holding codes ``0..size-1`` (uint8, int16 or int32)."""
    return torch.uint8 if size <= 2**8 else torch.int16 if size <= 2**15 else torch.int32


def index_dtype(count: int) -> torch.dtype:
    """int32 for offsets and rows up to ``count`` < 2**31, else int64."""
    return torch.int32 if count < 2**31 else torch.int64


def _as_int_tensor(values: Any, name: str, ndim: int) -> torch.Tensor:
    """``values`` as a CPU int64 tensor of ``ndim`` dimensions, refusing floats, bools and negative values."""
    if not isinstance(values, torch.Tensor):
        arr = np.array(values)  # a copy: torch takes only writable arrays
        if arr.dtype.kind not in "biuf":
            raise InvalidInputError(
                f"{name}.dtype={arr.dtype} is not an integer type; expected integers. "
                f"Fix: pass the codes, suffixes and rows as integer arrays (e.g. .astype(np.int64))."
            )
        values = torch.from_numpy(arr)
    t = values
    if t.numel() == 0 and t.dtype.is_floating_point:
        t = t.to(torch.int64)  # an empty list reads as float but holds nothing that is not an integer
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InvalidInputError(
            f"{name}.dtype={t.dtype} is not an integer type; expected integers. "
            f"Fix: pass the codes, suffixes and rows as integer arrays (e.g. .astype(np.int64))."
        )
    if t.dim() != ndim:
        raise InvalidInputError(
            f"{name}.shape={tuple(t.shape)} has {t.dim()} dimensions; expected {ndim}. "
            f"Fix: pass codes as (n_ids, levels) and suffix, item_rows as (n_ids,)."
        )
    t = t.detach().to("cpu", torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise InvalidInputError(
            f"{name} holds a negative value ({int(t.min())}); expected values >= 0. "
            f"Fix: pass the codes, suffixes and rows the registry issued."
        )
    return t


@dataclass(frozen=True, eq=False)
class PrefixTable:
    """The issued ids as a trie in CSR arrays (see the module docstring); build with :meth:`build`."""

    offsets: tuple[torch.Tensor, ...]  # depth tensors, (n_nodes_d + 1,) int32/int64
    children: tuple[torch.Tensor, ...]  # depth tensors, (n_nodes_{d+1},) uint8/int16/int32
    leaf_offsets: torch.Tensor  # (n_leaves + 1,) int32/int64, or (0,) when every leaf holds one item
    item_rows: torch.Tensor  # (n_items,) int32/int64
    sizes: tuple[int, ...]  # (depth,) codes per level
    max_degree: tuple[int, ...] = field(init=False)  # (depth,) most children of one node, per level

    def __post_init__(self) -> None:
        degrees = tuple(int((o[1:] - o[:-1]).max()) if o.numel() > 1 else 0 for o in self.offsets)
        object.__setattr__(self, "max_degree", degrees)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, codes: Any, suffix: Any = None, *, n_codes: int, item_rows: Any = None) -> PrefixTable:
        """The prefix table of the ids ``(codes[i]..., suffix[i])``.

        Args:
            codes: (n_ids, levels) non-negative integers below ``n_codes`` (numpy, torch, lists).
            suffix: (n_ids,) non-negative integers, or None for ids of codes only.
            n_codes: codes per level.
            item_rows: (n_ids,) the item row of each id (default ``0..n_ids-1``).

        Returns:
            A CPU table; :meth:`to` moves it.

        Raises:
            InvalidInputError: codes outside ``0..n_codes-1``, negative values, non-integers, shapes that
                do not agree.
        """
        if isinstance(n_codes, bool) or not isinstance(n_codes, int | np.integer) or not 0 < n_codes < 2**31:
            raise InvalidInputError(
                f"n_codes={n_codes!r}; expected an integer in 1..2**31-1 (the codes per level). "
                f"Fix: pass the codebook's n_codes."
            )
        c = _as_int_tensor(codes, "codes", 2)  # (n, levels)
        n, levels = c.shape
        if levels == 0 or levels + (suffix is not None) > MAX_DEPTH:
            raise InvalidInputError(
                f"codes.shape={tuple(c.shape)}; expected 1 to {MAX_DEPTH - 1} levels. "
                f"Fix: pass one row of codes per id, (n_ids, levels)."
            )
        if n and int(c.max()) >= n_codes:
            row, level = divmod(int(torch.argmax(c)), levels)
            raise InvalidInputError(
                f"codes[{row}, {level}]={int(c[row, level])} is not below n_codes={n_codes}; expected codes in "
                f"0..{n_codes - 1}. Fix: pass the n_codes of the codebook that issued the codes."
            )
        cols = list(c.T)  # levels tensors of (n,)
        sizes = [int(n_codes)] * levels
        if suffix is not None:
            s = _as_int_tensor(suffix, "suffix", 1)  # (n,)
            if s.shape[0] != n:
                raise InvalidInputError(
                    f"suffix.shape={tuple(s.shape)} does not match codes with n_ids={n}; expected ({n},). "
                    f"Fix: pass one suffix per row of codes."
                )
            top = int(s.max()) + 1 if n else 1
            if top >= 2**31:
                raise InvalidInputError(
                    f"suffix holds {top - 1}; expected suffixes below 2**31 - 1. Fix: pass the registry's suffixes."
                )
            cols.append(s)
            sizes.append(top)
        rows = torch.arange(n, dtype=torch.int64) if item_rows is None else _as_int_tensor(item_rows, "item_rows", 1)
        if rows.shape[0] != n:
            raise InvalidInputError(
                f"item_rows.shape={tuple(rows.shape)} does not match codes with n_ids={n}; expected ({n},). "
                f"Fix: pass one item row per id."
            )
        return cls._from_columns(cols, sizes, rows)

    @classmethod
    def _from_columns(cls, cols: list[torch.Tensor], sizes: list[int], rows: torch.Tensor) -> PrefixTable:
        """The trie of the rows of ``cols`` (depth tensors of (n,) int64 values below ``sizes``)."""
        depth, n = len(cols), int(rows.shape[0])
        bits = [max(1, (s - 1).bit_length()) for s in sizes]
        if sum(bits) <= 63:  # one int64 key per id: one sort, prefixes by shifts
            shifts = [sum(bits[d + 1 :]) for d in range(depth)]
            key = torch.zeros(n, dtype=torch.int64)  # (n,)
            for col, shift in zip(cols, shifts, strict=True):
                key |= col << shift
            key, order = torch.sort(key, stable=True)  # (n,), (n,): equal ids keep their input order
            level_values = [(key >> shift) & ((1 << b) - 1) for shift, b in zip(shifts, bits, strict=True)]
            prefix_keys = [key >> shift for shift in shifts]  # prefix of depth d + 1, as one integer
        else:  # too wide for one key: stable sorts, last level first
            order = torch.arange(n, dtype=torch.int64)
            for col in reversed(cols):
                order = order[torch.sort(col[order], stable=True).indices]
            level_values = [col[order] for col in cols]
            prefix_keys = None
        index = index_dtype(n + 1)
        new = torch.zeros(n, dtype=torch.bool)  # (n,) the sorted row starts a new node of the current depth
        if n:
            new[0] = True
        offsets, children = [], []
        for d in range(depth):
            values = level_values[d]  # (n,)
            changed = (prefix_keys[d][1:] != prefix_keys[d][:-1]) if prefix_keys is not None else None
            if changed is None:
                changed = new[1:] | (values[1:] != values[:-1])
            parent_starts = torch.nonzero(new).squeeze(1)  # (n_nodes_d,) for d >= 1; the root at d = 0
            new = new.clone()
            new[1:] |= changed
            starts = torch.nonzero(new).squeeze(1)  # (n_nodes_{d+1},)
            children.append(values[starts].to(code_dtype(sizes[d])))
            child_index = torch.cumsum(new, 0) - 1  # (n,) the node of depth d + 1 of each sorted row
            first = child_index[parent_starts] if d else torch.zeros(1, dtype=torch.int64)  # one root, even with no ids
            tail = torch.tensor([starts.shape[0]], dtype=torch.int64)
            offsets.append(torch.cat([first, tail]).to(index))
        leaf_starts = torch.nonzero(new).squeeze(1)  # (n_leaves,)
        if leaf_starts.shape[0] == n:
            leaf_offsets = torch.zeros(0, dtype=index)
        else:
            leaf_offsets = torch.cat([leaf_starts, torch.tensor([n], dtype=torch.int64)]).to(index)
        item_rows = rows[order].to(index_dtype(int(rows.max()) + 1 if n else 1))
        return cls(tuple(offsets), tuple(children), leaf_offsets, item_rows, tuple(sizes))

    # ------------------------------------------------------------------ arrays in and out (the file format)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as named numpy arrays (what :mod:`vq_pipeline.io.prefix_file` writes)."""
        arrays = {"sizes": np.asarray(self.sizes, dtype=np.int64), "item_rows": self.item_rows.cpu().numpy()}
        arrays["leaf_offsets"] = self.leaf_offsets.cpu().numpy()
        for d in range(self.depth):
            arrays[f"offsets_{d}"] = self.offsets[d].cpu().numpy()
            arrays[f"children_{d}"] = self.children[d].cpu().numpy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PrefixTable:
        """The table from :meth:`to_arrays`' arrays, as :func:`vq_pipeline.io.prefix_file.read_prefix_file`
        returns them (it checks the structure; this only wraps the arrays)."""
        depth = int(arrays["sizes"].shape[0])
        return cls(
            offsets=tuple(torch.from_numpy(arrays[f"offsets_{d}"]) for d in range(depth)),
            children=tuple(torch.from_numpy(arrays[f"children_{d}"]) for d in range(depth)),
            leaf_offsets=torch.from_numpy(arrays["leaf_offsets"]),
            item_rows=torch.from_numpy(arrays["item_rows"]),
            sizes=tuple(int(s) for s in arrays["sizes"]),
        )

    # ------------------------------------------------------------------ views

    @property
    def depth(self) -> int:
        """Tokens per full id: the code levels, plus one for the suffix."""
        return len(self.sizes)

    @property
    def n_items(self) -> int:
        return int(self.item_rows.shape[0])

    @property
    def n_ids(self) -> int:
        """Distinct full ids (leaves)."""
        return int(self.children[-1].shape[0])

    @property
    def device(self) -> torch.device:
        return self.item_rows.device

    @property
    def nbytes(self) -> int:
        """Bytes of every array of the table."""
        tensors = [*self.offsets, *self.children, self.leaf_offsets, self.item_rows]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: str | torch.device) -> PrefixTable:
        """The same table with its arrays on ``device``."""
        move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return PrefixTable(
            move(self.offsets), move(self.children), self.leaf_offsets.to(device), self.item_rows.to(device), self.sizes
        )

    # ------------------------------------------------------------------ queries

    def _walk(self, prefixes: torch.Tensor, token_offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The node of each prefix at depth ``l`` and whether it exists: ((b,) int64, (b,) bool)."""
        b, length = prefixes.shape
        node = torch.zeros(b, dtype=torch.int64, device=prefixes.device)  # (b,) the root
        ok = torch.ones(b, dtype=torch.bool, device=prefixes.device)  # (b,)
        for d in range(length):
            code = prefixes[:, d]  # (b,)
            if token_offsets is not None:
                code = code - token_offsets[d]
            ok &= (code >= 0) & (code < self.sizes[d])
            offsets, children = self.offsets[d], self.children[d]
            lo = offsets[node].long()  # (b,) first child
            end = offsets[node + 1].long()  # (b,) one past the last child
            hi = end.clone()
            n_children = children.shape[0]
            if n_children == 0:
                return node, torch.zeros_like(ok)
            for _ in range(max(1, self.max_degree[d].bit_length())):  # binary search within each parent
                mid = (lo + hi) // 2  # (b,)
                right = (lo < hi) & (children[mid.clamp(max=n_children - 1)].long() < code)
                lo = torch.where(right, mid + 1, lo)
                hi = torch.where(right, hi, torch.where(lo < hi, mid, hi))
            found = (lo < end) & (children[lo.clamp(max=n_children - 1)].long() == code)
            ok &= found
            node = torch.where(ok, lo, torch.zeros_like(lo))  # a missing prefix walks on from the root, masked out
        return node, ok

    def _check_prefixes(self, prefixes: Any, name: str, longest: int) -> torch.Tensor:
        if not isinstance(prefixes, torch.Tensor) or prefixes.dim() != 2:
            shape = tuple(prefixes.shape) if hasattr(prefixes, "shape") else type(prefixes).__name__
            raise InvalidInputError(
                f"{name}={shape}; expected a (batch, length) integer torch tensor. "
                f"Fix: pass the beam's tokens so far, e.g. torch.tensor(prefixes).view(batch, length)."
            )
        if prefixes.dtype.is_floating_point or prefixes.dtype == torch.bool:
            raise InvalidInputError(
                f"{name}.dtype={prefixes.dtype}; expected integer tokens. Fix: pass prefixes.long()."
            )
        if prefixes.shape[1] > longest:
            raise InvalidInputError(
                f"{name}.shape={tuple(prefixes.shape)} has length {prefixes.shape[1]}; expected at most {longest} "
                f"tokens (the table's ids have depth={self.depth}). Fix: pass shorter prefixes."
            )
        if prefixes.device != self.device:
            raise InvalidInputError(
                f"{name}.device={prefixes.device} but the table is on {self.device}; expected one device. "
                f"Fix: move the table once with table.to({str(prefixes.device)!r})."
            )
        return prefixes.long()

    def _offsets_tensor(self, token_offsets: Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
        if token_offsets is None:
            return None
        values = [int(v) for v in token_offsets]
        if len(values) != self.depth or min(values) < 0:
            raise InvalidInputError(
                f"token_offsets={values!r}; expected {self.depth} non-negative integers, the first token of each "
                f"level (codes, then suffix) in the model's vocabulary. Fix: pass one offset per level."
            )
        return torch.tensor(values, dtype=torch.int64, device=device)

    def next_mask(
        self, prefixes: torch.Tensor, token_offsets: Sequence[int] | None = None, *, vocab_size: int | None = None
    ) -> torch.Tensor:
        """The valid next tokens of each prefix: those that extend it to a prefix of an issued id.

        Args:
            prefixes: (b, l) integer tensor on the table's device, ``0 <= l < depth``: the first ``l``
                tokens of each beam (codes of levels ``0..l-1``; the suffix is the last level).
            token_offsets: optional ``depth`` integers: level ``d``'s code ``c`` is the token
                ``token_offsets[d] + c`` (one vocabulary for every level), in ``prefixes`` and in the mask.
            vocab_size: the mask's width with ``token_offsets`` (default: the last token any level can use, + 1).

        Returns:
            (b, sizes[l]) bool tensor on the prefixes' device, or (b, vocab_size) with ``token_offsets``:
            True where the token continues an issued id. A prefix that no id has gets a row of False.
        """
        p = self._check_prefixes(prefixes, "prefixes", self.depth - 1)
        offsets = self._offsets_tensor(token_offsets, p.device)
        length = p.shape[1]
        node, ok = self._walk(p, offsets)  # (b,), (b,)
        shift = 0 if offsets is None else int(token_offsets[length])  # type: ignore[index]
        if offsets is None:
            width = self.sizes[length]
        else:
            firsts = [int(o) for o in token_offsets]  # type: ignore[union-attr]
            width = vocab_size if vocab_size is not None else max(o + s for o, s in zip(firsts, self.sizes))
            if width < shift + self.sizes[length]:
                raise InvalidInputError(
                    f"vocab_size={width} is below the last token of level {length} ({shift + self.sizes[length] - 1}); "
                    f"expected the model's vocabulary size. Fix: pass vocab_size >= {shift + self.sizes[length]}."
                )
        b, degree = p.shape[0], self.max_degree[length]
        if self.n_items == 0 or degree == 0:
            return torch.zeros(b, width, dtype=torch.bool, device=p.device)
        # Every row's children as one (b, degree) block: no output of data-dependent size, so no device sync.
        start = self.offsets[length][node].long()  # (b,)
        count = torch.where(ok, self.offsets[length][node + 1].long() - start, torch.zeros_like(start))  # (b,)
        steps = torch.arange(degree, device=p.device)  # (degree,)
        valid = steps[None, :] < count[:, None]  # (b, degree)
        children = self.children[length]
        pos = (start[:, None] + steps[None, :]).clamp(max=children.shape[0] - 1)  # (b, degree)
        columns = torch.where(valid, children[pos].long() + shift, width)  # (b, degree); column `width`: discarded
        mask = torch.zeros(b, width + 1, dtype=torch.bool, device=p.device)  # (b, width + 1)
        mask.scatter_(1, columns, True)
        return mask[:, :width].contiguous()

    def items(
        self, full_ids: torch.Tensor, token_offsets: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The item rows of full ids.

        Args:
            full_ids: (b, depth) integer tensor on the table's device (tokens, with ``token_offsets``).

        Returns:
            (rows, bounds): (m,) int64 item rows and (b + 1,) int64 bounds; the items of ``full_ids[i]``
            are ``rows[bounds[i]:bounds[i + 1]]`` (none for an id that was not issued; one for an id
            with a suffix).
        """
        p = self._check_prefixes(full_ids, "full_ids", self.depth)
        if p.shape[1] != self.depth:
            raise InvalidInputError(
                f"full_ids.shape={tuple(p.shape)}; expected (batch, {self.depth}): every level's code"
                + (" and the suffix" if self.depth > 1 else "")
                + ". Fix: pass whole ids."
            )
        if self.n_items == 0:
            return torch.zeros(0, dtype=torch.int64, device=p.device), torch.zeros(
                p.shape[0] + 1, dtype=torch.int64, device=p.device
            )
        leaf, ok = self._walk(p, self._offsets_tensor(token_offsets, p.device))  # (b,), (b,)
        if self.leaf_offsets.numel() == 0:
            start, count = leaf, ok.long()
        else:
            start = self.leaf_offsets[leaf].long()  # (b,)
            count = torch.where(ok, self.leaf_offsets[leaf + 1].long() - start, torch.zeros_like(start))
        bounds = torch.zeros(p.shape[0] + 1, dtype=torch.int64, device=p.device)  # (b + 1,)
        bounds[1:] = torch.cumsum(count, 0)
        total = int(bounds[-1])
        owner = torch.repeat_interleave(torch.arange(p.shape[0], device=p.device), count)  # (m,)
        pos = torch.arange(total, device=p.device) - bounds[owner] + start[owner]  # (m,)
        return self.item_rows[pos].long(), bounds


__all__ = ["MAX_DEPTH", "PrefixTable", "code_dtype", "index_dtype"]
