"""The flows on a Dask cluster: a two-worker LocalCluster on loopback and a Prefect server on 127.0.0.1,
both started and stopped by this module (one fixture for all its tests).

Distributed encode must write the same bytes as a local encode; a distributed fit must give a local
streamed fit's codebook from the same init (tolerance: see FIT_ATOL); killing a worker while it holds
encode tasks must still end with every file correctly encoded.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import snapshot, write_parts

from vq_pipeline import Codebook
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import EncodeSettings, FitSettings, TableSettings

pytest.importorskip("prefect_dask")

from vq_flows.dask import DaskAddressError, parse_address, prefect_server  # noqa: E402
from vq_flows.encode import encode_embeddings_flow  # noqa: E402
from vq_flows.fit import fit_codebook_flow  # noqa: E402

# End to end: real servers, clusters or processes killed mid-run (make test-slow).
pytestmark = pytest.mark.slow

DIM = 12
N_CODES = 16
# A distributed fit adds the same float64 sums in another order (per partition, then across them):
# the float32 centroids may differ in their last bit, never more than this.
FIT_ATOL = 1e-5
ENCODE_SETTINGS = EncodeSettings("embedding", id_column="id", with_distance=True)


@pytest.fixture(scope="module")
def cluster(prefect_api):
    """(scheduler address, dask Client) of a two-worker LocalCluster, with a Prefect server for it.

    Prefect's event and log workers are process-wide: the ones this module's flow runs start talk to
    its temporary server. They are drained while that server still runs, so that they neither hold
    later runs' events nor hang the session's final drain against a server that is gone; and the
    session's test API comes up first, whatever the order the tests run in."""
    from distributed import Client, LocalCluster
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with prefect_server() as url, temporary_settings({PREFECT_API_URL: url}):
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0",
            env={"OMP_NUM_THREADS": "1"},
        ) as lc, Client(lc, set_as_default=False) as client:
            yield lc.scheduler_address, client
        APILogWorker.drain_all(timeout=60)
        EventsWorker.drain_all(timeout=60)


def make_parts(root: Path, n_parts: int = 4, n_rows: int = 1500) -> dict[str, np.ndarray]:
    return write_parts(root, {f"date=2026-11-{i + 1:02d}/part-0.parquet": n_rows for i in range(n_parts)}, dim=DIM)


def local_codes(tmp_path: Path, cb: Codebook) -> dict[str, bytes]:
    encode_tables([tmp_path / "in"], cb, tmp_path / "local", ENCODE_SETTINGS)
    return snapshot(tmp_path / "local")


def test_parse_address() -> None:
    assert parse_address("local:2") == ("local", 2)
    assert parse_address("tcp://10.0.0.5:8786") == ("tcp://10.0.0.5:8786", None)
    assert parse_address("scheduler:8786") == ("tcp://scheduler:8786", None)
    for bad in ("local:0", "local", "not an address"):
        with pytest.raises(DaskAddressError, match="dask="):
            parse_address(bad)


def test_encode_on_dask_writes_the_bytes_of_a_local_encode(cluster, tmp_path: Path) -> None:
    address, client = cluster
    make_parts(tmp_path / "in")
    cb = fit_from_tables([tmp_path / "in"], N_CODES, TableSettings(column="embedding"), FitSettings(metric="cosine", seed=0))
    cb_path = str(cb.save(tmp_path / "cb.safetensors"))
    expected = local_codes(tmp_path, cb)
    kwargs = dict(inputs=[str(tmp_path / "in")], codebook=cb_path, out_dir=str(tmp_path / "dask"), settings=ENCODE_SETTINGS)

    first = encode_embeddings_flow(**kwargs, dask=address)
    assert first["encoded"] == sorted(k for k in expected if k.endswith(".parquet"))
    assert snapshot(tmp_path / "dask") == expected  # codes, receipts and manifest, byte for byte
    # Each worker ran tasks with its own KeOps folder.
    folders = client.run(lambda: os.environ.get("VQ_KEOPS_WORKER"))
    assert len(set(folders.values())) == 2 and all(f and f.startswith("dask-") for f in folders.values())

    again = encode_embeddings_flow(**kwargs, dask=address)  # resume: nothing left to do
    assert again["encoded"] == [] and again["skipped"] == first["encoded"]
    assert snapshot(tmp_path / "dask") == expected


def test_vq_encode_dask_local_cluster(cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vq encode --dask local:2` starts (and stops) its own two-worker cluster; same bytes."""
    from vq_flows.cli import main

    make_parts(tmp_path / "in", n_parts=2, n_rows=800)
    cb = fit_from_tables([tmp_path / "in"], N_CODES, TableSettings(column="embedding"), FitSettings(metric="l2", seed=1))
    cb.save(tmp_path / "cb.safetensors")
    expected = local_codes(tmp_path, cb)
    rc = main([
        "encode", str(tmp_path / "in"), "--codebook", str(tmp_path / "cb.safetensors"), "--column", "embedding",
        "--id-column", "id", "--with-distance", "--out", str(tmp_path / "dask"), "--dask", "local:2", "--quiet",
    ])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("encoded 2 files (1,600 rows)")
    assert snapshot(tmp_path / "dask") == expected


def test_vq_fit_dask_writes_the_codebook_and_leaves_no_lock(cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vq fit --dask ADDRESS` checks and locks its --out once (in the flow), saves, and cleans up."""
    from vq_flows.cli import main

    from vq_pipeline.io.paths import lock_path

    address, _ = cluster
    make_parts(tmp_path / "in", n_parts=2, n_rows=400)
    out = tmp_path / "cb.safetensors"
    rc = main(["fit", str(tmp_path / "in"), "--column", "embedding", "--codes", str(N_CODES), "--iters", "3",
               "--out", str(out), "--dask", address, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert Codebook.load(out).n_codes == N_CODES and not lock_path(out).exists()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fit_on_dask_matches_a_local_fit_from_the_same_init(cluster, tmp_path: Path, metric: str) -> None:
    address, _ = cluster
    make_parts(tmp_path / "in")
    settings = FitSettings(metric=metric, seed=3, n_iter=8)
    # The same init: k-means++ on the same seeded sample of 256 x n_codes rows (a streamed local fit).
    local = fit_from_tables([tmp_path / "in"], N_CODES, TableSettings("embedding", data_budget=0), settings)
    summary = fit_codebook_flow(
        [str(tmp_path / "in")], str(tmp_path / "cb.safetensors"), N_CODES, TableSettings("embedding"),
        dataclasses.replace(settings, prune=True), dask=address,
    )
    dist = Codebook.load(summary["path"])
    assert dist.stats["mode"] == "partitioned" and dist.stats["partitions"] == 4
    assert dist.stats["init_sample"] == local.stats["init_sample"]
    assert dist.stats["iterations"] == local.stats["iterations"]
    torch.testing.assert_close(dist.centroids, local.centroids, rtol=0, atol=FIT_ATOL)
    assert torch.equal(dist.counts, local.counts)
    assert dist.stats["inertia"] == pytest.approx(local.stats["inertia"], rel=1e-9)
    # Pruning ran on the workers, each partition with its own state file, and skipped rows.
    assert dist.timings["prune_state_bytes"] >= 8 * sum(local.counts.tolist())
    assert sum(dist.timings["iteration_pruned"]) > 0
    assert not list(tmp_path.glob(".vq-fit-*"))  # per-iteration files are cleaned up


def test_killing_a_worker_mid_encode_still_completes(cluster, tmp_path: Path) -> None:
    address, client = cluster
    parts = make_parts(tmp_path / "in", n_parts=8, n_rows=4000)
    cb = fit_from_tables([tmp_path / "in"], N_CODES, TableSettings(column="embedding"), FitSettings(metric="l2", seed=0))
    cb_path = str(cb.save(tmp_path / "cb.safetensors"))
    expected = local_codes(tmp_path, cb)
    pids = client.run(os.getpid)  # worker address -> pid
    killed: dict[str, Any] = {}

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            busy = [w for w, tasks in client.processing().items() if tasks and w in pids]
            if busy:
                killed["worker"], killed["tasks"] = busy[0], client.processing()[busy[0]]
                os.kill(pids[busy[0]], signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    summary = encode_embeddings_flow(
        [str(tmp_path / "in")], cb_path, str(tmp_path / "dask"), ENCODE_SETTINGS, dask=address,
    )
    killer.join()
    assert killed, "no worker was ever busy"
    assert summary["encoded"] == sorted(parts) and summary["rows_total"] == 8 * 4000
    assert snapshot(tmp_path / "dask") == expected
