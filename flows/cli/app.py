"""The entry point: :func:`main` parses the command line, runs the command's handler, and turns what
it raises into an exit status and one line on stderr; Ctrl-C is handled once (:func:`interrupts_once`).
"""

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from vq_flows.cli.parser import build_parser
from vq_flows.cli.progress import Console, log_to_stderr

from vq_pipeline.errors import VQError

#: Exit status of a run stopped with Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace, Console], int]


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
def interrupts_once() -> Iterator[None]:
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


def main(argv: list[str] | None = None) -> int:
    """Run ``vq`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Returns rather than exits, so that it can be called in-process; the console script and
    ``python -m vq_flows.cli`` pass the result to ``sys.exit``. Ctrl-C at any point, the
    imports of torch and polars and a polars query included, prints one ``interrupted`` line and
    returns 130.
    """
    with interrupts_once():
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
            undo_log = log_to_stderr(console)
        handler: Handler = args.handler
        return handler(args, console)
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`vq inspect cb | head -1`): nothing left to tell it.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BaseException as exc:
        return _report(exc, console, debug=debug)
    finally:
        console.stop_live()  # on every way out: the terminal gets its cursor back
        if undo_log is not None:
            undo_log()


def _report(exc: BaseException, console: Console, *, debug: bool) -> int:
    """One ``error: ...`` line for a failed command (and the traceback with ``--debug``); returns 1.

    A VQError prints its message; anything else is reported as unexpected. A panic inside a Rust
    library (polars' PanicException) derives from BaseException, not Exception; the table readers
    translate the ones they meet and this catches any other. Any other BaseException is raised again.
    """
    if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
        raise exc
    if debug:
        console.stop_live()
        traceback.print_exception(exc)
    if isinstance(exc, VQError):
        console.error(f"error: {exc}")
    elif isinstance(exc, Exception):
        hint = "" if debug else " (run with --debug for the traceback)"
        console.error(f"error: unexpected {type(exc).__name__}: {exc}{hint}")
    else:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no message"
        console.error(
            f"error: a library failed inside its native code (PanicException: {first}); this usually means a "
            f"corrupt input file. Fix: run with --debug to see which file, then rewrite or remove it."
        )
    return 1
