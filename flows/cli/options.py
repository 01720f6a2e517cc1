"""The options of ``vq``, generated from the fields of the settings they set.

Every field of the frozen settings dataclasses of :mod:`vq_pipeline.settings` that a command takes
(``vq fit``: :class:`~vq_pipeline.settings.TableSettings` and :class:`~vq_pipeline.settings.FitSettings`;
``vq encode``: :class:`~vq_pipeline.settings.EncodeSettings` and :class:`~vq_pipeline.settings.EncodeOptions`;
``vq serve``: the parameters of the scheduled flow, its ``settings: PipelineSettings`` field by field,
see :mod:`vq_flows.cli.serve`) becomes an option through :func:`add_option`:

- name: ``--`` and the field's name with dashes (``top_k``: ``--top-k``), unless its :class:`Spec`
  names another (``n_iter``: ``--iters``, ``n_codes``: ``--codes``, ``FitSettings.prune``:
  ``--prune-search``; kept from before the options were generated);
- type: from the annotation: ``bool`` a flag, ``int`` and ``float`` numbers (at least the spec's
  ``minimum``), a tuple or sequence a repeatable list, anything else a string; the choices are the
  settings module's constant named after the field (``metric``: ``METRICS``, ``code_dtype``:
  ``CODE_DTYPE_NAMES``);
- default: the field's (a field without one is a required option);
- help: the :class:`Spec` of that name in :data:`SPECS` (``"<Class>.<field>"`` first; a field's own
  ``metadata`` with the same keys wins), then the default and the field it comes from, e.g.
  ``(default: l2, vq_pipeline.FitSettings.metric)``.

A field added to a settings class is thus an option of every command that takes that class, with
its type, default and choices; a :data:`SPECS` entry gives it a help text and a metavar. A command
reads its settings back with :func:`settings_from`, which the settings class validates. Written by
hand: the options that set no settings field (the inputs, ``--out``, ``--codebook``, ``--checkpoint``,
``--json``, ``--dask`` on fit and encode, ``--cron``, ``--name``) and the global ``--debug``,
``--quiet`` and ``--storage-option`` (``storage_options``, a dict field: ``KEY=VALUE``, repeatable,
before or after the subcommand).

Imports nothing heavy. The parser itself: :mod:`vq_flows.cli.parser`.
"""

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

from vq_pipeline.errors import ConfigurationError
from vq_pipeline import settings
from vq_pipeline.settings import (
    CODE_DTYPE_NAMES,
    EncodeOptions,
    EncodeSettings,
    FitSettings,
    TableSettings,
)

#: The default of an option that must be given.
REQUIRED: Any = dataclasses.MISSING
#: Below this many input rows, ``--dask`` costs more than it saves: a cluster's start-up and about
#: 0.3 s of scheduling per task (measured) against a local run of seconds.
DASK_MIN_ROWS = 200_000


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one field or parameter shows on the command line; the rest comes from the field itself."""

    help: str = ""
    flag: str | None = None  # default: "--" + the name with dashes
    dest: str | None = None  # default: argparse's, from the flag
    metavar: str | None = None
    minimum: float | None = None  # for numbers
    parse: Callable[[str], Any] | None = None  # instead of the parser the annotation implies
    default_text: str | None = None  # what a default of None means, for the help


# ----------------------------------------------------------------------------- value parsers


def storage_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. aws_region=eu-west-1)")
    return key.strip(), value


def number(kind: type, minimum: float | None) -> Callable[[str], Any]:
    """A parser of ``kind`` (int or float) values ``>= minimum``; refuses nan."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is float and math.isnan(value):
            raise argparse.ArgumentTypeError(f"{text} is not a number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def threshold_or_off(text: str) -> float | None:
    """``--usage-threshold``: a number of bits, or ``off``/``none`` to turn the rule off."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"usage_threshold={text!r}; expected bits (e.g. 0.1) or 'off'. Fix: pass a number, or off to turn the "
            f"rule off."
        ) from None


def hours_or_never(text: str) -> float | None:
    """``--refit-every-hours``: hours, or None (never) for 0 or less."""
    hours = number(float, None)(text)
    return hours if hours > 0 else None


# Kept as before the options were generated: the names, metavars and minimums of the options, and
# the gist of their help. A field's own ``metadata`` (the same keys) takes precedence.
SPECS: dict[str, Spec] = {
    # FitSettings
    "metric": Spec("distance"),
    "n_iter": Spec("at most N Lloyd updates", flag="--iters", metavar="N", minimum=0),
    "tol": Spec("stop when the objective's relative decrease is <= T", metavar="T", minimum=0.0),
    "init": Spec("initialization"),
    "seed": Spec("seed of every random choice", metavar="S", minimum=0),
    "n_init": Spec("seeded restarts; the best is kept", metavar="R", minimum=1),
    "engine": Spec("compute engine"),
    "device": Spec("compute device: cpu, cuda or cuda:N", metavar="cpu|cuda", default_text="cuda if available"),
    "memory_budget": Spec(
        "bytes of temporaries one chunk of a distance computation may use", metavar="BYTES", minimum=1
    ),
    "codec": Spec(
        "flat: one code per row; residual: each level quantizes what the levels before it left (coarse-to-fine "
        "semantic ids); product: each level quantizes its own slice of the dimensions; scalar: --bits per dimension "
        "on a calibrated grid; binary: one bit per dimension (the sign after centring)"
    ),
    "levels": Spec(
        "codes per row for --codec residual or product (--codes is per level; product: L divides the embedding dim; "
        "scalar and binary: one code per dimension, leave at 1)",
        metavar="L",
        minimum=1,
    ),
    "rotation": Spec(
        "orthogonal rotation of the rows before they are coded: opq (learned with the codes; product, residual), "
        "itq (learned for the signs; binary), random (seeded; residual, product, binary), none",
    ),
    "bits": Spec("--codec scalar: bits per dimension, 8 or 4 (4: two codes per byte)", metavar="8|4"),
    "scalar_range": Spec(
        "--codec scalar: each dimension's range, from the training rows' min and max, their 0.001 and 0.999 "
        "quantiles, or (mse) the one of least squared error among min/max and trimmed ranges (values outside "
        "are clipped to the range ends)"
    ),
    "rotation_iters": Spec("--rotation opq or itq: rounds of learning the rotation", metavar="N", minimum=1),
    "train_beam": Spec(
        "--codec residual: fit each level after the first on what the B best partial code tuples of the levels "
        "before leave of every row; encode with --beam B to match (1: greedy)",
        metavar="B",
        minimum=1,
    ),
    "FitSettings.prune": Spec(
        "skip the search of the rows whose code the triangle inequality proves unchanged (exact pruned Lloyd: the "
        "same codebook, 8 bytes of state a row; see the README for when it pays)",
        flag="--prune-search",
        dest="prune",
    ),
    "balance": Spec(
        "cap every code (every level) at ceil((1 + F) x rows / codes) training rows; the fit records the cap, the "
        "largest code and the stated gap of the capped assignment (stats balance)",
        metavar="F",
        minimum=0.0,
        default_text="off",
    ),
    "holdout": Spec(
        "keep this share of the rows (a seeded choice) out of the fit and report their mean distance to their codes "
        "(the held-out error, in the summary and vq inspect); the rows must fit in memory (see --sample); 0: none",
        metavar="F",
        minimum=0.0,
    ),
    # EncodeSettings
    "column": Spec("the embedding column"),
    "id_column": Spec("id column copied to the output", metavar="ID", default_text="row positions, as `row`"),
    "top_k": Spec("codes per row, nearest first", metavar="K", minimum=1),
    "with_distance": Spec("also write the distance(s) to the code(s)"),
    "keep": Spec("columns copied through to the output (put DATA before this option, or repeat --keep)", metavar="COL"),
    "code_dtype": Spec(
        f"integer type of the code column, one of {', '.join(CODE_DTYPE_NAMES)}",
        metavar="TYPE",
        default_text="the smallest unsigned type for the codebook's n_codes",
    ),
    "beam": Spec(
        "residual codebooks: partial code tuples kept per row by the beam search; 1 is greedy", metavar="B", minimum=1
    ),
    "unique": Spec(
        "multi-level codebooks: also write a suffix column that makes every row's code tuple unique in OUT_DIR "
        "(semantic ids)"
    ),
    "id_registry": Spec(
        "with --unique: issue the suffixes through the id registry (encode: OUT_DIR.vq/registry; serve: "
        "WORK_DIR/ids/registry): an issued id never changes, a folder's existing suffixes are adopted on the first "
        "run, and the prefix table of the id version is written beside the registry; needs --id-column"
    ),
    "id_policy": Spec(
        "with --id-registry, what a refit does to issued ids: keep the id version (new items go on being encoded "
        "with the codebook that issued it) or publish a new one (every item re-encoded, with old->new tables)"
    ),
    # EncodeOptions
    "overwrite": Spec("replace codes that another codebook or other settings wrote in OUT_DIR"),
    "prune": Spec("remove the codes of inputs that are not part of this run (kept and listed as stale by default)"),
    # TableSettings (the fit's reading; batch_rows also EncodeOptions)
    "sample": Spec("fit on a seeded sample of N rows", metavar="N", minimum=1),
    "data_budget": Spec(
        "hold the training rows in memory when they take at most this many bytes; stream them from the tables "
        "otherwise",
        metavar="BYTES",
        minimum=0,
    ),
    "batch_rows": Spec("rows read per batch", metavar="N", minimum=1),
    # not settings fields: arguments of the fit and of the scheduled flow
    "n_codes": Spec(
        "number of codes (centroids; per level for a multi-level codec; --codec scalar and binary: 2**bits and 2, "
        "given or not)",
        flag="--codes",
        metavar="K",
        minimum=1,
        default_text="2**bits for --codec scalar, 2 for binary; required for the other codecs",
    ),
    "input_root": Spec("folder of embedding tables (hive partitions welcome)", metavar="DIR"),
    "work_dir": Spec("folder for codebooks, codes and reports", metavar="DIR"),
    "refit_every_hours": Spec(
        "refit when the codebook is older; 0 or less: never refit on schedule", metavar="H", parse=hours_or_never
    ),
    "drift_threshold": Spec(
        "refit when new rows' mean distance exceeds the training one by this fraction", metavar="F", minimum=0.0
    ),
    "usage_threshold": Spec(
        "refit when new rows' code-usage JS divergence exceeds its finite-sample bias by this many bits (evaluated "
        "from max(100, 5 x codes) new rows on; 'off': never)",
        metavar="BITS|off",
        parse=threshold_or_off,
    ),
    "dask": Spec(
        "run each scheduled run's fits and encodes on a Dask cluster: local:N (started for the run) or a scheduler "
        "address (tcp://host:8786)",
        metavar="ADDRESS",
    ),
}


# ----------------------------------------------------------------------------- generated options


def spec_of(name: str, owner: str | None = None, metadata: Any = None) -> Spec:
    """The :class:`Spec` of ``name`` (``"<owner>.<name>"`` first, e.g. ``"FitSettings.prune"``),
    overridden by the keys of a field's ``metadata`` that a Spec has."""
    spec = SPECS.get(f"{owner}.{name}") or SPECS.get(name, Spec())
    given = {k: v for k, v in dict(metadata or {}).items() if k in Spec.__dataclass_fields__}
    return dataclasses.replace(spec, **given) if given else spec


def flag_of(name: str, owner: str | None = None) -> str:
    """The option of the field or parameter ``name``: ``n_iter`` -> ``--iters``, ``top_k`` -> ``--top-k``."""
    return spec_of(name, owner).flag or "--" + name.replace("_", "-")


def dest_of(name: str, owner: str | None = None) -> str:
    """Where argparse keeps the value of ``name``'s option (``n_iter``: ``iters``)."""
    return spec_of(name, owner).dest or flag_of(name, owner).removeprefix("--").replace("-", "_")


def _kind(annotation: Any) -> str:
    """``bool``, ``int``, ``float``, ``list`` or ``str``: the option kind of an annotation (a type, or its
    text under ``from __future__ import annotations``); ``None`` in a union only makes it optional."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    parts = [p.strip() for p in text.split("|") if p.strip() not in ("None", "NoneType")]
    base = parts[0] if len(parts) == 1 else "str"
    if base.startswith(("tuple", "list", "Sequence", "typing.Sequence", "collections.abc.Sequence")):
        return "list"
    if base.startswith(("dict", "Mapping")):
        raise ConfigurationError(f"no generated option for a {text} field; write it by hand (see --storage-option)")
    return base if base in ("bool", "int", "float") else "str"


def _help(spec: Spec, default: Any, source: str | None, kind: str) -> str:
    """The spec's help, then the default and its source, ``%`` escaped for argparse."""
    shown = spec.default_text if default is None else default
    if default is REQUIRED:
        note = ""
    elif kind in ("bool", "list") or shown is None:
        note = f" ({source})" if source else ""
    else:
        note = f" (default: {shown}{f', {source}' if source else ''})"
    return (spec.help + note).replace("%", "%%")


def add_option(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    annotation: Any,
    default: Any = None,
    owner: str | None = None,
    metadata: Any = None,
    help: str | None = None,
) -> None:
    """Add the option of the field or parameter ``name`` of the settings class named ``owner``, if any
    (see the module docstring for how)."""
    spec = spec_of(name, owner, metadata)
    if help is not None:
        spec = dataclasses.replace(spec, help=help)
    kind = _kind(annotation)
    source = f"vq_pipeline.{owner}.{name}" if owner else None
    given: dict[str, Any] = {"dest": dest_of(name, owner), "help": _help(spec, default, source, kind)}
    if default is REQUIRED:
        given["required"] = True
    else:
        given["default"] = list(default) if kind == "list" else default
    if kind == "bool":
        given["action"] = "store_true"
    elif kind == "list":
        given.update(nargs="+", action="extend", metavar=spec.metavar)
    else:
        choices = getattr(settings, f"{name.upper()}S", None) or getattr(settings, f"{name.upper()}_NAMES", None)
        parse = spec.parse or (number(int if kind == "int" else float, spec.minimum) if kind != "str" else None)
        given.update(type=parse, choices=choices, metavar=spec.metavar)
    parser.add_argument(flag_of(name, owner), **given)


def add_settings_options(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = ()) -> None:
    """One option per field of the settings dataclass ``cls``, less ``skip``."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else REQUIRED
        add_option(
            parser, field.name, annotation=field.type, default=default, owner=cls.__name__, metadata=field.metadata
        )


def settings_from(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """The settings ``cls`` from the parsed options of its fields (and ``given``), validated by ``cls``."""
    dests = {f.name: dest_of(f.name, cls.__name__) for f in dataclasses.fields(cls)}
    values = {name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)}
    return cls(**{**values, **given})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def settings_fields(obj: Any) -> dict[str, Any]:
    """A settings object's fields as keyword arguments (tuples as lists, as Prefect parameters)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def storage_options(args: argparse.Namespace) -> dict[str, str] | None:
    """``--storage-option`` pairs given before and after the subcommand, as polars' storage_options."""
    pairs = [*args.storage_options, *getattr(args, "sub_storage_options", [])]
    return dict(pairs) or None


# ----------------------------------------------------------------------------- the commands' options


def add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
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
        type=storage_option,
        default=[],
        metavar="KEY=VALUE",
        help="polars storage_options for object storage (s3://, gs://, az://); repeatable",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--dask``, of ``vq fit`` and ``vq encode``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a summary line")
    parser.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help="run on a Dask cluster through the Prefect flow: local:N (N local workers) or a scheduler address "
        "(tcp://host:8786). Uses PREFECT_API_URL, or starts a Prefect server on 127.0.0.1 for local clusters. "
        "Not combined with --storage-option, --batch-rows, --n-init; a fit on Dask keeps no --checkpoint. "
        f"Slower than a local run below about {DASK_MIN_ROWS:,} rows",
    )


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", nargs="+", metavar="DATA", help="table files, globs or folders (local or object storage)"
    )


def add_fit_options(fit: argparse.ArgumentParser) -> None:
    _add_data(fit)
    add_option(fit, "n_codes", annotation=int, default=None)  # required but for scalar and binary codes: cmd_fit
    add_settings_options(fit, TableSettings, skip=("storage_options",))  # --storage-option: a global option
    add_settings_options(fit, FitSettings)
    fit.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="keep the fit's state in FILE as soon as seeding ends and after every iteration; rerunning the "
        "same command after a crash resumes there (default: OUT.ckpt next to --out; 'none' to disable)",
    )
    _add_run_options(fit)
    fit.add_argument("--out", required=True, metavar="CODEBOOK.safetensors", help="codebook file to write (atomically)")
    add_global_options(fit, in_subcommand=True)


def add_encode_options(enc: argparse.ArgumentParser) -> None:
    _add_data(enc)
    enc.add_argument(
        "--codebook", required=True, metavar="CODEBOOK.safetensors", help="codebook file written by `vq fit`"
    )
    add_settings_options(enc, EncodeSettings)
    enc.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (not inside an input folder)")
    add_settings_options(enc, EncodeOptions, skip=("storage_options",))  # --storage-option: a global option
    _add_run_options(enc)
    add_global_options(enc, in_subcommand=True)
