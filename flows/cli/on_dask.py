"""``vq fit --dask`` and ``vq encode --dask``: the command's settings handed to a Prefect flow that runs
on a Dask cluster, after the checks that a local run does not need.

The flows take the command's settings objects whole; the settings that a run on Dask does not honour
(:data:`NOT_ON_DASK`, and ``--storage-option``) are refused unless at their defaults, so that no
option is silently dropped. Prefect is imported only by :func:`run_flow`.
"""

import argparse
import dataclasses
import os
from typing import Any

from vq_flows.cli import options
from vq_flows.cli.options import flag_of, storage_options
from vq_flows.cli.progress import Console, plural

from vq_pipeline.errors import InvalidInputError, VQError
from vq_pipeline.io.paths import is_local

#: Settings that ``--dask`` does not take away from their defaults, as before settings travelled whole to
#: the flows: ``--batch-rows`` (the workers read with their own) and ``--n-init`` (one fit per cluster run).
NOT_ON_DASK = ("batch_rows", "n_init")


def absolute(path: str) -> str:
    """Local paths made absolute (Dask workers may run elsewhere); URIs as given."""
    return os.path.abspath(path) if is_local(path) else path


def count_rows(
    inputs: list[str], *, column: str, storage_options: dict[str, str] | None
) -> tuple[int, int, int | None] | None:
    """(tables, rows, dim or None) of the inputs, from their footers; None when they cannot be read
    (the command itself then fails with its fuller message)."""
    from vq_pipeline.io import tables

    try:
        sources = tables.discover(inputs, storage_options=storage_options)
        infos = [tables.inspect_source(s, column=column, storage_options=storage_options) for s in sources]
    except VQError:
        return None
    dims = {info.dim for info in infos}
    return len(sources), sum(info.n_rows for info in infos), dims.pop() if len(dims) == 1 else None


def warn_if_small(args: argparse.Namespace, console: Console) -> None:
    """One warning when ``--dask`` is given so few rows that the cluster's overheads dominate."""
    if not all(map(is_local, args.data)):
        return  # remote tables are read with the workers' credentials; not counted here
    counted = count_rows(args.data, column=args.column, storage_options=None)
    minimum = options.DASK_MIN_ROWS  # read when called, so that a test can lower it
    if counted is None or counted[1] >= minimum:
        return
    console.warning(
        f"--dask={args.dask!r} for {plural(counted[1], 'row')} in {plural(counted[0], 'table')}: the cluster's "
        f"start-up and per-task overhead (about 0.3 s per task) will dominate; a local run (without --dask) "
        f"would be faster below about {minimum:,} rows. Running on Dask anyway."
    )


def refuse_what_dask_ignores(args: argparse.Namespace, *settings: Any) -> None:
    """Refuse ``--storage-option``, and a setting of NOT_ON_DASK away from its default, with ``--dask``."""
    if storage_options(args):
        raise InvalidInputError(
            "--storage-option with --dask: the flows read object storage with the workers' own credentials "
            "(environment or instance role); expected no --storage-option. Fix: configure credentials on the workers."
        )
    for obj in settings:
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for name in (n for n in NOT_ON_DASK if n in fields):
            value, default = getattr(obj, name), fields[name].default
            if value != default:
                flag = flag_of(name)
                raise InvalidInputError(
                    f"{flag}={value} with --dask: expected the default ({default}). Fix: drop {flag}, or run "
                    f"without --dask."
                )


def run_flow(args: argparse.Namespace, flow_name: str, **params: Any) -> dict[str, Any]:
    """Run the Prefect flow ``vq_flows.<flow_name>`` with ``params`` and ``dask=args.dask`` against a
    reachable Prefect API; returns the flow's summary. The one call of the fit and encode flows."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Imported only here: the library itself never imports prefect (flows/ wraps the library).
    import importlib

    from vq_flows.dask import prefect_api_for

    module, name = flow_name.rsplit(".", 1)
    flow_fn = getattr(importlib.import_module(f"vq_flows.{module}"), name)
    with prefect_api_for(args.dask):
        return flow_fn(dask=args.dask, **params)
