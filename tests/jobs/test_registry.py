"""The id registry: issued ids never change over many simulated runs (against a plain-Python oracle),
suffixes do not depend on row order, refits keep or publish versions, a second writer is refused, a
killed writer leaves the previous state and a rerun finishes to the same state, hostile folders are
refused; and the semantic-ids guide's example runs."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kill_points
from vq_pipeline.compute.semantic_ids import unique_suffix
from vq_pipeline.errors import EncodeLockedError, InvalidInputError, StateError
from vq_pipeline.jobs.registry import MANIFEST_NAME, Registry, load_prefix_table

ROOT = Path(__file__).resolve().parents[2]
FP_A, FP_B, FP_C = "a" * 64, "b" * 64, "c" * 64


# --- many simulated runs against an oracle ----------------------------------------------------------------------------


@st.composite
def schedules(draw: st.DrawFn) -> dict:
    """Days of arrivals: each id arrives on one day (ids of any sign, so later ones may be smaller), each
    day also re-sends some ids issued before, rows in any order; few codes, so tuples collide often."""
    levels = draw(st.integers(1, 2))
    n_codes = draw(st.integers(1, 3))
    ids = draw(st.lists(st.integers(-(10**6), 10**6), unique=True, max_size=40))
    n_days = draw(st.integers(1, 6))
    codes = {i: tuple(draw(st.lists(st.integers(0, n_codes - 1), min_size=levels, max_size=levels))) for i in ids}
    first_day = {i: draw(st.integers(0, n_days - 1)) for i in ids}
    days = []
    for day in range(n_days):
        new = [i for i in ids if first_day[i] == day]
        old = [i for i in ids if first_day[i] < day]
        resent = draw(st.lists(st.sampled_from(old), unique=True)) if old else []
        days.append(draw(st.permutations(new + resent)))
    return {"levels": levels, "codes": codes, "days": days}


def run_day(registry: Registry, day: list[int], codes: dict, levels: int) -> np.ndarray:
    rows = np.array([codes[i] for i in day], dtype=np.int64).reshape(len(day), levels)
    return registry.issue(pl.Series("id", day, dtype=pl.Int64), rows, FP_A)


@settings(max_examples=40, deadline=None)
@given(schedules())
def test_issued_ids_never_change_over_many_runs(tmp_path_factory, schedule) -> None:
    folder = tmp_path_factory.mktemp("registry")
    codes, levels = schedule["codes"], schedule["levels"]
    issued: dict[int, int] = {}  # the oracle: id -> suffix, append-only
    next_free: dict[tuple, int] = defaultdict(int)
    for day in schedule["days"]:
        for i in sorted(i for i in day if i not in issued):  # new items of one run: by id
            issued[i] = next_free[codes[i]]
            next_free[codes[i]] += 1
        with Registry.open(folder) as registry:  # one scheduled run: open, issue, close
            suffix = run_day(registry, day, codes, levels)
        assert suffix.tolist() == [issued[i] for i in day]
        everyone = sorted(issued)
        found = Registry.open(folder, write=False).lookup(everyone)  # from disk, as the next run reads it
        assert found["suffix"].to_list() == [issued[i] for i in everyone]  # 100% of issued ids unchanged
        assert [tuple(c) for c in found["codes"].to_list()] == [codes[i] for i in everyone]
        assert found.select(pl.struct("codes", "suffix").n_unique()).item() == len(everyone)


@settings(max_examples=25, deadline=None)
@given(schedules(), st.randoms(use_true_random=False))
def test_suffixes_depend_on_the_calls_not_on_row_order(tmp_path_factory, schedule, rnd) -> None:
    frames = []
    for shuffle in (False, True):
        folder = tmp_path_factory.mktemp("registry")
        with Registry.open(folder) as registry:
            for day in schedule["days"]:
                day = list(day)
                if shuffle:
                    rnd.shuffle(day)
                run_day(registry, day, schedule["codes"], schedule["levels"])
            frames.append(registry.frame() if registry.current_version else None)
    assert (frames[0] is None and frames[1] is None) or frames[0].equals(frames[1])


def test_a_smaller_new_id_does_not_move_an_issued_one(tmp_path: Path) -> None:
    """What suffixes recomputed over the folder do (the old ``--unique``), and what the registry does instead."""
    assert unique_suffix([[0], [0]], ids=[5, 3]).tolist() == [1, 0]  # recomputed: id 5 moves from 0 to 1
    with Registry.open(tmp_path) as registry:
        assert registry.issue([5], [[0]], FP_A).tolist() == [0]
        assert registry.issue([3, 5], [[0], [0]], FP_A).tolist() == [1, 0]  # 5 keeps 0; 3 takes the next free


# --- refusals ------------------------------------------------------------------------------------------------------------


def test_reissuing_an_item_with_other_codes_is_refused(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as registry:
        registry.issue([1, 2], [[0, 1], [0, 1]], FP_A)
        message = (
            r"id=2 was issued codes=\[0, 1\] suffix=1 under id version 1, now codes=\[1, 1\] \(1 items differ\); "
            r"expected an issued item's codes never to change under one id version\. Fix: encode these items with "
            r"the codebook of id version 1, or publish a new id version \(Registry.new_version\)\."
        )
        with pytest.raises(InvalidInputError, match=message):
            registry.issue([2, 3], [[1, 1], [0, 1]], FP_A)
        assert registry.lookup([3])["suffix"].to_list() == [None]  # nothing of the refused call was issued


def test_another_codebook_must_publish_a_version(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as registry:
        registry.issue([1], [[0]], FP_A)
        with pytest.raises(
            StateError, match=r"codebook_fingerprint=bbbbbbbbbbbbbbbb\.\.\. did not issue the current id "
        ):
            registry.issue([2], [[0]], FP_B)


@pytest.mark.parametrize(
    ("ids", "codes", "message"),
    [
        ([1, 1], [[0], [1]], r"id=1 occurs more than once \(1 repeated rows\)"),
        ([1, None], [[0], [1]], r"ids holds 1 nulls"),
        ([1.5], [[0]], r"ids.dtype=Float64; expected integer or string item keys"),
        (["x"], [[0]], r"ids.dtype=String but the registry keys items by Int64 ids"),
        ([1], [[0, 1]], r"codes.shape=\(1, 2\) has levels=2; the registry holds ids of levels=1"),
        ([1, 2], [[0]], r"codes.shape=\(1, 1\); expected \(2, levels\)"),
        ([1], [[-1]], r"codes \(dtype=int64\) hold values outside the integers 0..2\*\*32-1"),
    ],
)
def test_bad_calls_are_refused_with_the_value_named(tmp_path: Path, ids, codes, message) -> None:
    with Registry.open(tmp_path) as registry:
        registry.issue([7], [[0]], FP_A)
        with pytest.raises(InvalidInputError, match=message):
            registry.issue(pl.Series("id", ids), codes, FP_A)


def test_a_second_writer_is_refused_and_a_reader_is_not(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as registry:
        registry.issue([1], [[0]], FP_A)
        with pytest.raises(
            EncodeLockedError, match=rf"registry='{re.escape(str(tmp_path))}' is being written by pid {os.getpid()} on "
        ):
            Registry.open(tmp_path)
        reader = Registry.open(tmp_path, write=False)
        assert reader.lookup([1])["suffix"].to_list() == [0]
        with pytest.raises(StateError, match=r"was opened for reading; expected a writer"):
            reader.issue([2], [[0]], FP_A)
    Registry.open(tmp_path).close()  # released


# --- adopting the suffixes an output has, publishing a new version ------------------------------------------------------


def test_a_first_run_adopts_the_current_suffixes_as_version_1(tmp_path: Path) -> None:
    codes = np.random.default_rng(0).integers(0, 3, (60, 2))
    ids = np.random.default_rng(1).permutation(1000)[:60]
    table = pl.DataFrame({"id": ids, "codes": codes, "suffix": unique_suffix(codes, ids)})
    table = table.with_columns(pl.col("codes").cast(pl.Array(pl.UInt8, 2)), pl.col("suffix").cast(pl.UInt32))
    with Registry.open(tmp_path) as registry:
        assert registry.adopt(table.lazy(), FP_A) == 60
        assert registry.current_version == 1 and registry.fingerprint(1) == FP_A
        found = registry.lookup(table["id"])
        assert found["suffix"].to_list() == table["suffix"].to_list()
        nxt = registry.issue([-5], codes[:1], FP_A)  # a new item of an adopted tuple: one past its largest suffix
        same = (codes == codes[0]).all(axis=1)
        assert nxt.tolist() == [int(table["suffix"].to_numpy()[same].max()) + 1]
        with pytest.raises(StateError, match=r"already holds id version 1; expected an empty registry"):
            registry.adopt(table, FP_A)
    with Registry.open(tmp_path / "other") as registry:
        with pytest.raises(InvalidInputError, match=r"table holds a full id \(codes, suffix\) on more than one row"):
            registry.adopt(table.with_columns(pl.lit(0, pl.UInt32).alias("suffix")), FP_A)
        with pytest.raises(InvalidInputError, match=r"table lacks columns \['suffix'\]"):
            registry.adopt(table.drop("suffix"), FP_A)


def test_publishing_a_version_keeps_the_previous_one_and_maps_old_to_new(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    old_codes, new_codes = rng.integers(0, 3, (50, 2)), rng.integers(0, 3, (53, 2))
    with Registry.open(tmp_path) as registry:
        registry.issue(np.arange(30), old_codes[:30], FP_A)
        registry.issue(np.arange(30, 50), old_codes[30:], FP_A)
        before = registry.frame(1)
        with pytest.raises(InvalidInputError, match=r"id=49 \(1 items\) of id version 1 is missing from ids"):
            registry.new_version(np.arange(49), new_codes[:49], FP_B)
        with pytest.raises(StateError, match=r"already issued the current id version 1"):
            registry.new_version(np.arange(53), new_codes, FP_A)
        info = registry.new_version(np.arange(53)[::-1], new_codes[::-1], FP_B)  # any row order
        assert info["id_version"] == 2 and info["previous"] == 1 and info["n_items"] == 53 and info["n_new"] == 3
        assert registry.frame(1).equals(before)  # the previous version stays readable, unchanged
        v2 = registry.frame(2)
        assert v2["id"].to_list()[:50] == before["id"].to_list()  # issue order kept; new items after, by id
        expected = [unique_suffix(new_codes[v2["id"].to_numpy()], np.arange(53))[i] for i in range(53)]
        assert v2["suffix"].to_list() == expected  # suffixes of version 2 follow issue order
        items, prefixes = registry.version_map(2)
        joined = before.join(v2, on="id", suffix="_new")
        assert items["id"].to_list() == before["id"].to_list()
        assert items["new_codes"].to_list() == joined["codes_new"].to_list()
        assert items["old_suffix"].to_list() == before["suffix"].to_list()
        assert (
            info["n_moved"]
            == joined.filter(
                (pl.col("codes") != pl.col("codes_new")) | (pl.col("suffix") != pl.col("suffix_new"))
            ).height
        )
        for level in (1, 2):  # per prefix: how many items went from each old prefix to each new one
            rows = prefixes.filter(pl.col("level") == level)
            assert rows["n_items"].sum() == 50
            pairs = defaultdict(int)
            for a, b in zip(items["old_codes"].to_list(), items["new_codes"].to_list(), strict=True):
                pairs[(tuple(a[:level]), tuple(b[:level]))] += 1
            assert {
                (tuple(a), tuple(b)): n for a, b, n in rows.select("old_prefix", "new_prefix", "n_items").rows()
            } == pairs
        registry.issue([100], [[0, 0]], FP_B)  # new items now go to version 2
        with pytest.raises(StateError, match=r"did not issue the current id version 2"):
            registry.issue([101], [[0, 0]], FP_A)
        assert registry.lookup([100], version=1)["suffix"].to_list() == [None]
        assert registry.version_of(FP_A) == 1 and registry.version_of(FP_C) is None


def test_string_ids(tmp_path: Path) -> None:
    with Registry.open(tmp_path, id_column="item") as registry:
        assert registry.issue(["b", "a"], [[1], [1]], FP_A).tolist() == [1, 0]
    with pytest.raises(InvalidInputError, match=r"id_column='id' but the registry in .* keys items by 'item'"):
        Registry.open(tmp_path)
    assert Registry.open(tmp_path, id_column="item", write=False).lookup(["a", "z"])["suffix"].to_list() == [0, None]


# --- the prefix table of a version ---------------------------------------------------------------------------------------


def test_the_prefix_table_of_a_version_maps_every_issued_id_to_its_item(tmp_path: Path) -> None:
    codes = np.random.default_rng(3).integers(0, 4, (200, 3))
    with Registry.open(tmp_path) as registry:
        registry.issue(np.arange(200)[::-1], codes[::-1], FP_A)
        path = registry.write_prefix_table(tmp_path / "v1.prefix.safetensors", n_codes=4)
        frame = registry.frame()
    table = load_prefix_table(path, codebook_fingerprint=FP_A, id_version=1)
    full = np.concatenate([frame["codes"].to_numpy(), frame["suffix"].to_numpy()[:, None]], axis=1).astype(np.int64)
    rows, bounds = table.items(torch.tensor(full))
    assert torch.equal(rows, torch.arange(200)) and torch.equal(bounds, torch.arange(201))
    with pytest.raises(StateError, match=r"was built for id_version='1'; expected id_version='2'"):
        load_prefix_table(path, id_version=2)


# --- crashes: a killed writer leaves the previous state; a rerun finishes to the same one ------------------------------


CHILD = (
    kill_points.CHILD_PRELUDE
    + """
from vq_pipeline.jobs.registry import Registry

A, B = "a" * 64, "b" * 64
with Registry.open(sys.argv[1]) as r:
    if r.current_version in (None, 1):
        r.issue([10, 4, 7], [[0, 1], [0, 1], [1, 1]], A)
        r.issue([2, 9, 4], [[0, 1], [1, 1], [0, 1]], A)
        r.new_version([2, 4, 7, 9, 10, 1], [[1, 0], [1, 0], [0, 0], [0, 0], [1, 0], [1, 0]], B)
    r.issue([0, 9], [[1, 0], [0, 0]], B)
finish()
"""
)


def state(folder: Path) -> dict:
    """Everything a reader sees of a registry: each version's rows and published maps."""
    registry = Registry.open(folder, write=False)
    if registry.current_version is None:
        return {}
    out: dict = {}
    for v in range(1, registry.current_version + 1):
        out[v] = registry.frame(v).rows()
        if v > 1:
            out[f"map{v}"] = [m.rows() for m in registry.version_map(v)]
    return out


def test_a_killed_writer_leaves_a_readable_state_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", CHILD]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    counts = kill_points.count([*argv, str(reference)], env=env)
    assert counts["replace"] == 10  # 2 files per issue, 4 to publish
    final = state(reference)
    # What a reader may see between calls: the state after each call of the child, in order.
    steps: list[dict] = [{}]
    partial = tmp_path / "partial"
    with Registry.open(partial) as r:
        r.issue([10, 4, 7], [[0, 1], [0, 1], [1, 1]], FP_A)
    steps.append(state(partial))
    with Registry.open(partial) as r:
        r.issue([2, 9, 4], [[0, 1], [1, 1], [0, 1]], FP_A)
    steps.append(state(partial))
    with Registry.open(partial) as r:
        r.new_version([2, 4, 7, 9, 10, 1], [[1, 0], [1, 0], [0, 0], [0, 0], [1, 0], [1, 0]], FP_B)
    steps.append(state(partial))
    steps.append(final)
    for i, point in enumerate(kill_points.points(counts, 8, seed=26)):
        folder = tmp_path / f"killed{i}"
        kill_points.kill_at([*argv, str(folder)], point, env=env)
        assert state(folder) in steps, point  # the state before or after the interrupted call, never between
        kill_points.count([*argv, str(folder)], env=env)  # the rerun takes the lock the killed run held
        assert state(folder) == final, point
        leftovers = sorted(p.name for p in folder.iterdir())
        assert leftovers == sorted(p.name for p in reference.iterdir()), point


# --- hostile folders -----------------------------------------------------------------------------------------------------


def issued_folder(folder: Path) -> Path:
    with Registry.open(folder) as registry:
        registry.issue([1, 2], [[0], [0]], FP_A)
    return folder


def test_a_changed_batch_file_is_refused(tmp_path: Path) -> None:
    folder = issued_folder(tmp_path)
    batch = next(folder.glob("ids-*.parquet"))
    pl.DataFrame({"id": [1, 2], "codes": [[0], [0]], "suffix": [1, 0], "id_version": [1, 1]}).with_columns(
        pl.col("codes").cast(pl.Array(pl.UInt32, 1)), pl.col("suffix", "id_version").cast(pl.UInt32)
    ).write_parquet(batch)
    with pytest.raises(StateError, match=r"does not hash to the sha256 the manifest records; expected the file"):
        Registry.open(folder, write=False)
    batch.unlink()
    with pytest.raises(StateError, match=r"is missing \(or not a regular file\) but the manifest lists it"):
        Registry.open(folder, write=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other"), r"has format='other'"),
        (lambda m: m.update(levels=0), r"has levels=0"),
        (lambda m: m.update(id_dtype="Object"), r"has id_dtype='Object'"),
        (lambda m: m["versions"][0].update(codebook_fingerprint="x"), r"has versions\[0\]="),
        (lambda m: m.update(current_version=2), r"a current_version that is not the last"),
        (lambda m: m["batches"][0].update(file="../../etc/passwd"), r"has a file entry"),
        (lambda m: m["batches"][0].update(rows=-1), r"has a file entry"),
    ],
)
def test_a_manifest_the_registry_did_not_write_is_refused(tmp_path: Path, edit, message) -> None:
    folder = issued_folder(tmp_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StateError, match=message):
        Registry.open(folder, write=False)


def test_a_manifest_that_is_no_json_object_or_a_symlink_is_refused(tmp_path: Path) -> None:
    folder = issued_folder(tmp_path)
    (folder / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(StateError, match=r"holds a JSON list, not an object"):
        Registry.open(folder, write=False)
    (folder / MANIFEST_NAME).write_text("{nope")
    with pytest.raises(StateError, match=r"is not valid JSON"):
        Registry.open(folder, write=False)
    (folder / MANIFEST_NAME).unlink()
    (folder / MANIFEST_NAME).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(StateError, match=r"is a symlink \(never followed\)"):
        Registry.open(folder)


def test_leftovers_of_an_interrupted_write_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    folder = issued_folder(tmp_path)
    orphan = folder / "ids-v000001-b000002.parquet"
    orphan.write_bytes(b"half a batch")
    stranger = folder / "notes.txt"
    stranger.write_text("kept")
    Registry.open(folder, write=False).close()
    assert orphan.exists()  # a reader removes nothing
    Registry.open(folder).close()
    assert not orphan.exists() and stranger.exists()


# --- the guide's example -------------------------------------------------------------------------------------------------


def test_the_guide_example_runs(tmp_path: Path, monkeypatch) -> None:
    page = (ROOT / "docs" / "guide" / "semantic-ids.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "semantic-ids.md", "exec"), scope)
    issued = {tuple(c) + (s,) for c, s in Registry.open("ids", write=False).frame().select("codes", "suffix").rows()}
    assert len(issued) == 2000 and scope["suffix"].shape == (2000,)
    for beam, code_1 in zip(scope["beams"].tolist(), scope["next_code"].tolist(), strict=True):
        assert any(full[:2] == (beam[0], code_1) for full in issued)
