"""The scheduled pipeline with semantic ids through an id registry: runs with new items each day and a
refit, under id_policy keep and publish."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.datasets import load_digits

from vq_pipeline.codebook import Codebook
from vq_pipeline.errors import InvalidInputError
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs import workdir
from vq_pipeline.jobs.registry import Registry, load_prefix_table
from vq_pipeline.jobs.scheduled import run_once
from vq_pipeline.settings import PipelineSettings

DAYS = 4
REFIT_DAY = 2  # the run of this day refits (refit_every_hours=0)


@pytest.fixture(scope="module")
def days() -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, rows) per day: new items each day, with ids below and above the earlier ones; the later
    days' rows shifted, so that a refit moves codes."""
    x = load_digits().data.astype("float32")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))[: 4 * 300]
    ids = rng.permutation(100_000)[: len(order)]
    out = []
    for d in range(DAYS):
        part = slice(d * 300, (d + 1) * 300)
        rows = x[order[part]] + (3.0 * (d >= REFIT_DAY))
        out.append((ids[part], rows))
    return out


def settings_for(policy: str, refit: bool) -> PipelineSettings:
    return PipelineSettings(
        column="embedding",
        n_codes=4,
        id_column="id",
        codec="residual",
        levels=2,
        unique=True,
        id_registry=True,
        id_policy=policy,
        refit_every_hours=0 if refit else None,
        drift_threshold=100.0,
        usage_threshold=None,
    )


def registry_ids(work: Path, version: int | None = None) -> dict[int, tuple]:
    with Registry.open(workdir.ids_dir(work) / "registry", id_column="id", write=False) as reg:
        f = reg.frame(version)
    return {i: (*c, s) for i, c, s in zip(f["id"], f["codes"].to_list(), f["suffix"])}


def folder_ids(codes_dir: str) -> dict[int, tuple]:
    f = pl.read_parquet(f"{codes_dir}/**/*.parquet", hive_partitioning=False)
    return {i: (*c, s) for i, c, s in zip(f["id"], f["codes"].to_list(), f["suffix"])}


def run_days(tmp_path: Path, days: list, policy: str) -> list[dict]:
    summaries = []
    for d, (ids, rows) in enumerate(days):
        write_embeddings(tmp_path / "in" / f"day={d}" / "part.parquet", ids, rows)
        summaries.append(run_once(tmp_path / "in", tmp_path / "work", settings_for(policy, d == REFIT_DAY)))
    return summaries


def test_keep_never_changes_an_issued_id_across_a_refit(tmp_path: Path, days: list) -> None:
    work = tmp_path / "work"
    issued: dict[int, tuple] = {}
    for d, (ids, rows) in enumerate(days):
        write_embeddings(tmp_path / "in" / f"day={d}" / "part.parquet", ids, rows)
        s = run_once(tmp_path / "in", work, settings_for("keep", d == REFIT_DAY))
        found = registry_ids(work)
        assert {i: found[i] for i in issued} == issued, f"day {d}: an issued id changed"
        assert set(found) == {int(i) for ids_, _ in days[: d + 1] for i in ids_}
        ids = s["ids"]
        assert ids["id_version"] == 1 and ids["policy"] == "keep"
        assert ids["issued"] == len(found) - len(issued)
        if d == 0:
            first = s["fingerprint"]
        assert ids["codebook_fingerprint"] == first  # the first codebook issues every id
        assert folder_ids(ids["codes_dir"]) == found  # its codes folder carries the registry's ids
        if d >= REFIT_DAY:
            assert s["fingerprint"] != first and ids["applied"] == "keep"
            assert s["codes_dir"] != ids["codes_dir"]
        issued = found
    report = Path(s["report"]).read_text()
    assert "kept id version 1 (policy keep)" in report


def test_publish_publishes_a_new_version_with_right_maps(tmp_path: Path, days: list) -> None:
    work = tmp_path / "work"
    summaries = run_days(tmp_path, days[: REFIT_DAY], "publish")
    v1 = registry_ids(work)
    assert summaries[-1]["ids"]["id_version"] == 1
    write_embeddings(tmp_path / "in" / f"day={REFIT_DAY}" / "part.parquet", *days[REFIT_DAY])
    s = run_once(tmp_path / "in", work, settings_for("publish", True))
    assert s["action"] == "refit"
    ids = s["ids"]
    assert ids["applied"] == "publish" and ids["id_version"] == 2
    assert ids["codebook_fingerprint"] == s["fingerprint"] and ids["codes_dir"] == s["codes_dir"]
    v2 = registry_ids(work)
    # the previous version stays readable: its issued ids unchanged, the day's new items issued by the old
    # codebook before the refit
    before, v1 = v1, registry_ids(work, 1)
    assert {i: v1[i] for i in before} == before and len(v1) == 3 * len(days[0][0])
    assert folder_ids(s["codes_dir"]) == v2  # the new codebook's codes carry version 2
    # version 2: every item re-encoded by the new codebook, suffixes in issue order (v1's order, then new by id)
    cb = Codebook.load(s["codebook"])
    every = pl.read_parquet(f"{s['codes_dir']}/**/*.parquet", hive_partitioning=False)
    assert every.height == len(v2)
    with Registry.open(workdir.ids_dir(work) / "registry", id_column="id", write=False) as reg:
        order = [*reg.frame(1)["id"].to_list()]
        items, prefixes = reg.version_map(2)
    new = sorted(set(v2) - set(order))
    seen: dict[tuple, int] = {}
    for i in [*order, *new]:
        tup = v2[i][:-1]
        assert v2[i][-1] == seen.get(tup, 0)
        seen[tup] = seen.get(tup, 0) + 1
    # the item map: old (v1) -> new (v2) for every v1 item; the prefix map counts them per prefix
    assert items.height == len(v1)
    for row in items.iter_rows(named=True):
        assert (*row["old_codes"], row["old_suffix"]) == v1[row["id"]]
        assert (*row["new_codes"], row["new_suffix"]) == v2[row["id"]]
    for level in (1, 2):
        want: dict[tuple, int] = {}
        for i in v1:
            key = (tuple(v1[i][:level]), tuple(v2[i][:level]))
            want[key] = want.get(key, 0) + 1
        got = prefixes.filter(pl.col("level") == level)
        assert {(tuple(a), tuple(b)): n for a, b, n in got.select("old_prefix", "new_prefix", "n_items").iter_rows()} == want
    moved = sum(v1[i] != v2[i] for i in v1)
    assert s["ids"]["published"]["n_moved"] == moved
    # both versions' prefix tables are kept, each fingerprinted to its codebook
    load_prefix_table(workdir.ids_dir(work) / "prefix-v1.safetensors", id_version=1)
    load_prefix_table(workdir.ids_dir(work) / "prefix-v2.safetensors", codebook_fingerprint=cb.fingerprint, id_version=2)
    assert "published id version 2 (policy publish)" in Path(s["report"]).read_text()
    # the next day: new items issued under version 2, the issued ones unchanged
    write_embeddings(tmp_path / "in" / f"day={REFIT_DAY + 1}" / "part.parquet", *days[REFIT_DAY + 1])
    s = run_once(tmp_path / "in", work, settings_for("publish", False))
    after = registry_ids(work)
    assert {i: after[i] for i in v2} == v2 and s["ids"]["id_version"] == 2 and s["ids"]["applied"] is None
    assert s["ids"]["issued"] == len(days[REFIT_DAY + 1][0])


def test_settings_refusals() -> None:
    base = dict(column="embedding", n_codes=4, codec="residual", levels=2)
    with pytest.raises(InvalidInputError, match=r"id_registry=True with id_column=None; expected an id column"):
        PipelineSettings(**base, unique=True, id_registry=True)
    with pytest.raises(InvalidInputError, match=r"id_policy='publish' with id_registry=False"):
        PipelineSettings(**base, id_column="id", unique=True, id_policy="publish")
    with pytest.raises(InvalidInputError, match=r"id_policy='rename' is not supported"):
        PipelineSettings(**base, id_column="id", unique=True, id_registry=True, id_policy="rename")
    from vq_pipeline.jobs.scheduled import check_settings

    flat = dataclasses.replace(PipelineSettings(**base), codec="flat", levels=1, unique=True)
    with pytest.raises(InvalidInputError, match=r"unique=True with codec='flat'"):
        check_settings(flat)
