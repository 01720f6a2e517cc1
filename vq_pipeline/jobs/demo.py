"""A fit and an encode without Prefect, on generated embeddings (``make demo`` runs the Prefect
pipeline instead: :mod:`vq_flows.demo`).

Run with ``python -m vq_pipeline.jobs.demo [OUT_DIR]``. It writes, under ``OUT_DIR`` (default
``vq_demo_output/``): ``train.parquet`` and ``new/part-0.parquet`` (generated embeddings),
``codebook.safetensors``, and ``codes/part-0.parquet`` (``id, code, distance``) with its bookkeeping
in ``codes.vq/``, then prints a summary as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from vq_pipeline.compute.lloyd import print_progress
from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import EncodeSettings, FitSettings, TableSettings


def generate_embeddings(n_rows: int, dim: int, n_topics: int, *, seed: int) -> np.ndarray:
    """Clustered unit-norm embeddings, like a sentence encoder's: (n_rows, dim) float32."""
    rng = np.random.default_rng(seed)
    topics = np.random.default_rng(12345).standard_normal((n_topics, dim))  # shared by all tables
    x = topics[rng.integers(n_topics, size=n_rows)] + 0.35 * rng.standard_normal((n_rows, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def main(
    out_dir: str = "vq_demo_output", *, n_train: int = 20_000, n_new: int = 5_000, dim: int = 64, n_codes: int = 64
) -> dict:
    out = Path(out_dir)
    train = write_embeddings(out / "train.parquet", np.arange(n_train), generate_embeddings(n_train, dim, 48, seed=1))
    new = write_embeddings(
        out / "new" / "part-0.parquet", np.arange(n_new) + 10**6, generate_embeddings(n_new, dim, 48, seed=2)
    )

    t0 = time.perf_counter()
    codebook = fit_from_tables(
        [train],
        n_codes,
        TableSettings(column="embedding"),
        FitSettings(metric="cosine", seed=0),
        progress=print_progress(),
    )
    codebook_path = codebook.save(out / "codebook.safetensors")
    result = encode_tables(
        [new.parent], codebook, out / "codes", EncodeSettings(column="embedding", id_column="id", with_distance=True)
    )
    record = result.records["part-0.parquet"]
    summary = {
        "codebook": str(codebook_path),
        "codes": str(out / "codes" / record["output"]),
        "manifest": result.manifest,
        "n_codes": codebook.n_codes,
        "dim": codebook.dim,
        "metric": codebook.metric,
        "engine": codebook.settings["engine"],
        "train_rows": n_train,
        "iterations": codebook.stats["iterations"],
        "converged": codebook.stats["converged"],
        "train_mean_distance": codebook.stats["inertia"] / n_train,
        "new_mean_distance": record["distance_sum"] / record["rows"],
        "codes_used": sum(1 for c in record["code_counts"] if c),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:2])
