"""kill -9 at chosen points of an encode and of a checkpointed fit, then resume: outputs byte-identical,
nothing partial. The child says when it is at the point and the parent kills it there (``kill_points``), so
every kill lands where it was aimed, on any machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fit_tables, snapshot as files
from kill_points import CHILD_PRELUDE, count, kill_at, points

from vq_pipeline import IterationStats
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.encode_state import MANIFEST_NAME, state_dir
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import EncodeOptions, EncodeSettings, FitSettings, TableSettings

# End to end: processes killed mid-run (make test-slow).
pytestmark = pytest.mark.slow

N_KILLS = 20

CHILD = CHILD_PRELUDE + """
from vq_pipeline.jobs.encode_folder import EncodeEvents, encode_tables
from vq_pipeline.settings import EncodeOptions, EncodeSettings
settings = EncodeSettings("embedding", id_column="id", with_distance=True)
encode_tables([sys.argv[1]], sys.argv[2], sys.argv[3], settings, EncodeOptions(batch_rows=4096), events=EncodeEvents(rows=at_step))
finish()
"""


def test_kill_nine_at_chosen_points_then_resume_gives_identical_outputs(tmp_path: Path) -> None:
    data = tmp_path / "in"
    for i in range(6):
        write_embeddings(data / f"day={i}" / "part-0.parquet", np.arange(6000) + i * 10**6, generate_embeddings(6000, 32, 30, seed=i))
    codebook = tmp_path / "cb.safetensors"
    fit_from_tables([data], 64, TableSettings(column="embedding", sample=3000), FitSettings(n_iter=5)).save(codebook)
    reference = tmp_path / "reference"
    encode_tables([data], codebook, reference, EncodeSettings(column="embedding", id_column="id", with_distance=True), EncodeOptions(batch_rows=4096))
    want = files(reference)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = [sys.executable, "-c", CHILD, str(data), str(codebook)]
    counted = count([*child, str(tmp_path / "counted")], env=env)
    assert files(tmp_path / "counted") == want, "the child's run differs from this process's"
    # 6 outputs (each after a batch of its own) and their receipts, then the manifest
    assert counted["step"] == 12 and counted["replace"] >= 13, counted
    chosen = points(counted, N_KILLS, seed=1234)
    assert len(set(chosen)) == N_KILLS
    for trial, point in enumerate(chosen):
        out = tmp_path / f"run{trial}"
        kill_at([*child, str(out)], point, env=env)
        if out.exists() or state_dir(out).exists():
            # Whatever the kill left: complete outputs under final names, or temporary names only.
            for rel, content in files(out).items():
                if rel.endswith(".parquet") and not Path(rel).name.startswith("."):
                    assert content == want[rel], f"{point}: partial or wrong {rel} under its final name"
                elif rel == f"state/{MANIFEST_NAME}":
                    assert content == want[rel], f"{point}: manifest written before all outputs"
        encode_tables([data], codebook, out, EncodeSettings(column="embedding", id_column="id", with_distance=True), EncodeOptions(batch_rows=4096))
        assert files(out) == want, f"{point}: resumed run differs from the uninterrupted one"
        assert not list(out.rglob(".*.tmp")) and not list(state_dir(out).rglob(".*.tmp"))
        shutil.rmtree(out)
        shutil.rmtree(state_dir(out))
    print(json.dumps(chosen))


FIT_CHILD = CHILD_PRELUDE + """
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import FitSettings, TableSettings
reading = TableSettings("embedding", data_budget=0, batch_rows=2000)
fit_from_tables(
    [sys.argv[1]], 32, reading, FitSettings(n_iter=30, tol=0.0, n_init=2), checkpoint=sys.argv[2], progress=at_step
).save(sys.argv[3])
finish()
"""
FIT_KILLS = 8


def comparable(path: Path) -> bytes:
    """A codebook file with its run record (creation time, timings) pinned."""
    import dataclasses

    from vq_pipeline import Codebook

    return dataclasses.replace(Codebook.load(path), created_at="", timings={}).to_bytes()


def test_kill_nine_during_a_checkpointed_fit_then_resume_gives_the_same_codebook(tmp_path: Path) -> None:
    data = tmp_path / "in"
    for i in range(3):
        write_embeddings(data / f"part-{i}.parquet", np.arange(20_000), generate_embeddings(20_000, 16, 40, seed=i))
    reference = tmp_path / "reference.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = [sys.executable, "-c", FIT_CHILD, str(data)]
    counted = count([*child, str(tmp_path / "ref.ckpt"), str(reference)], env=env)
    assert not (tmp_path / "ref.ckpt").exists(), "a finished fit removes its checkpoint"
    want = comparable(reference)
    # checkpoints (after seeding and after every update, in both restarts), then the codebook file
    n_replace = counted["replace"]
    assert n_replace >= 2 * 2 + 1 and counted["step"] >= 2 * 2, counted
    chosen = points(counted, FIT_KILLS, seed=99)
    resumed = 0
    for trial, point in enumerate(chosen):
        ckpt, out = tmp_path / f"t{trial}.ckpt", tmp_path / f"t{trial}.safetensors"
        kill_at([*child, str(ckpt), str(out)], point, env=env)
        # The first replace is the first checkpoint, the last one the codebook file (the checkpoint removed
        # before it): a kill between them leaves a checkpoint to resume from.
        kind, n = point.split(":")[0], int(point.split(":")[1])
        expected = kind == "after-replace" and n < n_replace or kind == "before-replace" and 1 < n < n_replace
        assert ckpt.exists() or not expected, f"{point}: no checkpoint left to resume from"
        resumed += ckpt.exists()
        subprocess.run([*child[:3], "run", *child[3:], str(ckpt), str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
        assert comparable(out) == want, f"{point}: the resumed fit differs"
        assert not ckpt.exists() and not list(tmp_path.glob(".*.tmp"))
    assert resumed >= FIT_KILLS // 2, f"only {resumed} of the kills at {chosen} left a checkpoint"
    print(json.dumps({"counts": counted, "points": chosen, "resumed": resumed}))


def test_interrupted_fit_resumes_from_its_checkpoint_in_process(tmp_path: Path) -> None:
    data = tmp_path / "in"
    write_embeddings(data / "part-0.parquet", np.arange(3000), generate_embeddings(3000, 8, 20, seed=3))
    kwargs = dict(column="embedding", n_codes=16, n_iter=10, tol=0.0, n_init=2, seed=4)
    import dataclasses

    want = dataclasses.replace(fit_tables([data], **kwargs), created_at="", timings={}).to_bytes()
    seen = []

    def stop_in_second_restart(stats) -> None:
        if not isinstance(stats, IterationStats):
            return
        seen.append(stats.iteration)
        if len(seen) == 14:  # inside the second restart
            raise KeyboardInterrupt

    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_tables([data], checkpoint=ckpt, progress=stop_in_second_restart, **kwargs)
    assert ckpt.exists()
    after = []
    got = fit_tables([data], checkpoint=ckpt, progress=lambda s: after.append(getattr(s, "iteration", None)), **kwargs)
    assert after[0] > 1, "the second run started from the checkpoint, not from scratch"
    assert dataclasses.replace(got, created_at="", timings={}).to_bytes() == want
    assert not ckpt.exists()
    # A checkpoint of another fit is ignored rather than resumed.
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        fit_tables([data], checkpoint=ckpt, progress=stop_in_second_restart, **kwargs)
    other = fit_tables([data], checkpoint=ckpt, **{**kwargs, "seed": 5})
    assert other.settings["seed"] == 5 and not ckpt.exists()
