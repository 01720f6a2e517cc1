"""kill -9 at random points of an encode, then resume: outputs byte-identical, nothing partial."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vq_pipeline.demo import generate_embeddings
from vq_pipeline.pipeline import MANIFEST_NAME, encode_tables, fit_from_tables
from vq_pipeline.tables import write_embeddings

N_KILLS = 20

CHILD = """
import sys
from vq_pipeline.pipeline import encode_tables
print("ready", flush=True)
encode_tables([sys.argv[1]], sys.argv[2], sys.argv[3], column="embedding", id_column="id", with_distance=True, batch_rows=4096)
print("done", flush=True)
"""


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "lock"}


@pytest.mark.slow
def test_kill_nine_at_random_points_then_resume_gives_identical_outputs(tmp_path: Path) -> None:
    data = tmp_path / "in"
    for i in range(6):
        write_embeddings(data / f"day={i}" / "part-0.parquet", np.arange(6000) + i * 10**6, generate_embeddings(6000, 32, 30, seed=i))
    codebook = tmp_path / "cb.safetensors"
    fit_from_tables([data], column="embedding", n_codes=64, sample=3000, n_iter=5).save(codebook)
    reference = tmp_path / "reference"
    t0 = time.perf_counter()
    encode_tables([data], codebook, reference, column="embedding", id_column="id", with_distance=True, batch_rows=4096)
    encode_seconds = time.perf_counter() - t0
    want = files(reference)

    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outcomes = {"killed": 0, "finished_first": 0}
    for trial in range(N_KILLS):
        out = tmp_path / f"run{trial}"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data), str(codebook), str(out)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 1.5 * encode_seconds))
        child.send_signal(signal.SIGKILL)
        outcomes["killed" if child.wait() == -signal.SIGKILL else "finished_first"] += 1
        if out.exists():
            # Whatever the kill left: complete outputs under final names, or temporary names only.
            for rel, content in files(out).items():
                if rel.endswith(".parquet") and not Path(rel).name.startswith("."):
                    assert content == want[rel], f"trial {trial}: partial or wrong {rel} under its final name"
                elif rel == MANIFEST_NAME:
                    assert content == want[rel], f"trial {trial}: manifest written before all outputs"
        encode_tables([data], codebook, out, column="embedding", id_column="id", with_distance=True, batch_rows=4096)
        assert files(out) == want, f"trial {trial}: resumed run differs from the uninterrupted one"
        assert not list(out.rglob(".*.tmp"))
        shutil.rmtree(out)
    assert outcomes["killed"] >= N_KILLS // 2, outcomes
    print(json.dumps(outcomes))
