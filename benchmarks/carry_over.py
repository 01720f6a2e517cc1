"""How many rows could a scheduled refit carry over without reading their vectors?

Command, from the repository root::

    .venv/bin/python benchmarks/carry_over.py [--quick] [--json PATH]

The question behind it: after the scheduled pipeline refits (a warm start from the current codebook, then
alignment of the code numbers), most rows keep their code. A per-row certificate written beside each encoded
file, the distance ``u`` to the row's own centroid and a lower bound ``l`` on its distance to every other one
(8 bytes a row), proves the code unchanged without the row's vector when

    u + delta[a] < min(l - max_{j != a} delta[j], S[a] - u)

where ``delta[j] = |c'_j - c_j|`` is how far centroid j moved and ``S[a]`` the distance from the old centroid
``c_a`` to the nearest *moved* new centroid (the triangle inequality both ways; the script tries several
cut-offs for "moved" and keeps the best bound per row). Here ``l`` is the exact second-nearest distance, the
strongest certificate of this kind, so the shares are upper bounds for any such scheme.

For each data set it prints: the share of the old rows whose code a full re-encode keeps (``unchanged``), the
share the certificate proves (``proven``; it must never prove a row that changed: ``violations``), the median
centroid movement against the median row-to-centroid distance, and, for one parquet file of the old rows, how
the time of ``encode_tables`` splits between reading the embeddings and the rest. A carried-over row saves its
search, and saves its read only if every row of its file (or page) is proven too.

Data (unit-norm clustered rows as ``vq_pipeline.jobs.demo.generate_embeddings`` makes them):

* ``same``: the refit sees 20% more rows from the same topics (no drift at all: the best case);
* ``drift``: 20% more rows in which a quarter of the topics are five times as frequent (moderate drift, the
  kind that fires the pipeline's code-usage rule);
* ``wordllama``: the token embeddings, 25,600 old rows and 6,400 more (``harness.wordllama``).

Writes JSON and markdown (default ``benchmarks/results/carry_over-<UTC time>``; ``--quick``: under
``benchmarks/.cache/results/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import harness

SEED = 0
N_TOPICS = 64


def topic_rows(n: int, dim: int, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Rows as ``generate_embeddings`` makes them (shared topics), with topic ``weights`` when given."""
    rng = np.random.default_rng(seed)
    topics = np.random.default_rng(12345).standard_normal((N_TOPICS, dim))
    which = rng.choice(N_TOPICS, size=n, p=weights) if weights is not None else rng.integers(N_TOPICS, size=n)
    x = topics[which] + 0.35 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def datasets(quick: bool) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    n, dim, k = (20_000, 32, 64) if quick else (100_000, 64, 256)
    skew = np.ones(N_TOPICS)
    skew[: N_TOPICS // 4] = 5.0
    out = [
        (f"same {n}×{dim}", topic_rows(n, dim, 0), topic_rows(n // 5, dim, 1), k),
        (f"drift {n}×{dim}", topic_rows(n, dim, 0), topic_rows(n // 5, dim, 1, skew / skew.sum()), k),
    ]
    if not quick:
        x = harness.wordllama()
        perm = np.random.default_rng(harness.SPLIT_SEED).permutation(len(x))
        out.append(("wordllama 25600×256", x[perm[:25_600]], x[perm[25_600:]], 256))
    return out


def certificate_shares(old_x: np.ndarray, old: Any, new: Any) -> dict[str, Any]:
    """Unchanged, proven and violating shares of ``old_x`` between codebooks ``old`` and ``new`` (aligned)."""
    import torch

    codes, dist = old.encode(old_x, top_k=2, return_distances=True)
    codes, dist = torch.as_tensor(codes), torch.as_tensor(dist).double()
    a = codes[:, 0]
    u, low = dist[:, 0].clamp_min(0).sqrt(), dist[:, 1].clamp_min(0).sqrt()  # (n,), (n,)
    c0, c1 = old.centroids.double(), new.centroids.double()
    delta = (c1 - c0).norm(dim=1)  # (K,)
    cross = torch.cdist(c0, c1)  # (K, K) |c_a - c'_j|
    bound = torch.full_like(u, -torch.inf)
    for q in (0.5, 0.75, 0.9, 0.95, 0.99, 1.0):
        tau = float(torch.quantile(delta, q))
        moved = delta > tau
        s = torch.where(moved[None, :], cross, torch.inf)
        s.fill_diagonal_(torch.inf)
        bound = torch.maximum(bound, torch.minimum(low - tau, s.min(dim=1).values[a] - u))
    proven = (u + delta[a]) * (1 + 1e-9) < bound
    hamerly = (u + delta[a]) * (1 + 1e-9) < low - delta.max()
    kept = torch.as_tensor(new.encode(old_x)) == a
    return {
        "rows": int(old_x.shape[0]),
        "unchanged": float(kept.double().mean()),
        "proven": float(proven.double().mean()),
        "proven_hamerly": float(hamerly.double().mean()),
        "violations": int((proven & ~kept).sum()),
        "median_movement": float(delta.median()),
        "max_movement": float(delta.max()),
        "median_distance": float(u.median()),
        "median_gap": float((low - u).median()),
    }


def encode_split(old_x: np.ndarray, codebook: Any) -> dict[str, float]:
    """Seconds of ``encode_tables`` on one parquet file of ``old_x`` and of reading its embeddings alone."""
    import polars as pl

    from vq_pipeline.jobs.encode_folder import encode_tables
    from vq_pipeline.settings import EncodeSettings

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "old.parquet"
        pl.DataFrame({"id": np.arange(len(old_x)), "embedding": old_x}).write_parquet(path)
        settings = EncodeSettings(column="embedding", id_column="id")
        encode_tables([path], codebook, Path(tmp) / "warm", settings)  # warm-up
        _, total = harness.timed(lambda: encode_tables([path], codebook, Path(tmp) / "codes", settings))
        _, read = harness.timed(lambda: pl.read_parquet(path, columns=["embedding"])["embedding"].to_numpy())
    return {"encode_s": total, "read_embeddings_s": read}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data, no wordllama: a smoke check")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/carry_over-<time>.json")
    args = ap.parse_args()
    from vq_pipeline.runtime import apply_omp_waits

    apply_omp_waits()
    import torch  # noqa: F401 - for limit_threads

    from vq_pipeline import fit_codebook

    harness.limit_threads(harness.THREADS)
    started = harness.now()
    rows = []
    for name, old_x, more, k in datasets(args.quick):
        old = fit_codebook(old_x, k, seed=SEED, device="cpu")
        both = np.concatenate([old_x, more])
        refit = fit_codebook(both, k, init=old, seed=SEED, device="cpu")  # the pipeline's warm-started refit
        sample = both[np.random.default_rng(SEED).permutation(len(both))[:50_000]]
        new = refit.aligned_to(old, sample)
        row = {"data": name, "k": k, **certificate_shares(old_x, old, new), **encode_split(old_x, new)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = args.json or harness.results_path("carry_over", args.quick, started)
    record = {
        "started": f"{started:%Y-%m-%dT%H:%M:%SZ}",
        "machine": harness.machine_info(("vq-pipeline", "torch", "numpy", "polars")),
        "command": " ".join(["benchmarks/carry_over.py", *sys.argv[1:]]),
        "rows": rows,
    }
    lines = [
        f"{record['started']}, `{record['command']}`",
        "",
        "| data | K | unchanged | proven | proven (one bound) | violations | median movement / distance / gap "
        "| encode s | read embeddings s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['k']} | {r['unchanged']:.3f} | {r['proven']:.3f} | {r['proven_hamerly']:.3f} "
            f"| {r['violations']} | {r['median_movement']:.4f} / {r['median_distance']:.4f} / {r['median_gap']:.4f} "
            f"| {r['encode_s']:.3f} | {r['read_embeddings_s']:.3f} |"
        )
    harness.write_results(path, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
