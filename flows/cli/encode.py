"""``vq encode``: encode tables into a folder of codes (here, or on Dask through the encode flow).

The library is called in one place each: :func:`vq_pipeline.jobs.encode_folder.encode_tables` in
:func:`_encode_here`, the flow in :func:`_encode_on_dask`. torch and polars are imported when it runs.
"""

import argparse
import os
from typing import TYPE_CHECKING

from vq_flows.cli import on_dask
from vq_flows.cli.inspection import FAISS_QUALITY
from vq_flows.cli.options import settings_from, storage_options
from vq_flows.cli.progress import Console, EncodeProgress, dumps, plural

from vq_pipeline.io.paths import check_output_folder
from vq_pipeline.jobs.display import safe_text
from vq_pipeline.settings import EncodeOptions, EncodeSettings

if TYPE_CHECKING:
    from vq_pipeline.jobs.encode_folder import EncodeResult

#: The keys of the encode flow's summary that make an EncodeResult (a multi-level run adds OPTIONAL_KEYS).
RESULT_KEYS = (
    "out_dir",
    "manifest",
    "codebook_fingerprint",
    "encoded",
    "skipped",
    "rows_encoded",
    "rows_total",
    "seconds",
    "stale",
    "pruned",
    "unrecorded",
)
OPTIONAL_KEYS = ("codec", "levels", "semantic_ids")


def cmd_encode(args: argparse.Namespace, console: Console) -> int:
    """``vq encode``: encode_tables with a progress bar; the run is resumable (see pipeline)."""
    check_output_folder("--out", args.out, args.data)  # encode_tables checks again; this names the flag
    settings: EncodeSettings = settings_from(EncodeSettings, args)
    compute: EncodeOptions = settings_from(EncodeOptions, args, storage_options=storage_options(args))
    if args.dask:
        on_dask.warn_if_small(args, console)
        result = _encode_on_dask(args, settings, compute)
    else:
        result = _encode_here(args, console, settings, compute)
    if args.json:
        console.result(dumps(result.to_dict()))
        return 0
    skipped = f", skipped {len(result.skipped):,} already complete" if result.skipped else ""
    console.result(
        safe_text(
            f"encoded {plural(len(result.encoded), 'file')} ({plural(result.rows_encoded, 'row')}){skipped} "
            f"-> {result.manifest}"
        )
    )
    registry = (result.semantic_ids or {}).get("id_registry")
    if registry:
        console.result(
            f"semantic ids: id version {registry['id_version']}, {plural(registry['issued'], 'id')} issued, "
            f"{registry['kept']:,} kept ({registry['adopted']:,} adopted); prefix table {registry['prefix_table']}"
        )
    if result.codec == "residual" and settings.beam == 1 and result.rows_encoded:
        console.progress(f"residual codes encoded greedily (--beam 1). {FAISS_QUALITY}")
    _warn_about_leftovers(args, console, result)
    return 0


def _warn_about_leftovers(args: argparse.Namespace, console: Console, result: "EncodeResult") -> None:
    """The warnings after a run: outputs removed by --prune, stale outputs kept, files vq did not write."""
    if result.pruned:
        console.warning(f"removed {plural(len(result.pruned), 'stale output')}: {', '.join(result.pruned)}")
    if result.stale:
        console.warning(
            f"{plural(len(result.stale), 'output')} in {args.out} belong to inputs not part of this run, kept and "
            f"listed as stale in the manifest (e.g. {result.stale[0]!r}); pass --prune to remove them."
        )
    if result.unrecorded:
        console.warning(
            f"{plural(len(result.unrecorded), 'parquet file')} in {args.out} were not written by vq and are left "
            f"alone (e.g. {result.unrecorded[0]!r}); readers of the folder will read them too."
        )


def _encode_here(
    args: argparse.Namespace, console: Console, settings: EncodeSettings, compute: EncodeOptions
) -> "EncodeResult":
    """The one call of :func:`~vq_pipeline.jobs.encode_folder.encode_tables`."""
    from vq_pipeline.jobs.encode_folder import EncodeEvents, encode_tables

    progress = EncodeProgress(console)
    events = EncodeEvents(plan=progress.plan, rows=progress)
    result: EncodeResult = encode_tables(args.data, args.codebook, args.out, settings, compute, events=events)
    console.stop_live()
    return result


def _encode_on_dask(args: argparse.Namespace, settings: EncodeSettings, compute: EncodeOptions) -> "EncodeResult":
    """``vq encode --dask``: the encode flow, one task per file on the cluster's workers."""
    from vq_pipeline.jobs.encode_folder import EncodeResult

    on_dask.refuse_what_dask_ignores(args, settings, compute)
    s = on_dask.run_flow(
        args,
        "encode.encode_embeddings_flow",
        inputs=[on_dask.absolute(d) for d in args.data],
        codebook=on_dask.absolute(args.codebook),
        out_dir=os.path.abspath(args.out),
        settings=settings,
        options=compute,
    )
    return EncodeResult(**{k: s[k] for k in RESULT_KEYS}, **{k: s[k] for k in OPTIONAL_KEYS if k in s})
