"""Exact pruning of the E step (vq_pipeline.compute.prune): the same codes, sums and codebooks as the full
search, and bounds that are never wrong, in memory, on streamed tables, on partitions and across a
resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENGINES, assert_codes_match, fit_tables

from vq_pipeline import fit_codebook
from vq_pipeline.compute import prune
from vq_pipeline.compute.data import InMemoryRows, e_step
from vq_pipeline.compute.engines import get_engine
from vq_pipeline.compute.lloyd import IterationStats
from vq_pipeline.compute.prune import Bounds
from vq_pipeline.io.discovery import discover
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.mappers import serial
from vq_pipeline.jobs.partitioned import PartitionWork, load_bounds, partition_stats_file
from vq_pipeline.jobs.sources import StreamSpec


def mixture(n: int, dim: int, k: int, *, seed: int = 0, offset: float = 40.0) -> torch.Tensor:
    """(n, dim) float32 rows around k centres, far from the origin (the hard case for the GEMM)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 3
    return centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, dim, generator=g) + offset


def comparable(cb) -> bytes:
    return dataclasses.replace(cb, created_at="", timings={}).to_bytes()


def true_bounds(x: torch.Tensor, c: torch.Tensor, groups: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 oracle: each row's nearest code (lowest on ties) and its distance to the nearest other
    centroid of each group (inf where a group has no other)."""
    d = torch.cdist(x.double(), c.double(), compute_mode="donot_use_mm_for_euclid_dist")  # (n, m)
    code = d.argmin(dim=1)
    d[torch.arange(x.shape[0]), code] = float("inf")
    per = torch.full((x.shape[0], t), float("inf"), dtype=torch.float64)
    per.scatter_reduce_(1, groups.expand(x.shape[0], -1), d, "amin")
    return code, per


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_pruned_fit_is_the_unpruned_fit(metric: str) -> None:
    x = mixture(6000, 16, 24)
    init = x[:64].clone()
    kw = dict(metric=metric, init=init, n_iter=25, tol=0.0, engine="torch", device="cpu")
    full = fit_codebook(x, 64, prune=False, **kw)
    pruned = fit_codebook(x, 64, prune=True, **kw)
    assert comparable(pruned) == comparable(full)  # centroids, counts, inertia, history: the same bytes
    skipped = pruned.timings["iteration_pruned"]
    assert len(skipped) == len(pruned.stats["history"]) and skipped[0] == 0
    assert max(skipped) > 0.5 * x.shape[0], f"bounds proved too few rows: {skipped}"
    assert pruned.timings["prune_state_bytes"] >= 8 * x.shape[0]
    assert "iteration_pruned" not in full.timings


@pytest.mark.parametrize("grouped", [False, True], ids=["one bound", "groups"])
@pytest.mark.parametrize("engine", ENGINES)
def test_bounds_never_overstate_and_codes_are_exact(engine: str, grouped: bool, monkeypatch) -> None:
    """After every E step: each row's code is the float64 oracle's (away from near-ties) and every
    stored lower bound is at most the true distance to that group's other centroids."""
    if grouped:
        monkeypatch.setattr(prune, "MIN_GROUPED_CODES", 32)
    x = mixture(3000, 8, 12, seed=1)
    c = x[:192].clone()  # (192, 8) duplicate-free start, far from converged
    eng = get_engine(engine, torch.device("cpu"), 8)
    bounds, total = Bounds(), 0
    for step in range(8):
        p = e_step(x, c, engine=eng, chunk_rows=700, bounds=bounds)
        full = e_step(x, c, engine=eng, chunk_rows=700)
        assert torch.equal(p.counts, full.counts) and torch.equal(p.sums, full.sums)
        assert torch.equal(p.far_rows, full.far_rows)
        total += p.n_pruned
        grouping = prune.Grouping(bounds.order, bounds.lower.shape[1])
        assert grouping.t == (3 if grouped and engine == "torch" else 1)  # other engines: one bound
        code, per = true_bounds(x, c, grouping.group, grouping.t)
        assert assert_codes_match(bounds.codes.long(), x, c, "l2", rtol=1e-6) > 0.9 * x.shape[0]
        assert torch.all(bounds.lower.double() <= per), f"step {step}: a lower bound exceeds the true distance"
        c = (p.sums / p.counts.clamp_min(1)[:, None]).float()  # the M step (no code is empty here)
        assert int((p.counts == 0).sum()) == 0
    assert total > x.shape[0], "the bounds never pruned anything"


def test_edge_cases_keep_the_unpruned_answer() -> None:
    """Duplicate centroids (exact ties: the lowest code), one code, one dimension (no GEMM)."""
    x = mixture(900, 4, 5, seed=2)
    eng = get_engine("torch", torch.device("cpu"), 4)
    c = torch.cat([x[:6], x[:6]])  # every centroid twice: each row's nearest is an exact tie
    b = Bounds()
    for _ in range(3):
        got = e_step(x, c, engine=eng, chunk_rows=256, bounds=b)
        want = e_step(x, c, engine=eng, chunk_rows=256)
        assert torch.equal(got.counts, want.counts) and int(got.counts[6:].sum()) == 0
    one = x[:1].clone()
    b = Bounds()
    for _ in range(2):
        assert torch.equal(e_step(x, one, engine=eng, chunk_rows=256, bounds=b).sums, e_step(x, one, engine=eng, chunk_rows=256).sums)
    line = x[:, :1].contiguous()
    eng1 = get_engine("torch", torch.device("cpu"), 1)
    c1 = line[:40].clone()
    b = Bounds()
    pruned = 0
    for _ in range(6):
        got = e_step(line, c1, engine=eng1, chunk_rows=256, bounds=b)
        want = e_step(line, c1, engine=eng1, chunk_rows=256)
        assert torch.equal(got.counts, want.counts) and torch.equal(got.sums, want.sums)
        assert assert_codes_match(b.codes.long(), line, c1, "l2", rtol=1e-6) > 800
        pruned += got.n_pruned
        c1 = (want.sums / want.counts.clamp_min(1)[:, None]).float().where(want.counts[:, None] > 0, c1)
    assert pruned > 0


def test_an_unfinished_step_leaves_no_state_and_a_changed_shape_starts_over() -> None:
    x = mixture(2000, 6, 8, seed=3)
    eng = get_engine("torch", torch.device("cpu"), 6)
    b = Bounds()
    e_step(x, x[:16].clone(), engine=eng, chunk_rows=300, bounds=b)
    assert b.centroids is not None

    class Stop(Exception):
        pass

    class Breaks:
        shape = x.shape

        def __getitem__(self, rows: slice) -> torch.Tensor:
            if rows.start >= 900:
                raise Stop
            return x[rows]

    with pytest.raises(Stop):
        e_step(Breaks(), x[16:32].clone(), engine=eng, chunk_rows=300, bounds=b)
    assert b.centroids is None  # half updated: never trusted
    p = e_step(x, x[16:32].clone(), engine=eng, chunk_rows=300, bounds=b)
    assert p.n_pruned == 0 and torch.equal(p.counts, e_step(x, x[16:32].clone(), engine=eng, chunk_rows=300).counts)
    p = e_step(x[:1000], x[:24].clone(), engine=eng, chunk_rows=300, bounds=b)  # other rows, other codes
    assert p.n_pruned == 0 and b.codes.shape == (1000,) and b.centroids.shape == (24, 6)


@pytest.fixture()
def tables(tmp_path: Path) -> tuple[list[Path], torch.Tensor]:
    x = mixture(4000, 8, 16, seed=4, offset=10.0)
    paths = []
    for i, (a, b) in enumerate([(0, 1500), (1500, 1500), (1500, 4000)]):  # one empty partition
        paths.append(tmp_path / "in" / f"part-{i}.parquet")
        write_embeddings(paths[-1], np.arange(a, b), x[a:b].numpy())
    return paths, x


def test_streamed_and_partitioned_fits_prune_to_the_same_codebook(tables, tmp_path: Path) -> None:
    paths, x = tables
    kw = dict(column="embedding", n_codes=32, n_iter=15, tol=0.0, seed=1, engine="torch", device="cpu")
    want = fit_tables(paths, data_budget=1, batch_rows=500, prune=False, **kw)
    streamed = fit_tables(paths, data_budget=1, batch_rows=500, prune=True, **kw)
    assert want.stats["mode"] == "streamed" and comparable(streamed) == comparable(want)
    assert max(streamed.timings["iteration_pruned"]) > 0.5 * x.shape[0]

    seen: list[int] = []
    states: set[str] = set()
    state_rows: list[int] = []

    def mapper(fn, items):  # here, in order, recording each partition's pruned rows and state file
        for i, out in serial(fn, items):
            seen.append(out["pruned"])
            states.add(Path(items[i].bounds).name)
            if i == 0:
                state_rows.append(load_bounds(items[i].bounds).codes.shape[0])
            yield i, out

    parted = fit_tables(paths, prune=True, mapper=mapper, scratch=tmp_path, **kw)
    assert sorted(states) == [f"bounds-flat-{j:06d}.npz" for j in range(3)]
    assert state_rows[-1] == 1500  # partition 0's state holds a bound for each of its rows
    assert not list(tmp_path.glob(".vq-fit-*"))  # the exchange folder is removed
    assert parted.stats["mode"] == "partitioned"
    np.testing.assert_allclose(parted.centroids.numpy(), want.centroids.numpy(), rtol=0, atol=1e-5)
    assert torch.equal(parted.counts, want.counts) and sum(seen) > x.shape[0]
    assert parted.timings["prune_state_bytes"] >= 8 * x.shape[0]


def test_a_damaged_or_stale_partition_state_only_costs_a_full_search(tables, tmp_path: Path) -> None:
    paths, x = tables
    src = discover([paths[2]])[0]
    cfile = tmp_path / "c.npy"
    np.save(cfile, x[:20].numpy())
    bfile, sfile = tmp_path / "bounds.npz", tmp_path / "stats.npz"
    work = PartitionWork(src, str(cfile), str(sfile), StreamSpec("embedding", "l2", "torch", "cpu"), None, str(bfile))
    first = partition_stats_file(work)
    again = partition_stats_file(work)  # the same centroids: all proven
    assert first["pruned"] == 0 and again["pruned"] == 2500 and again["objective"] == first["objective"]
    bfile.write_bytes(b"not a state")
    assert partition_stats_file(work)["pruned"] == 0
    z = dict(np.load(bfile))
    z["codes"] = np.full_like(z["codes"], 99)  # out of range: refused, searched again
    np.savez(bfile, **z)
    assert load_bounds(bfile).codes is None
    assert partition_stats_file(work)["objective"] == first["objective"]


def test_resumed_pruned_fit_equals_the_uninterrupted_one(tables, tmp_path: Path) -> None:
    paths, _ = tables
    kw = dict(column="embedding", n_codes=32, n_iter=12, tol=0.0, seed=2, engine="torch", device="cpu", data_budget=1, batch_rows=500)
    want = fit_tables(paths, prune=False, **kw)
    calls = []

    def stop(ev) -> None:
        if isinstance(ev, IterationStats):
            calls.append(ev.pruned)
            if len(calls) == 7:
                raise KeyboardInterrupt

    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_tables(paths, checkpoint=ckpt, progress=stop, prune=True, **kw)
    assert ckpt.exists() and max(calls) > 0
    got = fit_tables(paths, checkpoint=ckpt, prune=True, **kw)
    assert comparable(got) == comparable(want) and got.timings["iteration_pruned"][0] == 0


def test_multilevel_fits_prune_each_level() -> None:
    x = mixture(3000, 8, 16, seed=5)
    kw = dict(codec="residual", levels=2, n_iter=10, tol=0.0, seed=3, engine="torch", device="cpu")
    assert comparable(fit_codebook(x, 16, prune=True, **kw)) == comparable(fit_codebook(x, 16, prune=False, **kw))
    kw = dict(kw, codec="product")
    assert comparable(fit_codebook(x, 16, prune=True, **kw)) == comparable(fit_codebook(x, 16, prune=False, **kw))


def test_prune_setting_is_checked() -> None:
    from vq_pipeline import FitSettings, InvalidInputError

    with pytest.raises(InvalidInputError, match="prune='yes'; expected True or False"):
        FitSettings(prune="yes")
    assert InMemoryRows(torch.zeros(3, 2), prune=True)._bounds is not None


@pytest.mark.parametrize("codec", ["product", "residual"])
def test_streamed_multilevel_fits_prune_each_level(tables, codec: str) -> None:
    """Product levels share one pass over the tables (each level's bounds span the pass); residual
    levels stream one after another."""
    paths, x = tables
    kw = dict(column="embedding", n_codes=8, codec=codec, levels=2, n_iter=8, tol=0.0, seed=6, engine="torch", device="cpu")
    kw.update(data_budget=1, batch_rows=700)
    want = fit_tables(paths, prune=False, **kw)
    got = fit_tables(paths, prune=True, **kw)
    assert want.stats["mode"] == "streamed" and comparable(got) == comparable(want)
    assert max(got.timings["iteration_pruned"]) > 0.5 * x.shape[0]
