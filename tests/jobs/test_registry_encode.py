"""``unique`` encode runs with an id registry (``id_registry``): issued ids never change over runs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import encode_folder, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kill_points import CHILD_PRELUDE, count, kill_at, points
from sklearn.datasets import load_digits

from vq_pipeline import fit_codebook
from vq_pipeline.errors import InvalidInputError, StateError
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.io.tables import read_table
from vq_pipeline.jobs.encode_state import prefix_table_path, registry_dir
from vq_pipeline.jobs.registry import Registry, load_prefix_table
from vq_pipeline.settings import EncodeSettings

KW = dict(column="embedding", id_column="id", unique=True)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().data.astype("float32")  # (1797, 64)


@pytest.fixture(scope="module")
def book(digits: np.ndarray):
    return fit_codebook(digits, 4, codec="residual", levels=2, seed=0)  # 16 tuples: many items share one


def read_folder(out: Path) -> pl.DataFrame:
    return pl.concat([read_table(p) for p in sorted(out.glob("*.parquet"))]).sort("id")


def full_ids(frame: pl.DataFrame) -> dict[int, tuple]:
    return {i: (*c, s) for i, c, s in zip(frame["id"], frame["codes"].to_list(), frame["suffix"])}


def registry_oracle(issued: dict[int, tuple], ids: np.ndarray, codes: np.ndarray) -> dict[int, tuple]:
    """The ids of one run, append-only: issued items keep theirs; new ones, by id, take the next free
    suffix of their tuple (one more than the largest issued for it)."""
    out = dict(issued)
    for i in sorted(int(i) for i in ids if int(i) not in issued):
        tup = tuple(int(c) for c in codes[list(ids).index(i)])
        taken = [v[-1] for v in out.values() if v[:-1] == tup]
        out[i] = (*tup, max(taken) + 1 if taken else 0)
    return out


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    days=st.lists(st.integers(20, 120), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_issued_ids_never_change_over_days(tmp_path_factory, digits: np.ndarray, book, days: list[int], seed: int) -> None:
    """New files each day, with ids drawn from one range (new ids often smaller than issued ones): after
    every run, 100% of the ids issued before are unchanged, and the new ones follow the oracle."""
    tmp = tmp_path_factory.mktemp("days")
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10_000)[: sum(days)]  # unique over the days, in no order
    rows = rng.choice(len(digits), size=sum(days), replace=False)
    codes = np.asarray(book.encode(digits[rows]))
    issued: dict[int, tuple] = {}
    start = 0
    for day, n in enumerate(days):
        part = slice(start, start + n)
        start += n
        write_embeddings(tmp / f"day{day}" / f"part{day}.parquet", ids[part], digits[rows[part]])
        result = encode_folder([tmp / f"day{day}"], book, tmp / "out", id_registry=True, **KW)
        found = full_ids(read_folder(tmp / "out"))
        assert {i: found[i] for i in issued} == issued, f"day {day}: an issued id changed"
        want = registry_oracle(issued, ids[: start], codes[: start])
        assert found == want
        assert len(set(found.values())) == len(found)  # unique full ids over the folder
        reg = result.semantic_ids["id_registry"]
        assert (reg["issued"], reg["kept"], reg["id_version"]) == (n, start - n, 1)
        issued = found
    # the prefix table of the id version finds every item, and only them
    table = load_prefix_table(prefix_table_path(registry_dir(tmp / "out"), 1), codebook_fingerprint=book.fingerprint)
    frame = Registry.open(registry_dir(tmp / "out"), write=False).frame()
    import torch

    rows_found, bounds = table.items(torch.tensor([list(issued[i]) for i in frame["id"]], dtype=torch.int64))
    assert rows_found.tolist() == list(range(frame.height)) and bounds.tolist() == list(range(frame.height + 1))


def test_without_the_registry_a_smaller_new_id_renumbers_and_with_it_nothing_moves(
    tmp_path: Path, digits: np.ndarray, book
) -> None:
    """The case of the issue: day 2 brings items with smaller ids than day 1's and the same codes."""
    x = digits[:200]
    write_embeddings(tmp_path / "d1" / "a.parquet", np.arange(1000, 1100), x[:100])
    write_embeddings(tmp_path / "d2" / "b.parquet", np.arange(0, 100), x[100:])
    for registry in (False, True):
        out = tmp_path / f"out{int(registry)}"
        encode_folder([tmp_path / "d1"], book, out, id_registry=registry, **KW)
        before = full_ids(read_folder(out))
        encode_folder([tmp_path / "d2"], book, out, id_registry=registry, **KW)
        after = full_ids(read_folder(out))
        moved = sum(after[i] != before[i] for i in before)
        assert (moved > 0) == (not registry)


def test_first_run_with_the_registry_adopts_the_existing_suffixes(tmp_path: Path, digits: np.ndarray, book) -> None:
    write_embeddings(tmp_path / "d1" / "a.parquet", np.arange(500, 800), digits[:300])
    write_embeddings(tmp_path / "d2" / "b.parquet", np.arange(0, 300), digits[300:600])
    out = tmp_path / "out"
    encode_folder([tmp_path / "d1"], book, out, **KW)  # --unique alone: suffixes ranked over the folder
    before = full_ids(read_folder(out))
    result = encode_folder([tmp_path / "d2"], book, out, id_registry=True, **KW)
    after = full_ids(read_folder(out))
    assert {i: after[i] for i in before} == before
    reg = result.semantic_ids["id_registry"]
    assert (reg["adopted"], reg["issued"], reg["kept"], reg["id_version"]) == (300, 300, 300, 1)
    with Registry.open(registry_dir(out), write=False) as r:
        assert r.manifest["versions"][0]["origin"] == "adopt"
        assert r.frame().height == 600
    again = encode_folder([tmp_path / "d2"], book, out, id_registry=True, **KW)  # a finished run: nothing moves
    assert again.encoded == [] and again.semantic_ids["id_registry"]["issued"] == 0
    assert full_ids(read_folder(out)) == after


def test_refusals(tmp_path: Path, digits: np.ndarray, book) -> None:
    with pytest.raises(InvalidInputError, match=r"id_registry=True with id_column=None; expected an id column"):
        EncodeSettings("embedding", unique=True, id_registry=True)
    with pytest.raises(InvalidInputError, match=r"id_registry=True with unique=False"):
        EncodeSettings("embedding", id_column="id", id_registry=True)
    write_embeddings(tmp_path / "d1" / "a.parquet", np.arange(100), digits[:100])
    out = tmp_path / "out"
    encode_folder([tmp_path / "d1"], book, out, id_registry=True, **KW)
    want = snapshot(out)
    # the registry issued the folder's ids: a run without it would rank them again
    with pytest.raises(InvalidInputError, match=r"has an id registry .* but id_registry=False"):
        encode_folder([tmp_path / "d1"], book, out, **KW)
    # another codebook did not issue the id version: refused before any work, even with overwrite
    other = fit_codebook(digits, 4, codec="residual", levels=2, seed=1)
    with pytest.raises(StateError, match=r"did not issue the current id version 1 of the id registry"):
        encode_folder([tmp_path / "d1"], other, out, id_registry=True, overwrite=True, **KW)
    assert snapshot(out) == want


CHILD = CHILD_PRELUDE + """
from vq_pipeline.jobs.encode_folder import EncodeEvents, encode_tables
from vq_pipeline.settings import EncodeOptions, EncodeSettings
settings = EncodeSettings("embedding", id_column="id", unique=True, id_registry=True)
encode_tables([sys.argv[1]], sys.argv[2], sys.argv[3], settings, EncodeOptions(batch_rows=64), events=EncodeEvents(rows=at_step))
finish()
"""


@pytest.mark.slow
def test_kill_nine_then_resume_converges(tmp_path: Path, digits: np.ndarray, book) -> None:
    """Day 2 of a folder with a registry, killed at chosen points (registry append, suffix rewrites,
    manifest), then rerun: the folder and its registry end as an uninterrupted run leaves them."""
    codebook = tmp_path / "cb.safetensors"
    book.save(codebook)
    write_embeddings(tmp_path / "d1" / "a.parquet", np.arange(1000, 1600), digits[:600])
    for i in range(3):
        write_embeddings(tmp_path / "d2" / f"b{i}.parquet", np.arange(i * 200, i * 200 + 200), digits[600 + i * 200 : 800 + i * 200])
    base = tmp_path / "base"
    encode_folder([tmp_path / "d1"], codebook, base, id_registry=True, **KW)

    def fresh(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(base, out)
        shutil.copytree(str(base) + ".vq", str(out) + ".vq")
        return out

    reference = fresh("reference")
    encode_folder([tmp_path / "d2"], codebook, reference, id_registry=True, **KW)
    want = snapshot(reference)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = [sys.executable, "-c", CHILD, str(tmp_path / "d2"), str(codebook)]
    counted = count([*child, str(fresh("counted"))], env=env)
    assert snapshot(tmp_path / "counted") == want, "the child's run differs from this process's"
    # The run's last renames: the registry's batch file and manifest, the prefix table, three per rewritten
    # output (receipt with pending_sha256, output, receipt), the folder's manifest.
    n = counted["replace"]
    appended = f"after-replace:{n - 11}"  # the registry holds the new ids; no output has them yet
    chosen = [f"before-replace:{n - 11}", appended, f"after-replace:{n - 12}", f"after-replace:{n - 7}"]
    chosen += [p for p in points(counted, 4, seed=3) if p not in chosen]
    for point in chosen:
        out = fresh(point.replace(":", "-"))
        kill_at([*child, str(out)], point, env=env)
        if point == appended:
            with Registry.open(registry_dir(out), write=False) as r:
                assert r.frame().height == 1200
            assert all(read_table(p)["suffix"].null_count() == 200 for p in sorted(out.glob("b*.parquet")))
        encode_folder([tmp_path / "d2"], codebook, out, id_registry=True, **KW)
        assert snapshot(out) == want, f"{point}: resumed run differs from the uninterrupted one"


def test_vq_encode_id_registry(tmp_path: Path, digits: np.ndarray, book, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line: ``vq encode --unique --id-registry`` over two days, and its refusal of row positions."""
    import json

    from vq_flows import cli

    book.save(tmp_path / "cb.safetensors")
    write_embeddings(tmp_path / "d1" / "a.parquet", np.arange(100, 400), digits[:300])
    write_embeddings(tmp_path / "d2" / "b.parquet", np.arange(0, 100), digits[300:400])
    common = ["--codebook", str(tmp_path / "cb.safetensors"), "--column", "embedding", "--out", str(tmp_path / "out")]
    results = []
    for day in ("d1", "d2"):
        capsys.readouterr()
        code = cli.main(["encode", str(tmp_path / day), *common, "--id-column", "id", "--unique", "--id-registry", "--json", "--quiet"])
        out, err = capsys.readouterr()
        assert code == 0, err
        results.append(json.loads(out)["semantic_ids"]["id_registry"])
    assert [(r["id_version"], r["issued"], r["kept"]) for r in results] == [(1, 300, 0), (1, 100, 300)]
    assert Path(results[1]["prefix_table"]).is_file()
    capsys.readouterr()
    code = cli.main(["encode", str(tmp_path / "d2"), *common, "--unique", "--id-registry", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "id_registry=True with id_column=None; expected an id column" in err
