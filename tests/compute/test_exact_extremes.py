"""Exact codes at every shape: many codes in few dimensions, grids, rows inside their cells, data far
from the origin, through the engines and through the public API, for both engines.

The float64 oracle is compared at a tolerance sized to what float32 itself can resolve
(:func:`float32_rtol`): the default of ``assert_codes_match``, relative to the largest distance of
the whole matrix, would excuse every row of a scalar quantizer, whose neighbouring codes differ by
about 1e-8 of it, and so could not tell a right code from a wrong one there.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ENGINES, GPU_DEVICE, assert_codes_match, cuda, oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline import Codebook
from vq_pipeline.compute.engines import get_engine
from vq_pipeline.validate import normalize_rows

U = 2.0**-24  # float32 unit roundoff
CPU = torch.device("cpu")
ORACLE_ELEMENTS = 2**21  # the oracle's (rows, n_codes, dim) float64 temporaries stay near 16 MiB


def float32_rtol(x: torch.Tensor, c: torch.Tensor, k: int, metric: str) -> float:
    """``rtol`` for :func:`assert_codes_match` that excuses only what float32 cannot resolve.

    l2: the direct form ``sum((x - c)**2)`` in float32 is within ``gamma_{dim+2} d`` of a true
    squared distance ``d``, and every checked choice compares distances up to the largest (k+1)-th
    one ``t`` of any row; twice the error of two such distances, with room to spare, is
    ``8 (dim + 3) u t``.
    cosine: the rows are normalized in float32 and the stored centroids are unit only to within
    ``(dim + 3) u``; compared as ``|x/|x| - c|^2``, the codes' distances move by at most about
    ``(dim + 3) u (2 t + 3 sqrt(t))`` (the square root from the rows' rounding, times ``|c_j - c_l|``);
    ``8 (dim + 3) u (t + sqrt(t))`` covers it.
    The tolerance is ``rtol`` times the conftest's scale (the largest distance, at least 1).
    """
    d = oracle(x, c, metric)  # (n, n_codes) float64
    t = max(d.sort(dim=1).values[:, min(k, d.shape[1] - 1)].max().item(), 0.0)
    tol = 8 * (x.shape[1] + 3) * U * (t + (math.sqrt(t) if metric == "cosine" else 0.0))
    return tol / max(d.abs().amax().item(), 1.0)


def check_codes(codes: torch.Tensor, x: torch.Tensor, c: torch.Tensor, metric: str = "l2") -> int:
    """:func:`assert_codes_match` at :func:`float32_rtol`, over slices of rows that keep the oracle's
    temporaries small; returns the number of rows checked strictly."""
    codes = codes.view(codes.shape[0], -1)  # (n, k)
    step = max(1, ORACLE_ELEMENTS // (c.shape[0] * c.shape[1]))
    strict = 0
    for lo in range(0, x.shape[0], step):
        xs, cs = x[lo : lo + step], codes[lo : lo + step]
        strict += assert_codes_match(cs, xs, c, metric, rtol=float32_rtol(xs, c, cs.shape[1], metric))
    return strict


def grid(dim: int, side: int, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cells, c)``: (side**dim, dim) float64 integer cell coordinates and the float32 centroids at
    the cells' centres, ``(cell + 0.5) / side + offset``."""
    axes = torch.meshgrid(*[torch.arange(side, dtype=torch.float64)] * dim, indexing="ij")
    cells = torch.stack(axes, dim=-1).reshape(-1, dim)  # (side**dim, dim)
    return cells, ((cells + 0.5) / side + offset).float()


def rows_in_cells(cells: torch.Tensor, side: int, offset: float, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, dim) float32 rows in the middle half of random cells of :func:`grid`: each row is nearer
    its cell's centroid than any other by a margin of at least half a cell width squared."""
    pick = cells[torch.randint(cells.shape[0], (n,), generator=g)]  # (n, dim)
    jitter = (torch.rand(pick.shape, generator=g, dtype=torch.float64) - 0.5) * 0.5  # (n, dim) in [-1/4, 1/4)
    return ((pick + 0.5 + jitter) / side + offset).float()


@st.composite
def extreme_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x, c, k)``: dims 1-8, up to 65,536 codes on a grid or at random, rows inside the cells or
    anywhere, centred at 0.5 or off-centre by 1000 (where float32 spacing is 6e-5 and the widest
    grids hold duplicated centroids)."""
    dim = draw(st.integers(1, 8))
    log2_codes = draw(st.integers(2, 16))
    layout = draw(st.sampled_from(["grid", "random"]))
    placement = draw(st.sampled_from(["cells", "anywhere"]))
    offset = draw(st.sampled_from([0.0, 1000.0]))
    k = draw(st.sampled_from([1, 3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    side = max(2, round(2 ** (log2_codes / dim)))
    while side**dim > 2**16:
        side -= 1
    cells, c = grid(dim, side, offset)
    if layout == "random":
        cells = torch.rand((2**log2_codes, dim), generator=g, dtype=torch.float64) * side - 0.5
        c = ((cells + 0.5) / side + offset).float()
    n = max(16, min(2000, 2**20 // c.shape[0]))
    if placement == "cells":
        x = rows_in_cells(cells, side, offset, n, g)
    else:
        x = (torch.rand((n, dim), generator=g, dtype=torch.float64) + offset).float()
    return x, c, k


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=40, deadline=None)
@given(case=extreme_cases())
def test_nearest_is_exact_at_extreme_shapes(engine: str, case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    x, c, k = case
    sqdist, idx = get_engine(engine, CPU, x.shape[1]).nearest(x, c, k)  # (n, k), (n, k)
    assert idx.shape == (x.shape[0], k) and bool((sqdist[:, 1:] >= sqdist[:, :-1]).all())
    check_codes(idx, x, c)
    # The distances are the chosen codes' own, to float32 precision.
    want = ((x.double()[:, None, :] - c.double()[idx]) ** 2).sum(dim=2)  # (n, k)
    torch.testing.assert_close(sqdist.double(), want, rtol=4 * (x.shape[1] + 2) * U, atol=1e-30)


def scalar_quantizer(n_codes: int, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, c)``: ``n_codes`` codes on a grid over [offset, offset + 1), ``2**23 / n_codes`` rows in
    the middle half of their cells (4096 codes at offset 1000: one float32 step from their centroid,
    three from the next)."""
    cells, c = grid(1, n_codes, offset)
    return rows_in_cells(cells, n_codes, offset, 2**23 // n_codes, torch.Generator().manual_seed(0)), c


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("n_codes", "offset"), [(4096, 1000.0), (16384, 0.0)])
def test_scalar_quantizer_gives_every_row_its_own_cell(engine: str, n_codes: int, offset: float) -> None:
    # Before the rounding bound, the torch engine put 73 of 2048 rows (4096 codes, offset 1000) and
    # 196 of 512 (16384 codes) on a neighbouring code: its float32 GEMM cannot separate codes this
    # close in [0, 1).
    x, c = scalar_quantizer(n_codes, offset)
    want = ((x.double() - offset) * n_codes).floor().long()[:, 0]  # (n,) the cell each row was drawn in
    eng = get_engine(engine, CPU, 1)
    _, idx = eng.nearest(x, c, 1)
    assert torch.equal(idx[:, 0], want)
    assert check_codes(idx, x, c) == x.shape[0]
    _, top = eng.nearest(x, c, 3)
    assert torch.equal(top[:, 0], want)
    # The 2nd and 3rd codes tie for a row on its centroid: half the rows at offset 1000, few at 0.
    assert check_codes(top, x, c) > 0.4 * x.shape[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_public_encode_is_exact_for_a_scalar_quantizer(engine: str) -> None:
    x, c = scalar_quantizer(4096, 1000.0)
    cb = Codebook(centroids=c, counts=torch.zeros(c.shape[0], dtype=torch.int64), metric="l2")
    codes, dist = cb.encode(x, engine=engine, device="cpu", return_distances=True)
    assert check_codes(codes, x, c) == x.shape[0]
    torch.testing.assert_close(dist.double(), oracle(x, c, "l2").min(dim=1).values, rtol=1e-6, atol=1e-30)
    top = cb.encode(x, top_k=3, engine=engine, device="cpu", memory_budget=2**20)  # many small chunks
    assert torch.equal(top[:, 0], codes)
    check_codes(top, x, c)


def unit_circle(n_codes: int, n: int, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, c, cell)``: ``n_codes`` unit centroids evenly spaced on the circle (float32, so unit to
    within its precision) and ``n`` rows of norm ``radius`` in the middle half of the angular cells
    ``cell`` (n,) of their nearest centroid."""
    angle = 2 * math.pi * torch.arange(n_codes, dtype=torch.float64) / n_codes
    c = torch.stack([angle.cos(), angle.sin()], dim=1).float()  # (n_codes, 2)
    g = torch.Generator().manual_seed(1)
    cell = torch.randint(n_codes, (n,), generator=g)  # (n,)
    row_angle = 2 * math.pi * (cell + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.5) / n_codes
    return (torch.stack([row_angle.cos(), row_angle.sin()], dim=1) * radius).float(), c, cell


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n_codes", [16384, 65536])
def test_public_encode_is_exact_for_many_codes_on_the_unit_circle(engine: str, n_codes: int) -> None:
    # Cosine normalizes the rows and ranks by L2 (vq_pipeline.compute.assign.encode). Codes 2 pi / 65536
    # apart differ in 1 - cos by about 2e-9; before the bound the torch engine got 24 of 128 rows
    # (16384 codes) and 26 of 32 (65536 codes) wrong.
    n = 2**21 // n_codes
    x, c, cell = unit_circle(n_codes, n, 3.0)
    cb = Codebook(centroids=c, counts=torch.zeros(n_codes, dtype=torch.int64), metric="cosine")
    for k in (1, 3):
        codes = cb.encode(x, top_k=k, engine=engine, device="cpu")
        # Exact for the rows as the library normalizes them ...
        strict = check_codes(codes, normalize_rows(x), c, "l2")
        # ... and for the cosine itself, at what float32 unit vectors can resolve.
        check_codes(codes, x, c, "cosine")
        if k == 1:
            assert torch.equal(codes, cell) and strict == n


@pytest.mark.parametrize("k", [1, 3])
def test_torch_engine_ranks_exact_ties_lowest_code_first(k: int) -> None:
    # Rows halfway between grid points are equally far from two or four codes, and each centroid
    # appears twice (codes j and j + 64): in every position of the top k, the lowest code wins.
    cells, c = grid(2, 8, 1000.0)
    c = torch.cat([c, c])  # (128, 2)
    g = torch.Generator().manual_seed(2)
    x = ((cells[torch.randint(64, (500,), generator=g)] + 1.0) / 8 + 1000.0).float()  # (500, 2) grid corners
    _, idx = get_engine("torch", CPU, 2).nearest(x, c, k)
    d = oracle(x, c, "l2")  # (500, 128)
    assert torch.equal(idx, d.sort(dim=1, stable=True).indices[:, :k])


def test_torch_engine_stays_exact_when_matrix_products_round_coarsely() -> None:
    # Under 'medium' float32 matmul precision (bfloat16 factors where the backend supports it) the
    # rounding bound widens 65,536-fold and every row is re-ranked, still exactly. (The codes are
    # 2 pi / 16384 apart on the unit circle: the float32 GEMM alone fails here at any precision.)
    x, c, cell = unit_circle(16384, 128, 1.0)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        for k in (1, 3):
            _, idx = get_engine("torch", CPU, 2).nearest(x, c, k)
            assert torch.equal(idx[:, 0], cell)
            check_codes(idx, x, c)
    finally:
        torch.set_float32_matmul_precision(before)


def _round_factors(a: torch.Tensor, bits: int, truncate: bool) -> torch.Tensor:
    """float32 ``a`` with its significand cut to ``bits`` stored bits (TF32: 10, bfloat16: 7), by
    truncation or round-to-nearest-even, as a GPU or AVX512-BF16 product sees its factors."""
    drop = 23 - bits
    i = a.contiguous().view(torch.int32).to(torch.int64)
    if not truncate:
        i = i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)
    return (i & ~((1 << drop) - 1)).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize(("bits", "precision"), [(10, "high"), (7, "medium")])
@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("dim", [8, 256, 1024])
def test_rounding_bound_covers_products_with_coarse_factors(
    bits: int, precision: str, truncate: bool, dim: int
) -> None:
    # The engine's partial |cs|^2 - 2 xs.cs from factors rounded to TF32 or bfloat16 and summed in
    # float32, against the exact key in float64: every entry within the row's bound E_i. Rows point
    # along their centroids' directions, so all the terms of a product share a sign and the rounding
    # errors add up instead of cancelling; the data sit far from the origin.
    from vq_pipeline.compute.engines.torch import TorchEngine, matmul_roundoff, product_gamma, _rounding_bound

    g = torch.Generator().manual_seed(dim + bits)
    c = torch.randn((64, dim), generator=g) + 50.0  # (64, dim)
    pick = torch.randint(64, (512,), generator=g)
    scale = 0.5 + torch.rand((512, 1), generator=g)
    eng = TorchEngine()
    shift, weights, big_c = eng._centred(c)
    x = ((c[pick] - shift) * scale + shift + 0.01 * torch.randn((512, dim), generator=g)).float()  # (512, dim)
    aug = torch.cat([x - shift, torch.ones(512, 1)], dim=1)  # (512, dim + 1) as _ranking builds it
    partial = torch.mm(_round_factors(aug, bits, truncate), _round_factors(weights, bits, truncate)).double()
    s64, c64 = shift.double(), c.double()
    exact = (c64 - s64).square().sum(dim=1)[None, :] - 2.0 * (x.double() - s64) @ (c64 - s64).T  # (512, 64)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        gamma = product_gamma(dim, matmul_roundoff(CPU))
    finally:
        torch.set_float32_matmul_precision(before)
    assert gamma == product_gamma(dim, 2.0 ** -(bits + 1)) < 5.0 * 2.0 ** -(bits + 1)  # about 4u, not inf
    bound = _rounding_bound(x - shift, big_c, gamma).double()  # (512,)
    ratio = ((partial - exact).abs() / bound[:, None]).max()
    assert ratio <= 1.0
    assert ratio > 0.05  # the data do reach the bound's scale: the test could fail


def test_torch_engine_proves_most_codes_when_products_use_tf32() -> None:
    # Under 'high' (TF32 allowed) the bound at dim 256 used to be infinite, which sent every row to
    # the float64 re-ranking; it now proves most rows of well-separated clusters, and the codes stay
    # exact.
    from vq_pipeline.compute.engines.torch import (
        _marks,
        matmul_roundoff,
        product_gamma,
        _proven_best_rows,
        _rounding_bound,
    )

    g = torch.Generator().manual_seed(5)
    c = torch.randn((128, 256), generator=g) + 3.0  # (128, 256)
    x = c[torch.randint(128, (4096,), generator=g)] + 0.3 * torch.randn((4096, 256), generator=g)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        eng = get_engine("torch", CPU, 256)
        _, idx = eng.nearest(x, c, 1)
        partial, xs, big_c = eng._ranking(x, c)
        bound = _rounding_bound(xs, big_c, product_gamma(256, matmul_roundoff(CPU)))
        _, unproven = _proven_best_rows(partial.clone(), bound, _marks(128, CPU))
    finally:
        torch.set_float32_matmul_precision(before)
    assert check_codes(idx, x, c) > 4000
    assert unproven.size < 0.1 * x.shape[0], unproven.size


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("engine", ENGINES)
def test_cuda_scalar_quantizer_and_grid_are_exact(engine: str) -> None:
    x, c = scalar_quantizer(4096, 1000.0)
    cells, c2 = grid(2, 256, 1000.0)
    g = torch.Generator().manual_seed(4)
    x2 = torch.cat([rows_in_cells(cells, 256, 1000.0, 2000, g), (torch.rand((1000, 2), generator=g) + 1000.0)])
    for rows, codes in ((x, c), (x2, c2)):
        eng = get_engine(engine, torch.device(GPU_DEVICE), rows.shape[1])
        for k in (1, 3):
            _, idx = eng.nearest(rows.to(GPU_DEVICE), codes.to(GPU_DEVICE), k)
            assert check_codes(idx.cpu(), rows, codes) > 0.4 * rows.shape[0]
