"""FitSettings / EncodeSettings / EncodeOptions are the one source of defaults: every entry point
(library functions, flows, `vq`, the deployment) takes its defaults from them, and they refuse bad
values at construction with the same messages as the functions."""

from __future__ import annotations

import inspect

import pytest
import torch

from vq_pipeline import EncodeSettings, FitSettings, InvalidInputError, fit_codebook
from vq_pipeline.errors import TooFewPointsError
from vq_pipeline.jobs.encode_folder import encode_tables
from vq_pipeline.jobs.fit_tables import fit_from_tables
from vq_pipeline.settings import EncodeOptions

FIT_FIELDS = [f for f in FitSettings.__dataclass_fields__]


def _defaults(fn) -> dict:
    fn = getattr(fn, "fn", fn)  # a Prefect flow wraps the function
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_the_notebook_fit_defaults_to_fit_settings() -> None:
    d, s = _defaults(fit_codebook), FitSettings()
    assert {f: d[f] for f in FIT_FIELDS} == {f: getattr(s, f) for f in FIT_FIELDS}


def _parameters(fn) -> set[str]:
    return set(inspect.signature(getattr(fn, "fn", fn)).parameters)


def test_jobs_and_flows_take_settings_objects_not_their_fields() -> None:
    """Settings travel as one object: no job or flow re-lists a settings field as its own parameter
    (so a new field reaches every entry point at once); only the notebook sugar does."""
    from vq_flows.encode import encode_embeddings_flow
    from vq_flows.fit import fit_codebook_flow
    from vq_flows.pipeline import vq_pipeline_flow

    from vq_pipeline.settings import PipelineSettings, TableSettings

    fields = {
        cls: set(cls.__dataclass_fields__) for cls in (FitSettings, EncodeSettings, EncodeOptions, TableSettings, PipelineSettings)
    }
    takes = {
        fit_from_tables: (FitSettings, TableSettings),
        fit_codebook_flow: (FitSettings, TableSettings),
        encode_tables: (EncodeSettings, EncodeOptions),
        encode_embeddings_flow: (EncodeSettings, EncodeOptions),
        vq_pipeline_flow: (PipelineSettings,),
    }
    for fn, classes in takes.items():
        relisted = _parameters(fn) & set().union(*(fields[c] for c in classes))
        assert not relisted, f"{getattr(fn, 'name', fn)} re-lists settings fields {sorted(relisted)}"
    assert {"settings", "reading"} <= _parameters(fit_from_tables) and "settings" in _parameters(encode_tables)


def test_flows_cli_and_deployment_default_to_fit_settings() -> None:
    from vq_flows.cli import build_parser
    from vq_flows.deploy import parse_args
    s = FitSettings()
    args = build_parser().parse_args(["fit", "data.parquet", "--column", "e", "--codes", "4", "--out", "cb.safetensors"])
    assert (args.metric, args.iters, args.tol, args.init, args.seed, args.n_init, args.engine) == (
        s.metric,
        s.n_iter,
        s.tol,
        s.init,
        s.seed,
        s.n_init,
        s.engine,
    )
    assert (args.codec, args.levels) == (s.codec, s.levels)
    _, _, params = parse_args(["--cron", "0 * * * *", "--input-root", "in", "--work-dir", "w", "--column", "e", "--codes", "4"])
    deployed = params["settings"]
    assert (deployed["metric"], deployed["seed"], deployed["engine"]) == (s.metric, s.seed, s.engine)
    assert (deployed["codec"], deployed["levels"]) == (s.codec, s.levels)


def test_cli_choices_and_encode_defaults_come_from_the_settings() -> None:
    from vq_flows.cli import build_parser

    from vq_pipeline.settings import CODECS

    parser = build_parser()
    fit = parser.parse_args(["fit", "d.parquet", "--column", "e", "--codes", "4", "--out", "cb.safetensors"])
    assert fit.codec == FitSettings.codec
    for codec in CODECS:  # every codec the library knows is a choice
        levels = "1" if codec == "flat" else "2"
        argv = ["fit", "d.parquet", "--column", "e", "--codes", "4", "--out", "c.safetensors"]
        assert parser.parse_args([*argv, "--codec", codec, "--levels", levels]).codec == codec
    enc = parser.parse_args(["encode", "d.parquet", "--codebook", "c.safetensors", "--column", "e", "--out", "o"])
    s = EncodeSettings(column="e")
    assert (enc.beam, enc.unique) == (s.beam, s.unique)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(metric="manhattan"), r"metric='manhattan' is not supported; expected one of 'l2', 'cosine'"),
        (dict(n_iter=-1), r"n_iter=-1 is out of range"),
        (dict(tol=-0.5), r"tol=-0.5"),
        (dict(seed=-3), r"seed=-3 is out of range"),
        (dict(n_init=0), r"n_init=0 is out of range"),
        (dict(engine="gpu"), r"engine='gpu' is not supported"),
        (dict(init="kmeans++"), r"init='kmeans\+\+' is not supported; expected one of 'auto', 'k-means\+\+'"),
        (dict(memory_budget=0), r"memory_budget=0 is out of range"),
        (dict(init=torch.zeros(4, 3), n_init=2), r"n_init=2 with a given init tensor would repeat the same run"),
        (dict(holdout=1.0), r"holdout=1.0; expected the share of rows kept out of the fit, a number >= 0 and < 1"),
        (dict(holdout=-0.2), r"holdout=-0.2; expected the share of rows kept out of the fit"),
    ],
)
def test_fit_settings_refuse_bad_values_with_the_functions_messages(bad: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        FitSettings(**bad)
    x = torch.randn(64, 3)
    with pytest.raises(InvalidInputError, match=message):  # the library function says the same
        fit_codebook(x, 4, **bad)


def test_fit_settings_are_checked_before_the_data() -> None:
    # Bad settings and too few rows: the settings error comes first, before any look at the rows.
    with pytest.raises(InvalidInputError, match="metric='bogus'"):
        fit_codebook(torch.randn(2, 3), 8, metric="bogus")
    with pytest.raises(TooFewPointsError, match="n_codes=8 exceeds the n_rows=2 rows"):
        fit_codebook(torch.randn(2, 3), 8)


def test_a_warm_start_codebook_of_another_metric_is_refused_by_the_settings() -> None:
    cb = fit_codebook(torch.randn(64, 3), 4, n_iter=2)
    with pytest.raises(InvalidInputError, match=r"init codebook metric='l2' but metric='cosine'.*Fix"):
        FitSettings(metric="cosine", init=cb)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(engine="gpu"), r"engine='gpu' is not supported"),
        (dict(batch_rows=0), r"batch_rows=0 is out of range"),
        (dict(memory_budget=-1), r"memory_budget=-1 is out of range"),
    ],
)
def test_encode_options_refuse_bad_values(bad: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        EncodeOptions(**bad)


def test_encode_settings_refuse_a_bad_top_k_and_keep_a_tuple() -> None:
    with pytest.raises(InvalidInputError, match=r"top_k=0 is out of range"):
        EncodeSettings(column="e", top_k=0)
    assert EncodeSettings(column="e", keep=["a", "b"]).keep == ("a", "b")


def test_settings_are_frozen_and_keywords_round_trip() -> None:
    s = FitSettings(metric="cosine", n_iter=7)
    with pytest.raises(AttributeError):
        s.n_iter = 3  # type: ignore[misc]
    assert FitSettings(**s.keywords()) == s
