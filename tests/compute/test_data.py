"""The data seam of Lloyd: every DataSource gives the same E step, EStepStats.merge, seeding rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vq_pipeline import InvalidInputError
from vq_pipeline.compute.data import MAX_FAR_CANDIDATES, EStepStats, InMemoryRows
from vq_pipeline.compute.lloyd import LloydState, lloyd
from vq_pipeline.io.discovery import discover
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.partitioned import partition_e_step
from vq_pipeline.jobs.sources import PartitionedTables, StreamedTables, StreamSpec

DIM = 6


@pytest.fixture()
def parts(tmp_path: Path) -> tuple[list, list[int], torch.Tensor]:
    g = np.random.default_rng(0)
    xs = [g.standard_normal((n, DIM)).astype(np.float32) * 3 for n in (120, 0, 75, 40)]
    for i, x in enumerate(xs):
        write_embeddings(tmp_path / f"part-{i}.parquet", np.arange(len(x)) + 1000 * i, x)
    sources = discover([tmp_path])
    return sources, [len(x) for x in xs], torch.from_numpy(np.concatenate(xs))


def streamed(sources, counts, **kw) -> StreamedTables:
    memory_budget = kw.pop("memory_budget", StreamSpec.memory_budget)
    spec = StreamSpec("embedding", "l2", "torch", batch_rows=16, memory_budget=memory_budget)
    return StreamedTables(sources, counts, spec, dim=DIM, **kw)


def assert_same(a: EStepStats, b: EStepStats) -> None:
    assert torch.equal(a.counts, b.counts) and torch.equal(a.far_sqdist, b.far_sqdist) and torch.equal(a.far_rows, b.far_rows)
    torch.testing.assert_close(a.sums, b.sums, rtol=0, atol=1e-9)
    assert a.objective == pytest.approx(b.objective, rel=1e-12)


def test_sources_give_the_same_e_step(parts) -> None:
    sources, counts, x = parts
    c = x[:5].clone()  # (5, dim)
    mem = InMemoryRows(x, engine="torch", memory_budget=2**16).e_step(c)
    assert int(mem.counts.sum()) == x.shape[0] and mem.far_sqdist.shape == (5,)
    assert torch.all(mem.far_sqdist[:-1] >= mem.far_sqdist[1:])
    assert_same(streamed(sources, counts, memory_budget=2**16).e_step(c), mem)

    def map_e_step(centroids: torch.Tensor, srcs) -> list[EStepStats]:
        spec = StreamSpec("embedding", "l2", "torch", "cpu")
        return [partition_e_step(s, centroids, spec) for s in srcs]

    spec = StreamSpec("embedding", "l2", batch_rows=16)
    part = PartitionedTables(sources, counts, map_e_step, spec, dim=DIM)
    assert_same(part.e_step(c), mem)
    with pytest.raises(InvalidInputError, match="map_e_step returned 1 results for 4 sources"):
        PartitionedTables(sources, counts, lambda c, s: [mem], spec, dim=DIM).e_step(c)


def test_merge_adds_in_order_and_keeps_the_farthest_rows() -> None:
    g = torch.Generator().manual_seed(1)
    n_codes = MAX_FAR_CANDIDATES + 8

    def part(n_far: int) -> EStepStats:
        d = torch.rand(n_far, generator=g).sort(descending=True).values
        return EStepStats(
            torch.rand(n_codes, 2, generator=g, dtype=torch.float64), torch.randint(5, (n_codes,), generator=g), float(d.sum()),
            d, torch.rand(n_far, 2, generator=g),
        )

    a, b = part(700), part(600)
    m = EStepStats.merge([a, b])
    assert torch.equal(m.sums, a.sums + b.sums) and torch.equal(m.counts, a.counts + b.counts)
    assert m.objective == a.objective + b.objective
    assert m.far_sqdist.shape == (MAX_FAR_CANDIDATES,) and torch.all(m.far_sqdist[:-1] >= m.far_sqdist[1:])
    assert torch.equal(m.far_sqdist, torch.cat([a.far_sqdist, b.far_sqdist]).sort(descending=True).values[:MAX_FAR_CANDIDATES])
    assert EStepStats.merge([a]).far_sqdist.shape == (700,)
    with pytest.raises(InvalidInputError, match=r"parts=\[\]"):
        EStepStats.merge([])


def test_seeding_rows(parts) -> None:
    sources, counts, x = parts
    s = streamed(sources, counts)
    assert torch.equal(s.sample(7, None), x[:7])
    drawn = s.sample(50, np.random.default_rng(3))
    assert torch.equal(drawn, s.sample(50, np.random.default_rng(3))) and drawn.shape == (50, DIM)
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in drawn.tolist())
    assert s.sample(10_000, np.random.default_rng(3)).shape == x.shape
    assert InMemoryRows(x).sample(3, np.random.default_rng(0)) is x  # in memory, seeding uses every row


def test_lloyd_resumed_from_any_state_ends_the_same() -> None:
    x = torch.randn(500, DIM, generator=torch.Generator().manual_seed(2))
    source = InMemoryRows(x, engine="torch")
    states: list[LloydState] = []
    want = lloyd(source, x[:9].clone(), metric="l2", n_iter=6, tol=0.0, on_update=states.append)
    assert [s.iteration for s in states] == list(range(2, 8)) and want.n_iter == 6 and len(want.history) == 7
    for state in states:
        again = LloydState.from_dict(state.to_dict())
        got = lloyd(source, x[:9].clone(), metric="l2", n_iter=6, tol=0.0, resume=again)
        assert torch.equal(got.centroids, want.centroids) and torch.equal(got.counts, want.counts)
        assert [h.objective for h in got.history] == [h.objective for h in want.history]
