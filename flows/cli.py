"""The ``vq`` command: fit a codebook from tables, encode tables into codes, inspect a codebook.

::

    vq fit DATA... --column COL --codes K --out CODEBOOK.safetensors [--metric cosine]
           [--codec flat|residual|product --levels L] [--json]
    vq encode DATA... --codebook CODEBOOK.safetensors --column COL --out OUT_DIR [--beam B] [--unique] [--json]
    vq inspect CODEBOOK.safetensors [--json] [--plot OUT.png]
    vq --version

stdout carries only the result (one summary line, or one JSON object with ``--json``) so that a
scheduler or a shell pipeline can parse it; progress, warnings and errors go to stderr.
Exit codes: 0 success, 1 error (a :class:`~vq_pipeline.errors.VQError` prints its message only;
anything else is reported as unexpected), 2 usage error, 130 interrupted (Ctrl-C prints one line).

This module is a thin shell over :mod:`vq_pipeline.pipeline`: no Prefect and no polars here. It
imports nothing heavy at import time: torch, polars and Prefect are imported by the commands that
use them (``vq fit`` and ``vq encode`` build their options on first use, since their defaults come
from the library), so ``vq --help`` and ``vq --version`` start at once and ``vq inspect`` loads only
the codebook module.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from vq_pipeline import __version__
from vq_pipeline.display import safe_text
from vq_pipeline.errors import InvalidInputError, VQError
from vq_pipeline.paths import check_output_file, check_output_folder, is_local, output_lock
from vq_pipeline.settings import (
    CODE_DTYPE_NAMES,
    CODECS,
    DEFAULT_BATCH_ROWS,
    ENGINES,
    INITS,
    METRICS,
    EncodeSettings,
    FitSettings,
)

if TYPE_CHECKING:
    from vq_pipeline.codebook import Codebook
    from vq_pipeline.codebook_file import CodebookInfo
    from vq_pipeline.kmeans import InitProgress, IterationStats
    from vq_pipeline.pipeline import EncodeResult
    from rich.progress import Progress, ProgressColumn, TaskID

#: Exit status of a run stopped with Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
#: Seconds between progress lines when stderr is a log file, not a terminal.
LOG_PROGRESS_INTERVAL = 5.0
#: Seconds between redraws of the progress bar on a terminal (redrawing every batch would flicker).
TTY_PROGRESS_INTERVAL = 0.1
#: Sources listed by ``vq inspect`` before eliding the rest (a hive table can have thousands).
MAX_SOURCES_SHOWN = 5
#: Below this many input rows, ``--dask`` costs more than it saves: a cluster's start-up and about
#: 0.3 s of scheduling per task (measured) against a local run of seconds.
DASK_MIN_ROWS = 200_000

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
    parser.add_argument(
        "--engine", choices=ENGINES, default=FitSettings.engine, help="compute engine (default: %(default)s)"
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="cpu|cuda",
        help="compute device: cpu, cuda or cuda:N (default: cuda if available)",
    )
    parser.add_argument(
        "--batch-rows",
        type=_int_at_least(1),
        default=DEFAULT_BATCH_ROWS,
        metavar="N",
        help=f"rows read per batch (default: {DEFAULT_BATCH_ROWS})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a summary line")
    parser.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help="run on a Dask cluster through the Prefect flow: local:N (N local workers) or a scheduler address "
        "(tcp://host:8786). Uses PREFECT_API_URL, or starts a Prefect server on 127.0.0.1 for local clusters. "
        f"Not combined with --storage-option, --batch-rows, --n-init; a fit on Dask keeps no --checkpoint. "
        f"Slower than a local run below about {DASK_MIN_ROWS:,} rows",
    )


def _add_fit_options(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("data", nargs="+", metavar="DATA", help="table files, globs or folders (local or object storage)")
    fit.add_argument("--column", required=True, help="the embedding column")
    fit.add_argument("--codes", required=True, type=_int_at_least(1), metavar="K", help="number of codes (centroids)")
    # Defaults: vq_pipeline.FitSettings, the one source of the fit's defaults.
    fit.add_argument("--metric", choices=METRICS, default=FitSettings.metric, help="distance (default: %(default)s)")
    fit.add_argument(
        "--codec",
        choices=CODECS,
        default=FitSettings.codec,
        help="flat: one code per row; residual: each level quantizes what the levels before it left "
        "(coarse-to-fine semantic ids); product: each level quantizes its own slice of the dimensions "
        "(default: %(default)s)",
    )
    fit.add_argument(
        "--levels",
        type=_int_at_least(1),
        default=FitSettings.levels,
        metavar="L",
        help="codes per row for --codec residual or product (--codes is per level; product: L divides the "
        "embedding dim) (default: %(default)s)",
    )
    fit.add_argument(
        "--train-beam",
        type=_int_at_least(1),
        default=FitSettings.train_beam,
        metavar="B",
        help="--codec residual: fit each level after the first on what the B best partial code tuples of the "
        "levels before leave of every row; encode with --beam B to match (1: greedy) (default: %(default)s)",
    )
    fit.add_argument(
        "--prune-search",
        dest="prune",
        action="store_true",
        help="skip the search of the rows whose code the triangle inequality proves unchanged (exact pruned "
        "Lloyd: the same codebook, 8 bytes of state a row; see the README for when it pays)",
    )
    fit.add_argument(
        "--iters",
        type=_int_at_least(0),
        default=FitSettings.n_iter,
        metavar="N",
        help="at most N Lloyd updates (default: %(default)s)",
    )
    fit.add_argument(
        "--tol",
        type=_non_negative_float,
        default=FitSettings.tol,
        metavar="T",
        help="stop when the objective's relative decrease is <= T (default: %(default)s)",
    )
    fit.add_argument("--init", choices=INITS, default=FitSettings.init, help="initialization (default: %(default)s)")
    fit.add_argument(
        "--seed",
        type=int,
        default=FitSettings.seed,
        metavar="S",
        help="seed of every random choice (default: %(default)s)",
    )
    fit.add_argument(
        "--n-init",
        type=_int_at_least(1),
        default=FitSettings.n_init,
        metavar="R",
        help="seeded restarts; the best is kept (default: %(default)s)",
    )
    fit.add_argument(
        "--sample", type=_int_at_least(1), default=None, metavar="N", help="fit on a seeded sample of N rows"
    )
    fit.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="keep the fit's state in FILE as soon as seeding ends and after every iteration; rerunning the "
        "same command after a crash resumes there (default: OUT.ckpt next to --out; 'none' to disable)",
    )
    _add_compute_options(fit)
    fit.add_argument("--out", required=True, metavar="CODEBOOK.safetensors", help="codebook file to write (atomically)")
    _add_global_options(fit, in_subcommand=True)


def _add_encode_options(enc: argparse.ArgumentParser) -> None:
    enc.add_argument("data", nargs="+", metavar="DATA", help="table files, globs or folders (local or object storage)")
    enc.add_argument(
        "--codebook", required=True, metavar="CODEBOOK.safetensors", help="codebook file written by `vq fit`"
    )
    enc.add_argument("--column", required=True, help="the embedding column")
    enc.add_argument(
        "--id-column",
        default=None,
        metavar="ID",
        help="id column copied to the output (default: row positions, as `row`)",
    )
    enc.add_argument(
        "--top-k", type=_int_at_least(1), default=1, metavar="K", help="codes per row, nearest first (default: 1)"
    )
    enc.add_argument("--with-distance", action="store_true", help="also write the distance(s) to the code(s)")
    enc.add_argument(
        "--beam",
        type=_int_at_least(1),
        default=EncodeSettings.beam,
        metavar="B",
        help="residual codebooks: partial code tuples kept per row by the beam search; 1 is greedy "
        "(default: %(default)s)",
    )
    enc.add_argument(
        "--unique",
        action="store_true",
        default=EncodeSettings.unique,
        help="multi-level codebooks: also write a suffix column that makes every row's code tuple unique "
        "in OUT_DIR (semantic ids)",
    )
    enc.add_argument(
        "--keep",
        nargs="+",
        action="extend",
        default=[],
        metavar="COL",
        help="columns copied through to the output (put DATA before this option, or repeat --keep)",
    )
    enc.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (not inside an input folder)")
    enc.add_argument(
        "--overwrite",
        action="store_true",
        help="replace codes that another codebook or other settings wrote in OUT_DIR",
    )
    enc.add_argument(
        "--prune",
        action="store_true",
        help="remove the codes of inputs that are not part of this run (kept and listed as stale by default)",
    )
    enc.add_argument(
        "--code-dtype",
        choices=CODE_DTYPE_NAMES,
        default=None,
        metavar="TYPE",
        help=f"integer type of the code column, one of {', '.join(CODE_DTYPE_NAMES)} "
        "(default: the smallest unsigned type for the codebook's n_codes)",
    )
    _add_compute_options(enc)
    _add_global_options(enc, in_subcommand=True)


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that adds its options when first used: to parse, or to print help or usage.

    ``vq fit`` and ``vq encode`` take their choices and defaults from the library (FitSettings,
    DEFAULT_BATCH_ROWS...), whose modules import torch and polars; ``vq --help``, ``vq --version``
    and ``vq inspect`` never build those options, so they never pay for those imports.
    """

    def __init__(self, *args: Any, add_options: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_options = add_options

    def _ensure_options(self) -> None:
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self._ensure_options()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._ensure_options()
        return super().format_usage()

    def format_help(self) -> str:
        self._ensure_options()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The ``vq`` argument parser; each subcommand sets ``handler``."""
    parser = argparse.ArgumentParser(
        prog="vq",
        description="K-means codebooks for embedding tables: fit, encode, inspect.",
        epilog="Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"vq {__version__}")
    _add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)

    fit = commands.add_parser(
        "fit",
        help="fit a codebook on the embedding column of tables",
        description="Fit a K-means codebook on the embedding column of parquet/Arrow tables and save it.",
        add_options=_add_fit_options,
    )
    fit.set_defaults(handler=cmd_fit)

    enc = commands.add_parser(
        "encode",
        help="assign every row of tables its nearest code(s)",
        description=(
            "Encode tables into one parquet file of codes per input file, under OUT_DIR. Resumable: a rerun "
            "skips files already encoded with the same codebook and settings."
        ),
        add_options=_add_encode_options,
    )
    enc.set_defaults(handler=cmd_encode)

    ins = commands.add_parser("inspect", help="describe a codebook file", description="Describe a codebook file.")
    ins.add_argument("codebook", metavar="CODEBOOK.safetensors")
    ins.add_argument("--json", action="store_true", help="print Codebook.summary() as JSON")
    ins.add_argument(
        "--plot",
        default=None,
        metavar="OUT.png",
        help="also draw the cluster sizes and the objective per iteration into OUT.png "
        "(needs matplotlib: pip install 'vq-pipeline[plot]')",
    )
    _add_global_options(ins, in_subcommand=True)
    ins.set_defaults(handler=cmd_inspect)
    return parser


# ----------------------------------------------------------------------------- output


class Console:
    """Where the command writes: results to stdout; progress, warnings and errors to stderr.

    On a terminal, progress is a rich.progress display on stderr, redrawn in place (:meth:`live`);
    a line written to stderr while it shows goes above it, and a result or an error ends it (so the
    cursor is back and nothing is left mid-line). Every line on stderr goes through ``safe_text``,
    and rich receives it as plain text, never as markup: a file name or a quoted file value can
    neither drive the terminal nor style it.
    """

    def __init__(self, *, quiet: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self._bars: Progress | None = None

    def result(self, text: str) -> None:
        self.stop_live()
        print(text, file=self.stdout, flush=True)

    def progress(self, text: str) -> None:
        if not self.quiet:
            self.line(text)

    def warning(self, text: str) -> None:
        """A ``warning: ...`` line; shown with ``--quiet`` too (it is not progress)."""
        self.line(f"warning: {text}")

    def error(self, text: str) -> None:
        """One line on stderr, after the progress display ends; control characters in it (from file
        names or file contents quoted by a message) are shown as escapes."""
        self.stop_live()
        self.line(text)

    def line(self, text: str) -> None:
        """One line on stderr, with ``--quiet`` too; above the progress display while one shows."""
        text = safe_text(text)
        if self._bars is None:
            print(text, file=self.stderr, flush=True)
            return
        from rich.text import Text

        self._bars.refresh()  # the display drawn again below the line shows the latest state
        self._bars.console.print(Text(text), soft_wrap=True)  # printed above the live display

    def live(self, *columns: ProgressColumn, clock: Callable[[], float]) -> Progress:
        """Start a rich progress display with ``columns`` on stderr (the caller checked that it is a
        terminal and that the command is not quiet) and return it; it ends at :meth:`stop_live`."""
        from rich.console import Console as RichConsole
        from rich.progress import Progress

        self.stop_live()
        terminal = RichConsole(file=self.stderr, force_terminal=True, highlight=False, markup=False, emoji=False)
        self._bars = Progress(
            *columns,
            console=terminal,
            transient=True,  # the lines printed above it say what was done
            get_time=clock,
            refresh_per_second=1 / TTY_PROGRESS_INTERVAL,
            redirect_stdout=False,  # stdout holds the result only
        )
        self._bars.start()
        return self._bars

    def stop_live(self) -> None:
        """End the progress display, if one shows: it is erased and the cursor shown again."""
        bars, self._bars = self._bars, None
        if bars is not None:
            bars.stop()


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _percent(done: int, total: int) -> str:
    return f"{100.0 * done / total if total else 100.0:.0f}%"


def _text_column(text_format: str) -> ProgressColumn:
    from rich.progress import TextColumn

    return TextColumn(text_format, markup=False)


class FitProgress:
    """Progress of ``fit_from_tables(progress=...)``: seeding, then one line per Lloyd iteration.

    Seeding (:class:`~vq_pipeline.kmeans.InitProgress`, every few percent of the centroids) leaves
    one line when it ends; before that a terminal shows a bar of the centroids chosen, and a log
    (stderr not a TTY) a line at most every ``LOG_PROGRESS_INTERVAL`` seconds of seeding. Each
    iteration leaves a line; between them a terminal shows the time the fit has taken. With
    ``n_init > 1`` each restart begins with its seeding events, or with iteration 1 when its init
    reports none, and every line names the restart.
    """

    def __init__(
        self, console: Console, n_init: int, *, tty: bool | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console, self.n_init, self.restart = console, n_init, 0
        self.tty = console.stderr.isatty() if tty is None else tty
        self.clock = clock
        self.seeding = False  # between a restart's first seeding event and its first iteration
        self.shown = 0.0  # InitProgress.seconds of the last seeding line shown
        self.bars: Progress | None = None
        self.task: Any = None  # the bar's rich TaskID

    def __call__(self, event: IterationStats | InitProgress) -> None:
        from vq_pipeline.kmeans import InitProgress  # already loaded by the fit that calls this

        if self.console.quiet:
            return
        if isinstance(event, InitProgress):
            self._seeding(event)
            return
        if self.restart == 0 or (event.iteration == 1 and not self.seeding):
            self.restart += 1  # (restart 0: a fit resumed from its checkpoint past iteration 1)
        self.seeding = False
        extra = f", {_plural(event.n_repairs, 'empty code')} repaired" if event.n_repairs else ""
        objective = f"objective {event.objective:.4g}{extra}"
        skipped = f", {event.pruned:,} rows proven unchanged" if event.pruned else ""
        self._draw(f"{self._prefix()}iteration {event.iteration} done, {objective}", done=0, total=None)
        self.console.progress(
            f"{self._prefix()}iteration {event.iteration}: {objective}{skipped} ({event.seconds:.2f} s)"
        )

    def _seeding(self, event: InitProgress) -> None:
        if not self.seeding:
            self.seeding, self.restart, self.shown = True, self.restart + 1, 0.0
        finished = event.chosen >= event.n_codes
        text = f"{self._prefix()}seeding: {event.chosen:,}/{event.n_codes:,}"
        self._draw(text, done=event.chosen, total=event.n_codes)
        if finished or (not self.tty and event.seconds - self.shown >= LOG_PROGRESS_INTERVAL):
            self.shown = event.seconds
            self.console.progress(f"{text} initial centroids ({event.seconds:.1f} s)")

    def _draw(self, description: str, *, done: int, total: int | None) -> None:
        """On a terminal: one bar (pulsing while iterating), with the fit's elapsed time."""
        if not self.tty:
            return
        if self.bars is None:
            from rich.progress import BarColumn, TimeElapsedColumn

            self.bars = self.console.live(
                _text_column("{task.description}"), BarColumn(), TimeElapsedColumn(), clock=self.clock
            )
            self.task = self.bars.add_task(safe_text(description), total=total, completed=done)
        else:
            self.bars.update(self.task, description=safe_text(description), total=total, completed=done)

    def _prefix(self) -> str:
        return f"restart {self.restart}/{self.n_init}, " if self.n_init > 1 else ""


class EncodeProgress:
    """Progress of ``encode_tables(on_plan=progress.plan, progress=progress)``: the run and the current file.

    :meth:`plan` learns the rows of every file to encode; each batch then moves the run's totals:
    files done, rows done, rate (rows/s since the plan) and ETA. Each finished file leaves a line
    with the run's totals. Before that, a terminal shows two bars, the run and the current file
    (rows, rate, time left); a log (stderr not a TTY) gets a line at each file's first batch and
    then at most every ``LOG_PROGRESS_INTERVAL`` seconds, so that logs stay short. Without a plan,
    only the current file is shown.
    """

    def __init__(
        self, console: Console, *, tty: bool | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console
        self.tty = console.stderr.isatty() if tty is None else tty
        self.clock = clock
        self.key: str | None = None
        # A file's first callback comes after its first batch, so a file is timed from the
        # previous callback (the previous file's end, or the start of the run for the first).
        self.started = self.previous = self.clock()
        self.last = float("-inf")
        self.n_files: int | None = None  # files to encode, from plan(); None without a plan
        self.rows_total = 0  # rows to encode, from plan()
        self.run_started = self.started
        self.files_done = self.rows_done = 0  # over the run: finished files, and every row encoded
        self.file_done = 0  # rows of the current file encoded
        self.bars: Progress | None = None  # on a terminal: the run's task, then the current file's
        self.tasks: dict[str, TaskID] = {}

    def plan(self, todo: dict[str, int], skipped: list[str]) -> None:
        """The ``on_plan`` callback: ``{key: rows}`` of the files to encode, and the keys skipped."""
        self.n_files, self.rows_total = len(todo), sum(todo.values())
        self.run_started = self.previous = self.clock()
        if todo:
            self._draw("run", f"0/{self.n_files} files", 0, self.rows_total, rate="")

    def __call__(self, key: str, done: int, total: int) -> None:
        now = self.clock()
        if key != self.key:
            self.key, self.started, self.last = key, self.previous, float("-inf")
            self.file_done = 0
        self.rows_done += done - self.file_done
        self.previous, self.file_done = now, done
        finished = done >= total
        if finished:
            self.files_done += 1
        elapsed = now - self.started
        self._draw("file", key, done, total, rate=f"{done / elapsed:,.0f} rows/s" if elapsed > 0 else "")
        if self.n_files is not None:
            rate = self.rows_done / (now - self.run_started) if now > self.run_started else 0.0
            files = f"{self.files_done}/{self.n_files} files"
            self._draw("run", files, self.rows_done, self.rows_total, rate=f"{rate:,.0f} rows/s" if rate else "")
        if not finished and (self.bars is not None or now - self.last < LOG_PROGRESS_INTERVAL):
            return  # a terminal shows it in the bars; a log waits for its interval
        self.last = now
        text = f"{key}: {done:,}/{total:,} rows ({_percent(done, total)}){f' in {elapsed:.1f} s' if finished else ''}"
        self.console.progress(text if self.n_files is None else f"{text}; overall {self._run(now)}")
        if finished and self.bars is not None:
            self.bars.remove_task(self.tasks.pop("file"))

    def _draw(self, name: str, description: str, done: int, total: int, *, rate: str) -> None:
        """Move the bar ``name`` ("run" or "file") on a terminal; start the display on first use."""
        if not self.tty or self.console.quiet:
            return
        if self.bars is None:
            from rich.progress import BarColumn, TaskProgressColumn, TimeRemainingColumn

            self.bars = self.console.live(
                _text_column("{task.description}"),
                BarColumn(),
                _text_column("{task.completed:,.0f}/{task.total:,.0f} rows"),
                TaskProgressColumn(),
                _text_column("{task.fields[rate]}"),
                TimeRemainingColumn(),
                clock=self.clock,
            )
        description = safe_text(description)
        if name not in self.tasks:
            self.tasks[name] = self.bars.add_task(description, total=total, completed=done, rate=rate)
        else:
            self.bars.update(self.tasks[name], description=description, total=total, completed=done, rate=rate)

    def _run(self, now: float) -> str:
        """The run so far: ``1/2 files, 1,600/3,000 rows (53%), 800 rows/s, ETA 0:00:02``."""
        rows_total, rows_done = self.rows_total, self.rows_done
        elapsed = now - self.run_started
        rows = f"{rows_done:,}/{rows_total:,} rows ({_percent(rows_done, rows_total)})"
        text = f"{self.files_done}/{self.n_files} files, {rows}"
        if elapsed <= 0 or rows_done == 0:
            return text
        rate = rows_done / elapsed
        if rows_done >= rows_total:
            return f"{text} in {elapsed:.1f} s, {rate:,.0f} rows/s"
        # H:MM:SS, as the terminal's time-left column shows it
        return f"{text}, {rate:,.0f} rows/s, ETA {datetime.timedelta(seconds=round((rows_total - rows_done) / rate))}"


# ----------------------------------------------------------------------------- checks of paths


def _absolute(path: str) -> str:
    """Local paths made absolute (Dask workers may run elsewhere); URIs as given."""
    return os.path.abspath(path) if is_local(path) else path


def _file_option(name: str, raw: str, example: str) -> Path:
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


def _check_fit_outputs(inputs: list[str], out: Path, checkpoint: Path | None) -> None:
    """Refuse, before any work, a ``vq fit --out`` or ``--checkpoint`` that is an input, lies inside
    an input folder, cannot be created, or is an existing file vq did not write (the library's rule)."""
    from vq_pipeline.checkpoint import FitCheckpoint
    from vq_pipeline.codebook_file import is_codebook_file

    check_output_file("--out", out, inputs, ours=is_codebook_file, what="codebook", suffix=".safetensors")
    if checkpoint is not None:
        check_output_file(
            "--checkpoint", checkpoint, inputs, ours=FitCheckpoint.is_checkpoint, what="fit checkpoint", suffix=".ckpt"
        )


# ----------------------------------------------------------------------------- commands


def _storage_options(args: argparse.Namespace) -> dict[str, str] | None:
    pairs = [*args.storage_options, *getattr(args, "sub_storage_options", [])]
    return dict(pairs) or None


def _count_rows(
    inputs: list[str], *, column: str, storage_options: dict[str, str] | None
) -> tuple[int, int, int | None] | None:
    """(tables, rows, dim or None) of the inputs, from their footers; None when they cannot be read
    (the command itself then fails with its fuller message)."""
    from vq_pipeline import tables

    try:
        sources = tables.discover(inputs, storage_options=storage_options)
        infos = [tables.inspect_source(s, column=column, storage_options=storage_options) for s in sources]
    except VQError:
        return None
    dims = {info.dim for info in infos}
    return len(sources), sum(info.n_rows for info in infos), dims.pop() if len(dims) == 1 else None


def _warn_if_small_for_dask(args: argparse.Namespace, console: Console) -> None:
    """One warning when ``--dask`` is given so few rows that the cluster's overheads dominate."""
    if not all(map(is_local, args.data)):
        return  # remote tables are read with the workers' credentials; not counted here
    counted = _count_rows(args.data, column=args.column, storage_options=None)
    if counted is None or counted[1] >= DASK_MIN_ROWS:
        return
    console.warning(
        f"--dask={args.dask!r} for {_plural(counted[1], 'row')} in {_plural(counted[0], 'table')}: the cluster's "
        f"start-up and per-task overhead (about 0.3 s per task) will dominate; a local run (without --dask) "
        f"would be faster below about {DASK_MIN_ROWS:,} rows. Running on Dask anyway."
    )


def cmd_fit(args: argparse.Namespace, console: Console) -> int:
    """``vq fit``: fit_from_tables, then save the codebook atomically."""
    # Checked before fitting, so that a long fit is not wasted on a path it cannot be saved to.
    out = _file_option("--out", args.out, "codebook.safetensors")
    t0 = time.perf_counter()
    if args.dask:
        _check_fit_outputs(args.data, out, None)
        _warn_if_small_for_dask(args, console)
        return _fit_on_dask(args, console, out, t0)  # the fit-codebook flow locks ``out`` itself
    if args.checkpoint == "none":
        checkpoint = None
    elif args.checkpoint:
        checkpoint = _file_option("--checkpoint", args.checkpoint, "fit.ckpt")
    else:
        checkpoint = out.with_name(out.name + ".ckpt")
    _check_fit_outputs(args.data, out, checkpoint)
    with output_lock(out, what="codebook"):  # one fit per output: the file on disk is the one reported
        return _fit_here(args, console, out, checkpoint, t0)


def _fit_here(args: argparse.Namespace, console: Console, out: Path, checkpoint: Path | None, t0: float) -> int:
    from vq_pipeline.pipeline import fit_from_tables

    if not console.quiet:
        _show_fit_input(args, console)
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
        codec=args.codec,
        levels=args.levels,
        train_beam=args.train_beam,
        prune=args.prune,
        sample=args.sample,
        batch_rows=args.batch_rows,
        storage_options=_storage_options(args),
        progress=FitProgress(console, args.n_init),
        checkpoint=checkpoint,
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
        **_multilevel_summary(codebook),
        "seconds": round(seconds, 3),
    }
    _print_fit_summary(args, console, summary)
    return 0


def _show_fit_input(args: argparse.Namespace, console: Console) -> None:
    """``reading 2,000,000 rows (dim 32) from 1 table``: said before a read that can take minutes."""
    counted = _count_rows(args.data, column=args.column, storage_options=_storage_options(args))
    if counted is None:
        return
    n_tables, n_rows, dim = counted
    rows = f"a seeded sample of {args.sample:,} of {n_rows:,} rows" if args.sample else _plural(n_rows, "row")
    console.progress(f"reading {rows}{f' (dim {dim})' if dim else ''} from {_plural(n_tables, 'table')}")


def _run_flow_on_dask(args: argparse.Namespace, flow_name: str, **params: Any) -> dict[str, Any]:
    """Run the Prefect flow ``vq_flows.<flow_name>`` with ``dask=args.dask`` against a reachable Prefect API."""
    if _storage_options(args):
        raise InvalidInputError(
            "--storage-option with --dask: the flows read object storage with the workers' own credentials "
            "(environment or instance role); expected no --storage-option. Fix: configure credentials on the workers."
        )
    if args.batch_rows != DEFAULT_BATCH_ROWS:
        raise InvalidInputError(
            f"--batch-rows={args.batch_rows} with --dask: expected the default. Fix: drop --batch-rows."
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Imported only here: the library itself never imports prefect (flows/ wraps the library).
    import importlib

    from vq_flows.dask import prefect_api_for

    module, name = flow_name.rsplit(".", 1)
    flow_fn = getattr(importlib.import_module(f"vq_flows.{module}"), name)
    with prefect_api_for(args.dask):
        return flow_fn(dask=args.dask, engine=args.engine, device=args.device, **params)


def _multilevel_summary(codebook: Codebook | CodebookInfo) -> dict[str, Any]:
    """``codec`` and ``levels``, and for a multi-level codebook its reconstruction ``mse``, ``collision_rate``
    and the per-level ``level_mse``, for the fit's summary (a flat codebook adds only codec and levels)."""
    summary: dict[str, Any] = {"codec": codebook.codec, "levels": codebook.levels}
    if codebook.codec != "flat":
        stats = codebook.stats if isinstance(codebook.stats, dict) else {}
        per_level = stats.get("levels") if isinstance(stats.get("levels"), list) else []
        summary["mse"] = stats.get("mse")
        summary["collision_rate"] = stats.get("collision_rate")
        summary["level_mse"] = [level.get("mse") if isinstance(level, dict) else None for level in per_level]
    return summary


def _print_fit_summary(args: argparse.Namespace, console: Console, summary: dict[str, Any], where: str = "") -> None:
    """The result of ``vq fit``: the summary as JSON, or one sentence (``where``: e.g. " on Dask ...")."""
    if args.json:
        console.result(_dumps(summary))
        return
    state = "converged" if summary["converged"] else f"not converged (stopped at --iters {args.iters})"
    codes = _plural(summary["n_codes"], "code")
    extra = ""
    if summary.get("codec", "flat") != "flat":
        codes = f"{summary['codec']} {summary['levels']} levels x {codes}"
        extra = f", mse {_number(summary.get('mse'))}, collision rate {_number(summary.get('collision_rate'))}"
    console.result(
        safe_text(
            f"fitted {codes} (dim {summary['dim']}, {summary['metric']}) on "
            f"{_plural(summary['rows'], 'row')} in {_plural(summary['iterations'], 'iteration')}{where}, {state}; "
            f"inertia {summary['inertia']:.4g}{extra} -> {summary['path']}"
        )
    )


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else "unknown"


def _fit_on_dask(args: argparse.Namespace, console: Console, out: Path, t0: float) -> int:
    """``vq fit --dask``: the fit-codebook flow, exact Lloyd as map-reduce on the cluster's workers."""
    if args.n_init != 1:
        raise InvalidInputError(
            f"--n-init={args.n_init} with --dask: expected 1. Fix: drop --n-init, or fit without --dask."
        )
    s = _run_flow_on_dask(
        args,
        "fit.fit_codebook_flow",
        inputs=[_absolute(d) for d in args.data],
        column=args.column,
        n_codes=args.codes,
        out=os.path.abspath(out),
        metric=args.metric,
        n_iter=args.iters,
        tol=args.tol,
        init=args.init,
        seed=args.seed,
        sample=args.sample,
        codec=args.codec,
        levels=args.levels,
        train_beam=args.train_beam,
        prune=args.prune,
    )
    keys = ("path", "fingerprint", "n_codes", "dim", "metric", "rows", "iterations", "converged", "inertia")
    multilevel = ("codec", "levels") + (("mse", "collision_rate", "level_mse") if s.get("codec") != "flat" else ())
    summary = {k: s.get(k) for k in keys + multilevel}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    _print_fit_summary(args, console, summary, where=f" on Dask {args.dask}")
    return 0


def cmd_encode(args: argparse.Namespace, console: Console) -> int:
    """``vq encode``: encode_tables with a progress bar; the run is resumable (see pipeline)."""
    check_output_folder("--out", args.out, args.data)  # encode_tables checks again; this names the flag
    if args.dask:
        from vq_pipeline.pipeline import EncodeResult

        _warn_if_small_for_dask(args, console)
        s = _run_flow_on_dask(
            args,
            "encode.encode_embeddings_flow",
            inputs=[_absolute(d) for d in args.data],
            codebook=_absolute(args.codebook),
            out_dir=os.path.abspath(args.out),
            column=args.column,
            id_column=args.id_column,
            top_k=args.top_k,
            with_distance=args.with_distance,
            keep=list(args.keep),
            code_dtype=args.code_dtype,
            overwrite=args.overwrite,
            prune=args.prune,
            **_multilevel_encode_options(args),
        )
        keys = (
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
        optional = ("codec", "levels", "semantic_ids")  # what a flow summary of a multi-level run adds
        result = EncodeResult(**{k: s[k] for k in keys}, **{k: s[k] for k in optional if k in s})
    else:
        result = _encode_here(args, console)
    if args.json:
        console.result(_dumps(result.to_dict()))
    else:
        skipped = f", skipped {len(result.skipped):,} already complete" if result.skipped else ""
        console.result(
            safe_text(
                f"encoded {_plural(len(result.encoded), 'file')} ({_plural(result.rows_encoded, 'row')}){skipped} "
                f"-> {result.manifest}"
            )
        )
        if result.pruned:
            console.warning(f"removed {_plural(len(result.pruned), 'stale output')}: {', '.join(result.pruned)}")
        if result.stale:
            console.warning(
                f"{_plural(len(result.stale), 'output')} in {args.out} belong to inputs not part of this run, kept and "
                f"listed as stale in the manifest (e.g. {result.stale[0]!r}); pass --prune to remove them."
            )
        if result.unrecorded:
            console.warning(
                f"{_plural(len(result.unrecorded), 'parquet file')} in {args.out} were not written by vq and are left "
                f"alone (e.g. {result.unrecorded[0]!r}); readers of the folder will read them too."
            )
    return 0


def _multilevel_encode_options(args: argparse.Namespace) -> dict[str, Any]:
    """``beam`` and ``unique`` for the encode flow, given only when set away from their defaults
    (EncodeSettings), so that a run without them calls the flow with its parameters of old."""
    options: dict[str, Any] = {}
    if args.beam != EncodeSettings.beam:
        options["beam"] = args.beam
    if args.unique != EncodeSettings.unique:
        options["unique"] = args.unique
    return options


def _encode_here(args: argparse.Namespace, console: Console) -> EncodeResult:
    from vq_pipeline.pipeline import encode_tables

    progress = EncodeProgress(console)
    result: EncodeResult = encode_tables(
        args.data,
        args.codebook,
        args.out,
        column=args.column,
        id_column=args.id_column,
        top_k=args.top_k,
        with_distance=args.with_distance,
        keep=args.keep,
        code_dtype=args.code_dtype,
        overwrite=args.overwrite,
        prune=args.prune,
        beam=args.beam,
        unique=args.unique,
        engine=args.engine,
        device=args.device,
        batch_rows=args.batch_rows,
        storage_options=_storage_options(args),
        progress=progress,
        on_plan=progress.plan,
    )
    console.stop_live()
    return result


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    """``vq inspect``: describe a codebook file, validated as ``Codebook.load`` does, without loading torch."""
    from vq_pipeline.codebook_file import load_info

    plot = getattr(args, "plot", None)  # a Namespace built by a caller may lack the option
    if plot is not None:
        from vq_pipeline.plots import check_picture_path, plot_codebook

        check_picture_path("--plot", plot, [args.codebook])  # before reading: the message names the flag
    codebook = load_info(args.codebook)
    if plot is not None:
        plot = str(plot_codebook(codebook, plot))  # drawn before anything is printed: an error leaves stdout empty
    if args.json:
        summary = codebook.summary() if plot is None else {**codebook.summary(), "plot": plot}
        console.result(_dumps(summary))  # JSON escapes every control character
    else:
        console.result(describe(codebook, title=args.codebook))
        if plot is not None:
            console.result(f"picture -> {safe_text(plot)}")
    return 0


def describe(codebook: Codebook | CodebookInfo, *, title: str = "codebook") -> str:
    """A multi-line, human-readable description of a codebook.

    Uses ``.get`` throughout: codebooks fitted in memory or by older releases lack some stats.
    Reads the counts through numpy, so it needs nothing of torch but the ``counts`` it is given.
    Every string taken from the codebook (or the title, a file name) goes through ``safe_text``
    and every number through ``show``, so a hostile file can neither drive the terminal, nor forge
    a line of the report, nor make it fail: each line is the title or starts with a label.
    """
    import numpy as np

    from vq_pipeline.display import is_number, safe_text, show

    s = codebook.stats if isinstance(codebook.stats, dict) else {}
    fit = codebook.settings
    if isinstance(fit, dict):
        fit_text = " ".join(f"{show(k)}={show(v)}" for k, v in fit.items() if k not in ("n_codes", "metric"))
    else:
        fit_text = show(fit)
    counts = np.asarray(codebook.counts, dtype=np.int64)  # (n_codes,)
    rows: list[tuple[str, str]] = [
        ("fingerprint", codebook.fingerprint),
        ("metric", show(codebook.metric)),
        ("codes", f"{codebook.n_codes:,} x dim {codebook.dim}"),
        ("fit", fit_text or "unknown"),
    ]
    multilevel = codebook.codec != "flat"
    if multilevel:
        rows[2] = ("codes", f"{codebook.n_codes:,} per level x {codebook.levels} levels, dim {codebook.dim}")
        rows.insert(2, ("codec", f"{show(codebook.codec)}, {codebook.levels} levels"))
    n_rows = s.get("n_rows")
    if n_rows is not None:
        how = s.get("mode")
        total = s.get("rows_total")
        if how == "sample" and total is not None:
            detail = f" (seeded sample of {show(total, ',')}, seed {show(s.get('sample_seed'))})"
        elif how:
            detail = f" ({show(how)})"
        else:
            detail = ""
        rows.append(("training rows", f"{show(n_rows, ',')}{detail}"))
    inertia = s.get("inertia")
    if inertia is not None:
        try:
            mean = f" (mean {inertia / n_rows:.4g} per row)" if is_number(inertia) and is_number(n_rows) else ""
        except (ArithmeticError, ValueError):  # no rows, or numbers too large for a float
            mean = ""
        rows.append(("inertia", f"{show(inertia, '.6g')}{mean}"))
    if "iterations" in s:
        converged = "converged" if s.get("converged") is True else "not converged"
        rows.append(("iterations", f"{show(s['iterations'])}, {converged}"))
    rows.append(("repairs", show(s.get("n_repairs", "unknown"))))
    rows.append(("empty codes", str(int((counts == 0).sum()))))
    if multilevel:
        rows.extend(_multilevel_rows(s, codebook.n_codes))
    median = f"{float(np.median(counts)):,.1f}".removesuffix(".0")  # x.5 only for an even n_codes
    rows.append(
        (
            "cluster sizes",
            f"min {int(counts.min()):,}, median {median}, max {int(counts.max()):,} (total {int(counts.sum()):,}"
            + (f" over {codebook.levels} levels)" if multilevel else ")"),
        )
    )
    sources = [show(source) for source in codebook.sources]
    shown = sources[:MAX_SOURCES_SHOWN] + (
        [f"... and {len(sources) - MAX_SOURCES_SHOWN:,} more"] if len(sources) > MAX_SOURCES_SHOWN else []
    )
    rows.append(("sources", "\n".join(shown) if shown else "(in memory)"))
    rows.append(("column", show(codebook.column) or "(in memory)"))
    rows.append(("data fingerprint", show(codebook.data_fingerprint) or "unknown"))
    rows.append(("parent", show(codebook.parent_fingerprint) or "none"))
    versions = codebook.versions
    versions_text = (
        ", ".join(f"{show(k)} {show(v)}" for k, v in versions.items()) if isinstance(versions, dict) else show(versions)
    )
    rows.append(("versions", versions_text or "unknown"))
    rows.append(("created_at", show(codebook.created_at) or "unknown"))
    timings = codebook.timings if isinstance(codebook.timings, dict) else {}
    if "fit_seconds" in timings:
        rows.append(("fit time", f"{show(timings['fit_seconds'], '.2f')} s"))
    width = max(len(name) for name, _ in rows) + 2
    lines = [safe_text(str(title))]
    for name, value in rows:
        first, *rest = value.split("\n")  # the sources (one per line) and the per-level table
        lines.append(f"  {name:<{width}}{first}")
        lines.extend(f"  {'':<{width}}{more}" for more in rest)
    return "\n".join(lines)


def _multilevel_rows(stats: dict[str, Any], n_codes: int) -> list[tuple[str, str]]:
    """``describe``'s rows for a residual or product codebook: the reconstruction error, the semantic ids'
    collisions, and one line per level (its error, used codes, iterations, convergence)."""
    from vq_pipeline.display import show

    rows = [("error (mse)", show(stats.get("mse", "unknown"), ".6g"))]
    if "collision_rate" in stats:
        rows.append(
            (
                "semantic ids",
                f"{show(stats.get('n_unique'), ',')} unique tuples, collision rate "
                f"{show(stats.get('collision_rate'), '.4g')}, largest group {show(stats.get('largest_group'), ',')}, "
                f"max suffix {show(stats.get('max_suffix'), ',')}",
            )
        )
    per_level = stats.get("levels")
    if not isinstance(per_level, list) or not per_level:
        return [*rows, ("per level", "unknown")]
    table = [("level", "error (mse)", "used codes", "iterations", "converged")]
    for i, level in enumerate(per_level):
        level = level if isinstance(level, dict) else {}
        converged = level.get("converged")
        table.append(
            (
                str(i),
                show(level.get("mse", "unknown"), ".6g"),
                f"{show(level.get('used_codes', '?'), ',')}/{n_codes:,}",
                show(level.get("iterations", "unknown")),
                "yes" if converged is True else "no" if converged is False else "unknown",
            )
        )
    widths = [max(len(cells[c]) for cells in table) for c in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip() for cells in table]
    return [*rows, ("per level", "\n".join(lines))]


# ----------------------------------------------------------------------------- entry point


class _InterruptHandler:
    """The SIGINT handler of one ``vq`` run: Ctrl-C raises KeyboardInterrupt, once.

    polars, when it runs a query, puts its own handler in front of this one: it cancels the query,
    raises KeyboardInterrupt, and passes the signal on, which with Python's default handler raises a
    second one in whatever runs next (a cleanup, the except clause: a second traceback). So a signal
    that comes while a KeyboardInterrupt is being handled is ignored, and so is one after the run.
    """

    def __init__(self) -> None:
        self.closed = False

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.closed and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_once() -> Iterator[None]:
    """Run with :class:`_InterruptHandler`, installed before polars is imported (so that polars chains
    to it). Left alone: a SIGINT that is ignored (``nohup``, a background job) or handled by a program
    that calls :func:`main`, and threads other than the main one (they cannot set handlers)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    handler = _InterruptHandler()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        handler.closed = True  # signal.signal runs a pending handler first: it must not raise now
        signal.signal(signal.SIGINT, previous)


class _ConsoleLog(logging.Handler):
    """Log records as lines on the console's stderr (above the progress display while one shows)."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.DEBUG)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                self.console.line(line)
        except Exception:  # noqa: BLE001 - logging's own report of a failed record
            self.handleError(record)


def _log_to_stderr(console: Console) -> Callable[[], None]:
    """``--debug``: the library logs each iteration and OOM retries under "vq_pipeline"; show them all.
    Returns what undoes it, so that a run in-process leaves the logger as it found it."""
    logger, handler = logging.getLogger("vq_pipeline"), _ConsoleLog(console)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)

    return undo


def main(argv: list[str] | None = None) -> int:
    """Run ``vq`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Returns rather than exits, so that it can be called in-process; the console script and
    ``python -m vq_flows.cli`` pass the result to ``sys.exit``. Ctrl-C at any point, the
    imports of torch and polars and a polars query included, prints one ``interrupted`` line and
    returns 130.
    """
    with _interrupts_once():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    console = Console(quiet=False)
    debug, undo_log = False, None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse exits for --help, --version (0) and usage errors (2)
            return exc.code if isinstance(exc.code, int) else 2
        console.quiet, debug = args.quiet, args.debug
        if debug:
            undo_log = _log_to_stderr(console)
        handler_fn: Handler = args.handler
        return handler_fn(args, console)
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
    except VQError as exc:
        if debug:
            console.stop_live()
            traceback.print_exc()
        console.error(f"error: {exc}")
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`vq inspect cb | head -1`): nothing left to tell it.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one readable line, not a traceback
        if debug:
            console.stop_live()
            traceback.print_exc()
            console.error(f"error: unexpected {type(exc).__name__}: {exc}")
        else:
            console.error(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1
    except BaseException as exc:
        # A panic inside a Rust library (polars' PanicException) derives from BaseException, not
        # Exception. The table readers translate the ones they meet; this catches any other.
        if type(exc).__name__ != "PanicException":
            raise
        if debug:
            console.stop_live()
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no message"
        console.error(
            f"error: a library failed inside its native code (PanicException: {first}); this usually means a "
            f"corrupt input file. Fix: run with --debug to see which file, then rewrite or remove it."
        )
        return 1
    finally:
        console.stop_live()  # on every way out: the terminal gets its cursor back
        if undo_log is not None:
            undo_log()


if __name__ == "__main__":
    sys.exit(main())
