"""The prefix table against a brute-force oracle (Python sets of issued id tuples): valid next tokens,
items of full ids, constrained beam search, and the size of the arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from conftest import GPU_DEVICE, cuda
from hypothesis import strategies as st

from vq_pipeline.compute.prefix_table import PrefixTable
from vq_pipeline.compute.semantic_ids import unique_suffix
from vq_pipeline.errors import InvalidInputError

FEW = settings(max_examples=60, deadline=None)


@st.composite
def issued(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(codes (n, levels), suffix or None, n_codes): few codes per level, so prefixes are shared."""
    n = draw(st.integers(0, 40))
    levels = draw(st.integers(1, 3))
    n_codes = draw(st.integers(1, 5))
    codes = np.array(draw(st.lists(st.lists(st.integers(0, n_codes - 1), min_size=levels, max_size=levels),
                                   min_size=n, max_size=n)), dtype=np.int64).reshape(n, levels)  # fmt: skip
    suffix = unique_suffix(codes) if draw(st.booleans()) else None
    return codes, suffix, n_codes


def full_ids(codes: np.ndarray, suffix: np.ndarray | None) -> np.ndarray:
    return codes if suffix is None else np.concatenate([codes, suffix[:, None]], axis=1)


def oracle_next(ids: np.ndarray, prefix: tuple[int, ...]) -> set[int]:
    n = len(prefix)
    return {int(row[n]) for row in ids if tuple(int(v) for v in row[:n]) == prefix}


@FEW
@given(issued(), st.data())
def test_next_mask_is_the_set_of_issued_continuations(case, data) -> None:
    codes, suffix, n_codes = case
    ids = full_ids(codes, suffix)
    table = PrefixTable.build(codes, suffix, n_codes=n_codes)
    depth = ids.shape[1]
    for length in range(depth):
        # Issued prefixes of this length and arbitrary ones (most of which no id has).
        prefixes = [tuple(int(v) for v in row[:length]) for row in ids[:5]]
        prefixes += [tuple(data.draw(st.integers(0, 6)) for _ in range(length)) for _ in range(4)]
        mask = table.next_mask(torch.tensor(prefixes, dtype=torch.int64).reshape(len(prefixes), length))
        width = n_codes if length < codes.shape[1] else (int(suffix.max()) + 1 if len(suffix) else 1)
        assert mask.shape == (len(prefixes), width) and mask.dtype == torch.bool
        for prefix, row in zip(prefixes, mask, strict=True):
            assert set(torch.nonzero(row).squeeze(1).tolist()) == oracle_next(ids, prefix)


@FEW
@given(issued(), st.integers(0, 50))
def test_token_offsets_shift_prefixes_and_mask(case, base) -> None:
    codes, suffix, n_codes = case
    ids = full_ids(codes, suffix)
    table = PrefixTable.build(codes, suffix, n_codes=n_codes)
    offsets = [base + 7 * d for d in range(ids.shape[1])]  # one vocabulary; levels may overlap, as some models do
    vocab = offsets[-1] + max(table.sizes) + 3
    for length in range(ids.shape[1]):
        plain = torch.tensor(ids[:, :length], dtype=torch.int64).reshape(len(ids), length)
        tokens = plain + torch.tensor(offsets[:length], dtype=torch.int64)
        shifted = table.next_mask(tokens, offsets, vocab_size=vocab)
        expected = torch.zeros(len(ids), vocab, dtype=torch.bool)
        unshifted = table.next_mask(plain)
        expected[:, offsets[length] : offsets[length] + unshifted.shape[1]] = unshifted
        assert torch.equal(shifted, expected)


@FEW
@given(issued())
def test_items_of_full_ids(case) -> None:
    codes, suffix, n_codes = case
    ids = full_ids(codes, suffix)
    rows = np.random.default_rng(0).permutation(len(ids))  # item rows need not follow input order
    table = PrefixTable.build(codes, suffix, n_codes=n_codes, item_rows=rows)
    queries = np.concatenate([ids, np.full((1, ids.shape[1]), 9)]).astype(np.int64)  # the last: never issued
    found, bounds = table.items(torch.tensor(queries))
    for i, query in enumerate(queries):
        expected = sorted(int(rows[j]) for j in range(len(ids)) if (ids[j] == query).all())
        assert sorted(found[bounds[i] : bounds[i + 1]].tolist()) == expected
    if suffix is not None:
        assert torch.equal(found[bounds[:-1][: len(ids)]], torch.as_tensor(rows))  # one item per full id


def beam_search(table: PrefixTable, scores: torch.Tensor, width: int) -> set[tuple[int, ...]]:
    """A constrained beam search: at every level, invalid tokens get -inf before the top-``width`` pick.

    Args:
        scores: (depth, max_size) random scores of each level's tokens (the same for every beam).
    """
    beams = torch.zeros(1, 0, dtype=torch.int64)  # (b, length)
    totals = torch.zeros(1)  # (b,)
    for level in range(table.depth):
        mask = table.next_mask(beams)  # (b, size)
        step = scores[level, : mask.shape[1]].expand_as(mask).masked_fill(~mask, float("-inf"))
        flat = (totals[:, None] + step).reshape(-1)  # (b * size,)
        keep = min(width, int(torch.isfinite(flat).sum()))
        best = torch.topk(flat, keep).indices  # (keep,)
        beams = torch.cat([beams[best // mask.shape[1]], (best % mask.shape[1])[:, None]], dim=1)
        totals = flat[best]
    return {tuple(int(v) for v in row) for row in beams}


@FEW
@given(issued(), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_constrained_beam_search_yields_only_issued_ids_and_reaches_all(case, width, seed) -> None:
    codes, suffix, n_codes = case
    ids = {tuple(int(v) for v in row) for row in full_ids(codes, suffix)}
    table = PrefixTable.build(codes, suffix, n_codes=n_codes)
    scores = torch.randn(table.depth, max(table.sizes), generator=torch.Generator().manual_seed(seed))
    found = beam_search(table, scores, width)
    assert found <= ids  # never an id that was not issued
    assert len(found) == min(width, len(ids))  # a beam never dies on a dead end
    assert beam_search(table, scores, max(1, len(ids))) == ids or not ids  # a wide enough beam reaches every id
    for target in list(ids)[:5]:  # and each id is the greedy pick of scores that favour it
        favour = torch.zeros(table.depth, max(table.sizes))
        favour[torch.arange(table.depth), torch.tensor(target)] = 1.0
        assert beam_search(table, favour, 1) == {target}


def test_wide_ids_take_the_stable_sort_path() -> None:
    """4 levels of 2**20 codes and a suffix need 80+ bits: the trie is built by stable sorts per level."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, (300, 4)) * (2**18)  # few distinct values, spread over 2**20
    suffix = unique_suffix(codes)
    table = PrefixTable.build(codes, suffix, n_codes=2**20)
    ids = full_ids(codes, suffix)
    for length in range(5):
        for row in ids[:20]:
            mask = table.next_mask(torch.tensor(row[None, :length], dtype=torch.int64))
            assert set(torch.nonzero(mask[0]).squeeze(1).tolist()) == oracle_next(
                ids, tuple(int(v) for v in row[:length])
            )
    found, bounds = table.items(torch.tensor(ids, dtype=torch.int64))
    assert torch.equal(found, torch.arange(300)) and torch.equal(bounds, torch.arange(301))


def test_three_levels_of_256_and_a_suffix_take_at_most_16_bytes_per_id() -> None:
    n = 200_000
    codes = np.random.default_rng(2).integers(0, 256, (n, 3))
    table = PrefixTable.build(codes, unique_suffix(codes), n_codes=256)
    assert table.n_items == n and table.nbytes / n <= 16, table.nbytes / n


def test_an_empty_table_allows_nothing() -> None:
    table = PrefixTable.build(np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64), n_codes=4)
    assert not table.next_mask(torch.zeros(3, 0, dtype=torch.int64)).any()
    assert not table.next_mask(torch.zeros(2, 1, dtype=torch.int64)).any()
    found, bounds = table.items(torch.zeros(2, 3, dtype=torch.int64))
    assert found.numel() == 0 and bounds.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: PrefixTable.build([[0, 4]], n_codes=4), r"codes\[0, 1\]=4 is not below n_codes=4"),
        (lambda: PrefixTable.build([[0, -1]], n_codes=4), r"codes holds a negative value \(-1\)"),
        (lambda: PrefixTable.build([[0.5]], n_codes=4), r"codes.dtype=torch.float64 is not an integer type"),
        (lambda: PrefixTable.build([["a"]], n_codes=4), r"codes.dtype=<U1 is not an integer type"),
        (lambda: PrefixTable.build([0, 1], n_codes=4), r"codes.shape=\(2,\) has 1 dimensions; expected 2"),
        (lambda: PrefixTable.build([[0], [1]], [0], n_codes=4), r"suffix.shape=\(1,\) does not match"),
        (lambda: PrefixTable.build([[0]], n_codes=0), r"n_codes=0; expected an integer in 1..2\*\*31-1"),
        (lambda: PrefixTable.build([[0]], item_rows=[0, 1], n_codes=2), r"item_rows.shape=\(2,\) does not match"),
    ],
)
def test_bad_inputs_are_refused_with_the_value_named(call, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        call()


def test_bad_queries_are_refused() -> None:
    table = PrefixTable.build([[0, 1], [1, 1]], [0, 0], n_codes=2)
    with pytest.raises(InvalidInputError, match=r"has length 3; expected at most 2 tokens"):
        table.next_mask(torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match=r"prefixes.dtype=torch.float32; expected integer tokens"):
        table.next_mask(torch.zeros(1, 1))
    with pytest.raises(InvalidInputError, match=r"full_ids.shape=\(1, 2\); expected \(batch, 3\)"):
        table.items(torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match=r"token_offsets=\[0\]; expected 3 non-negative integers"):
        table.next_mask(torch.zeros(1, 0, dtype=torch.int64), [0])
    with pytest.raises(InvalidInputError, match=r"vocab_size=2 is below the last token of level 0 \(2\)"):
        table.next_mask(torch.zeros(1, 0, dtype=torch.int64), [1, 3, 5], vocab_size=2)


def test_arrays_round_trip() -> None:
    codes = np.random.default_rng(3).integers(0, 4, (50, 2))
    table = PrefixTable.build(codes, None, n_codes=4)  # collisions: leaves with several items
    again = PrefixTable.from_arrays(table.to_arrays())
    prefixes = torch.tensor(codes[:, :1], dtype=torch.int64)
    assert torch.equal(again.next_mask(prefixes), table.next_mask(prefixes))
    assert all(torch.equal(a, b) for a, b in zip(again.items(torch.tensor(codes)), table.items(torch.tensor(codes))))


@cuda
def test_masks_and_items_on_the_gpu_equal_the_cpu_ones() -> None:
    """The table moved to the accelerator answers as on the CPU (VQ_TEST_DEVICE=cpu runs it here)."""
    codes = np.random.default_rng(4).integers(0, 16, (5000, 3))
    suffix = unique_suffix(codes)
    table = PrefixTable.build(codes, suffix, n_codes=16)
    moved = table.to(GPU_DEVICE)
    full = torch.tensor(np.concatenate([codes, suffix[:, None]], axis=1))
    for length in range(4):
        prefixes = full[:300, :length].contiguous()
        prefixes[::7] += 3  # some prefixes no id has
        expected = table.next_mask(prefixes)
        assert torch.equal(moved.next_mask(prefixes.to(GPU_DEVICE)).cpu(), expected)
        offsets = [0, 16, 32, 48]
        shifted = moved.next_mask(
            prefixes.to(GPU_DEVICE) + torch.tensor(offsets[:length], dtype=torch.int64, device=GPU_DEVICE), offsets
        )
        assert torch.equal(shifted.cpu()[:, offsets[length] : offsets[length] + expected.shape[1]], expected)
    rows, bounds = moved.items(full.to(GPU_DEVICE))
    assert torch.equal(rows.cpu(), torch.arange(5000)) and torch.equal(bounds.cpu(), torch.arange(5001))
