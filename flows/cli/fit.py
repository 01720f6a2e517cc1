"""``vq fit``: fit a codebook from tables (here, or on Dask through the fit-codebook flow) and save it.

The library is called in one place each: :func:`vq_pipeline.jobs.fit_tables.fit_from_tables` in
:func:`_fit_here`, the flow in :func:`_fit_on_dask`. torch and polars are imported when the fit runs.
"""

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vq_flows.cli import on_dask
from vq_flows.cli.options import settings_from, storage_options
from vq_flows.cli.progress import Console, FitProgress, dumps, plural

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.io.paths import check_output_file, output_lock
from vq_pipeline.jobs.display import safe_text
from vq_pipeline.settings import PER_DIMENSION_CODECS, FitSettings, TableSettings

if TYPE_CHECKING:
    from vq_pipeline.codebook import Codebook

#: The keys of ``vq fit --json``'s summary, here and on Dask (a multi-level codec adds MULTILEVEL_KEYS).
SUMMARY_KEYS = (
    "path",
    "fingerprint",
    "n_codes",
    "dim",
    "metric",
    "rows",
    "iterations",
    "converged",
    "inertia",
    "holdout",
    "scorecard",
)
MULTILEVEL_KEYS = ("mse", "collision_rate", "level_mse")
#: ... and a scalar or binary codec these (a rotation adds ``rotation``).
PER_DIMENSION_KEYS = ("bits", "clipped", "bit_balance")


def file_option(name: str, raw: str, example: str) -> Path:
    """``raw`` as the path of a file to write, refused when it names a folder (``x/``, or an existing one):
    ``Path`` drops a trailing slash, so ``--out e/`` would otherwise write a file named ``e``."""
    suffixes = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if raw.endswith(suffixes) or os.path.isdir(raw):
        what = f"ends with {raw[-1]!r}, so it names a folder" if raw.endswith(suffixes) else "is a folder"
        fixed = str(Path(raw) / example)
        raise InvalidInputError(
            f"{name}={raw!r} {what}; expected a file name such as {fixed!r}. Fix: pass {name} {fixed}."
        )
    return Path(raw)


def check_fit_outputs(inputs: list[str], out: Path, checkpoint: Path | None) -> None:
    """Refuse, before any work, a ``vq fit --out`` or ``--checkpoint`` that is an input, lies inside
    an input folder, cannot be created, or is an existing file vq did not write (the library's rule)."""
    from vq_pipeline.fitting.checkpoint import FitCheckpoint
    from vq_pipeline.io.codebook_file import is_codebook_file

    check_output_file("--out", out, inputs, ours=is_codebook_file, what="codebook", suffix=".safetensors")
    if checkpoint is not None:
        check_output_file(
            "--checkpoint", checkpoint, inputs, ours=FitCheckpoint.is_checkpoint, what="fit checkpoint", suffix=".ckpt"
        )


def check_fit_args(args: argparse.Namespace) -> None:
    """``vq fit``'s parsed options, checked as a usage error: ``--codes`` is required but for the scalar
    and binary codecs, which take the one count they have."""
    if getattr(args, "codes", None) is None and getattr(args, "codec", "flat") not in PER_DIMENSION_CODECS:
        per_level = " per level" if args.codec != "flat" else ""
        raise InvalidInputError(
            f"the following arguments are required: --codes (the number of codes{per_level} of --codec "
            f"{args.codec}; only --codec scalar and binary take none). Fix: pass --codes K, e.g. --codes 256."
        )


def codes_of(settings: FitSettings, given: int | None) -> int:
    """``--codes``: as given, or for scalar and binary codes the one count they take (``2**bits``, 2) when
    not given; refused when missing for another codec, or wrong for these two."""
    fixed = {"scalar": 2**settings.bits, "binary": 2}.get(settings.codec)
    if fixed is None:
        if given is None:
            raise InvalidInputError(
                f"--codes is missing with --codec {settings.codec}; expected the number of codes"
                f"{' per level' if settings.codec != 'flat' else ''}. Fix: pass e.g. --codes 256."
            )
        return given
    if given is not None and given != fixed:
        what = f"--bits {settings.bits} gives" if settings.codec == "scalar" else "one bit gives"
        raise InvalidInputError(
            f"--codes {given} with --codec {settings.codec}; {what} {fixed} codes per dimension, expected --codes "
            f"{fixed} or none. Fix: drop --codes"
            + (" (and pick --bits 8 or 4)." if settings.codec == "scalar" else ".")
        )
    return fixed


def cmd_fit(args: argparse.Namespace, console: Console) -> int:
    """``vq fit``: fit_from_tables, then save the codebook atomically."""
    # Refused before any work.
    settings: FitSettings = settings_from(FitSettings, args)
    table: TableSettings = settings_from(TableSettings, args, storage_options=storage_options(args))
    args.codes = codes_of(settings, args.codes)
    # Checked before fitting, so that a long fit is not wasted on a path it cannot be saved to.
    out = file_option("--out", args.out, "codebook.safetensors")
    t0 = time.perf_counter()
    if args.dask:
        check_fit_outputs(args.data, out, None)
        on_dask.warn_if_small(args, console)
        return _fit_on_dask(args, console, (settings, table), out, t0)  # the fit-codebook flow locks ``out`` itself
    if args.checkpoint == "none":
        checkpoint = None
    elif args.checkpoint:
        checkpoint = file_option("--checkpoint", args.checkpoint, "fit.ckpt")
    else:
        checkpoint = out.with_name(out.name + ".ckpt")
    check_fit_outputs(args.data, out, checkpoint)
    with output_lock(out, what="codebook"):  # one fit per output: the file on disk is the one reported
        codebook = _fit_here(args, console, (settings, table), checkpoint)
        codebook.save(out)
    from vq_pipeline.jobs.fit_file import FitSummary

    seconds = time.perf_counter() - t0
    summary = FitSummary.of(codebook, out, kept=False, init=str(settings.init), seconds=seconds).to_dict()
    print_fit_summary(args, console, summary)
    return 0


def _fit_here(
    args: argparse.Namespace, console: Console, given: tuple[FitSettings, TableSettings], checkpoint: Path | None
) -> "Codebook":
    """The one call of :func:`~vq_pipeline.jobs.fit_tables.fit_from_tables`."""
    from vq_pipeline.jobs.fit_tables import fit_from_tables

    settings, table = given
    if not console.quiet:
        _show_fit_input(args, console)
    return fit_from_tables(args.data, args.codes, table, settings, progress=FitProgress(console), checkpoint=checkpoint)


def _show_fit_input(args: argparse.Namespace, console: Console) -> None:
    """``reading 2,000,000 rows (dim 32) from 1 table``: said before a read that can take minutes."""
    counted = on_dask.count_rows(args.data, column=args.column, storage_options=storage_options(args))
    if counted is None:
        return
    n_tables, n_rows, dim = counted
    rows = f"a seeded sample of {args.sample:,} of {n_rows:,} rows" if args.sample else plural(n_rows, "row")
    console.progress(f"reading {rows}{f' (dim {dim})' if dim else ''} from {plural(n_tables, 'table')}")


def _fit_on_dask(
    args: argparse.Namespace, console: Console, given: tuple[FitSettings, TableSettings], out: Path, t0: float
) -> int:
    """``vq fit --dask``: the fit-codebook flow, exact Lloyd as map-reduce on the cluster's workers."""
    settings, table = given
    on_dask.refuse_what_dask_ignores(args, settings, table)
    s = on_dask.run_flow(
        args,
        "fit.fit_codebook_flow",
        inputs=[on_dask.absolute(d) for d in args.data],
        out=os.path.abspath(out),
        n_codes=args.codes,
        reading=table,
        settings=settings,
    )
    print_fit_summary(args, console, {**s, "task_seconds": time.perf_counter() - t0}, where=f" on Dask {args.dask}")
    return 0


def print_fit_summary(args: argparse.Namespace, console: Console, summary: dict[str, Any], where: str = "") -> None:
    """The result of ``vq fit``: ``summary`` (a :class:`~vq_pipeline.jobs.fit_file.FitSummary` as a dict)
    as JSON, with the keys of :data:`SUMMARY_KEYS`, or one sentence (``where``: e.g. " on Dask ...")."""
    if args.json:
        keys = SUMMARY_KEYS + ("codec", "levels") + (MULTILEVEL_KEYS if summary.get("codec") != "flat" else ())
        keys += tuple(k for k in ("rotation", *PER_DIMENSION_KEYS) if k in summary)
        console.result(dumps({**{k: summary.get(k) for k in keys}, "seconds": round(summary["task_seconds"], 3)}))
        return
    state = "converged" if summary["converged"] else f"not converged (stopped at --iters {args.iters})"
    codes = plural(summary["n_codes"], "code")
    extra = ""
    if summary.get("codec") in ("scalar", "binary"):
        bits = int(summary["n_codes"]).bit_length() - 1
        codes = f"{summary['codec']} codes, {plural(bits, 'bit')} per dimension"
        extra = f", mse {_number(summary.get('mse'))}"
        if summary.get("rotation", "none") != "none":
            extra += f", rotation {summary['rotation']}"
    elif summary.get("codec", "flat") != "flat":
        codes = f"{summary['codec']} {summary['levels']} levels x {codes}"
        extra = f", mse {_number(summary.get('mse'))}, collision rate {_number(summary.get('collision_rate'))}"
    holdout = summary.get("holdout")
    if isinstance(holdout, dict):
        extra += f", held-out error {_number(holdout.get('mean_distance'))} on {plural(holdout.get('rows', 0), 'row')}"
    card = summary.get("scorecard")
    if isinstance(card, dict):  # the scorecard's two headline figures; vq inspect shows the rest
        n_card = card.get("n_rows") if isinstance(card.get("n_rows"), int) else 0
        which = "held-out" if card.get("sample") == "holdout" else "training"
        extra += (
            f", scorecard on {plural(n_card, which + ' row')}: error {_number(card.get('error'))}, "
            f"recall@{_number(card.get('k'))} {_number(card.get('recall_at_k'))}"
        )
    console.result(
        safe_text(
            f"fitted {codes} (dim {summary['dim']}, {summary['metric']}) on "
            f"{plural(summary['rows'], 'row')} in {plural(summary['iterations'], 'iteration')}{where}, {state}; "
            f"inertia {summary['inertia']:.4g}{extra} -> {summary['path']}"
        )
    )


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else "unknown"
