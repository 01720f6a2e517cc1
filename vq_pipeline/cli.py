"""The ``vq`` command: fit a codebook from tables, encode tables into codes, inspect a codebook.

::

    vq fit DATA... --column COL --codes K --out CODEBOOK.safetensors [--metric cosine] [--json]
    vq encode DATA... --codebook CODEBOOK.safetensors --column COL --out OUT_DIR [--json]
    vq inspect CODEBOOK.safetensors [--json]

stdout carries only the result (one summary line, or one JSON object with ``--json``) so that a
scheduler or a shell pipeline can parse it; progress and errors go to stderr.
Exit codes: 0 success, 1 error (a :class:`~vq_pipeline.errors.VQError` prints its message only;
anything else is reported as unexpected), 2 usage error, 130 interrupted.

This module is a thin shell over :mod:`vq_pipeline.pipeline`: no Prefect and no polars here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from .codebook import Codebook
from .errors import InvalidInputError, VQError
from .kmeans import IterationStats
from .pipeline import DEFAULT_BATCH_ROWS, MANIFEST_NAME, EncodeResult, encode_tables, fit_from_tables

#: Exit status of a run stopped with Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
#: Seconds between progress lines when stderr is a log file, not a terminal.
LOG_PROGRESS_INTERVAL = 5.0
#: Seconds between redraws of the progress bar on a terminal (redrawing every batch would flicker).
TTY_PROGRESS_INTERVAL = 0.1
#: Sources listed by ``vq inspect`` before eliding the rest (a hive table can have thousands).
MAX_SOURCES_SHOWN = 5

Handler = Callable[[argparse.Namespace, "Console"], int]


# ----------------------------------------------------------------------------- argument parsing


def _storage_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. aws_region=eu-west-1)")
    return key.strip(), value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def _add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """Options accepted both before and after the subcommand (``vq --quiet fit`` and ``vq fit --quiet``).

    In subcommands the flags default to SUPPRESS so that a flag given before the subcommand is not
    reset by the subparser's defaults; storage options get their own dest and are merged later.
    """
    default: Any = argparse.SUPPRESS if in_subcommand else False
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", default=default, help="no progress output on stderr")
    parser.add_argument(
        "--storage-option",
        dest="sub_storage_options" if in_subcommand else "storage_options",
        action="append",
        type=_storage_option,
        default=[],
        metavar="KEY=VALUE",
        help="polars storage_options for object storage (s3://, gs://, az://); repeatable",
    )


def _add_compute_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["auto", "keops", "torch"], default="auto", help="compute engine (default: auto)")
    parser.add_argument(
        "--device", default=None, metavar="cpu|cuda", help="compute device: cpu, cuda or cuda:N (default: cuda if available)"
    )
    parser.add_argument(
        "--batch-rows", type=_int_at_least(1), default=DEFAULT_BATCH_ROWS, metavar="N",
        help=f"rows read per batch (default: {DEFAULT_BATCH_ROWS})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a summary line")
    parser.add_argument(
        "--dask", default=None, metavar="ADDRESS",
        help="run on a Dask cluster through the Prefect flow: local:N (N local workers) or a scheduler address "
        "(tcp://host:8786). Uses PREFECT_API_URL, or starts a Prefect server on 127.0.0.1 for local clusters. "
        "Not combined with --storage-option, --batch-rows, --n-init; a fit on Dask keeps no --checkpoint",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``vq`` argument parser; each subcommand sets ``handler``."""
    parser = argparse.ArgumentParser(
        prog="vq",
        description="K-means codebooks for embedding tables: fit, encode, inspect.",
        epilog="Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted.",
    )
    _add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = commands.add_parser(
        "fit", help="fit a codebook on the embedding column of tables",
        description="Fit a K-means codebook on the embedding column of parquet/Arrow tables and save it.",
    )
    fit.add_argument("data", nargs="+", metavar="DATA", help="table files, globs or folders (local or object storage)")
    fit.add_argument("--column", required=True, help="the embedding column")
    fit.add_argument("--codes", required=True, type=_int_at_least(1), metavar="K", help="number of codes (centroids)")
    fit.add_argument("--metric", choices=["l2", "cosine"], default="l2", help="distance (default: l2)")
    fit.add_argument("--iters", type=_int_at_least(0), default=50, metavar="N", help="at most N Lloyd updates (default: 50)")
    fit.add_argument(
        "--tol", type=_non_negative_float, default=1e-4, metavar="T",
        help="stop when the objective's relative decrease is <= T (default: 1e-4)",
    )
    fit.add_argument("--init", choices=["k-means++", "random", "first"], default="k-means++", help="initialization (default: k-means++)")
    fit.add_argument("--seed", type=int, default=0, metavar="S", help="seed of every random choice (default: 0)")
    fit.add_argument("--n-init", type=_int_at_least(1), default=1, metavar="R", help="seeded restarts; the best is kept (default: 1)")
    fit.add_argument("--sample", type=_int_at_least(1), default=None, metavar="N", help="fit on a seeded sample of N rows")
    fit.add_argument(
        "--checkpoint", default=None, metavar="FILE",
        help="keep the fit's state in FILE after every iteration; rerunning the same command after a crash resumes there "
        "(default: OUT.ckpt next to --out; 'none' to disable)",
    )
    _add_compute_options(fit)
    fit.add_argument("--out", required=True, metavar="CODEBOOK.safetensors", help="codebook file to write (atomically)")
    _add_global_options(fit, in_subcommand=True)
    fit.set_defaults(handler=cmd_fit)

    enc = commands.add_parser(
        "encode", help="assign every row of tables its nearest code(s)",
        description=(
            "Encode tables into one parquet file of codes per input file, under OUT_DIR. Resumable: a rerun "
            "skips files already encoded with the same codebook and settings."
        ),
    )
    enc.add_argument("data", nargs="+", metavar="DATA", help="table files, globs or folders (local or object storage)")
    enc.add_argument("--codebook", required=True, metavar="CODEBOOK.safetensors", help="codebook file written by `vq fit`")
    enc.add_argument("--column", required=True, help="the embedding column")
    enc.add_argument("--id-column", default=None, metavar="ID", help="id column copied to the output (default: row positions, as `row`)")
    enc.add_argument("--top-k", type=_int_at_least(1), default=1, metavar="K", help="codes per row, nearest first (default: 1)")
    enc.add_argument("--with-distance", action="store_true", help="also write the distance(s) to the code(s)")
    enc.add_argument(
        "--keep", nargs="+", action="extend", default=[], metavar="COL",
        help="columns copied through to the output (put DATA before this option, or repeat --keep)",
    )
    enc.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    enc.add_argument("--overwrite", action="store_true", help="replace codes that another codebook or other settings wrote in OUT_DIR")
    _add_compute_options(enc)
    _add_global_options(enc, in_subcommand=True)
    enc.set_defaults(handler=cmd_encode)

    ins = commands.add_parser("inspect", help="describe a codebook file", description="Describe a codebook file.")
    ins.add_argument("codebook", metavar="CODEBOOK.safetensors")
    ins.add_argument("--json", action="store_true", help="print Codebook.summary() as JSON")
    _add_global_options(ins, in_subcommand=True)
    ins.set_defaults(handler=cmd_inspect)
    return parser


# ----------------------------------------------------------------------------- output


class Console:
    """Where the command writes: results to stdout, progress and errors to stderr.

    Remembers whether a progress bar left the cursor mid-line, so that whatever is written to
    stderr next (an error, a warning) starts on a fresh line.
    """

    def __init__(self, *, quiet: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self._open_line = False

    def result(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def progress(self, text: str) -> None:
        if not self.quiet:
            self.end_line()
            print(text, file=self.stderr, flush=True)

    def draw(self, text: str) -> None:
        """Redraw the current terminal line (the caller checked that stderr is a TTY)."""
        if not self.quiet:
            self.stderr.write("\r\x1b[2K" + text)  # carriage return, then erase the old, longer line
            self.stderr.flush()
            self._open_line = True

    def end_line(self) -> None:
        if self._open_line:
            self.stderr.write("\n")
            self.stderr.flush()
            self._open_line = False

    def error(self, text: str) -> None:
        self.end_line()
        print(text, file=self.stderr, flush=True)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


class FitProgress:
    """Per-iteration lines for ``fit_from_tables(progress=...)``; restarts are told apart by iteration 1."""

    def __init__(self, console: Console, n_init: int) -> None:
        self.console, self.n_init, self.restart = console, n_init, 0

    def __call__(self, stats: IterationStats) -> None:
        if stats.iteration == 1:
            self.restart += 1
        prefix = f"restart {self.restart}/{self.n_init}, " if self.n_init > 1 else ""
        extra = f", {_plural(stats.n_repairs, 'empty code')} repaired" if stats.n_repairs else ""
        self.console.progress(f"{prefix}iteration {stats.iteration}: objective {stats.objective:.4g}{extra} ({stats.seconds:.2f} s)")


class EncodeProgress:
    """Rows done per file for ``encode_tables(progress=...)``.

    On a terminal, a bar redrawn in place; in a log (stderr not a TTY), a line at most every
    ``LOG_PROGRESS_INTERVAL`` seconds and one when each file ends, so that logs stay short.
    """

    def __init__(self, console: Console, *, tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.tty = console.stderr.isatty() if tty is None else tty
        self.clock = clock
        self.key: str | None = None
        # A file's first callback comes after its first batch, so a file is timed from the
        # previous callback (the previous file's end, or the start of the run for the first).
        self.started = self.previous = self.clock()
        self.last = float("-inf")

    def __call__(self, key: str, done: int, total: int) -> None:
        now = self.clock()
        if key != self.key:
            self.console.end_line()
            self.key, self.started, self.last = key, self.previous, float("-inf")
        self.previous = now
        finished = done >= total
        interval = TTY_PROGRESS_INTERVAL if self.tty else LOG_PROGRESS_INTERVAL
        if not finished and now - self.last < interval:
            return
        self.last = now
        elapsed = now - self.started
        pct = 100.0 * done / total if total else 100.0
        rate = f", {done / elapsed:,.0f} rows/s" if elapsed > 0 else ""
        counts = f"{done:,}/{total:,} rows ({pct:.0f}%{rate})"
        if self.tty:
            width = 24
            filled = int(width * min(done, total) / total) if total else width
            self.console.draw(f"{key} [{'#' * filled}{'-' * (width - filled)}] {counts}")
            if finished:
                self.console.end_line()
        else:
            self.console.progress(f"{key}: {counts}{f' in {elapsed:.1f} s' if finished else ''}")


# ----------------------------------------------------------------------------- commands


def _storage_options(args: argparse.Namespace) -> dict[str, str] | None:
    pairs = [*args.storage_options, *getattr(args, "sub_storage_options", [])]
    return dict(pairs) or None


def cmd_fit(args: argparse.Namespace, console: Console) -> int:
    """``vq fit``: fit_from_tables, then save the codebook atomically."""
    out = Path(args.out)
    # Checked before fitting, so that a long fit is not wasted on a path it cannot be saved to.
    if out.is_dir():
        raise InvalidInputError(f"--out={str(out)!r} is a folder; expected a file name such as {str(out / 'codebook.safetensors')!r}.")
    t0 = time.perf_counter()
    if args.dask:
        return _fit_on_dask(args, console, out, t0)
    codebook = fit_from_tables(
        args.data,
        column=args.column,
        n_codes=args.codes,
        metric=args.metric,
        n_iter=args.iters,
        tol=args.tol,
        init=args.init,
        seed=args.seed,
        n_init=args.n_init,
        engine=args.engine,
        device=args.device,
        sample=args.sample,
        batch_rows=args.batch_rows,
        storage_options=_storage_options(args),
        progress=FitProgress(console, args.n_init),
        checkpoint=None if args.checkpoint == "none" else (args.checkpoint or out.with_name(out.name + ".ckpt")),
    )
    codebook.save(out)
    seconds = time.perf_counter() - t0
    stats = codebook.stats
    summary = {
        "path": str(out),
        "fingerprint": codebook.fingerprint,
        "n_codes": codebook.n_codes,
        "dim": codebook.dim,
        "metric": codebook.metric,
        "rows": stats["n_rows"],
        "iterations": stats["iterations"],
        "converged": stats["converged"],
        "inertia": stats["inertia"],
        "seconds": round(seconds, 3),
    }
    _print_fit_summary(args, console, summary)
    return 0


def _absolute(path: str) -> str:
    """Local paths made absolute (Dask workers may run elsewhere); URIs as given."""
    return path if "://" in path else os.path.abspath(path)


def _run_flow_on_dask(args: argparse.Namespace, flow_name: str, **params: Any) -> dict[str, Any]:
    """Run the Prefect flow ``vq_flows.<flow_name>`` with ``dask=args.dask`` against a reachable Prefect API."""
    if _storage_options(args):
        raise InvalidInputError(
            "--storage-option with --dask: the flows read object storage with the workers' own credentials "
            "(environment or instance role); expected no --storage-option. Fix: configure credentials on the workers."
        )
    if args.batch_rows != DEFAULT_BATCH_ROWS:
        raise InvalidInputError(f"--batch-rows={args.batch_rows} with --dask: expected the default. Fix: drop --batch-rows.")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Imported only here: the library itself never imports prefect (flows/ wraps the library).
    import importlib

    from vq_flows.dask import prefect_api_for

    module, name = flow_name.rsplit(".", 1)
    flow_fn = getattr(importlib.import_module(f"vq_flows.{module}"), name)
    with prefect_api_for(args.dask):
        return flow_fn(dask=args.dask, engine=args.engine, device=args.device, **params)


def _print_fit_summary(args: argparse.Namespace, console: Console, summary: dict[str, Any], where: str = "") -> None:
    """The result of ``vq fit``: the summary as JSON, or one sentence (``where``: e.g. " on Dask ...")."""
    if args.json:
        console.result(_dumps(summary))
        return
    state = "converged" if summary["converged"] else f"not converged (stopped at --iters {args.iters})"
    console.result(
        f"fitted {_plural(summary['n_codes'], 'code')} (dim {summary['dim']}, {summary['metric']}) on "
        f"{_plural(summary['rows'], 'row')} in {_plural(summary['iterations'], 'iteration')}{where}, {state}; "
        f"inertia {summary['inertia']:.4g} -> {summary['path']}"
    )


def _fit_on_dask(args: argparse.Namespace, console: Console, out: Path, t0: float) -> int:
    """``vq fit --dask``: the fit-codebook flow, exact Lloyd as map-reduce on the cluster's workers."""
    if args.n_init != 1:
        raise InvalidInputError(f"--n-init={args.n_init} with --dask: expected 1. Fix: drop --n-init, or fit without --dask.")
    s = _run_flow_on_dask(
        args, "fit.fit_codebook_flow", inputs=[_absolute(d) for d in args.data], column=args.column, n_codes=args.codes,
        out=os.path.abspath(out), metric=args.metric, n_iter=args.iters, tol=args.tol, init=args.init, seed=args.seed,
        sample=args.sample,
    )
    summary = {k: s[k] for k in ("path", "fingerprint", "n_codes", "dim", "metric", "rows", "iterations", "converged", "inertia")}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    _print_fit_summary(args, console, summary, where=f" on Dask {args.dask}")
    return 0


def cmd_encode(args: argparse.Namespace, console: Console) -> int:
    """``vq encode``: encode_tables with a progress bar; the run is resumable (see pipeline)."""
    if args.dask:
        s = _run_flow_on_dask(
            args, "encode.encode_embeddings_flow", inputs=[_absolute(d) for d in args.data], codebook=_absolute(args.codebook),
            out_dir=os.path.abspath(args.out), column=args.column, id_column=args.id_column, top_k=args.top_k,
            with_distance=args.with_distance, keep=list(args.keep), overwrite=args.overwrite,
        )
        keys = ("out_dir", "manifest", "codebook_fingerprint", "encoded", "skipped", "rows_encoded", "rows_total", "seconds")
        result = EncodeResult(**{k: s[k] for k in keys})
    else:
        result = _encode_here(args, console)
    if args.json:
        console.result(_dumps(result.to_dict()))
    else:
        skipped = f", skipped {len(result.skipped):,} already complete" if result.skipped else ""
        console.result(
            f"encoded {_plural(len(result.encoded), 'file')} ({_plural(result.rows_encoded, 'row')}){skipped} "
            f"-> {Path(result.out_dir) / MANIFEST_NAME}"
        )
    return 0


def _encode_here(args: argparse.Namespace, console: Console) -> EncodeResult:
    result: EncodeResult = encode_tables(
        args.data,
        args.codebook,
        args.out,
        column=args.column,
        id_column=args.id_column,
        top_k=args.top_k,
        with_distance=args.with_distance,
        keep=args.keep,
        overwrite=args.overwrite,
        engine=args.engine,
        device=args.device,
        batch_rows=args.batch_rows,
        storage_options=_storage_options(args),
        progress=EncodeProgress(console),
    )
    console.end_line()
    return result


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    """``vq inspect``: describe a codebook file (Codebook.load validates it first)."""
    codebook = Codebook.load(args.codebook)
    if args.json:
        console.result(_dumps(codebook.summary()))
    else:
        console.result(describe(codebook, title=args.codebook))
    return 0


def describe(codebook: Codebook, *, title: str = "codebook") -> str:
    """A multi-line, human-readable description of a codebook.

    Uses ``.get`` throughout: codebooks fitted in memory or by older releases lack some stats.
    """
    s, fit = codebook.stats, codebook.fit
    counts = codebook.counts.double()
    rows: list[tuple[str, str]] = [
        ("fingerprint", codebook.fingerprint),
        ("metric", codebook.metric),
        ("codes", f"{codebook.n_codes:,} x dim {codebook.dim}"),
        ("fit", " ".join(f"{k}={v}" for k, v in fit.items() if k not in ("n_codes", "metric")) or "unknown"),
    ]
    n_rows = s.get("n_rows")
    if n_rows is not None:
        how = s.get("mode")
        total = s.get("rows_total")
        if how == "sample" and total is not None:
            detail = f" (seeded sample of {total:,}, seed {s.get('sample_seed')})"
        elif how:
            detail = f" ({how})"
        else:
            detail = ""
        rows.append(("training rows", f"{n_rows:,}{detail}"))
    inertia = s.get("inertia")
    if inertia is not None:
        mean = f" (mean {inertia / n_rows:.4g} per row)" if n_rows else ""
        rows.append(("inertia", f"{inertia:.6g}{mean}"))
    if "iterations" in s:
        rows.append(("iterations", f"{s['iterations']}, {'converged' if s.get('converged') else 'not converged'}"))
    rows.append(("repairs", str(s.get("n_repairs", "unknown"))))
    rows.append(("empty codes", str(int((codebook.counts == 0).sum()))))
    median = f"{float(torch.quantile(counts, 0.5)):,.1f}".removesuffix(".0")  # x.5 only for an even n_codes
    rows.append(("cluster sizes", f"min {int(counts.min()):,}, median {median}, max {int(counts.max()):,} (total {int(counts.sum()):,})"))
    sources = list(codebook.sources)
    shown = sources[:MAX_SOURCES_SHOWN] + ([f"... and {len(sources) - MAX_SOURCES_SHOWN:,} more"] if len(sources) > MAX_SOURCES_SHOWN else [])
    rows.append(("sources", "\n".join(shown) if shown else "(in memory)"))
    rows.append(("column", codebook.column or "(in memory)"))
    rows.append(("data fingerprint", codebook.data_fingerprint or "unknown"))
    rows.append(("parent", codebook.parent_fingerprint or "none"))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in codebook.versions.items()) or "unknown"))
    rows.append(("created_at", codebook.created_at or "unknown"))
    if "fit_seconds" in codebook.timings:
        rows.append(("fit time", f"{codebook.timings['fit_seconds']:.2f} s"))
    width = max(len(name) for name, _ in rows) + 2
    lines = [title]
    for name, value in rows:
        first, *rest = value.split("\n")
        lines.append(f"  {name:<{width}}{first}")
        lines.extend(f"  {'':<{width}}{more}" for more in rest)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run ``vq`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Returns rather than exits, so that it can be called in-process; the console script and
    ``python -m vq_pipeline.cli`` pass the result to ``sys.exit``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    console = Console(quiet=args.quiet)
    if args.debug:
        # The library logs each iteration and OOM retries under "vq_pipeline"; show them all.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger = logging.getLogger("vq_pipeline")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    handler_fn: Handler = args.handler
    try:
        return handler_fn(args, console)
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
    except VQError as exc:
        if args.debug:
            console.end_line()
            traceback.print_exc()
        console.error(f"error: {exc}")
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`vq inspect cb | head -1`): nothing left to tell it.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one readable line, not a traceback
        if args.debug:
            console.end_line()
            traceback.print_exc()
            console.error(f"error: unexpected {type(exc).__name__}: {exc}")
        else:
            console.error(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
