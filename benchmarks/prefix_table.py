"""The prefix table of semantic ids: build speed, bytes per id, file round trip and next-token masks.

Command (from the repository root)::

    .venv/bin/python benchmarks/prefix_table.py [--n 10000000] [--levels 3] [--codes 256] [--repeats 3]
        [--batch 1024] [--quick] [--json PATH]

Question (issue 26): does :class:`vq_pipeline.compute.prefix_table.PrefixTable` take at most 16 bytes per
issued id, and build at 10M ids a minute or faster, for 10M ids of 3 levels x 256 codes and a suffix?

What it does, in this one process (it imports only vq_pipeline, torch and numpy; 2 threads):

1. Draws ``n`` ids of ``levels`` uniformly random codes in ``0..codes-1`` (seed 0) and their suffixes
   (:func:`vq_pipeline.compute.semantic_ids.unique_suffix`, not timed): the worst case for the trie's size,
   since random tuples share the fewest prefixes.
2. ``build``: ``PrefixTable.build(codes, suffix, n_codes=codes)``, ``repeats`` times, interleaved with the
   file round trip; median wall time, ids per minute, extra peak RSS (:func:`harness.measure`).
3. ``bytes per id``: the arrays' bytes (``table.nbytes``) and the file's size, over ``n``.
4. ``write`` / ``read``: :func:`vq_pipeline.jobs.registry.write_prefix_table` and ``load_prefix_table``
   (which checks the whole file: header, sha256 of the content, every trie invariant).
5. ``next_mask``: masks of ``batch`` issued prefixes at every level (a beam step), median of 20 calls.

Writes ``benchmarks/results/prefix_table-<UTC time>.json`` and ``.md`` (``--quick``: 100,000 ids, one
repeat, under ``benchmarks/.cache/results/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = 100_000, 1
    started = harness.now()
    import torch

    from vq_pipeline.compute.prefix_table import PrefixTable
    from vq_pipeline.compute.semantic_ids import unique_suffix
    from vq_pipeline.jobs.registry import load_prefix_table, write_prefix_table

    harness.limit_threads(harness.THREADS)
    info = harness.machine_info()
    codes = np.random.default_rng(0).integers(0, args.codes, (args.n, args.levels))
    suffix = unique_suffix(codes)
    builds, writes, reads = [], [], []
    table = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ids.prefix.safetensors"
        for _ in range(args.repeats):
            table, stats = harness.measure(lambda: PrefixTable.build(codes, suffix, n_codes=args.codes))
            builds.append(stats)
            _, stats = harness.measure(
                lambda: write_prefix_table(path, table, codebook_fingerprint="0" * 64, id_version=1)
            )
            writes.append(stats)
            loaded, stats = harness.measure(lambda: load_prefix_table(path, codebook_fingerprint="0" * 64))
            reads.append(stats)
        file_bytes = path.stat().st_size
    assert table is not None
    full = torch.from_numpy(np.concatenate([codes, suffix[:, None]], axis=1))
    rows = torch.from_numpy(np.random.default_rng(1).choice(args.n, args.batch, replace=False))
    masks = []
    for length in range(table.depth):
        prefixes = full[rows, :length].contiguous()
        mask = table.next_mask(prefixes)
        assert mask[torch.arange(args.batch), full[rows, length]].all()  # every issued continuation allowed
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            table.next_mask(prefixes)
            times.append(time.perf_counter() - t0)
        masks.append({"length": length, "width": int(mask.shape[1]), "median_ms": 1000 * statistics.median(times)})
    build_s = statistics.median(b["wall_s"] for b in builds)
    record = {
        "started": started.isoformat(),
        "machine": info,
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "n_ids": args.n,
        "table_bytes": table.nbytes,
        "bytes_per_id": table.nbytes / args.n,
        "file_bytes": file_bytes,
        "file_bytes_per_id": file_bytes / args.n,
        "build": builds,
        "build_median_s": build_s,
        "ids_per_minute": args.n / build_s * 60,
        "write": writes,
        "read": reads,
        "next_mask": masks,
    }
    md = [
        f"# Prefix table: {args.n:,} ids of {args.levels} levels x {args.codes} codes + suffix",
        "",
        f"{info['cpu']}, {info['nproc']} cores, {harness.THREADS} threads, commit {info['commit']}, "
        f"torch {info['versions']['torch']}, {started:%Y-%m-%d %H:%M} UTC.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| arrays, bytes per id | {table.nbytes / args.n:.2f} |",
        f"| file, bytes per id | {file_bytes / args.n:.2f} |",
        f"| build, median of {args.repeats} (s) | {build_s:.2f} |",
        f"| build, ids per minute | {args.n / build_s * 60:,.0f} |",
        f"| build, CPU stall (median) | {statistics.median(b['cpu_stall'] or 0 for b in builds):.2f} |",
        f"| build, extra peak RSS (MiB) | {max(b['extra_peak_rss_mib'] for b in builds):,.0f} |",
        f"| write file, median (s) | {statistics.median(w['wall_s'] for w in writes):.2f} |",
        f"| read and check file, median (s) | {statistics.median(r['wall_s'] for r in reads):.2f} |",
        "",
        f"next_mask of {args.batch} issued prefixes (median of 20 calls):",
        "",
        "| prefix length | mask width | ms |",
        "|---|---|---|",
        *(f"| {m['length']} | {m['width']} | {m['median_ms']:.2f} |" for m in masks),
    ]
    out = args.json or harness.results_path("prefix_table", args.quick, started)
    harness.write_results(out, record, "\n".join(md))
    print("\n".join(md))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
