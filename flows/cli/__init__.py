"""The ``vq`` command: fit a codebook from tables, encode tables into codes, inspect a codebook, serve
the scheduled pipeline.

::

    vq fit DATA... --column COL --codes K --out CODEBOOK.safetensors [--metric cosine]
           [--codec flat|residual|product --levels L] [--rotation none|random|opq|itq] [--json]
    vq fit DATA... --column COL --codec scalar [--bits 8|4] | --codec binary --out CODEBOOK.safetensors
    vq encode DATA... --codebook CODEBOOK.safetensors --column COL --out OUT_DIR [--beam B] [--unique] [--json]
    vq inspect CODEBOOK.safetensors [--json] [--plot OUT.png]
    vq serve --cron "0 * * * *" --input-root DIR --work-dir DIR --column COL --codes K [...]
    vq --version

stdout carries only the result (one summary line, or one JSON object with ``--json``) so that a
scheduler or a shell pipeline can parse it; progress, warnings and errors go to stderr.
Exit codes: 0 success, 1 error (a :class:`~vq_pipeline.errors.VQError` prints its message only;
anything else is reported as unexpected), 2 usage error, 130 interrupted (Ctrl-C prints one line).

A thin shell over :mod:`vq_pipeline.jobs` and the flows; its modules:

- ``options``: the options generated from the fields of the settings dataclasses
  (:mod:`vq_pipeline.settings`): name, type, choices, default and help (see its docstring), the
  options of ``vq fit`` and ``vq encode``, and :func:`~vq_flows.cli.options.settings_from`, which
  reads the settings back. ``parser``: :func:`build_parser`, the subcommands and their handlers.
- ``progress``: the :class:`Console` (stdout for results, stderr for the rest), the rich progress
  displays of a fit (:class:`FitProgress`) and of an encode run (:class:`EncodeProgress`), and the
  ``--debug`` log handler.
- ``fit``, ``encode``, ``inspection`` (``vq inspect``, :func:`describe`), ``serve``: one module per
  command, each with its ``cmd_*`` handler and the one call of the library function or flow it runs;
  ``serve`` also builds its options from the scheduled flow's signature and holds the deployment.
- ``on_dask``: ``--dask`` for fit and encode: the checks, and the flow run on the cluster.
- ``app``: :func:`main`: parse, run the handler, map errors to exit statuses, handle Ctrl-C once.
- ``__main__``: ``python -m vq_flows.cli``.

Nothing heavy is imported at import time: torch, polars and Prefect are imported by the commands
that use them (``vq fit``, ``vq encode`` and ``vq serve`` build their options on first use), so
``vq --help`` and ``vq --version`` start at once and ``vq inspect`` loads only the codebook module.
"""

from vq_flows.cli.app import EXIT_INTERRUPTED, main
from vq_flows.cli.inspection import MAX_SOURCES_SHOWN, cmd_inspect, describe
from vq_flows.cli.parser import build_parser
from vq_flows.cli.progress import Console, EncodeProgress, FitProgress

__all__ = [
    "EXIT_INTERRUPTED",
    "MAX_SOURCES_SHOWN",
    "Console",
    "EncodeProgress",
    "FitProgress",
    "build_parser",
    "cmd_inspect",
    "describe",
    "main",
]
