"""Semantic ids: collision statistics and unique suffixes, against a brute-force dictionary oracle."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline.compute.semantic_ids import collision_stats, unique_suffix
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.jobs.semantic_ids import collision_stats_table, suffix_table

FEW = settings(max_examples=50, deadline=None)


# --- the oracle: plain Python over tuples ---------------------------------------------------------------------------


def rows_of(codes: np.ndarray) -> list[tuple[int, ...]]:
    codes = np.asarray(codes)
    codes = codes[:, None] if codes.ndim == 1 else codes
    return [tuple(int(v) for v in row) for row in codes]


def oracle_stats(codes: np.ndarray) -> dict:
    rows = rows_of(codes)
    counts = Counter(rows)
    n = len(rows)
    levels = 1 if np.asarray(codes).ndim == 1 else np.asarray(codes).shape[1]
    largest = max(counts.values(), default=0)
    return {
        "n_rows": n,
        "n_unique": len(counts),
        "collision_rate": sum(1 for r in rows if counts[r] > 1) / n if n else 0.0,
        "largest_group": largest,
        "max_suffix": max(largest - 1, 0),
        "usage": [len({r[level] for r in rows}) for level in range(levels)],
    }


def oracle_suffix(codes: np.ndarray, ids: list | None = None) -> list[int]:
    rows = rows_of(codes)
    keys = list(range(len(rows))) if ids is None else list(ids)
    groups: dict[tuple[int, ...], list] = defaultdict(list)
    for key, row in zip(keys, rows):
        groups[row].append(key)
    return [sorted(groups[row]).index(key) for key, row in zip(keys, rows)]


@st.composite
def small_codes(draw: st.DrawFn) -> np.ndarray:
    """Few distinct codes per level, so that collisions are common; flat or multi-level, any int type."""
    n = draw(st.integers(0, 40))
    levels = draw(st.integers(1, 4))
    top = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.int64]))
    values = draw(st.lists(st.integers(0, top - 1), min_size=n * levels, max_size=n * levels))
    codes = np.array(values, dtype=dtype).reshape(n, levels)
    return codes[:, 0] if levels == 1 and draw(st.booleans()) else codes


# --- in memory ------------------------------------------------------------------------------------------------------


@FEW
@given(small_codes())
def test_collision_stats_matches_the_oracle(codes: np.ndarray) -> None:
    stats = collision_stats(codes)
    assert stats == oracle_stats(codes)
    assert json.loads(json.dumps(stats)) == stats  # plain JSON values, no numpy scalars
    assert all(type(v) is int for k, v in stats.items() if k not in ("collision_rate", "usage"))


@FEW
@given(small_codes(), st.data())
def test_unique_suffix_matches_the_oracle(codes: np.ndarray, data: st.DataObject) -> None:
    n = codes.shape[0]
    suffix = unique_suffix(codes)
    assert suffix.dtype == np.int64 and suffix.shape == (n,)
    assert suffix.tolist() == oracle_suffix(codes)
    ids = data.draw(st.lists(st.integers(-1000, 1000), min_size=n, max_size=n, unique=True))
    assert unique_suffix(codes, np.array(ids)).tolist() == oracle_suffix(codes, ids)
    names = [f"row-{i}" for i in ids]  # strings sort otherwise than the integers
    assert unique_suffix(codes, np.array(names)).tolist() == oracle_suffix(codes, names)
    # (tuple, suffix) is unique, the suffixes of a group are 0..size-1, and max_suffix is the largest one.
    rows = rows_of(codes)
    assert len(set(zip(rows, suffix.tolist()))) == n
    assert (suffix.max() if n else 0) == collision_stats(codes)["max_suffix"]


@FEW
@given(small_codes(), st.randoms(use_true_random=False))
def test_suffix_of_an_id_does_not_depend_on_row_order(codes: np.ndarray, rnd) -> None:
    n = codes.shape[0]
    ids = np.array(rnd.sample(range(10 * n + 1), n), dtype=np.int64)
    before = dict(zip(ids.tolist(), unique_suffix(codes, ids).tolist()))
    perm = np.array(rnd.sample(range(n), n), dtype=np.int64)
    after = dict(zip(ids[perm].tolist(), unique_suffix(codes[perm], ids[perm]).tolist()))
    assert after == before


def test_hand_computed_suffixes() -> None:
    codes = np.array([[1, 2], [1, 2], [0, 1], [1, 2], [2, 1]], dtype=np.uint8)
    assert unique_suffix(codes).tolist() == [0, 1, 0, 2, 0]
    assert unique_suffix(codes, ids=np.array(["b", "c", "x", "a", "y"])).tolist() == [1, 2, 0, 0, 0]
    assert unique_suffix(codes, ids=np.array([30, 10, 5, 20, 7])).tolist() == [2, 0, 0, 1, 0]
    assert collision_stats(codes) == {
        "n_rows": 5,
        "n_unique": 3,
        "collision_rate": 0.6,
        "largest_group": 3,
        "max_suffix": 2,
        "usage": [3, 2],
    }
    # Tuples that share one level but differ in another do not collide (no hashing, no summing of levels).
    assert unique_suffix(np.array([[0, 1], [1, 0], [0, 1]])).tolist() == [0, 0, 1]
    assert collision_stats(np.array([[0, 1], [1, 0]]))["collision_rate"] == 0.0


def test_empty_and_wide_codes() -> None:
    assert collision_stats(np.zeros((0, 3), dtype=np.uint8)) == {
        "n_rows": 0,
        "n_unique": 0,
        "collision_rate": 0.0,
        "largest_group": 0,
        "max_suffix": 0,
        "usage": [0, 0, 0],
    }
    assert unique_suffix([]).shape == (0,)
    assert unique_suffix(np.zeros((0, 2), dtype=np.int64), ids=np.array([], dtype=str)).shape == (0,)
    big = np.array([[2**63 + 5, 1], [2**63 + 5, 1], [5, 1]], dtype=np.uint64)  # beyond int64: no overflow
    assert unique_suffix(big).tolist() == [0, 1, 0]


# --- parquet files --------------------------------------------------------------------------------------------------


def write_split(tmp_path: Path, ids: np.ndarray, codes: np.ndarray, cuts: list[int]) -> list[str]:
    """Write rows [cuts[i], cuts[i+1]) to part-i.parquet, codes as Array(UInt8, levels)."""
    files = []
    bounds = [0, *cuts, len(ids)]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        frame = pl.DataFrame(
            {"id": ids[a:b], "codes": codes[a:b]}, schema_overrides={"codes": pl.Array(pl.UInt8, codes.shape[1])}
        )
        path = tmp_path / f"part-{i}.parquet"
        frame.write_parquet(path)
        files.append(str(path))
    return files


@pytest.mark.parametrize("id_kind", ["int", "str"])
def test_suffix_table_equals_unique_suffix_of_the_concatenation(tmp_path: Path, id_kind: str) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    codes = rng.integers(0, 4, size=(n, 3)).astype(np.uint8)  # 64 tuples: many collisions
    ids = rng.permutation(n * 3)[:n].astype(np.int64)
    if id_kind == "str":
        ids = np.array([f"doc-{i}" for i in ids])
    files = write_split(tmp_path, ids, codes, [1000, 2200])
    table = suffix_table(files, id_column="id", codes_column="codes")
    assert table.columns == ["id", "suffix"]
    assert table.schema["suffix"] == pl.UInt32
    assert table["id"].to_numpy().tolist() == ids.tolist()  # the files' row order
    assert table["suffix"].to_numpy().tolist() == unique_suffix(codes, ids).tolist()
    # The files in another order, one as a glob: the same suffix for every id.
    again = suffix_table([files[2], str(tmp_path / "part-[01].parquet")], id_column="id", codes_column="codes")
    assert dict(again.iter_rows()) == dict(table.iter_rows())
    assert collision_stats_table(files, codes_column="codes") == collision_stats(codes)


def test_table_codes_as_flat_integers_and_lists(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 3, size=(200, 2))
    ids = rng.permutation(200)
    flat = tmp_path / "flat.parquet"
    pl.DataFrame({"id": ids, "code": codes[:, 0].astype(np.uint16)}).write_parquet(flat)
    assert suffix_table(flat, id_column="id", codes_column="code")["suffix"].to_list() == oracle_suffix(
        codes[:, 0], ids.tolist()
    )
    assert collision_stats_table(flat, codes_column="code") == oracle_stats(codes[:, 0])
    lists = tmp_path / "lists.parquet"
    pl.DataFrame({"id": ids, "codes": pl.Series(codes.tolist(), dtype=pl.List(pl.Int32))}).write_parquet(lists)
    assert suffix_table(lists, id_column="id", codes_column="codes")["suffix"].to_list() == oracle_suffix(
        codes, ids.tolist()
    )
    assert collision_stats_table(lists, codes_column="codes") == oracle_stats(codes)


def test_table_of_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pl.DataFrame(
        {"id": pl.Series([], dtype=pl.Int64), "codes": pl.Series([], dtype=pl.Array(pl.UInt8, 2))}
    ).write_parquet(path)
    assert suffix_table(path, id_column="id", codes_column="codes").height == 0
    assert collision_stats_table(path, codes_column="codes") == collision_stats(np.zeros((0, 2), dtype=np.uint8))


# --- errors ---------------------------------------------------------------------------------------------------------


def expect_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(InvalidInputError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "expected" in message and "Fix:" in message, message
    return message


@pytest.mark.parametrize("call", [collision_stats, unique_suffix])
def test_bad_codes(call) -> None:
    expect_error(r"codes\.dtype=float64", call, np.array([[0.0, 1.0]]))
    expect_error(r"codes\.dtype=bool", call, np.array([True, False]))
    expect_error(r"codes\[1, 0\]=-3 is negative", call, np.array([[0, 1], [-3, 2]]))
    expect_error(r"codes\.shape=\(1, 2, 2\) has ndim=3", call, np.zeros((1, 2, 2), dtype=np.int64))
    expect_error(r"ndim=0", call, np.int64(3))
    expect_error(r"levels=0", call, np.zeros((3, 0), dtype=np.int64))


def test_bad_ids() -> None:
    codes = np.array([[0, 1], [0, 1], [2, 2]])
    expect_error(r"ids\.shape=\(2,\) .* n_rows=3", unique_suffix, codes, ids=np.array([1, 2]))
    message = expect_error(r"ids\[0\]=ids\[2\]='a'", unique_suffix, codes, ids=np.array(["a", "b", "a"]))
    assert "ids=None" in message
    expect_error(r"ids\[1\]=ids\[2\]=7", unique_suffix, codes, ids=[1, 7, 7])
    expect_error(r"ids\.dtype=object cannot be sorted", unique_suffix, codes, ids=np.array([1, "a", 2], dtype=object))


def test_bad_tables(tmp_path: Path) -> None:
    codes = np.array([[0, 1], [0, 1], [2, 2]], dtype=np.uint8)
    files = write_split(tmp_path, np.array([4, 5, 4]), codes, [2])  # id 4 in both files
    expect_error(r"id=4 occurs 2 times", suffix_table, files, id_column="id", codes_column="codes")
    expect_error(r"id_column='row' is not a column", suffix_table, files, id_column="row", codes_column="codes")
    expect_error(r"codes_column='sid' is not a column", collision_stats_table, files, codes_column="sid")
    expect_error(r"cannot be read", suffix_table, str(tmp_path / "missing.parquet"), id_column="id", codes_column="c")
    expect_error(r"id_column='codes'", suffix_table, files, id_column="codes", codes_column="codes")
    expect_error(r"files=\[\] names no table", collision_stats_table, [], codes_column="codes")

    bad = tmp_path / "bad.parquet"
    pl.DataFrame(
        {
            "id": [1, None, 3],
            "key": [1, 2, 3],
            "good": pl.Series([[0, 1], [0, 1], [1, 1]], dtype=pl.Array(pl.UInt8, 2)),
            "float": [0.5, 1.0, 2.0],
            "negative": pl.Series([[0, 1], [-2, 1], [1, 1]], dtype=pl.Array(pl.Int16, 2)),
            "null_code": pl.Series([[0, 1], [0, None], [1, 1]], dtype=pl.Array(pl.UInt8, 2)),
            "ragged": pl.Series([[0, 1], [0], [1, 1]], dtype=pl.List(pl.UInt8)),
        }
    ).write_parquet(bad)
    expect_error(r"id_column='id' is null on 1 rows", suffix_table, bad, id_column="id", codes_column="good")
    for call in (collision_stats_table, lambda path, **kw: suffix_table(path, id_column="key", **kw)):
        expect_error(r"codes_column='float' has type Float64", call, bad, codes_column="float")
        expect_error(r"negative code \(-2\)", call, bad, codes_column="negative")
        expect_error(r"1 null codes", call, bad, codes_column="null_code")
        expect_error(r"lists of 1 to 2 codes", call, bad, codes_column="ragged")
