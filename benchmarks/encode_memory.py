"""Peak memory (RSS) and throughput of streamed table encoding as the table grows.

Command (from the repository root, after ``make install``)::

    .venv/bin/python benchmarks/encode_memory.py [--rows 1000000 2000000 4000000] [--dim 128] [--codes 1024]

For each row count it writes one parquet file of ``rows x dim`` float32 embeddings (row groups of
65,536 rows; files are cached under ``benchmarks/results/memory/``), then encodes it in a fresh
child process with :func:`vq_pipeline.pipeline.encode_tables` and reports the child's peak RSS
(``VmHWM``), its wall time and rows per second. The codebook is fitted once on a 50,000-row
sample of the smallest file. Flat memory means the peak does not grow with the row count.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "results" / "memory"

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent.
CHILD = """
import json, re, sys, time
from vq_pipeline.pipeline import encode_tables
t0 = time.perf_counter()
r = encode_tables([sys.argv[1]], sys.argv[2], sys.argv[3], column="embedding", id_column="id")
assert r.rows_encoded == r.rows_total > 0, "nothing was encoded"
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"rows": r.rows_encoded, "seconds": time.perf_counter() - t0, "peak_rss_mib": hwm / 1024}))
"""


def write_table(path: Path, rows: int, dim: int) -> None:
    """Write ``rows`` clustered embeddings in slices, so the generator itself stays small."""
    import polars as pl

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, dim)).astype(np.float32)
    step = 262_144
    frames = []
    for start in range(0, rows, step):
        n = min(step, rows - start)
        x = centres[rng.integers(4096, size=n)] + 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
        frames.append(pl.DataFrame({"id": np.arange(start, start + n), "embedding": x}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.concat(frames).write_parquet(path, row_group_size=65_536)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--codes", type=int, default=1024)
    args = parser.parse_args()

    from vq_pipeline.pipeline import fit_from_tables

    files = {}
    for rows in args.rows:
        path = CACHE / f"emb-{rows}x{args.dim}" / "part-0.parquet"
        if not path.exists():
            t0 = time.perf_counter()
            write_table(path, rows, args.dim)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        files[rows] = path
    codebook = CACHE / f"codebook-{args.codes}x{args.dim}.safetensors"
    if not codebook.exists():
        fit_from_tables([files[min(files)]], column="embedding", n_codes=args.codes, sample=50_000, n_iter=10).save(codebook)

    print(f"# streamed encode, {args.dim}-d float32 -> {args.codes} codes; {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}; parent RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("| rows | file MiB | peak RSS MiB | seconds | rows/s |")
    print("|---:|---:|---:|---:|---:|")
    results = []
    for rows, path in sorted(files.items()):
        out = CACHE / f"codes-{rows}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh folder: a complete one would be skipped
        run = subprocess.run([sys.executable, "-c", CHILD, str(path.parent), str(codebook), str(out)], capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stderr)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        r["file_mib"] = path.stat().st_size / 2**20
        results.append(r)
        print(f"| {rows:,} | {r['file_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | {rows / r['seconds']:.3g} |")
    (CACHE / "encode_memory.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
