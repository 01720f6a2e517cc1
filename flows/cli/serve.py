"""``vq serve``: serve the scheduled flow (:func:`vq_flows.pipeline.vq_pipeline_flow`) on a cron or an
interval schedule, as the Prefect deployment ``vq-pipeline/<name>``.

::

    vq serve --cron "0 * * * *" | --interval 1h  --input-root data/embeddings --work-dir vq_work \\
        --column embedding --codes 1024 [--metric l2|cosine] [--codec flat|residual|product|scalar|binary \\
        --levels L --rotation none|random|opq|itq --bits 8|4] \\
        [--id-column id] [--refit-every-hours 168] [--drift-threshold 0.25] [--usage-threshold 0.1|off] \
        [--unique --id-registry --id-policy keep|publish]

The schedule is exactly one of ``--cron`` (5 cron fields) and ``--interval`` (a run every so many
seconds: ``3600``, or a number with a unit ``s``, ``m``, ``h`` or ``d``: ``90s``, ``15m``, ``1h``,
``1.5d``; Prefect's interval schedule, anchored at the time the deployment is registered). A
*schedule*, in the functions below, is the cron string or the interval as a ``datetime.timedelta``.

Its options are the flow's parameters, read from its signature (:func:`add_serve_options`): a
settings parameter (``settings: PipelineSettings``) gives one option per field. The command first
refuses, with one ``error:`` line and exit status 1, whatever the first scheduled run would refuse
(:func:`check_deployment`); then :func:`serve_deployment` registers the deployment with the Prefect
API (set ``PREFECT_API_URL`` to a running ``prefect server start`` or Prefect Cloud; without it Prefect
starts a temporary local server that lives as long as this process) and runs the scheduled flow runs
in this process until stopped. At most one run executes at a time (``limit=1``), and the flow also
locks its work_dir.
``python -m vq_flows.deploy`` (deprecated) does the same.

Prefect and the flow are imported when the options are built or the deployment is made.
"""

import argparse
import dataclasses
import datetime
import os
import re
from typing import Any

from vq_flows.cli.options import (
    REQUIRED,
    add_global_options,
    add_option,
    add_settings_options,
    dest_of,
    settings_fields,
    settings_from,
    storage_options,
)
from vq_flows.cli.progress import Console

from vq_pipeline.errors import InvalidInputError
from vq_pipeline.settings import EncodeSettings, FitSettings, PipelineSettings, TableSettings

DEFAULT_NAME = "scheduled"
DESCRIPTION = (
    "Serve the vq-pipeline flow on a cron or interval schedule: register the deployment with the Prefect API "
    "(PREFECT_API_URL, or a temporary local server) and run its scheduled runs here until stopped."
)
#: Where ``vq serve``'s plain flow parameters say their defaults come from: the first of these with
#: a field of that name (a settings parameter's options name its own class).
SERVE_OWNERS = (FitSettings, EncodeSettings, TableSettings, PipelineSettings)


# ----------------------------------------------------------------------------- the deployment


#: The units ``--interval`` takes, in seconds (none: seconds).
INTERVAL_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*([smhd]?)\s*", re.IGNORECASE)


def parse_interval(text: str) -> datetime.timedelta:
    """``--interval``'s value as a duration: seconds (``3600``), or a number with a unit of
    :data:`INTERVAL_UNITS` (``90s``, ``15m``, ``1h``, ``1.5d``). Its sign is :func:`check_deployment`'s to check."""
    found = _DURATION.fullmatch(text)
    if found is None:
        raise InvalidInputError(
            f"interval={text!r} is not a duration; expected seconds (3600) or a number with a unit s, m, h or d "
            f"(90s, 15m, 1h, 1d). Fix: pass one, such as --interval 1h."
        )
    return datetime.timedelta(seconds=float(found[1]) * INTERVAL_UNITS[found[2].lower()])


def schedule_text(schedule: str | datetime.timedelta) -> str:
    """How the command names a schedule: the cron string quoted, or ``every <seconds> s``."""
    if isinstance(schedule, datetime.timedelta):
        return f"every {schedule.total_seconds():g} s"
    return f"the schedule {schedule!r}"


def deployment_options(schedule: str | datetime.timedelta, name: str = DEFAULT_NAME, **params: Any) -> dict[str, Any]:
    """The deployment's settings, shared by :func:`serve_deployment` and :func:`build_deployment`;
    ``schedule``: a cron string, or the interval between runs."""
    from prefect.types.entrypoint import EntrypointType

    every = isinstance(schedule, datetime.timedelta)
    return dict(
        name=name,
        **({"interval": schedule} if every else {"cron": schedule}),
        parameters=params,
        description="Fit or refit the codebook as needed and encode every new partition.",
        tags=["vq-pipeline"],
        # The flow is loaded by module path (vq_flows.pipeline), so runs work from the repository root
        # whatever folder the deployment was started from.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def check_deployment(cron: str | datetime.timedelta, name: str = DEFAULT_NAME, **params: Any) -> None:
    """Refuse now, registering nothing and running nothing, a deployment whose every scheduled run would
    fail: a schedule (a cron string Prefect refuses, an interval of 0 s or less) or name that Prefect
    refuses, then whatever the flow's first run would refuse with
    ``params`` (:func:`vq_flows.pipeline.check_flow_parameters`: settings, Dask address, paths, the
    work_dir's state). Each refusal is a VQError, one line for the command's ``error:``."""
    from prefect.exceptions import InvalidNameError
    from vq_flows.pipeline import check_flow_parameters

    if isinstance(cron, datetime.timedelta):
        if cron <= datetime.timedelta(0):
            raise InvalidInputError(
                f"interval={cron.total_seconds():g} s; expected a positive time between scheduled runs. Fix: pass "
                f"one, such as --interval 1h (or 3600)."
            )
    else:
        _check_cron(cron)
    try:
        build_deployment(cron, name, **params)
    except InvalidNameError as exc:
        raise InvalidInputError(
            f"name={name!r} is not a deployment name Prefect accepts ({exc}); expected a name such as "
            f"{DEFAULT_NAME!r}. Fix: pass another --name."
        ) from None
    check_flow_parameters(**params)


def _check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise InvalidInputError(
            f"cron={cron!r} is not a cron schedule; expected 5 fields (minute hour day-of-month month day-of-week), "
            f"such as '0 * * * *' (hourly) or '30 2 * * 1' (Mondays, 02:30). Fix: pass one, such as --cron '0 * * * *'."
        ) from None


def build_deployment(cron: str | datetime.timedelta, name: str = DEFAULT_NAME, **params: Any) -> Any:
    """The RunnerDeployment :func:`serve_deployment` would register (for inspection and tests; nothing runs)."""
    from vq_flows.pipeline import vq_pipeline_flow

    return vq_pipeline_flow.to_deployment(**deployment_options(cron, name, **params))


def serve_deployment(cron: str | datetime.timedelta, name: str = DEFAULT_NAME, **params: Any) -> None:
    """Serve ``vq_pipeline_flow`` with ``params`` on the schedule ``cron`` (a cron string or an interval);
    blocks until stopped."""
    from vq_flows.pipeline import vq_pipeline_flow

    vq_pipeline_flow.serve(**deployment_options(cron, name, **params), limit=1)


# ----------------------------------------------------------------------------- the options


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    """``--cron`` or ``--interval``, and ``--name``, then the options of the scheduled flow's parameters
    (imports Prefect): a parameter whose type is a settings dataclass (``settings: PipelineSettings``) gives one option
    per field; any other parameter one option."""
    from vq_flows.pipeline import vq_pipeline_flow

    serve.add_argument(
        "--cron", default=None, help='cron schedule, e.g. "0 * * * *" (hourly); or give --interval instead'
    )
    serve.add_argument(
        "--interval",
        default=None,
        metavar="SECONDS|DURATION",
        help="run every so often instead of on a cron schedule: seconds (3600) or a number with a unit s, m, h or d "
        "(15m, 1h, 1d)",
    )
    serve.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    parameters = flow_parameters(vq_pipeline_flow)
    for name, (annotation, default) in parameters.items():
        if dataclasses.is_dataclass(annotation):
            add_settings_options(serve, annotation)
        else:
            owner = next((c.__name__ for c in SERVE_OWNERS if name in c.__dataclass_fields__), None)
            add_option(serve, name, annotation=annotation, default=default, owner=owner)
    serve.set_defaults(flow_parameters=parameters)
    add_global_options(serve, in_subcommand=True)


def flow_parameters(flow: Any) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default or REQUIRED) of a Prefect flow's parameters, from its signature."""
    import inspect

    return {
        name: (p.annotation, REQUIRED if p.default is inspect.Parameter.empty else p.default)
        for name, p in inspect.signature(flow.fn).parameters.items()
    }


def flow_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The scheduled flow's arguments from ``vq serve``'s options: a settings parameter as the dict of
    its fields (validated by building the settings; Prefect parameters are JSON), any other as given."""
    values: dict[str, Any] = {}
    for name, (annotation, _) in args.flow_parameters.items():
        if dataclasses.is_dataclass(annotation):
            values[name] = settings_fields(settings_from(annotation, args))
        else:
            values[name] = getattr(args, dest_of(name))
    return values


def check_serve(args: argparse.Namespace) -> None:
    """Refuse now, not at the first scheduled run, settings that every run would refuse (codec and levels)."""
    flow_arguments(args)
    if not any(dataclasses.is_dataclass(a) for a, _ in args.flow_parameters.values()):
        settings_from(FitSettings, args)  # a flow of plain parameters: check what it will build
        settings_from(EncodeSettings, args)


# ----------------------------------------------------------------------------- the command


def serve_arguments(args: argparse.Namespace) -> tuple[str | datetime.timedelta, str, dict[str, Any]]:
    """(schedule: the cron string or the interval, deployment name, flow parameters) from the parsed
    options of ``vq serve``; exactly one of ``--cron`` and ``--interval`` must be given."""
    cron, interval = args.cron, getattr(args, "interval", None)
    if (cron is None) == (interval is None):
        given = f"--cron {cron!r} and --interval {interval!r}" if cron is not None else "neither --cron nor --interval"
        raise InvalidInputError(
            f"{given} given; expected exactly one schedule: --cron (5 cron fields) or --interval (seconds, or a "
            f"duration such as 1h). Fix: pass one of them, such as --cron '0 * * * *' or --interval 1h."
        )
    schedule = cron if interval is None else parse_interval(interval)
    params = flow_arguments(args)
    for name in ("input_root", "work_dir"):  # absolute: scheduled runs may start in another working folder
        if isinstance(params.get(name), str):
            params[name] = os.path.abspath(params[name])
    return schedule, args.name, params


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    """``vq serve``: blocks, serving the deployment, until stopped (Ctrl-C: exit status 130)."""
    if storage_options(args):
        raise InvalidInputError(
            "--storage-option with vq serve: the scheduled runs read object storage with the serving process's own "
            "credentials (environment or instance role); expected no --storage-option. Fix: drop it."
        )
    schedule, name, params = serve_arguments(args)
    check_deployment(schedule, name, **params)  # every refusal of the first scheduled run, before registering
    console.progress(f"serving vq-pipeline/{name} on {schedule_text(schedule)} (Ctrl-C stops)")
    serve_deployment(schedule, name, **params)
    return 0
