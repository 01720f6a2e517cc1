"""Would a lower-precision product pay? The share of rows whose nearest code its rounding bound proves.

Command, from the repository root (scikit-learn installed, as in ``.venv``)::

    .venv/bin/python benchmarks/lowprec_proof.py [--json PATH]

The torch engine ranks codes by a float32 GEMM and keeps a row's nearest code only when the gap to the
runner-up exceeds twice a proven bound on the product's rounding (``_rounding_bound`` in
``vq_pipeline/engines/torch.py``); other rows are ranked again in float64. A faster, coarser product
only pays if its bound still proves most rows. For each data set, a codebook is fitted
(``fit_codebook(x, K, n_iter, init='k-means++', seed=0)``), the exact gap of every row is computed in float64, and the
share of rows with ``gap > 2 E`` is reported for:

* float32 (IEEE), the engine's bound: ``_product_gamma(dim, 2^-24)`` = ``gamma_{dim+5}(2^-24)``;
* TF32 (what ``torch.backends.cuda.matmul.allow_tf32`` or ``set_float32_matmul_precision("high")``
  allow), the engine's bound for factors rounded to ``u = 2^-11`` and summed in float32:
  ``_product_gamma(dim, 2^-11)``, about ``4u``;
* the bound the engine used for TF32 until 2026-11-30, every operation at ``u = 2^-11``:
  ``_gamma(dim + 5, 2^-11)`` (infinite, nothing proven, from ``(dim + 5) u >= 0.1``);
* bfloat16 factors summed in float32 (what AVX512-BF16 and tensor cores do; ``"medium"``), the
  engine's bound ``_product_gamma(dim, 2^-8)``;
each times the same ``C (C + 2 |x - s|)`` and the engine's 1.25 factor.

It also times one (8192 x dim) @ (dim x K) product in float32 and in bfloat16 on the CPU (2 torch
threads, median of 7 rounds), for scale.

Data: the ``wordllama`` token embeddings (32,000 x 256, see ``wordllama_data.py``), scikit-learn's
digits (1,797 x 64), and ``fair.py``'s gaussian mixture (100,000 x 64, K=256).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
U_BF16 = 2.0**-8


def proven_shares(x: np.ndarray, k: int, n_iter: int) -> dict[str, float]:
    import torch

    from vq_pipeline import fit_codebook
    from vq_pipeline.engines.torch import _gamma, _product_gamma

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    c = fit_codebook(xt, k, n_iter=n_iter, tol=0.0, init="k-means++", seed=0, device="cpu").centroids.float()
    s = c.mean(dim=0)
    cs, xs = (c - s).double(), (xt - s).double()
    big_c = float(cs.norm(dim=1).max())
    scale = big_c * (big_c + 2.0 * xs.norm(dim=1))  # (n,) C (C + 2 |x - s|)
    d = torch.cdist(xs, cs, compute_mode="donot_use_mm_for_euclid_dist").square()  # (n, K) exact enough
    two = d.topk(2, dim=1, largest=False).values  # (n, 2)
    gap = two[:, 1] - two[:, 0]
    dim = x.shape[1]
    factors = {
        "float32": _product_gamma(dim, 2.0**-24),
        "TF32": _product_gamma(dim, 2.0**-11),
        "TF32, former bound": _gamma(dim + 5, 2.0**-11),
        "bfloat16 factors, float32 sums": _product_gamma(dim, U_BF16),
    }
    return {name: float((gap > 2.0 * 1.25 * g * scale).double().mean()) for name, g in factors.items()}


def product_rates(dim: int, k: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(8192, dim), torch.randn(dim, k)
    out = {}
    for name, (p, q) in {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}.items():
        torch.mm(p, q)
        reps = max(3, int(2e9 / (2 * 8192 * dim * k)))
        times = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(p, q)
            times.append((time.perf_counter() - t) / reps)
        out[name] = 2 * 8192 * dim * k / statistics.median(times) / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=HERE / "results" / "lowprec_proof.json")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(2)
    import fair
    import wordllama_data
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    d, k = 64, 256
    centres = rng.normal(0.0, fair.SPREAD / np.sqrt(d), size=(k, d))
    mixture = centres[rng.integers(0, k, 100_000)] + rng.normal(0.0, fair.NOISE, size=(100_000, d)) + fair.OFFSET
    sets = [
        ("wordllama 32,000×256", wordllama_data.load(), 256, 20),
        ("wordllama 32,000×256", wordllama_data.load(), 1024, 5),
        ("digits 1,797×64", load_digits().data, 16, 20),
        ("mixture 100,000×64", mixture, 256, 20),
    ]
    rows = []
    for name, x, kk, n_iter in sets:
        shares = proven_shares(x, kk, n_iter)
        rates = product_rates(x.shape[1], kk)
        rows.append({"data": name, "k": kk, "n_iter": n_iter, "proven": shares, "gflops": rates})
        print(f"{name} K={kk}: {shares} {rates}", file=sys.stderr, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=1)
    )
    names = list(rows[0]["proven"])
    print(
        "| data | K | Lloyd iterations | " + " | ".join(f"proven: {n}" for n in names) + " | GF/s float32 / bfloat16 |"
    )
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['proven'][n]:.3f}" for n in names)
        rates = f"{r['gflops']['float32']:.0f} / {r['gflops']['bfloat16']:.0f}"
        print(f"| {r['data']} | {r['k']} | {r['n_iter']} | {cells} | {rates} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
