"""Seeding: the pruned greedy k-means++ against a plain float64 greedy k-means++; k-means||."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import oracle

from vq_pipeline import TooFewPointsError, fit_codebook
from vq_pipeline.compute.engines.torch import TorchEngine
from vq_pipeline.compute.seeding import InitProgress, kmeans_parallel, kmeans_plus_plus
from vq_pipeline.fitting.flat import _initial_centroids
from vq_pipeline.fitting.options import fit_options
from vq_pipeline.settings import FitSettings

CPU = torch.device("cpu")
#: Candidates whose float64 potentials differ by less than this, relative, tie: either may win.
TIE = 1e-9


def reference(
    x: torch.Tensor,
    n_codes: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    follow: torch.Tensor | None = None,
) -> tuple[list[int], int]:
    """Plain greedy k-means++, every distance in float64 in the direct form, drawing from
    ``generator`` as :func:`kmeans_plus_plus` does. Returns the chosen rows and the number of steps
    decided by a near-tie (nonzero only when following). The first row is drawn uniformly, or in
    proportion to ``weights``.

    With ``follow`` (n_codes, dim) (a seeding's result), each step must find ``follow[i]`` among its
    candidates at a potential within ``TIE`` of the best, and then takes it: the two runs then keep
    drawing the same candidates even after a near-tie that they broke differently.
    """
    x64 = x.double()
    w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.double()
    n, n_trials = x.shape[0], 2 + int(math.log(n_codes))
    if weights is None:
        chosen = [int(torch.randint(n, (1,), generator=generator))]
    else:
        target = torch.rand(1, generator=generator, dtype=torch.float64) * float(w.sum())
        chosen = [int(torch.searchsorted(w.cumsum(0), target, right=True).clamp_(max=n - 1))]
    if follow is not None:
        assert torch.equal(x[chosen[0]], follow[0]), "the first centre is not the generator's first draw"
    closest = (x64 - x64[chosen[0]]).square().sum(dim=1)  # (n,)
    ties = 0
    for i in range(1, n_codes):
        weighted = closest * w
        total = float(weighted.sum())
        cumulative = weighted.cumsum(0)
        targets = torch.rand(n_trials, generator=generator, dtype=torch.float64) * total
        cand = torch.searchsorted(cumulative, targets, right=True).clamp_(max=n - 1)  # (n_trials,)
        d = torch.stack([(x64 - x64[c]).square().sum(dim=1) for c in cand.tolist()])  # (n_trials, n)
        potential = (torch.minimum(closest[None, :], d) * w).sum(dim=1)  # (n_trials,)
        best = int(potential.argmin())
        if follow is not None:
            match = [t for t in range(n_trials) if torch.equal(x[cand[t]], follow[i])]
            assert match, f"step {i}: the seeding chose a row that is not among the candidates drawn"
            t = min(match, key=lambda t: float(potential[t]))
            assert potential[t] <= potential[best] * (1 + TIE), (
                f"step {i}: the seeding chose a candidate of potential {float(potential[t])!r}, "
                f"the best is {float(potential[best])!r}"
            )
            ties += bool(potential[t] != potential[best])
            best = t
        chosen.append(int(cand[best]))
        closest = torch.minimum(closest, d[best])
    return chosen, ties


def potential(x: torch.Tensor, c: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Float64 k-means objective of the centres ``c`` over the rows ``x`` (weighted)."""
    d = oracle(x, c, "l2").min(dim=1).values  # (n,) float64
    return float(d.sum() if weights is None else (d * weights.double()).sum())


def seed(x: torch.Tensor, n_codes: int, s: int, **kw) -> torch.Tensor:
    kw.setdefault("memory_budget", 2**20)
    return kmeans_plus_plus(x, n_codes, generator=torch.Generator().manual_seed(s), device=CPU, **kw)


def check_exact(x: torch.Tensor, n_codes: int, s: int, weights: torch.Tensor | None = None, **kw) -> None:
    """The seeding picks the reference's rows (up to near-ties), with the reference's potential: with
    the given memory budget (pruned passes over the rows, unless they are very few) and with one that
    holds every pairwise distance (the matrix of ``_GreedyMatrix``)."""
    assert x.shape[0] ** 2 * 9 <= 2**28  # the second run takes the matrix path
    for budget in (kw.pop("memory_budget", 2**20), 2**28):
        check_exact_with(x, n_codes, s, weights, memory_budget=budget, **kw)


def check_exact_with(x: torch.Tensor, n_codes: int, s: int, weights: torch.Tensor | None, **kw) -> None:
    ours = seed(x, n_codes, s, weights=weights, **kw)
    assert ours.shape == (n_codes, x.shape[1]) and ours.dtype == torch.float32
    _, ties = reference(x, n_codes, torch.Generator().manual_seed(s), weights, follow=ours)
    if ties:  # broken the other way, a near-tie sends the runs apart: only the followed run is checked
        return
    rows, _ = reference(x, n_codes, torch.Generator().manual_seed(s), weights)
    assert torch.equal(ours, x[rows])
    assert potential(x, ours, weights) == pytest.approx(potential(x, x[rows], weights), rel=TIE)


def uncentred_blobs(n: int, dim: int, n_blobs: int, s: int, *, offset: float, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(s)
    centres = torch.randn(n_blobs, dim, generator=g) * 3 + offset
    return centres[torch.randint(n_blobs, (n,), generator=g)] + spread * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("s", range(6))
@pytest.mark.parametrize(("n", "dim", "n_codes"), [(400, 2, 20), (900, 8, 48), (600, 33, 24), (300, 5, 2)])
def test_same_rows_as_plain_greedy_on_uncentred_blobs(s: int, n: int, dim: int, n_codes: int) -> None:
    check_exact(uncentred_blobs(n, dim, 12, s, offset=100.0, spread=0.5), n_codes, s)


@pytest.mark.parametrize("s", range(6))
def test_same_rows_on_near_copies_far_from_the_origin(s: int) -> None:
    """Clusters a thousand times tighter than their spacing, 1e4 from the origin: the float32 matrix
    product cannot rank their candidates (its error exceeds their distances), float64 can."""
    g = torch.Generator().manual_seed(s)
    base = torch.randn(10, 6, generator=g) * 10 + 1e4
    x = base[torch.randint(10, (500,), generator=g)] + 1e-2 * torch.randn(500, 6, generator=g)
    check_exact(x, 60, s)


@pytest.mark.parametrize("s", range(6))
def test_same_rows_with_duplicated_rows(s: int) -> None:
    g = torch.Generator().manual_seed(s)
    distinct = torch.randn(60, 7, generator=g) + 5
    x = distinct[torch.randint(60, (800,), generator=g)]  # each row some 13 times
    check_exact(x, 40, s)
    check_exact(x, 60, s)  # as many codes as distinct rows: every one of them, once


@pytest.mark.parametrize("s", range(4))
def test_too_few_distinct_rows_is_refused(s: int) -> None:
    g = torch.Generator().manual_seed(s)
    distinct = torch.randn(9, 4, generator=g)
    x = distinct[torch.randint(9, (200,), generator=g)]
    x[:9] = distinct  # all 9 present
    with pytest.raises(TooFewPointsError, match=r"only 9 distinct rows but n_codes=10"):
        seed(x, 10, s)
    with pytest.raises(TooFewPointsError, match=r"only 9 distinct rows but n_codes=10"):
        kmeans_parallel(
            x, 10, generator=torch.Generator().manual_seed(s), engine=TorchEngine(), memory_budget=2**20, device=CPU
        )


@pytest.mark.parametrize("s", range(6))
def test_same_rows_under_cosine(s: int) -> None:
    x = uncentred_blobs(700, 16, 20, s, offset=2.0, spread=0.3)
    check_exact(x / x.norm(dim=1, keepdim=True), 32, s)


@pytest.mark.parametrize("s", range(4))
def test_one_two_and_all_codes(s: int) -> None:
    x = uncentred_blobs(64, 3, 5, s, offset=-50.0, spread=1.0)
    for n_codes in (1, 2, 64):
        check_exact(x, n_codes, s)
    assert sorted(map(tuple, seed(x, 64, s).tolist())) == sorted(map(tuple, x.tolist()))


@pytest.mark.parametrize("s", range(4))
def test_same_rows_with_weights(s: int) -> None:
    g = torch.Generator().manual_seed(s)
    x = uncentred_blobs(300, 6, 15, s, offset=20.0, spread=0.5)
    weights = torch.randint(1, 50, (300,), generator=g).double()
    weights[::7] = 0  # rows of weight 0 are never drawn
    check_exact(x, 25, s, weights=weights)


def test_chunk_size_changes_nothing() -> None:
    x = uncentred_blobs(1000, 24, 30, 0, offset=7.0, spread=1.0)
    wide = seed(x, 40, 0, memory_budget=2**28)
    # A few dozen rows per chunk: every pass goes through many chunks, in both screening modes.
    assert torch.equal(seed(x, 40, 0, memory_budget=64 * 1024), wide)
    check_exact(x, 40, 0, memory_budget=64 * 1024)


def test_progress_events() -> None:
    x = uncentred_blobs(500, 4, 10, 0, offset=0.0, spread=1.0)
    events: list[InitProgress] = []
    seed(x, 40, 0, progress=events.append)
    assert [e.chosen for e in events] == [*range(2, 40, 2), 40] and {e.n_codes for e in events} == {40}


def test_kmeans_parallel_is_deterministic_and_picks_distinct_rows() -> None:
    x = uncentred_blobs(2000, 8, 30, 1, offset=30.0, spread=0.5)

    def run(s: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(s)
        return kmeans_parallel(x, 40, generator=g, engine=TorchEngine(), memory_budget=2**22, device=CPU)

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in a.tolist()) and len({tuple(r) for r in a.tolist()}) == 40


def test_kmeans_parallel_objective_after_lloyd_is_within_a_few_percent() -> None:
    """On blobs, Lloyd from k-means|| ends within 3% of Lloyd from k-means++ (means over seeds)."""
    x = uncentred_blobs(3000, 16, 40, 2, offset=10.0, spread=1.5)
    after: dict[str, list[float]] = {"k-means++": [], "k-means||": []}
    for s in range(3):
        for name, seeding in (("k-means++", kmeans_plus_plus), ("k-means||", kmeans_parallel)):
            g = torch.Generator().manual_seed(s)
            c0 = seeding(x, 40, generator=g, engine=TorchEngine(), memory_budget=2**22, device=CPU)
            cb = fit_codebook(x, 40, init=c0, n_iter=10, tol=0.0, engine="torch", device="cpu")
            after[name].append(cb.stats["inertia"])
    ratio = sum(after["k-means||"]) / sum(after["k-means++"])
    assert ratio < 1.03, after


def test_initial_centroids_dispatches_kmeans_parallel() -> None:
    x = uncentred_blobs(2000, 8, 30, 5, offset=3.0, spread=0.5)
    opts = fit_options(32, FitSettings(seed=7, engine="torch", device="cpu"), dim=8, n_rows=2000, x_device=x)
    eng = TorchEngine()
    parallel = _initial_centroids(x, replace(opts, init="k-means||"), 0, eng, None)
    expected = kmeans_parallel(
        x,
        32,
        generator=torch.Generator().manual_seed(7 * 1_000_003),
        engine=eng,
        memory_budget=opts.memory_budget,
        device=CPU,
    )
    assert torch.equal(parallel, expected)
    assert opts.init == "k-means||"  # what init="auto" stands for with a flat codebook
    exact = _initial_centroids(x, replace(opts, init="k-means++"), 0, eng, None)
    assert torch.equal(exact, seed(x, 32, 7 * 1_000_003, memory_budget=opts.memory_budget))


def test_auto_fits_large_tables_from_a_sample() -> None:
    """init="auto" is "sample" for flat and product codebooks from SAMPLE_INIT_MIN_ROWS rows and
    SAMPLE_INIT_FACTOR * SEED_ROWS_PER_CODE rows a code on, "k-means||" below, "progressive" for residual ones."""
    from vq_pipeline.compute.data import SEED_ROWS_PER_CODE
    from vq_pipeline.fitting.options import SAMPLE_INIT_FACTOR, SAMPLE_INIT_MIN_ROWS, resolve_init

    floor = SAMPLE_INIT_MIN_ROWS
    for codec in ("flat", "product"):
        assert resolve_init("auto", codec, floor, 8) == "sample"
        assert resolve_init("auto", codec, floor - 1, 8) == "k-means||"
        big_k = floor // (SAMPLE_INIT_FACTOR * SEED_ROWS_PER_CODE) * 2  # the per-code bound decides
        rows = SAMPLE_INIT_FACTOR * SEED_ROWS_PER_CODE * big_k
        assert resolve_init("auto", codec, rows, big_k) == "sample"
        assert resolve_init("auto", codec, rows - 1, big_k) == "k-means||"
        assert resolve_init("auto", codec) == "k-means||"  # rows unknown: not large
        assert resolve_init("k-means++", codec, 10**9, 8) == "k-means++"  # a name given is kept
    assert resolve_init("auto", "residual", 10**9, 8) == "progressive"


def test_the_sample_init_is_a_seeded_fit_on_a_sample_and_the_fit_goes_on_from_it() -> None:
    """Oracle: the sample init's centroids are k-means|| and Lloyd (the fit's tol and n_iter) on
    SEED_ROWS_PER_CODE rows a code drawn with the restart's generator; a fit with init="sample" is the
    same fit as one given those centroids (Lloyd on every row from them): same centroids, counts and inertia."""
    from vq_pipeline.compute.data import SEED_ROWS_PER_CODE, InMemoryRows
    from vq_pipeline.compute.lloyd import lloyd

    k, n = 3, 2000
    x = uncentred_blobs(n, 6, 12, 9, offset=2.0, spread=0.7)
    settings = FitSettings(seed=4, engine="torch", device="cpu", init="sample", n_iter=30, tol=1e-3)
    opts = fit_options(k, settings, dim=6, n_rows=n, x_device=x)
    got = _initial_centroids(x, opts, 0, TorchEngine(), None)

    g = torch.Generator().manual_seed(4 * 1_000_003)
    rows = x[torch.randperm(n, generator=g)[: SEED_ROWS_PER_CODE * k].sort().values]
    c0 = kmeans_parallel(rows, k, generator=g, engine=TorchEngine(), memory_budget=opts.memory_budget, device=CPU)
    want = lloyd(InMemoryRows(rows, engine="torch"), c0, metric="l2", n_iter=30, tol=1e-3).centroids
    assert rows.shape[0] == SEED_ROWS_PER_CODE * k < n
    assert torch.equal(got, want)

    fit = fit_codebook(x, k, seed=4, engine="torch", device="cpu", init="sample", n_iter=30, tol=1e-3)
    given = fit_codebook(x, k, seed=4, engine="torch", device="cpu", init=got, n_iter=30, tol=1e-3)
    assert fit.settings["init"] == "sample" and given.settings["init"] == "tensor"
    assert torch.equal(fit.centroids, given.centroids) and torch.equal(fit.counts, given.counts)
    assert fit.stats["inertia"] == given.stats["inertia"] and fit.stats["n_rows"] == n
