"""The encode output folder and the work_dir trust nothing they find: paths read from receipts,
manifests and pointers stay inside their folder, locks and temporaries never follow symlinks, only
files this package created are deleted, outputs map one-to-one to inputs, and the manifest lists
exactly the output files in the folder."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_pipeline import (
    Codebook,
    EncodeLockedError,
    InvalidInputError,
    OutputLockedError,
    PipelineStateError,
    StateError,
    fit_codebook,
)
from vq_pipeline.io.fileio import atomic_write, atomic_write_bytes, canonical_json
from vq_pipeline.io.paths import lock_path, output_lock
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs import workdir
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.encode_folder import encode_lock, encode_tables
from vq_pipeline.jobs.encode_state import LOCK_NAME, manifest_path, state_dir
from vq_pipeline.settings import EncodeOptions, EncodeSettings

DIM = 4
N_ROWS = 40
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
OUR_TEMPORARY = re.compile(r"\.vq-[0-9a-f]{16}\.tmp")


@pytest.fixture(scope="module")
def codebooks() -> tuple[Codebook, Codebook]:
    x = torch.from_numpy(generate_embeddings(400, DIM, 6, seed=0))
    return fit_codebook(x, 6, seed=1), fit_codebook(x, 5, seed=2)


_case = itertools.count()


@pytest.fixture()
def fresh(tmp_path_factory):
    """A new empty folder per call (hypothesis runs many examples in one test)."""
    return lambda: tmp_path_factory.mktemp(f"case{next(_case)}")


def write_part(path: Path, seed: int, *, ipc: bool = False) -> Path:
    x = generate_embeddings(N_ROWS, DIM, 6, seed=seed)
    ids = np.arange(N_ROWS) + 1000 * seed
    if ipc:
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"id": ids, "embedding": np.ascontiguousarray(x, dtype=np.float32)}).write_ipc(path)
        return path
    return write_embeddings(path, ids, x)


def files_under(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (a symlink as its target text, never followed), for before/after checks."""
    found: dict[str, bytes | str] = {}
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            found[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes()
    return found


def receipt_name(key: str) -> str:
    return f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


# ----------------------------------------------------------------------------- 1. paths found in files

ESCAPES = ["absolute", "dotdot", "dotdot-inside", "symlinked-file", "symlinked-folder"]
PLANTED_IN = ["receipt", "old-receipt", "manifest", "old-manifest"]


@FEW
@given(escape=st.sampled_from(ESCAPES), planted=st.sampled_from(PLANTED_IN), foreign=st.booleans(), overwrite=st.booleans())
def test_an_output_path_that_leads_out_of_the_folder_is_refused_and_nothing_is_deleted(
    codebooks, fresh, escape: str, planted: str, foreign: bool, overwrite: bool
) -> None:
    cb, other = codebooks
    case = fresh()
    root, out, outside = case / "in", case / "out", case / "outside"
    write_part(root / "a.parquet", 1)
    victim = write_part(outside / "victim.parquet", 9)
    encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    output = {
        "absolute": str(victim),
        "dotdot": "../outside/victim.parquet",
        "dotdot-inside": "a/../../outside/victim.parquet",
        "symlinked-file": "link.parquet",
        "symlinked-folder": "linked/victim.parquet",
    }[escape]
    if escape == "symlinked-file":
        os.symlink(victim, out / "link.parquet")
    if escape == "symlinked-folder":
        os.symlink(outside, out / "linked")
    fp = (other if foreign else cb).fingerprint
    receipt = {
        "key": "planted.parquet",
        "input": str(root / "planted.parquet"),
        "output": output,
        "rows": N_ROWS,
        "sha256": "0" * 64,
        "codebook_fingerprint": fp,
        "settings": {"column": "embedding", "id_column": None, "top_k": 1, "with_distance": False, "keep": []},
    }
    manifest = {"format": "vq-pipeline.encode-manifest", "codebook_fingerprint": fp, "outputs": {"planted.parquet": receipt}}
    where = {
        "receipt": (state_dir(out) / "receipts" / receipt_name("planted.parquet"), receipt),
        "old-receipt": (out / ".vq" / "receipts" / receipt_name("planted.parquet"), receipt),
        "manifest": (manifest_path(out), manifest),
        "old-manifest": (out / "_manifest.json", manifest),
    }
    path, content = where[planted]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canonical_json(content))
    before_outside, before_out = files_under(outside), files_under(out)
    with pytest.raises(StateError) as info:
        encode_tables([root], other if overwrite else cb, out, EncodeSettings(column="embedding"), EncodeOptions(overwrite=overwrite))
    message = str(info.value)
    assert f"output={output!r}" in message and path.name in message and "Fix" in message, message
    assert files_under(outside) == before_outside, "a file outside the output folder was touched"
    if planted != "old-receipt":  # that one is first moved into the bookkeeping folder, nothing else changes
        assert files_under(out) == before_out


def test_a_symlinked_output_subfolder_is_refused_before_anything_is_written(codebooks, tmp_path: Path) -> None:
    cb, _ = codebooks
    root, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    write_part(root / "day=1" / "a.parquet", 1)
    outside.mkdir()
    out.mkdir()
    os.symlink(outside, out / "day=1")
    with pytest.raises(StateError, match=r"outside out_dir=.*Fix: replace the symlink"):
        encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    assert list(outside.iterdir()) == []


# ----------------------------------------------------------------------------- 2. locks and temporaries

LOCK_PLANTS = ["symlink", "dangling", "hardlink", "foreign", "fifo"]


def plant_lock(kind: str, lock: Path, case: Path) -> Path:
    """Put what is not a lock file of ours under the name ``lock``: a symlink to ``case/victim.txt`` (made
    here, returned), a dangling symlink to ``case/created-by-nobody``, a hard link to the victim, a
    file of someone else's, or a FIFO."""
    victim = case / "victim.txt"
    victim.write_text("precious\n")
    if kind == "symlink":
        os.symlink(victim, lock)
    elif kind == "dangling":
        os.symlink(case / "created-by-nobody", lock)
    elif kind == "hardlink":
        os.link(victim, lock)
    elif kind == "foreign":
        lock.write_text("precious\n")
    else:
        os.mkfifo(lock)
    return victim


@FEW
@given(which=st.sampled_from(["encode", "workdir"]), kind=st.sampled_from(LOCK_PLANTS))
def test_a_lock_that_is_not_ours_is_refused_and_never_written(fresh, which: str, kind: str) -> None:
    case = fresh()
    out = case / "out"
    lock = state_dir(out) / "lock" if which == "encode" else out / workdir.LOCK_FILE
    lock.parent.mkdir(parents=True)
    victim = plant_lock(kind, lock, case)
    holder = encode_lock(out, inputs=[]) if which == "encode" else workdir.lock(out)
    with pytest.raises(StateError) as info:
        with holder:
            pass
    assert not isinstance(info.value, EncodeLockedError)
    assert "lock=" in str(info.value) and "Fix" in str(info.value), str(info.value)
    assert victim.read_text() == "precious\n" and not (case / "created-by-nobody").exists()
    if kind == "foreign":
        assert lock.read_text() == "precious\n"
    # Our own lock, empty or with the holder note of a run that died, is reused.
    lock.unlink()
    for note in ("", "pid 12345 on some-host"):
        lock.write_text(note)
        with encode_lock(out, inputs=[]) if which == "encode" else workdir.lock(out):
            assert lock.read_text().startswith(f"pid {os.getpid()} on ")
        assert lock.read_text() == ""


#: The two kinds of lock: an output file's (hidden, beside it, removed after the run) and an encode
#: folder's (``<out>.vq/lock``, kept between runs), as (lock file, lock holder, error of a second run).
LOCKS = {
    "output": (
        lambda root: lock_path(root / "cb.safetensors"),
        lambda root: output_lock(root / "cb.safetensors", what="codebook"),
        OutputLockedError,
    ),
    "folder": (
        lambda root: state_dir(root / "codes") / LOCK_NAME,
        lambda root: encode_lock(root / "codes", inputs=[]),
        EncodeLockedError,
    ),
}


@pytest.mark.parametrize("kind", LOCK_PLANTS)
def test_output_and_folder_locks_refuse_a_planted_lock_file_alike(tmp_path: Path, kind: str) -> None:
    """Both locks are one primitive: a lock path that is a symlink (followed nowhere), a hard link, a
    FIFO or a file that is not a lock file is refused with the same message and left as it was."""
    messages = {}
    for which, (lock_of, hold, _) in LOCKS.items():
        root = tmp_path / which
        lock = lock_of(root)
        lock.parent.mkdir(parents=True)
        victim = plant_lock(kind, lock, root)
        planted = os.lstat(lock)
        with pytest.raises(StateError) as info:
            with hold(root):
                pass
        messages[which] = str(info.value).replace(str(lock), "LOCK").replace(str(root), "ROOT")
        assert messages[which].startswith("lock='LOCK' ") and "Fix: move it away" in messages[which]
        assert victim.read_text() == "precious\n" and not (root / "created-by-nobody").exists()
        now = os.lstat(lock)  # neither removed nor written
        assert (now.st_ino, now.st_mode, now.st_size, now.st_mtime_ns) == (
            planted.st_ino,
            planted.st_mode,
            planted.st_size,
            planted.st_mtime_ns,
        )
    assert messages["output"] == messages["folder"], messages


@pytest.mark.parametrize("which", sorted(LOCKS))
def test_a_held_lock_names_its_holder(tmp_path: Path, which: str) -> None:
    lock_of, hold, busy = LOCKS[which]
    lock = lock_of(tmp_path)
    note = f"pid {os.getpid()} on {os.uname().nodename}"
    with hold(tmp_path):
        assert lock.read_text() == note
        with pytest.raises(busy, match=rf"by another run \({re.escape(note)}\); expected one run per"):
            with hold(tmp_path):
                pass
        assert lock.read_text() == note  # the refused run left the holder's lock alone
    if which == "output":
        assert not lock.exists()  # a finished fit leaves nothing but its output
    else:
        assert lock.read_text() == ""  # kept for the next run, empty


def test_a_symlinked_bookkeeping_folder_is_refused(codebooks, tmp_path: Path) -> None:
    cb, _ = codebooks
    write_part(tmp_path / "in" / "a.parquet", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "lock").write_text("")
    os.symlink(elsewhere, tmp_path / "out.vq")
    with pytest.raises(StateError, match=r"is a symlink .*Fix: remove the symlink"):
        encode_tables([tmp_path / "in"], cb, tmp_path / "out", EncodeSettings(column="embedding"))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["lock"] and not (tmp_path / "out").exists()


def test_temporary_files_have_a_fixed_length_name_of_their_own(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def write(f) -> None:
        seen.append(sorted(os.listdir(tmp_path)))
        f.write(b"data")

    for name in ("a.json", "b" * 255):
        atomic_write_bytes(tmp_path / name, b"old")
        atomic_write(tmp_path / name, write)
        assert (tmp_path / name).read_bytes() == b"data"
    for listing in seen:
        temporaries = [n for n in listing if n not in ("a.json", "b" * 255)]
        assert len(temporaries) == 1 and OUR_TEMPORARY.fullmatch(temporaries[0]), listing
    assert sorted(os.listdir(tmp_path)) == sorted(["a.json", "b" * 255])


def test_an_output_name_of_250_bytes_is_encoded(codebooks, tmp_path: Path) -> None:
    """NAME_MAX is 255: a name that fits must not fail at the end because its temporary name is longer."""
    cb, _ = codebooks
    name = "x" * 242 + ".parquet"
    assert len(name.encode()) == 250
    write_part(tmp_path / "in" / name, 3)
    result = encode_tables([tmp_path / "in"], cb, tmp_path / "out", EncodeSettings(column="embedding", id_column="id"))
    assert result.encoded == [name] and (tmp_path / "out" / name).is_file()
    want = cb.encode(torch.from_numpy(generate_embeddings(N_ROWS, DIM, 6, seed=3)))
    assert pl.read_parquet(tmp_path / "out" / name)["code"].to_list() == want.tolist()
    assert encode_tables([tmp_path / "in"], cb, tmp_path / "out", EncodeSettings(column="embedding", id_column="id")).encoded == []


# ----------------------------------------------------------------------------- 3. delete only what we created

STRANGER_NAMES = [".foo.tmp", ".a.parquet.abc123.tmp", ".vq-0123.tmp", ".vq-0123456789abcdef0.tmp", "x.tmp", ".VQ-0123456789ABCDEF.tmp"]


@FEW
@given(
    strangers=st.lists(st.sampled_from(STRANGER_NAMES), min_size=1, max_size=4, unique=True),
    where=st.sampled_from(["out", "part", "state", "unrelated"]),
    ours_as=st.sampled_from(["symlink", "folder", "below"]),
)
def test_only_our_own_leftover_temporaries_are_deleted(codebooks, fresh, strangers: list[str], where: str, ours_as: str) -> None:
    cb, _ = codebooks
    case = fresh()
    root, out = case / "in", case / "out"
    write_part(root / "day=1" / "a.parquet", 1)
    encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    folder = {"out": out, "part": out / "day=1", "state": state_dir(out), "unrelated": out / "notes"}[where]
    folder.mkdir(parents=True, exist_ok=True)
    for name in strangers:
        (folder / name).write_bytes(b"another program's file")
    victim = case / "victim.txt"
    victim.write_text("precious\n")
    # Names of our pattern that are not our leftovers: a symlink, a folder, a file below a folder we never write to.
    mimic = ".vq-00112233aabbccdd.tmp"
    if ours_as == "symlink":
        os.symlink(victim, folder / mimic)
    elif ours_as == "folder":
        (folder / mimic).mkdir()
        (folder / mimic / "inside").write_text("kept")
    else:
        (out / "notes" / "deeper").mkdir(parents=True, exist_ok=True)
        (out / "notes" / "deeper" / mimic).write_text("kept")
    # A real leftover of ours, in a folder the run writes to: removed.
    leftover = out / "day=1" / ".vq-ffeeddccbbaa9988.tmp"
    leftover.write_bytes(b"left by a crash")
    before = {k: v for k, v in files_under(out).items() if k != "day=1/" + leftover.name}
    before_state = {k: v for k, v in files_under(state_dir(out)).items() if k not in ("lock", "manifest.json")}
    encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    assert not leftover.exists()
    assert files_under(out) == before, "a file the run did not create was deleted or changed"
    assert {k: v for k, v in files_under(state_dir(out)).items() if k not in ("lock", "manifest.json")} == before_state
    assert victim.read_text() == "precious\n"


def test_overwrite_deletes_only_the_outputs_receipts_record(codebooks, tmp_path: Path) -> None:
    cb, other = codebooks
    root, out = tmp_path / "in", tmp_path / "out"
    write_part(root / "a.parquet", 1)
    encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    stranger = write_part(out / "stranger.parquet", 7)
    content = stranger.read_bytes()
    manifest = json.loads(manifest_path(out).read_text())
    manifest["outputs"]["stranger.parquet"] = {**manifest["outputs"]["a.parquet"], "output": "stranger.parquet"}
    manifest_path(out).write_bytes(canonical_json(manifest))  # a manifest entry, but no receipt
    result = encode_tables([root], other, out, EncodeSettings(column="embedding"), EncodeOptions(overwrite=True))
    assert result.encoded == ["a.parquet"] and stranger.read_bytes() == content
    assert result.unrecorded == ["stranger.parquet"]


# ----------------------------------------------------------------------------- 4. one output per input


@FEW
@given(
    pair=st.sampled_from([(".parquet", ".arrow"), (".parquet", ".ipc"), (".arrow", ".feather"), (".ipc", ".feather")]),
    sub=st.sampled_from(["", "day=1/"]),
)
def test_two_inputs_that_would_write_one_output_are_refused_before_any_work(codebooks, fresh, pair, sub: str) -> None:
    cb, _ = codebooks
    case = fresh()
    root, out = case / "in", case / "out"
    first = write_part(root / f"{sub}a{pair[0]}", 1, ipc=pair[0] != ".parquet")
    second = write_part(root / f"{sub}a{pair[1]}", 2, ipc=pair[1] != ".parquet")
    write_part(root / "b.parquet", 3)
    with pytest.raises(InvalidInputError) as info:
        encode_tables([root], cb, out, EncodeSettings(column="embedding"))
    message = str(info.value)
    assert str(first) in message and str(second) in message and f"'{sub}a.parquet'" in message and "Fix" in message
    assert not out.exists() and not state_dir(out).exists()


# ----------------------------------------------------------------------------- 5. the manifest lists the folder

POOL = ["a.parquet", "b.parquet", "day=2/c.parquet", "day=2/d.parquet"]


@FEW
@given(
    runs=st.lists(
        st.tuples(st.sets(st.sampled_from(POOL), min_size=1), st.booleans(), st.sets(st.sampled_from(POOL))),
        min_size=1,
        max_size=3,
    )
)
def test_the_manifest_lists_every_output_in_the_folder_and_stale_ones_are_kept_unless_pruned(
    codebooks, fresh, runs
) -> None:
    """Runs over changing subsets of the inputs (renamed, removed, added files), some with prune: after
    each, the manifest's outputs are exactly the parquet files in the folder, flagged by whether their
    input was in the run, and every output holds its input's codes."""
    cb, _ = codebooks
    case = fresh()
    out = case / "out"
    present: dict[str, int] = {}  # output -> seed of the input it was encoded from
    for i, (inputs, prune, renamed) in enumerate(runs):
        root = case / f"run{i}"
        for key in sorted(inputs):
            # A "renamed" file keeps its name but gets new content (another input took its place).
            write_part(root / key, POOL.index(key) + (10 * i if key in renamed else 0))
        result = encode_tables([root], cb, out, EncodeSettings(column="embedding", id_column="id"), EncodeOptions(prune=prune))
        stale = sorted(set(present) - inputs)
        assert result.stale == ([] if prune else stale) and result.pruned == (stale if prune else [])
        for key in inputs:
            present[key] = POOL.index(key) + (10 * i if key in renamed else 0)
        if prune:
            for key in stale:
                del present[key]
        manifest = json.loads(manifest_path(out).read_text())
        on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
        assert sorted(e["output"] for e in manifest["outputs"].values()) == on_disk == sorted(present)
        assert {k: e["in_this_run"] for k, e in manifest["outputs"].items()} == {k: k in inputs for k in present}
        assert manifest["n_stale"] == len(result.stale) and manifest["rows"] == N_ROWS * len(present)
        assert manifest["unrecorded"] == [] and result.unrecorded == []
        for key, seed in present.items():
            want = cb.encode(torch.from_numpy(generate_embeddings(N_ROWS, DIM, 6, seed=seed)))
            assert pl.read_parquet(out / key)["code"].to_list() == want.tolist(), key


def test_encoding_day2_keeps_day1_and_strangers_are_named_not_deleted(codebooks, tmp_path: Path) -> None:
    cb, _ = codebooks
    out = tmp_path / "codes"
    write_part(tmp_path / "day1" / "part-0.parquet", 1)
    write_part(tmp_path / "day2" / "part-1.parquet", 2)
    encode_tables([tmp_path / "day1"], cb, out, EncodeSettings(column="embedding"))
    day1 = (out / "part-0.parquet").read_bytes()
    stranger = write_part(out / "theirs" / "x.parquet", 5)
    result = encode_tables([tmp_path / "day2"], cb, out, EncodeSettings(column="embedding"), EncodeOptions(prune=True))
    assert result.pruned == ["part-0.parquet"] and not (out / "part-0.parquet").exists()
    assert stranger.is_file() and result.unrecorded == ["theirs/x.parquet"]
    encode_tables([tmp_path / "day1"], cb, out, EncodeSettings(column="embedding"))
    result = encode_tables([tmp_path / "day2"], cb, out, EncodeSettings(column="embedding"))
    assert result.stale == ["part-0.parquet"] and (out / "part-0.parquet").read_bytes() == day1
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["outputs"]["part-0.parquet"]["in_this_run"] is False
    assert manifest["outputs"]["part-0.parquet"]["input"].endswith("day1/part-0.parquet")
    assert manifest["unrecorded"] == ["theirs/x.parquet"] and manifest["n_stale"] == 1
    # A stale output changed by someone else is no longer ours: not pruned, named as unrecorded.
    (out / "part-0.parquet").write_bytes(b"edited")
    result = encode_tables([tmp_path / "day2"], cb, out, EncodeSettings(column="embedding"), EncodeOptions(prune=True))
    assert result.pruned == [] and (out / "part-0.parquet").read_bytes() == b"edited"
    assert result.unrecorded == ["part-0.parquet", "theirs/x.parquet"]


# ----------------------------------------------------------------------------- 6. current.json


def good_work_dir(tmp_path: Path) -> tuple[Path, Codebook]:
    work = tmp_path / "work"
    cb = fit_codebook(torch.randn(100, DIM, generator=torch.Generator().manual_seed(0)), 4)
    path = cb.save(workdir.codebook_path(work, cb.fingerprint))
    workdir.set_current(work, str(path), cb.fingerprint, "first", "2026-11-29T12:00:00+00:00")
    return work, cb


POINTERS = {
    "invalid-json": (lambda p, cb, t: b'{"codebook": ', "is not valid JSON"),
    "binary": (lambda p, cb, t: b"\xff\xfe\x00garbage", "is not valid JSON"),
    "list": (lambda p, cb, t: b"[1, 2]", "holds a JSON list"),
    "no-codebook": (lambda p, cb, t: canonical_json({"fingerprint": cb.fingerprint}), "has no 'codebook'"),
    "no-keys": (lambda p, cb, t: b"{}", "has no 'codebook' and no 'fingerprint'"),
    "fingerprint-int": (lambda p, cb, t: canonical_json({**p, "fingerprint": 7}), "has fingerprint=7"),
    "codebook-int": (lambda p, cb, t: canonical_json({**p, "codebook": 7}), "has codebook=7"),
    "codebook-null": (lambda p, cb, t: canonical_json({**p, "codebook": None}), "has codebook=None"),
    "last-fit-int": (lambda p, cb, t: canonical_json({**p, "last_fit_at": 12}), "has last_fit_at=12"),
    "absolute": (lambda p, cb, t: canonical_json({**p, "codebook": str(t / "elsewhere.safetensors")}), "outside work_dir"),
    "dotdot": (lambda p, cb, t: canonical_json({**p, "codebook": "../elsewhere.safetensors"}), "outside work_dir"),
    "codes-outside": (lambda p, cb, t: canonical_json({**p, "codes": "../elsewhere"}), "has codes='../elsewhere'"),
}


@pytest.mark.parametrize("case", sorted(POINTERS))
def test_a_corrupt_current_pointer_names_the_file_what_is_wrong_and_the_fix(tmp_path: Path, case: str) -> None:
    work, cb = good_work_dir(tmp_path)
    Codebook.load(workdir.codebook_path(work, cb.fingerprint)).save(tmp_path / "elsewhere.safetensors")
    pointer = work / workdir.CURRENT_NAME
    content, fragment = POINTERS[case]
    pointer.write_bytes(content(json.loads(pointer.read_text()), cb, tmp_path))
    with pytest.raises(PipelineStateError) as info:
        workdir.read_current(work)
    message = str(info.value)
    assert f"current={str(pointer)!r}" in message and fragment in message, message
    assert "Fix: restore it" in message and "delete it to start over with a fresh fit" in message


def test_a_codebook_reached_through_a_symlink_out_of_the_work_dir_is_refused(tmp_path: Path) -> None:
    work, cb = good_work_dir(tmp_path)
    moved = tmp_path / "elsewhere"
    shutil.move(work / "codebooks", moved)
    (work / "codebooks").symlink_to(moved)
    with pytest.raises(PipelineStateError, match=r"resolves to .*elsewhere.*, outside work_dir"):
        workdir.read_current(work)
    (work / "codebooks").unlink()
    shutil.move(moved, work / "codebooks")
    os.replace(work / workdir.CURRENT_NAME, tmp_path / "pointer.json")
    os.symlink(tmp_path / "pointer.json", work / workdir.CURRENT_NAME)  # the pointer itself, a symlink
    with pytest.raises(PipelineStateError, match=r"is a symlink"):
        workdir.read_current(work)


def test_codes_link_never_leads_out_of_the_work_dir(tmp_path: Path) -> None:
    work, cb = good_work_dir(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    link = work / workdir.CODES_LINK
    link.unlink()
    os.symlink(victim, link)  # a planted link is replaced, never followed
    workdir.link_current_codes(work, cb.fingerprint)
    assert os.readlink(link) == cb.fingerprint[:12] and sorted(os.listdir(victim)) == ["keep.txt"]
    shutil.rmtree(work / "codes")
    (work / "codes").symlink_to(victim)  # the codes folder itself leads outside
    with pytest.raises(PipelineStateError, match=r"outside work_dir.*Fix"):
        workdir.link_current_codes(work, cb.fingerprint)
    assert sorted(os.listdir(victim)) == ["keep.txt"]


def test_the_temporary_link_of_a_crashed_switch_is_ours_alone(tmp_path: Path) -> None:
    work, cb = good_work_dir(tmp_path)
    codes, path = work / "codes", str(workdir.codebook_path(work, cb.fingerprint))
    theirs = [".current.tmp", ".vq-0011223344556677.tmp"]  # not this link's temporaries
    for name in theirs:
        os.symlink("somewhere", codes / name)
    workdir.set_current(work, path, "e" * 64, "again", "2026-11-30T00:00:00")
    assert all(os.readlink(codes / n) == "somewhere" for n in theirs) and os.readlink(codes / "current") == "e" * 12
    from vq_pipeline.io.fileio import temporary_name

    ours = codes / temporary_name(codes / "current")
    os.symlink("nowhere", ours)
    workdir.set_current(work, path, "f" * 64, "again", "2026-11-30T01:00:00")
    assert not os.path.lexists(ours) and all(os.readlink(codes / n) == "somewhere" for n in theirs)
    assert os.readlink(codes / "current") == "f" * 12
