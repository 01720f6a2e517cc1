"""The ``vq`` parser: the top-level options and one subparser per command, whose options are built on
first use (:class:`CommandParser`) by :mod:`vq_flows.cli.options` (fit, encode) and
:mod:`vq_flows.cli.serve`; each subcommand sets ``handler``, its command module's ``cmd_*``.
"""

import argparse
from collections.abc import Callable
from typing import Any

from vq_flows.cli import encode, fit, inspection, serve
from vq_flows.cli.options import add_encode_options, add_fit_options, add_global_options

from vq_pipeline import __version__
from vq_pipeline.errors import VQError


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that adds its options when first used: to parse, or to print help or usage,
    and then checks what it parsed (``check``: a VQError becomes a usage error).

    ``vq fit``, ``vq encode`` and ``vq serve`` read their options from the library's settings (and
    ``vq serve`` from the flow's signature), whose modules may import torch, polars or Prefect;
    ``vq --help``, ``vq --version`` and ``vq inspect`` never build those options.
    """

    def __init__(
        self,
        *args: Any,
        add_options: Callable[[argparse.ArgumentParser], None] | None = None,
        check: Callable[[argparse.Namespace], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._add_options, self._check = add_options, check

    def _ensure_options(self) -> None:
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self._ensure_options()
        parsed, extras = super().parse_known_args(args, namespace)
        if self._check is not None:
            try:
                self._check(parsed)
            except VQError as exc:
                self.error(str(exc))
        return parsed, extras

    def format_usage(self) -> str:
        self._ensure_options()
        return super().format_usage()

    def format_help(self) -> str:
        self._ensure_options()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The ``vq`` argument parser; each subcommand sets ``handler`` (a ``(args, console) -> status`` function)."""
    parser = argparse.ArgumentParser(
        prog="vq",
        description="K-means codebooks for embedding tables: fit, encode, inspect, serve.",
        epilog="Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"vq {__version__}")
    add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    commands.add_parser(
        "fit",
        help="fit a codebook on the embedding column of tables",
        description="Fit a K-means codebook on the embedding column of parquet/Arrow tables and save it.",
        add_options=add_fit_options,
        check=fit.check_fit_args,
    ).set_defaults(handler=fit.cmd_fit)
    commands.add_parser(
        "encode",
        help="assign every row of tables its nearest code(s)",
        description="Encode tables into one parquet file of codes per input file, under OUT_DIR. Resumable: a "
        "rerun skips files already encoded with the same codebook and settings.",
        add_options=add_encode_options,
    ).set_defaults(handler=encode.cmd_encode)
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
    add_global_options(ins, in_subcommand=True)
    ins.set_defaults(handler=inspection.cmd_inspect)
    commands.add_parser(
        "serve",
        help="serve the scheduled pipeline flow on a cron schedule",
        description=serve.DESCRIPTION,
        add_options=serve.add_serve_options,
        check=serve.check_serve,
    ).set_defaults(handler=serve.cmd_serve)
    return parser
