"""The main job, end to end: generate a partitioned embedding table, run the vq-pipeline flow once.

Run with ``make demo`` (or ``python -m vq_flows.demo [OUT_DIR]``). Under ``OUT_DIR`` (default
``vq_demo_output/``) it writes ``input/date=2026-11-0X/part-0.parquet`` (3 partitions, 20,000 rows
of clustered 64-dim embeddings with an ``id`` column; existing partitions are kept), then runs
:func:`vq_flows.pipeline.vq_pipeline_flow` with ``work_dir=OUT_DIR/work`` on Prefect's ephemeral API
(no server to start) and prints where the codebook, the codes and the report are. A second run
finds everything encoded and does nothing but report.
"""

import os
import sys

# Before prefect is imported: it reads its settings once.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from vq_flows.pipeline import vq_pipeline_flow  # noqa: E402

from vq_pipeline.io.table_writer import write_embeddings
from vq_pipeline.jobs.demo import generate_embeddings
from vq_pipeline.settings import PipelineSettings

PARTITIONS = {"date=2026-11-01": 7_000, "date=2026-11-02": 6_500, "date=2026-11-03": 6_500}
DIM = 64
N_TOPICS = 48
N_CODES = 64


def write_partitions(root: Path) -> list[Path]:
    """Write the demo partitions that do not exist yet (rewriting one would make it new input)."""
    paths, first_id = [], 0
    for i, (partition, n_rows) in enumerate(PARTITIONS.items()):
        path = root / partition / "part-0.parquet"
        if not path.is_file():
            write_embeddings(
                path, np.arange(n_rows) + first_id, generate_embeddings(n_rows, DIM, N_TOPICS, seed=100 + i)
            )
        paths.append(path)
        first_id += n_rows  # ids are unique across partitions, as one encode run requires
    return paths


def main(out_dir: str = "vq_demo_output") -> dict[str, Any]:
    out = Path(out_dir)
    write_partitions(out / "input")
    settings = PipelineSettings("embedding", N_CODES, id_column="id", metric="cosine")
    summary = vq_pipeline_flow(input_root=str(out / "input"), work_dir=str(out / "work"), settings=settings)
    e = summary["encode"][-1]
    drift = summary["drift"]
    print()
    print(f"codebook:  {summary['codebook']}  ({summary['action']}: {summary['reason'] or 'nothing due'})")
    print(
        f"codes:     {summary['codes_dir']}  ({len(e['encoded'])} files "
        f"encoded, {len(e['skipped'])} skipped, {e['rows_total']} rows)"
    )
    print(f"manifest:  {summary['manifest']}")
    print(f"report:    {summary['report']}")
    if drift["rows"]:
        print(
            f"drift:     distortion ratio {drift['distortion_ratio']:.3f}, code-usage "
            f"divergence {drift['usage_divergence']:.4f} bits ({drift['rows']} new rows)"
        )
    print(f"seconds:   {summary['seconds']:.1f}")
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:2])
