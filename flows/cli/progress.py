"""What ``vq`` writes on the terminal: the :class:`Console` (results on stdout; progress, warnings
and errors on stderr), the rich progress displays of a fit and of an encode run, and the log handler
that ``--debug`` puts on the library's logger.

Imports only the standard library at import time; rich is imported when a display first draws.
"""

import datetime
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from vq_pipeline.jobs.display import safe_text

if TYPE_CHECKING:
    from rich.progress import Progress, ProgressColumn, TaskID

    from vq_pipeline.compute.lloyd import IterationStats
    from vq_pipeline.compute.seeding import InitProgress

#: Seconds between an encode run's progress lines when stderr is a log file, not a terminal (a fit's
#: lines: :class:`vq_pipeline.compute.lloyd.ProgressLines`).
LOG_PROGRESS_INTERVAL = 5.0
#: Seconds between redraws of the progress bar on a terminal (redrawing every batch would flicker).
TTY_PROGRESS_INTERVAL = 0.1


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
        #: ``--debug``: the library's log is shown (:func:`log_to_stderr`), and it holds a fit's progress
        #: lines already, with their times; the fit's display then draws only its bar.
        self.shows_log = False

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

    def live(self, *columns: "ProgressColumn", clock: Callable[[], float]) -> "Progress":
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


def dumps(value: Any) -> str:
    """``value`` as indented JSON (what ``--json`` prints); anything JSON lacks as its str."""
    return json.dumps(value, indent=2, default=str)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def percent(done: int, total: int) -> str:
    return f"{100.0 * done / total if total else 100.0:.0f}%"


def _text_column(text_format: str) -> "ProgressColumn":
    from rich.progress import TextColumn

    return TextColumn(text_format, markup=False)


class FitProgress:
    """Progress of ``fit_from_tables(progress=...)``: the lines of
    :class:`vq_pipeline.compute.lloyd.ProgressLines` (what a log gets: seeding's start, at most one line
    a second and its end; every iteration as ``iteration 3/50: objective ... (-1.2%), 0.6 s elapsed, ETA
    ...``; the end of each Lloyd run, whose count of iterations is the summary's), prefixed with the
    level of a multi-level fit and the restart when ``n_init > 1``. On a terminal, a bar (of the
    centroids chosen while seeding, pulsing while iterating, with the fit's elapsed time) shows what
    happens between the lines, and takes the place of seeding's in-between lines.
    """

    def __init__(
        self, console: Console, *, tty: bool | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console
        self.tty = console.stderr.isatty() if tty is None else tty
        self.clock = clock
        self.lines: Any = None  # the ProgressLines, made at the first event (the library is loaded by then)
        self.bars: Progress | None = None
        self.task: Any = None  # the bar's rich TaskID

    def __call__(self, event: "IterationStats | InitProgress") -> None:
        # already loaded by the fit that calls this
        from vq_pipeline.compute.lloyd import IterationProgress, ProgressLines
        from vq_pipeline.compute.seeding import InitProgress

        if self.console.quiet:
            return
        if self.lines is None:
            seeding_interval = float("inf") if self.tty else 1.0  # a terminal's bar shows seeding as it goes
            self.lines = ProgressLines(self.console.progress, clock=self.clock, seeding_interval=seeding_interval)
        if isinstance(event, InitProgress):
            prefix = self.lines.prefix(event)
            self._draw(f"{prefix}seeding: {event.chosen:,}/{event.n_codes:,}", done=event.chosen, total=event.n_codes)
        elif isinstance(event, IterationProgress):
            prefix = self.lines.prefix(event)
            state = "done" if event.done else f"iteration {event.iteration}/{event.n_iter} done"
            self._draw(f"{prefix}{state}, objective {event.objective:.6g}", done=0, total=None)
        if not self.console.shows_log:  # the log shows these lines (--debug): once is enough
            self.lines(event)

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
        text = f"{key}: {done:,}/{total:,} rows ({percent(done, total)}){f' in {elapsed:.1f} s' if finished else ''}"
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
        rows = f"{rows_done:,}/{rows_total:,} rows ({percent(rows_done, rows_total)})"
        text = f"{self.files_done}/{self.n_files} files, {rows}"
        if elapsed <= 0 or rows_done == 0:
            return text
        rate = rows_done / elapsed
        if rows_done >= rows_total:
            return f"{text} in {elapsed:.1f} s, {rate:,.0f} rows/s"
        # H:MM:SS, as the terminal's time-left column shows it
        return f"{text}, {rate:,.0f} rows/s, ETA {datetime.timedelta(seconds=round((rows_total - rows_done) / rate))}"


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


def log_to_stderr(console: Console) -> Callable[[], None]:
    """``--debug``: the library logs each iteration and OOM retries under "vq_pipeline"; show them all.
    Returns what undoes it, so that a run in-process leaves the logger as it found it."""
    logger, handler = logging.getLogger("vq_pipeline"), _ConsoleLog(console)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    console.shows_log = True

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        console.shows_log = False

    return undo
