"""Deprecated: ``python -m vq_flows.deploy ARGS`` is ``vq serve ARGS`` (:mod:`vq_flows.cli.serve`).

Kept for one release: it prints one deprecation line on stderr, then does what ``vq serve`` does.
The deployment's functions are :mod:`vq_flows.cli.serve`'s, re-exported here under their old names.
"""

import sys
from collections.abc import Sequence
from typing import Any

from vq_flows.cli.app import main as vq
from vq_flows.cli.parser import build_parser
from vq_flows.cli.serve import DEFAULT_NAME, build_deployment, deployment_options, serve_arguments
from vq_flows.cli.serve import serve_deployment as serve

#: What ``python -m vq_flows.deploy`` prints on stderr before it does what ``vq serve`` does.
DEPRECATION = "python -m vq_flows.deploy is deprecated; use vq serve"


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, str, dict[str, Any]]:
    """(cron, deployment name, flow parameters) from ``vq serve``'s arguments (usage errors exit 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return serve_arguments(build_parser().parse_args(["serve", *argv]))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vq_flows.deploy ARGS``: one deprecation line on stderr, then ``vq serve ARGS``."""
    print(DEPRECATION, file=sys.stderr, flush=True)
    return vq(["serve", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["DEFAULT_NAME", "DEPRECATION", "build_deployment", "deployment_options", "main", "parse_args", "serve"]

if __name__ == "__main__":
    sys.exit(main())
