"""Serve the vq-pipeline flow on a cron schedule.

    python -m vq_flows.deploy --cron "0 * * * *" --input-root data/embeddings --work-dir vq_work \\
        --column embedding --codes 1024 [--metric l2|cosine] [--codec flat|residual|product --levels L] \\
        [--id-column id] [--refit-every-hours 168] \\
        [--drift-threshold 0.25] [--usage-threshold 0.1|off]

This registers a deployment with the Prefect API (set ``PREFECT_API_URL`` to a running
``prefect server start`` or Prefect Cloud; without it Prefect starts a temporary local server that
lives as long as this process) and runs the scheduled flow runs in this process until stopped.
At most one run executes at a time (``limit=1``), and the flow also locks its work_dir.
"""

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from prefect.types.entrypoint import EntrypointType

from vq_flows.pipeline import (
    DEFAULT_DRIFT_THRESHOLD,
    DEFAULT_REFIT_EVERY_HOURS,
    DEFAULT_USAGE_THRESHOLD,
    vq_pipeline_flow,
)
from vq_pipeline.errors import VQError
from vq_pipeline.settings import CODE_DTYPE_NAMES, CODECS, ENGINES, METRICS, FitSettings

DEFAULT_NAME = "scheduled"


def deployment_options(cron: str, name: str = DEFAULT_NAME, **params: Any) -> dict[str, Any]:
    """The deployment's settings, shared by :func:`serve` and :func:`build_deployment`."""
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


def build_deployment(cron: str, name: str = DEFAULT_NAME, **params: Any) -> Any:
    """The RunnerDeployment :func:`serve` would register (for inspection and tests; nothing runs)."""
    return vq_pipeline_flow.to_deployment(**deployment_options(cron, name, **params))


def serve(cron: str, name: str = DEFAULT_NAME, **params: Any) -> None:
    """Serve ``vq_pipeline_flow`` with ``params`` on the ``cron`` schedule; blocks until stopped."""
    vq_pipeline_flow.serve(**deployment_options(cron, name, **params), limit=1)


def _threshold_or_off(value: str) -> float | None:
    """``--usage-threshold``: a number of bits, or ``off``/``none`` to turn the rule off."""
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"usage_threshold={value!r}; expected bits (e.g. {DEFAULT_USAGE_THRESHOLD}) or 'off'. "
            f"Fix: pass a number, or off to turn the rule off."
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, str, dict[str, Any]]:
    """(cron, deployment name, flow parameters) from the command line."""
    p = argparse.ArgumentParser(
        prog="python -m vq_flows.deploy", description="Serve the vq-pipeline flow on a cron schedule."
    )
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 * * * *" (hourly)')
    p.add_argument("--name", default=DEFAULT_NAME, help="deployment name (default: %(default)s)")
    p.add_argument("--input-root", required=True, help="folder of embedding tables (hive partitions welcome)")
    p.add_argument("--work-dir", required=True, help="folder for codebooks, codes and reports")
    p.add_argument("--column", required=True, help="embedding column")
    p.add_argument("--codes", type=int, required=True, help="number of codes (K)")
    p.add_argument(
        "--metric",
        default=FitSettings.metric,
        choices=METRICS,
        help="distance metric (default: %(default)s, vq_pipeline.FitSettings.metric, as everywhere)",
    )
    p.add_argument(
        "--codec",
        default=FitSettings.codec,
        choices=CODECS,
        help="flat, or residual/product multi-level codes (default: %(default)s, vq_pipeline.FitSettings.codec)",
    )
    p.add_argument(
        "--levels",
        type=int,
        default=FitSettings.levels,
        help="codes per row for --codec residual or product; --codes is per level (default: %(default)s)",
    )
    p.add_argument("--id-column", default=None)
    p.add_argument(
        "--refit-every-hours",
        type=float,
        default=DEFAULT_REFIT_EVERY_HOURS,
        help="0 or less: never refit on schedule (default: %(default)s)",
    )
    p.add_argument(
        "--drift-threshold",
        type=float,
        default=DEFAULT_DRIFT_THRESHOLD,
        help="refit when new rows' mean distance exceeds the training one by this fraction (default: %(default)s)",
    )
    p.add_argument(
        "--usage-threshold",
        type=_threshold_or_off,
        default=DEFAULT_USAGE_THRESHOLD,
        help="refit when new rows' code-usage JS divergence exceeds its finite-sample bias by this many bits "
        "(evaluated from max(100, 5 x codes) new rows on; 'off': never; default: %(default)s)",
    )
    p.add_argument("--sample", type=int, default=None, help="fit on a seeded sample of this many rows")
    p.add_argument("--seed", type=int, default=FitSettings.seed)
    p.add_argument("--engine", default=FitSettings.engine, choices=ENGINES)
    p.add_argument(
        "--code-dtype",
        default=None,
        choices=CODE_DTYPE_NAMES,
        help="integer type of the code column (default: the smallest unsigned type for --codes)",
    )
    a = p.parse_args(argv)
    try:  # a codec and levels that do not go together are refused now, not at the first scheduled run
        FitSettings(metric=a.metric, codec=a.codec, levels=a.levels)
    except VQError as exc:
        p.error(str(exc))
    params = dict(
        # Absolute: scheduled runs may start in another working folder.
        input_root=os.path.abspath(a.input_root),
        work_dir=os.path.abspath(a.work_dir),
        column=a.column,
        n_codes=a.codes,
        metric=a.metric,
        codec=a.codec,
        levels=a.levels,
        id_column=a.id_column,
        refit_every_hours=a.refit_every_hours if a.refit_every_hours > 0 else None,
        drift_threshold=a.drift_threshold,
        usage_threshold=a.usage_threshold,
        sample=a.sample,
        seed=a.seed,
        engine=a.engine,
        code_dtype=a.code_dtype,
    )
    return a.cron, a.name, params


def main(argv: Sequence[str] | None = None) -> int:
    cron, name, params = parse_args(argv)
    serve(cron, name=name, **params)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
