"""Scalar and binary codes, their packed forms, Hamming distances and rotations against numpy oracles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline.compute.codecs import (
    binary_encode,
    binary_grid,
    grid_decode,
    hamming,
    hamming_topk,
    pack_bits,
    pack_nibbles,
    procrustes,
    random_rotation,
    rotate_rows,
    scalar_encode,
    scalar_grid,
    unpack_bits,
    unpack_nibbles,
)
from vq_pipeline.compute.levels import RowMap, decode, encode_multilevel
from vq_pipeline.errors import InvalidInputError

SETTINGS = settings(max_examples=40, deadline=None)


def scalar_oracle(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The documented closed form in float32 numpy: clip(floor((x - lo) / step + 0.5), 0, K - 1)."""
    g = grid[:, :, 0].astype(np.float32)
    k = g.shape[1]
    lo = g[:, 0]
    step = (g[:, -1] - lo) / np.float32(k - 1)
    constant = step <= 0
    safe = np.where(constant, np.float32(1), step).astype(np.float32)
    with np.errstate(over="ignore"):
        q = np.floor((x.astype(np.float32) - lo) / safe + np.float32(0.5))
    q = np.clip(q, 0, k - 1)
    q[:, constant] = 0
    return q.astype(np.int64)


@st.composite
def scalar_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    bits = draw(st.sampled_from([8, 4]))
    dim = draw(st.integers(1, 9))
    n = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e12]))
    offset = draw(st.sampled_from([0.0, 1.0, -5e3, 1e6]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, dim)) * scale + offset).astype(np.float32)
    lo = rng.standard_normal(dim) * scale + offset
    hi = lo + np.abs(rng.standard_normal(dim)) * scale * 2
    if draw(st.booleans()):
        hi[0] = lo[0]  # a constant dimension
    return x, scalar_grid(torch.from_numpy(lo), torch.from_numpy(hi), bits).numpy(), bits


@SETTINGS
@given(scalar_case())
def test_scalar_codes_equal_the_numpy_oracle_bit_for_bit(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    x, grid, bits = case
    codes = scalar_encode(torch.from_numpy(x), torch.from_numpy(grid))
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    np.testing.assert_array_equal(codes.numpy(), scalar_oracle(x, grid))
    assert codes.numel() == 0 or int(codes.max()) < 2**bits


def test_scalar_codes_of_a_large_input_split_over_threads_equal_the_oracle() -> None:
    from vq_pipeline.compute.codecs import SCALAR_THREAD_ROWS

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2 * SCALAR_THREAD_ROWS + 3, 33)) * 3).astype(np.float32)
    x[5, 2], x[-1, 0] = 3e38, -3e38  # overflow to ±inf inside the formula, then clipped
    lo, hi = np.percentile(x, 1, axis=0), np.percentile(x, 99, axis=0)
    hi[4] = lo[4]  # a constant dimension
    for bits in (8, 4):
        grid = scalar_grid(torch.from_numpy(lo), torch.from_numpy(hi), bits).numpy()
        codes = scalar_encode(torch.from_numpy(x), torch.from_numpy(grid))
        np.testing.assert_array_equal(codes.numpy(), scalar_oracle(x, grid))


@SETTINGS
@given(scalar_case())
def test_scalar_grids_increase_and_codes_are_the_nearest_grid_point_up_to_ties(
    case: tuple[np.ndarray, np.ndarray, int],
) -> None:
    x, grid, bits = case
    g = grid[:, :, 0].astype(np.float64)  # (dim, K)
    diffs = np.diff(g, axis=1)
    assert ((diffs > 0).all(axis=1) | (diffs == 0).all(axis=1)).all()
    codes = scalar_encode(torch.from_numpy(x), torch.from_numpy(grid)).numpy()
    dist = np.abs(x.astype(np.float64)[:, :, None] - g[None])  # (n, dim, K)
    best = dist.min(axis=2)
    chosen = np.take_along_axis(dist, codes[:, :, None], axis=2)[:, :, 0]
    # float32 rounding of (x - lo) / step may move a value within a few ulps of a midpoint to its other side
    tol = 4 * np.spacing(np.maximum(np.abs(x), np.abs(g).max(axis=1)).astype(np.float32)).astype(np.float64)
    tol += 1e-6 * (g[:, -1] - g[:, 0])  # the float32 step's relative error, times the codes
    assert (chosen <= best + tol).all()
    second = np.sort(dist, axis=2)[:, :, 1]
    clear = second - best > 2 * tol  # no near-tie: the nearest is the one code
    np.testing.assert_array_equal(codes[clear], dist.argmin(axis=2)[clear])


def test_scalar_grid_keeps_narrow_ranges_strictly_increasing_and_refuses_bad_ranges() -> None:
    lo = torch.tensor([1e6, 0.0, 3.0], dtype=torch.float64)
    hi = torch.tensor([1e6 + 0.0625, 1.0, 3.0], dtype=torch.float64)
    g = scalar_grid(lo, hi, 8)[:, :, 0].numpy()
    assert (np.diff(g[0]) > 0).all() and (np.diff(g[1]) > 0).all() and (g[2] == 3.0).all()
    assert g[1, 0] == 0 and abs(g[1, -1] - 1) < 1e-6 and abs(g[1, 1] - 1 / 255) < 1e-7
    with pytest.raises(InvalidInputError, match=r"hi\[0\]=0.0 < lo\[0\]=1.0.*Fix:"):
        scalar_grid(torch.tensor([1.0]), torch.tensor([0.0]), 8)
    with pytest.raises(InvalidInputError, match=r"bits=6; expected one of \(8, 4\).*Fix:"):
        scalar_grid(torch.tensor([0.0]), torch.tensor([1.0]), 6)


@SETTINGS
@given(st.integers(0, 30), st.integers(1, 20), st.integers(0, 2**31))
def test_binary_codes_equal_the_numpy_oracle_and_decode_to_the_grid(n: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mean, scale = rng.standard_normal(dim), np.abs(rng.standard_normal(dim))
    scale[0] = 0.0
    grid = binary_grid(torch.from_numpy(mean), torch.from_numpy(scale)).numpy()
    np.testing.assert_array_equal(grid[:, :, 0], np.stack([mean - scale, mean + scale], 1).astype(np.float32))
    z = rng.standard_normal((n, dim)).astype(np.float32)
    z[: n // 2, 0] = grid[0, 0, 0]  # exactly at the midpoint of a zero-scale dimension: code 0
    codes = binary_encode(torch.from_numpy(z), torch.from_numpy(grid))
    mid = (grid[:, 0, 0] + grid[:, 1, 0]) / np.float32(2)
    np.testing.assert_array_equal(codes.numpy(), (z > mid).astype(np.uint8))
    out = grid_decode(torch.from_numpy(grid), codes).numpy()
    np.testing.assert_array_equal(out, grid[np.arange(dim)[None, :], codes.numpy(), 0])


@SETTINGS
@given(st.integers(0, 20), st.integers(1, 19), st.integers(0, 2**31))
def test_packing_round_trips_and_matches_numpy(n: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    nib = rng.integers(0, 16, (n, dim))
    packed = pack_nibbles(torch.from_numpy(nib))
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n, (dim + 1) // 2)
    padded = np.concatenate([nib, np.zeros((n, dim % 2), np.int64)], 1)
    np.testing.assert_array_equal(packed.numpy(), (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8))
    np.testing.assert_array_equal(unpack_nibbles(packed, dim).numpy(), nib)
    bits = rng.integers(0, 2, (n, dim))
    pb = pack_bits(torch.from_numpy(bits))
    np.testing.assert_array_equal(pb.numpy(), np.packbits(bits.astype(np.uint8), axis=1))
    np.testing.assert_array_equal(unpack_bits(pb, dim).numpy(), bits)


def test_packing_refuses_out_of_range_codes_and_wrong_widths() -> None:
    with pytest.raises(InvalidInputError, match=r"codes hold values in \[0, 16\]; expected codes in \[0, 15\]"):
        pack_nibbles(torch.tensor([[16, 0]]))
    with pytest.raises(InvalidInputError, match=r"bits hold values in \[0, 2\]"):
        pack_bits(torch.tensor([[2, 0]]))
    with pytest.raises(InvalidInputError, match=r"packed.shape\[1\]=3; expected 2 bytes per row for dim=9"):
        unpack_bits(torch.zeros((1, 3), dtype=torch.uint8), 9)


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40), st.integers(0, 2**31))
def test_hamming_equals_a_numpy_oracle_and_topk_is_stable(n: int, m: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, (n, dim)), rng.integers(0, 2, (m, dim))
    b[: m // 2] = b[0]  # duplicates: ties broken by the lower index
    pa, pb = pack_bits(torch.from_numpy(a)), pack_bits(torch.from_numpy(b))
    want = (a[:, None, :] != b[None, :, :]).sum(2)
    got = hamming(pa, pb, memory_budget=64)  # a tiny budget: one row per chunk
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)
    k = min(m, 5)
    d, idx = hamming_topk(pa, pb, k)
    order = np.argsort(want, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx.numpy(), order)
    np.testing.assert_array_equal(d.numpy(), np.take_along_axis(want, order, 1))


def test_random_rotation_is_orthogonal_and_seeded() -> None:
    r = random_rotation(64, 3)
    assert r.dtype == torch.float32 and r.shape == (64, 64)
    r64 = r.numpy().astype(np.float64)
    assert np.abs(r64.T @ r64 - np.eye(64)).max() < 1e-5
    assert torch.equal(r, random_rotation(64, 3)) and not torch.equal(r, random_rotation(64, 4))
    # Haar: the sign fix makes the first column's distribution symmetric; a crude check of no bias
    firsts = np.stack([random_rotation(8, s).numpy()[0, 0] for s in range(200)])
    assert abs(firsts.mean()) < 0.1


def objective(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> float:
    return float(((x @ r - y) ** 2).sum())


@SETTINGS
@given(st.integers(0, 2**31))
def test_procrustes_beats_a_brute_force_search_of_2d_orthogonal_matrices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((12, 2)), rng.standard_normal((12, 2))
    r = procrustes(torch.from_numpy(x.T @ y)).numpy().astype(np.float64)
    assert np.abs(r.T @ r - np.eye(2)).max() < 1e-6
    brute = min(
        objective(x, y, np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ np.diag([1, s]))
        for t, s in itertools.product(np.linspace(0, 2 * np.pi, 3600, endpoint=False), (1, -1))
    )
    assert objective(x, y, r) <= brute + 1e-4 * max(1.0, brute)


def test_procrustes_recovers_a_rotation_and_its_statistic_adds_over_parts() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6))
    r0 = random_rotation(6, 9).numpy().astype(np.float64)
    y = x @ r0
    r = procrustes(x.T @ y).numpy()
    assert np.abs(r - r0).max() < 1e-5
    parts = sum(x[a : a + 77].T @ y[a : a + 77] for a in range(0, 500, 77))  # streamed: sums of parts
    assert torch.equal(procrustes(parts), procrustes(x.T @ y)) or np.abs(procrustes(parts).numpy() - r).max() < 1e-6
    for _ in range(200):  # no random orthogonal matrix does better on noisy targets
        q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
        noisy = y + 0.3 * rng.standard_normal(y.shape)
        best = procrustes(x.T @ noisy).numpy().astype(np.float64)
        assert objective(x, noisy, best) <= objective(x, noisy, q) + 1e-6


def nearest64(z: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = ((z[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(2)
    two = np.sort(d, axis=1)[:, :2]
    return d.argmin(1), two[:, 1] - two[:, 0]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_rotated_product_codes_equal_the_float64_oracle_on_the_rotated_rows(metric: str) -> None:
    rng = np.random.default_rng(1)
    dim, levels, n_codes = 12, 3, 16
    x = torch.from_numpy(rng.standard_normal((300, dim)).astype(np.float32))
    cents = torch.from_numpy(rng.standard_normal((levels, n_codes, dim // levels)).astype(np.float32))
    r = random_rotation(dim, 5)
    codes, dists = encode_multilevel(
        cents,
        "product",
        metric,
        x,
        rotation=r,
        return_distances=True,
        engine="torch",
        device="cpu",
        memory_budget=2**20,
    )
    xn = x / x.norm(dim=1, keepdim=True) if metric == "cosine" else x
    z = rotate_rows(xn, r).numpy()
    sub = dim // levels
    for lv in range(levels):
        want, margin = nearest64(z[:, lv * sub : (lv + 1) * sub], cents[lv].numpy())
        clear = margin > 1e-5
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(codes[:, lv].numpy()[clear], want[clear])
    # decode rotates back: the reconstruction in x's space, and distances measured on the rotated rows
    back = decode(cents, "product", codes, metric=metric, rotation=r).numpy().astype(np.float64)
    zhat = np.concatenate([cents[lv].numpy()[codes[:, lv].numpy()] for lv in range(levels)], 1).astype(np.float64)
    if metric == "cosine":
        zhat /= np.linalg.norm(zhat, axis=1, keepdims=True)
    np.testing.assert_allclose(back, zhat @ r.numpy().astype(np.float64).T, atol=1e-5)
    d64 = ((z.astype(np.float64) - zhat) ** 2).sum(1) * (0.5 if metric == "cosine" else 1.0)
    np.testing.assert_allclose(dists.numpy(), d64, rtol=1e-4, atol=1e-5)


def test_rotated_residual_codes_equal_the_float64_greedy_oracle_on_the_rotated_rows() -> None:
    rng = np.random.default_rng(2)
    dim, levels, n_codes = 8, 2, 16
    x = torch.from_numpy(rng.standard_normal((300, dim)).astype(np.float32))
    cents = torch.from_numpy(rng.standard_normal((levels, n_codes, dim)).astype(np.float32))
    cents[1] *= 0.3
    r = random_rotation(dim, 6)
    codes, _ = encode_multilevel(
        cents, "residual", "l2", x, rotation=r, engine="torch", device="cpu", memory_budget=2**20
    )
    res = rotate_rows(x, r).numpy().astype(np.float64)
    ok = np.ones(len(res), bool)
    for lv in range(levels):
        want, margin = nearest64(res, cents[lv].numpy())
        ok &= margin > 1e-5
        np.testing.assert_array_equal(codes[:, lv].numpy()[ok], want[ok])
        res = res - cents[lv].numpy().astype(np.float64)[codes[:, lv].numpy()]
    assert ok.mean() > 0.95


def test_rotated_scalar_and_binary_paths_through_encode_multilevel_equal_the_closed_forms() -> None:
    rng = np.random.default_rng(3)
    dim = 10
    x = torch.from_numpy(rng.standard_normal((50, dim)).astype(np.float32))
    grid = scalar_grid(x.min(0).values, x.max(0).values, 4)
    codes, dists = encode_multilevel(grid, "scalar", "l2", x, return_distances=True, memory_budget=2**20)
    np.testing.assert_array_equal(codes.numpy(), scalar_oracle(x.numpy(), grid.numpy()))
    dec = decode(grid, "scalar", codes, metric="l2").numpy()
    np.testing.assert_allclose(dists.numpy(), ((x.numpy() - dec) ** 2).sum(1), rtol=1e-5)
    r = random_rotation(dim, 1)
    z = rotate_rows(x, r)
    bgrid = binary_grid(z.mean(0), (z - z.mean(0)).abs().mean(0))
    bcodes, _ = encode_multilevel(bgrid, "binary", "l2", x, rotation=r, memory_budget=2**20)
    mid = (bgrid[:, 0, 0] + bgrid[:, 1, 0]) / 2
    np.testing.assert_array_equal(bcodes.numpy(), (z.numpy() > mid.numpy()).astype(np.int64))
    with pytest.raises(InvalidInputError, match=r"beam=2 with a scalar codebook.*Fix: pass beam=1"):
        encode_multilevel(grid, "scalar", "l2", x, beam=2, memory_budget=2**20)
    with pytest.raises(InvalidInputError, match=r"rotation.shape=\(9, 9\); expected \(10, 10\).*Fix:"):
        encode_multilevel(bgrid, "binary", "l2", x, rotation=random_rotation(9, 0), memory_budget=2**20)


def test_row_maps_rotate_first_and_carry_the_rotation_through_arrays() -> None:
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((20, 6)).astype(np.float32))
    r = random_rotation(6, 2)
    sliced = RowMap.columns(2, 4, 6, rotation=r)
    assert torch.equal(sliced(x), rotate_rows(x, r)[:, 2:4])
    prefix = torch.from_numpy(rng.standard_normal((1, 4, 6)).astype(np.float32))
    resid = RowMap.residual(prefix, engine="torch", rotation=r)
    z = rotate_rows(x, r)
    k = ((z[:, None, :] - prefix[0][None]) ** 2).sum(2).argmin(1)
    torch.testing.assert_close(resid(x), z - prefix[0][k])
    for m in (sliced, resid):
        back = RowMap.from_arrays(m.to_arrays())
        assert back.rotation is not None and torch.equal(back.rotation, r) and torch.equal(back(x), m(x))
    plain = RowMap.from_arrays({k: v for k, v in RowMap.columns(0, 3, 6).to_arrays().items() if k != "rotation"})
    assert plain.rotation is None  # arrays written before rotations existed
    with pytest.raises(InvalidInputError, match=r"rotation.shape=\(5, 5\); expected \(6, 6\)"):
        RowMap.columns(0, 3, 6, rotation=random_rotation(5, 0))
