"""An output folder has one identity (every name of it shares one bookkeeping folder, lock and
history), nothing vq did not write is replaced, and checks that can fail run before the first byte
is written (a refused run leaves the folder byte for byte as it was)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import snapshot
from vq_pipeline import Codebook, EncodeLockedError, InvalidInputError, StateError, fit_codebook
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.encode_folder import encode_lock, encode_tables
from vq_pipeline.jobs.encode_state import manifest_path, receipt_path, state_dir, typed_state_dir
from vq_pipeline.settings import EncodeOptions, EncodeSettings

DIM = 4
ROWS = 30
KEYS = ("a.parquet", "b.parquet", "c.parquet")
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SETTINGS = EncodeSettings(column="embedding", id_column="id")

_case = itertools.count()


@pytest.fixture(scope="module")
def books() -> tuple[Codebook, Codebook]:
    x = torch.from_numpy(generate_embeddings(300, DIM, 6, seed=0))
    return fit_codebook(x, 8, seed=1), fit_codebook(x, 5, seed=2)


@pytest.fixture()
def fresh(tmp_path_factory):
    """A new empty folder per call (hypothesis runs many examples in one test)."""
    return lambda: tmp_path_factory.mktemp(f"case{next(_case)}")


def write_inputs(root: Path, keys=KEYS, *, id_base: int = 0) -> Path:
    for i, key in enumerate(keys):
        ids = np.arange(ROWS) + id_base + 1000 * i
        write_embeddings(root / key, ids, generate_embeddings(ROWS, DIM, 6, seed=10 + i + id_base))
    return root


# ----------------------------------------------------------------------------- one identity per folder


def alias_of(real: Path, base: Path, form: str) -> Path:
    """Another name of the folder ``real`` (which lies in ``base``)."""
    if form == "typed":
        return real
    if form == "dotdot":
        return real / ".." / real.name
    if form == "dot":
        return real.parent / "." / real.name
    if form == "link":
        link = base / f"link-{next(_case)}"
        link.symlink_to(real, target_is_directory=True)
        return link
    if form == "relative-link":
        link = base / f"rel-{next(_case)}"
        link.symlink_to(real.name, target_is_directory=True)
        return link
    if form == "linked-parent":
        parent = base / f"parent-{next(_case)}"
        parent.symlink_to(real.parent, target_is_directory=True)
        return parent / real.name
    raise AssertionError(form)


FORMS = ["typed", "dotdot", "dot", "link", "relative-link", "linked-parent"]


@FEW
@given(first=st.sampled_from(FORMS), second=st.sampled_from(FORMS))
def test_every_name_of_a_folder_has_one_bookkeeping_folder_and_one_lock(fresh, first: str, second: str) -> None:
    base = fresh()
    real = base / "codes"
    real.mkdir()
    one, two = alias_of(real, base, first), alias_of(real, base, second)
    assert state_dir(one) == state_dir(two) == base.resolve() / "codes.vq"
    with encode_lock(one, inputs=[]):
        with pytest.raises(EncodeLockedError, match="locked by another run"):
            with encode_lock(two, inputs=[]):
                pass  # pragma: no cover - the lock is held


def test_an_encode_through_a_symlink_and_one_through_the_folder_share_one_history(tmp_path: Path, books) -> None:
    a, b = books
    data = write_inputs(tmp_path / "data")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    encode_tables([data], a, tmp_path / "alias", SETTINGS)
    assert not (tmp_path / "alias.vq").exists() and manifest_path(real).is_file()
    before = snapshot(real)
    with pytest.raises(InvalidInputError, match=r"holds codes written with codebook .*Fix: pass --overwrite"):
        encode_tables([data], b, real, SETTINGS)
    assert snapshot(real) == before, "B's codes did not replace A's"
    again = encode_tables([data], a, real, SETTINGS)
    assert again.encoded == [] and sorted(again.skipped) == list(KEYS), "the run through the alias is this folder's"


def test_codes_current_is_the_folder_it_points_at(tmp_path: Path, books) -> None:
    a, b = books
    data = write_inputs(tmp_path / "data")
    codes = tmp_path / "work" / "codes"
    encode_tables([data], a, codes / "v1", SETTINGS)
    (codes / "current").symlink_to("v1", target_is_directory=True)
    before = snapshot(codes / "v1")
    with pytest.raises(InvalidInputError, match="holds codes written with codebook"):
        encode_tables([data], b, codes / "current", SETTINGS)
    assert snapshot(codes / "v1") == before
    assert not (codes / "current.vq").exists()


def test_bookkeeping_an_earlier_version_kept_beside_a_symlink_is_named_with_the_fix(tmp_path: Path, books) -> None:
    a, _ = books
    data = write_inputs(tmp_path / "data")
    real = tmp_path / "real"
    encode_tables([data], a, real, SETTINGS)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    os.replace(state_dir(real), typed_state_dir(tmp_path / "alias"))  # where the alias's bookkeeping used to go
    with pytest.raises(StateError, match=r"alias\.vq.*Fix: move .*alias\.vq.* to .*real\.vq"):
        encode_tables([data], a, tmp_path / "alias", SETTINGS)
    os.replace(typed_state_dir(tmp_path / "alias"), state_dir(real))  # the advised fix
    assert encode_tables([data], a, tmp_path / "alias", SETTINGS).encoded == []


# ----------------------------------------------------------------------------- nothing foreign replaced


def test_a_foreign_file_under_an_output_name_is_refused_and_nothing_is_written(tmp_path: Path, books) -> None:
    a, _ = books
    data = write_inputs(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    pl.DataFrame({"id": [1, 2], "mine": ["x", "y"]}).write_parquet(out / "b.parquet")
    before = snapshot(out)
    with pytest.raises(StateError, match=r"b\.parquet' was not written by vq-pipeline .*Fix: move or delete"):
        encode_tables([data], a, out, SETTINGS)
    assert snapshot(out) == before
    assert not state_dir(out).exists(), "the bookkeeping folder the refused run created is gone"


def test_a_folder_under_an_output_name_is_refused(tmp_path: Path, books) -> None:
    a, _ = books
    data = write_inputs(tmp_path / "data")
    (tmp_path / "out" / "a.parquet").mkdir(parents=True)
    with pytest.raises(StateError, match=r"a\.parquet' is not a regular file"):
        encode_tables([data], a, tmp_path / "out", SETTINGS)


SLOTS = ["absent", "foreign", "ours", "damaged"]


@FEW
@given(
    slots=st.tuples(*[st.sampled_from(SLOTS)] * len(KEYS)),
    stale=st.booleans(),
    extra_foreign=st.booleans(),
    overwrite=st.booleans(),
)
def test_folders_mixing_receipted_foreign_and_stale_files(
    fresh, books, slots: tuple[str, ...], stale: bool, extra_foreign: bool, overwrite: bool
) -> None:
    """Whatever the folder holds, a run either refuses before writing a byte (exactly when a file that no
    receipt records sits under one of its output names) or ends with every output equal to a clean run's,
    every foreign file byte-identical and every stale output kept."""
    a, _ = books
    base = fresh()
    data_all = write_inputs(base / "all", (*KEYS, "old.parquet"))
    data = base / "run"
    data.mkdir()
    for key in KEYS:
        shutil.copy(data_all / key, data / key)
    reference = base / "reference"
    encode_tables([data_all], a, reference, SETTINGS)
    out = base / "out"
    out.mkdir()
    (state_dir(out) / "receipts").mkdir(parents=True)
    pl.DataFrame({"id": [7], "theirs": [1.5]}).write_parquet(base / "foreign.parquet")
    foreign_bytes = (base / "foreign.parquet").read_bytes()
    for key, slot in zip(KEYS, slots):
        if slot == "foreign":
            (out / key).write_bytes(foreign_bytes)
        elif slot in ("ours", "damaged"):
            shutil.copy(receipt_path(reference, key), receipt_path(out, key))
            shutil.copy(reference / key, out / key)
            if slot == "damaged":
                (out / key).write_bytes(b"not parquet any more")
    if stale:
        shutil.copy(receipt_path(reference, "old.parquet"), receipt_path(out, "old.parquet"))
        shutil.copy(reference / "old.parquet", out / "old.parquet")
    if extra_foreign:
        (out / "zz.parquet").write_bytes(foreign_bytes)
    before = snapshot(out)
    options = EncodeOptions(overwrite=overwrite)
    if "foreign" in slots:
        with pytest.raises(StateError, match="was not written by vq-pipeline"):
            encode_tables([data], a, out, SETTINGS, options)
        assert snapshot(out) == before
        return
    result = encode_tables([data], a, out, SETTINGS, options)
    for key in KEYS:
        assert (out / key).read_bytes() == (reference / key).read_bytes()
    assert sorted(result.encoded) == [k for k, s in zip(KEYS, slots) if s != "ours"]
    if stale:
        assert result.stale == ["old.parquet"] and (out / "old.parquet").read_bytes() == (reference / "old.parquet").read_bytes()
    if extra_foreign:
        assert (out / "zz.parquet").read_bytes() == foreign_bytes and result.unrecorded == ["zz.parquet"]


def test_a_run_killed_between_receipt_and_output_resumes(tmp_path: Path, books) -> None:
    """The receipt is written before its output replaces anything: a run that stopped in between (the
    receipt is there, the output is not yet) leaves nothing a rerun would take for a foreign file."""
    a, _ = books
    data = write_inputs(tmp_path / "data")
    out = tmp_path / "out"
    encode_tables([data], a, out, SETTINGS)
    clean = snapshot(out)
    (out / "b.parquet").unlink()  # as if killed after the receipt and before the rename
    again = encode_tables([data], a, out, SETTINGS)
    assert again.encoded == ["b.parquet"] and snapshot(out) == clean


# ----------------------------------------------------------------------------- checks before writes


@pytest.fixture(scope="module")
def residual() -> Codebook:
    x = torch.from_numpy(generate_embeddings(300, DIM, 6, seed=0))
    return fit_codebook(x, 4, codec="residual", levels=2, seed=0)


def test_unique_ids_clashing_with_a_kept_output_are_refused_before_any_write(tmp_path: Path, residual) -> None:
    unique = EncodeSettings(column="embedding", id_column="id", unique=True)
    out = tmp_path / "out"
    encode_tables([write_inputs(tmp_path / "day1", ("day1.parquet",))], residual, out, unique)
    before = snapshot(out)
    day2 = write_inputs(tmp_path / "day2", ("day2.parquet",))  # the same ids as day1: a clash
    with pytest.raises(InvalidInputError, match=r"already in output .*day1\.parquet.*Fix: pass --prune"):
        encode_tables([day2], residual, out, unique)
    assert snapshot(out) == before, "nothing written: no output with null suffixes, the same manifest"
    again = encode_tables([day2], residual, out, unique, EncodeOptions(prune=True))
    assert again.pruned == ["day1.parquet"]
    frame = pl.read_parquet(out / "day2.parquet")
    assert frame["suffix"].null_count() == 0 and frame.select("codes", "suffix").n_unique() == ROWS


def test_unique_ids_of_another_type_than_a_kept_output_are_refused_before_any_write(tmp_path: Path, residual) -> None:
    unique = EncodeSettings(column="embedding", id_column="id", unique=True)
    out = tmp_path / "out"
    encode_tables([write_inputs(tmp_path / "day1", ("day1.parquet",))], residual, out, unique)
    before = snapshot(out)
    day2 = tmp_path / "day2"
    day2.mkdir()
    x = generate_embeddings(ROWS, DIM, 6, seed=3)
    pl.DataFrame({"id": [f"item-{i}" for i in range(ROWS)], "embedding": x.tolist()}).with_columns(
        pl.col("embedding").cast(pl.Array(pl.Float32, DIM))
    ).write_parquet(day2 / "day2.parquet")
    with pytest.raises(InvalidInputError, match=r"is String in the inputs but Int64 in output"):
        encode_tables([day2], residual, out, unique)
    assert snapshot(out) == before


def test_a_refused_overwrite_run_deletes_nothing(tmp_path: Path, books) -> None:
    """With overwrite, the other codebook's outputs are removed only once every check has passed."""
    a, b = books
    data = write_inputs(tmp_path / "data")
    out = tmp_path / "out"
    encode_tables([data], a, out, SETTINGS)
    (out / "a.parquet").unlink()
    (out / "a.parquet").write_bytes(b"someone else's")
    os.remove(receipt_path(out, "a.parquet"))
    before = snapshot(out)
    with pytest.raises(StateError, match="was not written by vq-pipeline"):
        encode_tables([data], b, out, SETTINGS, EncodeOptions(overwrite=True))
    assert snapshot(out) == before
    assert json.loads(manifest_path(out).read_text())["codebook_fingerprint"] == a.fingerprint


# ----------------------------------------------------------------------------- names are bytes on disk


def test_a_file_name_that_is_not_utf8_is_fitted_encoded_and_suffixed(tmp_path: Path, residual) -> None:
    """A name is bytes on disk; one that is not UTF-8 is a valid table, not a corrupt one."""
    from vq_pipeline.jobs.fit_tables import fit_from_tables
    from vq_pipeline.settings import TableSettings

    data = tmp_path / "data"
    data.mkdir()
    odd = os.fsdecode(os.fsencode(data) + b"/caf\xe9.parquet")  # Latin-1 bytes: not UTF-8
    x = generate_embeddings(ROWS, DIM, 6, seed=4)
    write_embeddings(odd, np.arange(ROWS), x)
    write_inputs(data, ("plain.parquet",), id_base=ROWS)
    fitted = fit_from_tables([data], 4, TableSettings(column="embedding"))
    assert fitted.stats["n_rows"] == 2 * ROWS
    out = tmp_path / "out"
    unique = EncodeSettings(column="embedding", id_column="id", unique=True)
    result = encode_tables([data], residual, out, unique)
    assert sorted(os.listdir(os.fsencode(out))) == [b"caf\xe9.parquet", b"plain.parquet"]
    mine = pl.read_parquet(open(os.path.join(out, "caf\udce9.parquet"), "rb"))
    np.testing.assert_array_equal(mine["codes"].to_numpy(), residual.encode(torch.from_numpy(x)).numpy())
    assert result.semantic_ids["n_rows"] == 2 * ROWS and mine["suffix"].null_count() == 0
    assert encode_tables([data], residual, out, unique).encoded == [], "a rerun finds its receipts"


def test_a_multilevel_encode_names_the_column_and_the_absolute_row(tmp_path: Path, residual) -> None:
    data = tmp_path / "data"
    x = generate_embeddings(1000, DIM, 6, seed=5)
    x[777, 3] = np.nan
    write_embeddings(data / "a.parquet", np.arange(1000), x)
    with pytest.raises(InvalidInputError, match=r"a\.parquet: embedding\[777, 3\]=nan"):
        encode_tables([data], residual, tmp_path / "out", SETTINGS, EncodeOptions(batch_rows=500))
    assert not (tmp_path / "out").exists(), "a refused first run leaves no folder behind"


def test_a_work_dir_and_a_codebook_file_have_one_lock_whatever_their_name(tmp_path: Path) -> None:
    from vq_pipeline import OutputLockedError
    from vq_pipeline.io.paths import output_lock
    from vq_pipeline.jobs import workdir

    real = tmp_path / "work"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    with workdir.lock(tmp_path / "alias"):
        with pytest.raises(EncodeLockedError, match="locked by another run"):
            with workdir.lock(real / "sub" / ".."):
                pass  # pragma: no cover - the lock is held
    with output_lock(tmp_path / "alias" / "cb.safetensors", what="codebook"):
        with pytest.raises(OutputLockedError, match="being written by another run"):
            with output_lock(real / "cb.safetensors", what="codebook"):
                pass  # pragma: no cover - the lock is held
