"""The main job on embedded defaults: fit a codebook on a generated embedding table, encode another.

Run with ``make demo`` (or ``python -m vq_pipeline.demo [OUT_DIR]``). It writes, under ``OUT_DIR``
(default ``vq_demo_output/``): ``train.parquet`` and ``new.parquet`` (generated embeddings),
``codebook.safetensors`` and ``codes.parquet`` (``id, code, distance``), then prints a summary.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from . import fit_codebook
from .tables import read_embeddings, write_codes, write_embeddings


def generate_embeddings(n_rows: int, dim: int, n_topics: int, *, seed: int) -> np.ndarray:
    """Clustered unit-norm embeddings, like a sentence encoder's: (n_rows, dim) float32."""
    rng = np.random.default_rng(seed)
    topics = np.random.default_rng(12345).standard_normal((n_topics, dim))  # shared by all tables
    x = topics[rng.integers(n_topics, size=n_rows)] + 0.35 * rng.standard_normal((n_rows, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def main(out_dir: str = "vq_demo_output", *, n_train: int = 20_000, n_new: int = 5_000, dim: int = 64, n_codes: int = 64) -> dict:
    out = Path(out_dir)
    train = write_embeddings(out / "train.parquet", np.arange(n_train), generate_embeddings(n_train, dim, 48, seed=1))
    new = write_embeddings(out / "new.parquet", np.arange(n_new) + 10**6, generate_embeddings(n_new, dim, 48, seed=2))

    t0 = time.perf_counter()
    _, x = read_embeddings(train)
    codebook = fit_codebook(
        x, n_codes, metric="cosine", seed=0, sources=(str(train),), column="embedding",
        progress=lambda s: print(f"  iteration {s.iteration}: objective {s.objective:.4f}", file=sys.stderr),
    )
    codebook_path = codebook.save(out / "codebook.safetensors")
    ids, x_new = read_embeddings(new)
    codes, distances = codebook.encode(x_new, return_distances=True)
    codes_path = write_codes(out / "codes.parquet", ids, codes, distances)
    summary = {
        "codebook": str(codebook_path),
        "codes": str(codes_path),
        "n_codes": codebook.n_codes,
        "dim": codebook.dim,
        "metric": codebook.metric,
        "engine": codebook.fit["engine"],
        "train_rows": n_train,
        "iterations": codebook.stats["iterations"],
        "converged": codebook.stats["converged"],
        "train_mean_distance": codebook.stats["inertia"] / n_train,
        "new_mean_distance": float(distances.double().mean()),
        "codes_used": int(codes.unique().numel()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:2])
