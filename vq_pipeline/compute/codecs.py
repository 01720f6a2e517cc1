"""Per-dimension codes (scalar and binary), their packed forms, Hamming distances, and rotations.

A scalar or binary codebook holds, for each of its ``dim`` dimensions, a grid of the values a code
decodes to: a (dim, K, 1) float32 tensor (the multi-level layout with one-wide levels, one level per
dimension; K = ``2**bits`` for scalar codes, 2 for binary codes).

* scalar: ``grid[d, k] = lo[d] + k * step[d]`` with ``step[d] = (hi[d] - lo[d]) / (K - 1)``, strictly
  increasing in ``k`` (or constant when ``hi[d] == lo[d]``). A value's code is the closed form
  ``clip(floor((x - lo) / step + 0.5), 0, K - 1)`` in float32, ``lo`` and ``step`` read back from
  the grid's ends: the nearest grid point, except within float32 rounding of a midpoint.
* binary: ``grid[d] = [m[d] - s[d], m[d] + s[d]]``; a value's code is 1 above the midpoint, else 0.

Rotations are orthogonal (dim, dim) float32 matrices ``R``; rows are rotated as ``z = x @ R`` and
reconstructions rotated back as ``x_hat = z_hat @ R.T``. :func:`procrustes` is the orthogonal ``R``
minimizing ``||X R - Y||`` from the sum ``X^T Y``, which streamed and partitioned passes add up.

Tensors in, tensors out: no polars, no files.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.settings import SCALAR_BITS

#: Bytes of temporaries one chunk of :func:`hamming` may use.
HAMMING_MEMORY_BUDGET = 64 * 2**20

# popcount of every byte value
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def _grid_dims(grid: torch.Tensor, name: str = "grid") -> tuple[int, int]:
    if not isinstance(grid, torch.Tensor) or grid.ndim != 3 or grid.shape[2] != 1 or grid.shape[1] < 2:
        raise InvalidInputError(
            f"{name}.shape={tuple(getattr(grid, 'shape', ()))}; expected a (dim, n_codes, 1) tensor with n_codes >= 2 "
            f"(one grid of values per dimension). Fix: pass the centroids of a scalar or binary codebook."
        )
    return int(grid.shape[0]), int(grid.shape[1])


def scalar_grid(lo: torch.Tensor | np.ndarray, hi: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """The (dim, 2**bits, 1) float32 grid of a scalar codebook from per-dimension ranges ``[lo, hi]``.

    ``step = (hi - lo) / (2**bits - 1)`` and ``lo + k * step`` are computed in float64, then stored as
    float32. Where the range is positive but too narrow for 2**bits distinct float32 values, the step
    is widened to the smallest that keeps them strictly increasing; where ``hi == lo`` every value is
    ``lo``.
    """
    if bits not in SCALAR_BITS:
        raise InvalidInputError(f"bits={bits!r}; expected one of {SCALAR_BITS}. Fix: pass bits=8 or bits=4.")
    lo64 = np.asarray(torch.as_tensor(lo).detach().cpu().numpy(), dtype=np.float64).reshape(-1)  # (dim,)
    hi64 = np.asarray(torch.as_tensor(hi).detach().cpu().numpy(), dtype=np.float64).reshape(-1)  # (dim,)
    if lo64.shape != hi64.shape or not (np.isfinite(lo64).all() and np.isfinite(hi64).all()):
        raise InvalidInputError(
            f"lo.shape={lo64.shape}, hi.shape={hi64.shape}; expected two finite (dim,) ranges. "
            f"Fix: compute them from finite training rows."
        )
    if (hi64 < lo64).any():
        d = int(np.argmax(hi64 < lo64))
        raise InvalidInputError(
            f"hi[{d}]={float(hi64[d])!r} < lo[{d}]={float(lo64[d])!r}; expected hi >= lo in every dimension. "
            f"Fix: swap them."
        )
    k_max = 2**bits - 1
    lo32 = lo64.astype(np.float32).astype(np.float64)  # the grid starts at a float32 value
    step = (hi64 - lo32) / k_max  # (dim,)
    # Steps below 2 float32 spacings at the largest magnitude the grid reaches could collapse two values;
    # widening a step moves the grid's end, which may reach a larger spacing: repeat until it holds.
    for _ in range(4):
        end = np.abs(lo32 + k_max * step)
        reach = np.maximum(np.maximum(np.abs(lo32), np.abs(hi64)), end).astype(np.float32)
        min_step = 2.0 * np.spacing(reach).astype(np.float64)  # (dim,)
        narrow = (step > 0) & (step < min_step)
        if not narrow.any():
            break
        step = np.where(narrow, min_step, step)
    grid = lo32[:, None] + np.arange(k_max + 1, dtype=np.float64)[None, :] * step[:, None]  # (dim, K)
    out = grid.astype(np.float32)
    out[:, 0] = lo32  # exact start
    return torch.from_numpy(np.ascontiguousarray(out[:, :, None]))


def _scalar_params(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, step, constant) of a scalar grid: (dim,) float32, (dim,) float32 (1 where constant), (dim,) bool."""
    _, k = _grid_dims(grid)
    g = grid[:, :, 0].to(torch.float32)
    lo = g[:, 0].contiguous()
    step = (g[:, -1] - lo) / float(k - 1)  # float32, as the numpy oracle computes it
    constant = step <= 0
    return lo, torch.where(constant, torch.ones_like(step), step), constant


#: Values per block of :func:`scalar_encode` on a CPU (64 Ki float32: 256 KiB): its five elementwise
#: passes run over a block that stays in the core's cache, not five trips to memory.
SCALAR_BLOCK_VALUES = 2**16
#: Rows below which :func:`scalar_encode` uses one thread on a CPU.
SCALAR_THREAD_ROWS = 16_384
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _POOL:  # created on first use: importing the package starts no thread
        _POOL.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="vq-scalar"))
    return _POOL[0]


def _scalar_blocks(x: np.ndarray, lo: np.ndarray, step: np.ndarray, k: int, out: np.ndarray, part: slice) -> None:
    """Code the rows ``part`` of ``x`` into ``out`` block by block (numpy releases the GIL in each pass)."""
    rows = max(1, SCALAR_BLOCK_VALUES // max(x.shape[1], 1))
    buf = np.empty((rows, x.shape[1]), np.float32)
    with np.errstate(over="ignore"):  # a value far outside the range overflows to ±inf, then clips
        for a in range(part.start, part.stop, rows):
            b = min(a + rows, part.stop)
            q = buf[: b - a]
            np.subtract(x[a:b], lo, out=q)
            np.divide(q, step, out=q)
            np.add(q, np.float32(0.5), out=q)
            np.clip(q, np.float32(0.0), np.float32(k - 1), out=q)
            np.copyto(out[a:b], q, casting="unsafe")  # float -> uint8 truncates: the floor of a value >= 0


def scalar_encode(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(n, dim) uint8 scalar codes of (n, dim) float32 rows under a (dim, K, 1) ``grid``, on ``x``'s device.

    ``clip(floor((x - lo) / step + 0.5), 0, K - 1)`` in float32 with ``lo = grid[:, 0, 0]`` and
    ``step = (grid[:, -1, 0] - grid[:, 0, 0]) / (K - 1)``; 0 in dimensions whose step is 0. Computed
    as ``trunc(clip((x - lo) / step + 0.5, 0, K - 1))``, the same values (truncation is the floor of a
    value >= 0). On a CPU, in cache-sized blocks with numpy, split over two threads for large inputs:
    measured on 2 cores, torch's elementwise passes over the same blocks were several times slower
    under load (each pass starts and joins its thread team), numpy's one pass per block is not.
    """
    dim, k = _grid_dims(grid)
    if x.ndim != 2 or x.shape[1] != dim:
        raise InvalidInputError(f"x.shape={tuple(x.shape)}; expected (n, {dim}) rows for a grid of dim={dim}.")
    lo, step, constant = (t.to(x.device) for t in _scalar_params(grid))
    if x.device.type != "cpu":
        q = (x.to(torch.float32) - lo).div_(step).add_(0.5).clamp_(0.0, float(k - 1))
        out = q.to(torch.uint8)
    else:
        xs = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)  # (n, dim), no copy when it is already
        codes = np.empty(xs.shape, np.uint8)  # (n, dim)
        n = xs.shape[0]
        args = (xs, lo.numpy(), step.numpy(), k, codes)
        if n < SCALAR_THREAD_ROWS or torch.get_num_threads() < 2:
            _scalar_blocks(*args, slice(0, n))
        else:
            half = n // 2
            list(_pool().map(lambda part: _scalar_blocks(*args, part), (slice(0, half), slice(half, n))))
        out = torch.from_numpy(codes)
    if bool(constant.any()):
        out[:, constant] = 0
    return out


#: The trims of :func:`least_error_range`: a range end may be the data's extreme value (0) or the
#: quantile this far in from it, on each side.
RANGE_TRIMS = (0.0, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def _grid_errors(sample: torch.Tensor, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """(dim,) float64 sum of squared errors of ``sample`` (n, dim) coded on the grid of ``[lo, hi]``."""
    grid = scalar_grid(lo, hi, bits)
    decoded = grid_decode(grid, scalar_encode(sample, grid))  # (n, dim)
    return (sample.double() - decoded.double()).square().sum(dim=0).numpy()


def least_error_range(sample: torch.Tensor, lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per dimension, the range of least squared error on ``sample`` among trimmed ranges.

    Args:
        sample: (n, dim) float32 CPU rows (a seeded sample of the training rows), ``n >= 1``.
        lo, hi: (dim,) float64, each dimension's minimum and maximum over all training rows.

    Returns:
        (lo, hi) (dim,) float64: each end is the data's extreme or the quantile :data:`RANGE_TRIMS` in
        from it, chosen one end after the other (the low end with the high end at the maximum, then the
        high end), each the first of least error on the sample (ties keep the untrimmed end), so the
        sample's error is never above that of ``[lo, hi]``. Trimming pays where a few outlying values
        stretch a range: every other value is then coded on a finer grid, and only the outliers clip.
    """
    x64 = sample.double().numpy()
    trims = np.asarray(RANGE_TRIMS[1:])
    low_q = np.quantile(x64, trims, axis=0)  # (t, dim)
    high_q = np.quantile(x64, 1.0 - trims, axis=0)  # (t, dim)
    best_lo, best_hi = lo.astype(np.float64).copy(), hi.astype(np.float64).copy()
    for side in ("lo", "hi"):
        base_lo, base_hi = best_lo.copy(), best_hi.copy()
        best_err = _grid_errors(sample, base_lo, base_hi, bits)  # (dim,)
        for q in low_q if side == "lo" else high_q:
            cand_lo = np.minimum(np.maximum(q, base_lo), base_hi) if side == "lo" else base_lo
            cand_hi = np.maximum(np.minimum(q, base_hi), base_lo) if side == "hi" else base_hi
            err = _grid_errors(sample, cand_lo, cand_hi, bits)
            better = err < best_err  # (dim,) strictly: ties keep the earlier (less trimmed) end
            best_err = np.where(better, err, best_err)
            best_lo = np.where(better, cand_lo, best_lo)
            best_hi = np.where(better, cand_hi, best_hi)
    return best_lo, best_hi


def binary_grid(mean: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The (dim, 2, 1) float32 grid ``[mean - scale, mean + scale]`` of a binary codebook (float64
    arithmetic, stored float32); ``scale >= 0``."""
    m = np.asarray(torch.as_tensor(mean).detach().cpu().numpy(), dtype=np.float64).reshape(-1)
    s = np.asarray(torch.as_tensor(scale).detach().cpu().numpy(), dtype=np.float64).reshape(-1)
    if m.shape != s.shape or not (np.isfinite(m).all() and np.isfinite(s).all()) or (s < 0).any():
        raise InvalidInputError(
            f"mean.shape={m.shape}, scale.shape={s.shape}; expected two finite (dim,) vectors with scale >= 0. "
            f"Fix: compute them from finite training rows (scale: the mean absolute deviation)."
        )
    grid = np.stack([m - s, m + s], axis=1).astype(np.float32)  # (dim, 2)
    return torch.from_numpy(np.ascontiguousarray(grid[:, :, None]))


def binary_encode(z: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(n, dim) uint8 binary codes of (n, dim) float32 rows: 1 where ``z > (grid[:, 0] + grid[:, 1]) / 2``
    (float32), else 0; on ``z``'s device."""
    dim, k = _grid_dims(grid)
    if k != 2 or z.ndim != 2 or z.shape[1] != dim:
        raise InvalidInputError(
            f"z.shape={tuple(z.shape)}, grid.shape={tuple(grid.shape)}; expected (n, dim) rows and a (dim, 2, 1) grid."
        )
    g = grid[:, :, 0].to(z.device, torch.float32)
    mid = (g[:, 0] + g[:, 1]) / 2.0  # (dim,)
    return (z.to(torch.float32) > mid).to(torch.uint8)


def grid_decode(grid: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(n, dim) float32 values ``grid[d, codes[:, d], 0]`` of (n, dim) codes in range: one gather."""
    dim, k = _grid_dims(grid)
    g = grid.reshape(dim * k).to(codes.device, torch.float32)
    offsets = torch.arange(dim, device=codes.device, dtype=torch.int64) * k  # (dim,)
    return g[codes.to(torch.int64) + offsets]


def _check_codes(codes: torch.Tensor, limit: int, name: str) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor) or codes.ndim != 2:
        raise InvalidInputError(f"{name}.shape={tuple(getattr(codes, 'shape', ()))}; expected an (n, dim) tensor.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= limit):
        raise InvalidInputError(
            f"{name} hold values in [{int(codes.min())}, {int(codes.max())}]; expected codes in [0, {limit - 1}]. "
            f"Fix: pass the codes encode returned."
        )
    return codes


def _check_packed(packed: torch.Tensor, dim: int, per_byte: int, name: str) -> int:
    width = math.ceil(dim / per_byte)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.ndim != 2:
        raise InvalidInputError(
            f"{name} (shape={tuple(getattr(packed, 'shape', ()))}, dtype={getattr(packed, 'dtype', None)}); "
            f"expected an (n, {width}) uint8 tensor."
        )
    if packed.shape[1] != width:
        raise InvalidInputError(
            f"{name}.shape[1]={packed.shape[1]}; expected {width} bytes per row for dim={dim}. "
            f"Fix: unpack with the codebook the codes were written with."
        )
    return width


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n, ceil(dim/2)) uint8: 4-bit codes two per byte, even dimension in the low nibble (an odd
    dim's last high nibble is 0)."""
    c = _check_codes(codes, 16, "codes").to(torch.uint8)
    if c.shape[1] % 2:
        c = torch.cat([c, torch.zeros((c.shape[0], 1), dtype=torch.uint8, device=c.device)], dim=1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, dim) int64 codes of :func:`pack_nibbles`' output."""
    width = _check_packed(packed, dim, 2, "packed")
    out = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], 2 * width)
    return out[:, :dim].to(torch.int64)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n, ceil(dim/8)) uint8 of (n, dim) 0/1 codes, in numpy ``packbits`` order (the first dimension
    in the most significant bit; trailing bits of the last byte 0)."""
    b = _check_codes(bits, 2, "bits").to(torch.uint8)
    n, dim = b.shape
    pad = -dim % 8
    if pad:
        b = torch.cat([b, torch.zeros((n, pad), dtype=torch.uint8, device=b.device)], dim=1)
    w = _BIT_WEIGHTS.to(b.device)
    return (b.reshape(n, (dim + pad) // 8, 8) * w).sum(dim=2, dtype=torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, dim) int64 0/1 codes of :func:`pack_bits`' output."""
    width = _check_packed(packed, dim, 8, "packed")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    out = (packed[:, :, None] >> shifts) & 1  # (n, width, 8)
    return out.reshape(packed.shape[0], 8 * width)[:, :dim].to(torch.int64)


def hamming(a: torch.Tensor, b: torch.Tensor, *, memory_budget: int = HAMMING_MEMORY_BUDGET) -> torch.Tensor:
    """(n, m) int32 Hamming distances between packed binary codes ``a`` (n, B) and ``b`` (m, B) uint8
    (:func:`pack_bits`' form), computed in row chunks of at most ``memory_budget`` bytes of temporaries."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 2:
            raise InvalidInputError(
                f"{name} (shape={tuple(getattr(t, 'shape', ()))}, dtype={getattr(t, 'dtype', None)}); expected "
                f"packed binary codes, an (n, bytes) uint8 tensor. Fix: pack them with pack_bits."
            )
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError(
            f"a.shape[1]={a.shape[1]} but b.shape[1]={b.shape[1]}; expected codes of the same width."
        )
    n, m, width = a.shape[0], b.shape[0], a.shape[1]
    out = torch.empty((n, m), dtype=torch.int32, device=a.device)
    table = _POPCOUNT.to(a.device)
    bb = b.to(a.device)
    rows = max(1, memory_budget // max(1, m * width * 3))
    for start in range(0, n, rows):
        x = a[start : start + rows, None, :] ^ bb[None, :, :]  # (rows, m, width)
        out[start : start + rows] = table[x.to(torch.int64)].sum(dim=2, dtype=torch.int32)
    return out


def hamming_topk(
    a: torch.Tensor, b: torch.Tensor, k: int, *, memory_budget: int = HAMMING_MEMORY_BUDGET
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` codes of ``b`` nearest each code of ``a`` in Hamming distance: (n, k) int32 distances
    and (n, k) int64 indices into ``b``, nearest first, ties broken by the lower index."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= b.shape[0]:
        raise InvalidInputError(
            f"k={k!r}; expected an integer in [1, {b.shape[0]}] (the codes searched). Fix: pass a smaller k."
        )
    d = hamming(a, b, memory_budget=memory_budget)  # (n, m)
    key = d.to(torch.int64) * b.shape[0] + torch.arange(b.shape[0], device=d.device)  # distinct, ordered
    best = key.topk(k, dim=1, largest=False, sorted=True).values  # (n, k)
    return (best // b.shape[0]).to(torch.int32), best % b.shape[0]


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x @ rotation`` in float32 on ``x``'s device (``x`` itself when ``rotation`` is None): rows into
    the rotated space a rotated codebook codes in."""
    if rotation is None:
        return x
    return x.to(torch.float32) @ rotation.to(x.device, torch.float32)


def unrotate_rows(z: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``z @ rotation.T`` in float32 (``z`` itself when ``rotation`` is None): reconstructions back."""
    if rotation is None:
        return z
    return z.to(torch.float32) @ rotation.to(z.device, torch.float32).T


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """A seeded Haar-random (dim, dim) float32 orthogonal matrix: the QR factor Q of a float64
    Gaussian matrix (numpy's ``default_rng(seed)``) with the signs of R's diagonal moved into Q,
    re-orthogonalized in float64 (``U V^T`` of its SVD) before the cast."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidInputError(f"dim={dim!r}; expected a positive integer. Fix: pass the embedding width.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed={seed!r}; expected an integer >= 0. Fix: pass e.g. seed=0.")
    g = np.random.default_rng(seed).standard_normal((dim, dim))  # float64
    q, r = np.linalg.qr(g)
    signs = np.sign(np.diag(r))
    q = q * np.where(signs == 0, 1.0, signs)[None, :]
    u, _, vt = np.linalg.svd(q)
    return torch.from_numpy(np.ascontiguousarray((u @ vt).astype(np.float32)))


def procrustes(xty: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The orthogonal (dim, dim) float32 ``R`` minimizing ``||X R - Y||`` given the (dim, dim) sum
    ``X^T Y`` over rows: ``U @ V^T`` of its float64 SVD ``U S V^T``."""
    m = np.asarray(torch.as_tensor(xty).detach().cpu().numpy(), dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or not np.isfinite(m).all():
        raise InvalidInputError(
            f"xty.shape={m.shape}; expected a finite square (dim, dim) matrix, the sum X^T Y over rows."
        )
    u, _, vt = np.linalg.svd(m)
    return torch.from_numpy(np.ascontiguousarray((u @ vt).astype(np.float32)))


__all__ = [
    "HAMMING_MEMORY_BUDGET",
    "SCALAR_BITS",
    "RANGE_TRIMS",
    "SCALAR_BLOCK_VALUES",
    "binary_encode",
    "binary_grid",
    "grid_decode",
    "hamming",
    "hamming_topk",
    "least_error_range",
    "pack_bits",
    "pack_nibbles",
    "procrustes",
    "random_rotation",
    "rotate_rows",
    "scalar_encode",
    "scalar_grid",
    "unpack_bits",
    "unpack_nibbles",
    "unrotate_rows",
]
