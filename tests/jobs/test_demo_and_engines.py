"""The main job end to end, engine selection, and the KeOps cache folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from conftest import assert_codes_match

from vq_pipeline import Codebook
from vq_pipeline.compute.engines import auto_engine_name, get_engine, keops
from vq_pipeline.jobs.demo import main


def test_demo_fits_encodes_and_writes_consistent_files(tmp_path: Path) -> None:
    summary = main(str(tmp_path), n_train=3000, n_new=800, dim=16, n_codes=12)
    cb = Codebook.load(summary["codebook"])
    assert cb.metric == "cosine" and cb.n_codes == 12 and cb.sources == (str(tmp_path / "train.parquet"),)
    codes = pl.read_parquet(summary["codes"])
    new = pl.read_parquet(tmp_path / "new" / "part-0.parquet")
    x_new = torch.from_numpy(new["embedding"].to_numpy().copy())
    assert codes.columns == ["id", "code", "distance"]
    assert codes["id"].to_list() == new["id"].to_list()
    got = torch.from_numpy(codes["code"].to_numpy().astype(np.int64))
    assert_codes_match(got, x_new, cb.centroids, "cosine")
    assert torch.equal(got, cb.encode(x_new))


def test_auto_follows_the_measured_cpu_rule() -> None:
    for dim in (2, 8, 128, 384):
        assert auto_engine_name(torch.device("cpu"), dim) == "torch"
    assert get_engine("auto", torch.device("cpu"), 2).name == "torch"


def test_keops_cache_folder_is_keyed_by_flags_and_worker(monkeypatch) -> None:
    a, b = keops.cache_folder("-O3"), keops.cache_folder("-march=native")
    assert a != b and a.parent == b.parent
    monkeypatch.setenv("VQ_KEOPS_WORKER", "worker-1")
    assert keops.cache_folder("-O3") == a / "worker-1"
