"""``vq serve``: serve the scheduled flow (:func:`vq_flows.pipeline.vq_pipeline_flow`) on a cron schedule,
as the Prefect deployment ``vq-pipeline/<name>``.

::

    vq serve --cron "0 * * * *" --input-root data/embeddings --work-dir vq_work --column embedding \\
        --codes 1024 [--metric l2|cosine] [--codec flat|residual|product --levels L] [--id-column id] \\
        [--refit-every-hours 168] [--drift-threshold 0.25] [--usage-threshold 0.1|off]

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
import os
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
    "Serve the vq-pipeline flow on a cron schedule: register the deployment with the Prefect API "
    "(PREFECT_API_URL, or a temporary local server) and run its scheduled runs here until stopped."
)
#: Where ``vq serve``'s plain flow parameters say their defaults come from: the first of these with
#: a field of that name (a settings parameter's options name its own class).
SERVE_OWNERS = (FitSettings, EncodeSettings, TableSettings, PipelineSettings)


# ----------------------------------------------------------------------------- the deployment


def deployment_options(cron: str, name: str = DEFAULT_NAME, **params: Any) -> dict[str, Any]:
    """The deployment's settings, shared by :func:`serve_deployment` and :func:`build_deployment`."""
    from prefect.types.entrypoint import EntrypointType

    return dict(
        name=name,
        cron=cron,
        parameters=params,
        description="Fit or refit the codebook as needed and encode every new partition.",
        tags=["vq-pipeline"],
        # The flow is loaded by module path (vq_flows.pipeline), so runs work from the repository root
        # whatever folder the deployment was started from.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def check_deployment(cron: str, name: str = DEFAULT_NAME, **params: Any) -> None:
    """Refuse now, registering nothing and running nothing, a deployment whose every scheduled run would
    fail: a schedule or name that Prefect refuses, then whatever the flow's first run would refuse with
    ``params`` (:func:`vq_flows.pipeline.check_flow_parameters`: settings, Dask address, paths, the
    work_dir's state). Each refusal is a VQError, one line for the command's ``error:``."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import InvalidNameError
    from pydantic import ValidationError
    from vq_flows.pipeline import check_flow_parameters

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise InvalidInputError(
            f"cron={cron!r} is not a cron schedule; expected 5 fields (minute hour day-of-month month day-of-week), "
            f"such as '0 * * * *' (hourly) or '30 2 * * 1' (Mondays, 02:30). Fix: pass one, such as --cron '0 * * * *'."
        ) from None
    try:
        build_deployment(cron, name, **params)
    except InvalidNameError as exc:
        raise InvalidInputError(
            f"name={name!r} is not a deployment name Prefect accepts ({exc}); expected a name such as "
            f"{DEFAULT_NAME!r}. Fix: pass another --name."
        ) from None
    check_flow_parameters(**params)


def build_deployment(cron: str, name: str = DEFAULT_NAME, **params: Any) -> Any:
    """The RunnerDeployment :func:`serve_deployment` would register (for inspection and tests; nothing runs)."""
    from vq_flows.pipeline import vq_pipeline_flow

    return vq_pipeline_flow.to_deployment(**deployment_options(cron, name, **params))


def serve_deployment(cron: str, name: str = DEFAULT_NAME, **params: Any) -> None:
    """Serve ``vq_pipeline_flow`` with ``params`` on the ``cron`` schedule; blocks until stopped."""
    from vq_flows.pipeline import vq_pipeline_flow

    vq_pipeline_flow.serve(**deployment_options(cron, name, **params), limit=1)


# ----------------------------------------------------------------------------- the options


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    """``--cron`` and ``--name``, then the options of the scheduled flow's parameters (imports Prefect):
    a parameter whose type is a settings dataclass (``settings: PipelineSettings``) gives one option
    per field; any other parameter one option."""
    from vq_flows.pipeline import vq_pipeline_flow

    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 * * * *" (hourly)')
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


def serve_arguments(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(cron, deployment name, flow parameters) from the parsed options of ``vq serve``."""
    params = flow_arguments(args)
    for name in ("input_root", "work_dir"):  # absolute: scheduled runs may start in another working folder
        if isinstance(params.get(name), str):
            params[name] = os.path.abspath(params[name])
    return args.cron, args.name, params


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    """``vq serve``: blocks, serving the deployment, until stopped (Ctrl-C: exit status 130)."""
    if storage_options(args):
        raise InvalidInputError(
            "--storage-option with vq serve: the scheduled runs read object storage with the serving process's own "
            "credentials (environment or instance role); expected no --storage-option. Fix: drop it."
        )
    cron, name, params = serve_arguments(args)
    check_deployment(cron, name, **params)  # every refusal of the first scheduled run, before registering
    console.progress(f"serving vq-pipeline/{name} on the schedule {cron!r} (Ctrl-C stops)")
    serve_deployment(cron, name, **params)
    return 0
