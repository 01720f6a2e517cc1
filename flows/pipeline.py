"""Prefect flow: the scheduled job. Keep a codebook current and every partition encoded with it.

Layout under ``work_dir``::

    codebooks/<fingerprint[:12]>.safetensors   every codebook fitted (content-addressed)
    codebooks/current.json                     which one is current (written atomically)
    codes/<fingerprint[:12]>/                  that codebook's codes: one parquet per input file,
                                               receipts, _manifest.json
    reports/<UTC time>.md, .json               one report per run

Each run, holding a lock on ``work_dir``: fit when there is no current codebook (or the requested
metric / n_codes changed); encode every input file not yet encoded with the current codebook;
measure drift on the newly encoded rows; refit, warm-started from the current codebook, when the
refit schedule is due or the distortion ratio exceeds ``1 + drift_threshold``; after a refit, make
the new codebook current and encode everything into its own folder (the old folder is left as is).
"""

import contextlib
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from vq_flows.encode import encode_embeddings_flow, retry_transient
from vq_flows.fit import fit_codebook_flow
from vq_pipeline import Codebook
from vq_pipeline.codebook import atomic_write_bytes
from vq_pipeline.pipeline import drift_report, folder_lock

CURRENT_NAME = "codebooks/current.json"
CURRENT_FORMAT = "vq-pipeline.current-codebook"
REPORT_ARTIFACT_KEY = "vq-pipeline-report"
# The pipeline's encode settings: one code per row plus its distance (lets readers filter rows the
# codebook represents badly). Changing them would make every codes folder refuse the next run.
TOP_K = 1
WITH_DISTANCE = True


class PipelineStateError(RuntimeError):
    """``codebooks/current.json`` points at a missing or different codebook."""


def codebook_path(work_dir: str | Path, fingerprint: str) -> Path:
    return Path(work_dir) / "codebooks" / f"{fingerprint[:12]}.safetensors"


def codes_dir(work_dir: str | Path, fingerprint: str) -> Path:
    return Path(work_dir) / "codes" / fingerprint[:12]


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def refit_reason(
    *,
    created_at: str,
    last_fit_at: str | None,
    now: dt.datetime,
    refit_every_hours: float | None,
    distortion_ratio: float | None,
    drift_threshold: float,
) -> str | None:
    """Why the current codebook should be refitted now, or None.

    Schedule: the codebook is older than ``refit_every_hours``; its age counts from its
    ``created_at``, or from the last refit attempt when that is later (a refit that reproduced the
    same centroids keeps the old file, and must not make every later run refit again).
    Drift: the newly encoded rows' mean distance exceeds the training mean by more than
    ``drift_threshold`` (``distortion_ratio > 1 + drift_threshold``).
    """
    reasons = []
    if refit_every_hours is not None:
        times = [t for t in (_parse_time(created_at), _parse_time(last_fit_at)) if t is not None]
        age_h = (now - max(times)).total_seconds() / 3600 if times else float("inf")
        if age_h > refit_every_hours:
            reasons.append(f"schedule: the codebook is {age_h:.1f} h old (refit every {refit_every_hours:g} h)")
    if distortion_ratio is not None and distortion_ratio > 1 + drift_threshold:
        reasons.append(f"drift: distortion ratio {distortion_ratio:.3f} > 1 + drift_threshold ({1 + drift_threshold:g})")
    return "; ".join(reasons) or None


@task(name="read-current-codebook", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def read_current_task(work_dir: str) -> dict[str, Any] | None:
    """The current codebook's pointer and identity, or None when there is none yet."""
    pointer = Path(work_dir) / CURRENT_NAME
    if not pointer.is_file():
        return None
    current = json.loads(pointer.read_text())
    path = Path(work_dir) / current["codebook"]
    if not path.is_file():
        raise PipelineStateError(
            f"{pointer} points at codebook {current['codebook']!r}, which does not exist; expected the current "
            f"codebook file. Fix: restore it, or delete {pointer} to fit a new codebook."
        )
    cb = Codebook.load(path)
    if cb.fingerprint != current["fingerprint"]:
        raise PipelineStateError(
            f"{path} has fingerprint {cb.fingerprint[:12]}… but {pointer} records {current['fingerprint'][:12]}…; "
            f"expected codebook files never to change. Fix: restore the file, or delete {pointer} to fit anew."
        )
    return {
        **current,
        "path": str(path),
        "created_at": cb.created_at,
        "metric": cb.metric,
        "n_codes": cb.n_codes,
        "dim": cb.dim,
        "parent_fingerprint": cb.parent_fingerprint,
    }


@task(name="set-current-codebook", cache_policy=NO_CACHE)
def set_current_task(work_dir: str, path: str, fingerprint: str, reason: str, now: str, since: str | None = None) -> dict[str, Any]:
    """Point ``codebooks/current.json`` at a codebook (atomically: readers see the old or the new)."""
    work = Path(work_dir)
    pointer = {
        "format": CURRENT_FORMAT,
        "codebook": Path(path).relative_to(work).as_posix(),
        "fingerprint": fingerprint,
        "codes": codes_dir(work, fingerprint).relative_to(work).as_posix(),
        "since": since or now,
        "last_fit_at": now,
        "reason": reason,
    }
    atomic_write_bytes(work / CURRENT_NAME, (json.dumps(pointer, indent=1, sort_keys=True) + "\n").encode())
    return pointer


@task(name="drift-report", cache_policy=NO_CACHE)
def drift_task(codebook: str, receipts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Distortion and code usage of newly encoded rows against the codebook's training baseline."""
    return drift_report(Codebook.load(codebook), [receipts[k] for k in sorted(receipts)])


@task(name="write-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def write_report_task(path: str, markdown: str, summary: dict[str, Any]) -> str:
    """Write the run's report as markdown and its summary as JSON next to it."""
    report = Path(path)
    atomic_write_bytes(report, markdown.encode())
    atomic_write_bytes(report.with_suffix(".json"), (json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n").encode())
    return str(report)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, float) else str(value)


def report_markdown(summary: dict[str, Any]) -> str:
    """The run report as markdown (pure formatting of the flow's summary)."""
    s = summary
    lines = [f"# vq-pipeline run {s['started_at']}", ""]
    action = {
        "fit": "fitted a first codebook",
        "refit": "refitted, warm-started from the previous codebook",
        "refit-unchanged": "refitted, but the refit reproduced the current codebook (kept)",
        "none": "no refit",
    }[s["action"]]
    lines += [f"**Codebook:** {action}" + (f" — {s['reason']}" if s["reason"] else "") + ".", ""]
    lines += ["## Encoding", "", "| codebook | folder | encoded | skipped | rows encoded |", "|---|---|---|---|---|"]
    for e in s["encode"]:
        lines.append(
            f"| `{e['codebook_fingerprint'][:12]}` | `{e['out_dir']}` | {len(e['encoded'])} | {len(e['skipped'])} | {e['rows_encoded']} |"
        )
    lines += ["", "## Drift of the newly encoded rows", ""]
    columns = [("against the codebook current at the start", s["drift"])]
    if s.get("drift_after_refit"):
        columns.append(("against the refitted codebook", s["drift_after_refit"]))
    lines += ["| | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for key, label in [
        ("rows", "rows"),
        ("mean_distance", "mean distance"),
        ("train_mean_distance", "training mean distance"),
        ("distortion_ratio", "distortion ratio (new / training)"),
        ("codes_used", "codes used"),
        ("usage_divergence", "code-usage divergence (JS, bits)"),
    ]:
        lines.append(f"| {label} | " + " | ".join(_fmt(d.get(key)) for _, d in columns) + " |")
    lines += [
        "",
        f"Refit rules: every {_fmt(s['params']['refit_every_hours'])} h, or when the distortion ratio exceeds "
        f"{1 + s['params']['drift_threshold']:g}.",
        "",
        "## Where things are",
        "",
        f"- current codebook: `{s['codebook']}` (fingerprint `{s['fingerprint']}`)",
        f"- codes: `{s['codes_dir']}`, manifest `{s['manifest']}`",
        f"- this report: `{s['report']}` (summary: `{Path(s['report']).with_suffix('.json')}`)",
    ]
    if s.get("previous_codebook"):
        lines.append(f"- previous codebook: `{s['previous_codebook']}`; its codes are left in `{s['previous_codes_dir']}`")
    return "\n".join(lines) + "\n"


@flow(name="vq-pipeline")
def vq_pipeline_flow(
    input_root: str,
    work_dir: str,
    column: str,
    n_codes: int,
    metric: str = "cosine",
    id_column: str | None = None,
    refit_every_hours: float | None = 24 * 7,
    drift_threshold: float = 0.25,
    sample: int | None = None,
    seed: int = 0,
    engine: str = "auto",
    dask: str | None = None,
) -> dict[str, Any]:
    """Fit or refit the codebook as needed and encode every new partition under ``input_root``.

    Args:
        input_root: folder of embedding tables (hive partitions welcome); every table file below it
            is an input. work_dir: where codebooks, codes and reports go (not inside input_root).
        column, id_column: the embedding and id columns. n_codes, metric, sample, seed, engine: fit
            settings. refit_every_hours: refit when the codebook is older (None: never on schedule).
        drift_threshold: refit when new rows' mean distance exceeds the training one by this fraction.
        dask: run the fits and encodes on a Dask cluster: ``local:N`` (started once for the whole
            run) or a scheduler address; see :mod:`vq_flows.dask`.

    Returns:
        ``codebook``, ``fingerprint``, ``codes_dir``, ``manifest``, ``report``, ``action`` (fit,
        refit, refit-unchanged, none), ``reason``, ``encode`` (one summary per encode run),
        ``drift`` (and ``drift_after_refit``), ``previous_codebook`` after a refit, ``seconds``,
        ``flow_run_id``.
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    work, root = Path(work_dir).absolute(), Path(input_root).absolute()
    if work == root or root in work.parents:
        raise ValueError(
            f"work_dir={work_dir!r} is inside input_root={input_root!r}; expected separate folders, or the codes "
            f"would be read back as inputs. Fix: put work_dir outside input_root."
        )
    started = dt.datetime.now(dt.timezone.utc)
    now = started.isoformat(timespec="seconds")
    fit_settings = dict(inputs=[str(root)], column=column, n_codes=n_codes, metric=metric, sample=sample, seed=seed, engine=engine)
    template = str(work / "codebooks" / "{fp12}.safetensors")

    cluster = contextlib.ExitStack()
    if dask:
        from vq_flows.dask import dask_cluster

        # One cluster for every fit and encode of the run (local:N starts here, stops at the end).
        fit_settings["dask"] = dask = cluster.enter_context(dask_cluster(dask))

    def encode(current: dict[str, Any]) -> dict[str, Any]:
        return encode_embeddings_flow(
            inputs=[str(root)], codebook=current["path"], out_dir=str(codes_dir(work, current["fingerprint"])),
            column=column, id_column=id_column, top_k=TOP_K, with_distance=WITH_DISTANCE, engine=engine, dask=dask,
        )

    def brief(e: dict[str, Any]) -> dict[str, Any]:
        keys = ("codebook_fingerprint", "out_dir", "manifest", "encoded", "skipped", "rows_encoded", "rows_total", "flow_run_id")
        return {k: e[k] for k in keys}

    with cluster, folder_lock(work / ".vq" / "lock", folder=work):  # one run per work_dir: a slow run and the next scheduled one never overlap
        current = read_current_task(str(work))
        action, reason, previous = "none", None, None
        changed = current is not None and (current["metric"], current["n_codes"]) != (metric, n_codes)
        if current is None or changed:
            action = "fit"
            reason = (
                f"settings changed (metric {current['metric']} → {metric}, n_codes {current['n_codes']} → {n_codes})"
                if changed else "no current codebook"
            )
            previous = current
            fit = fit_codebook_flow(out=template, **fit_settings)
            set_current_task(str(work), fit["path"], fit["fingerprint"], reason, now)
            current = read_current_task(str(work))
        encoded = [encode(current)]
        drift = drift_task(current["path"], encoded[0]["new_receipts"])
        drift_after = None
        if action == "none":  # a codebook fitted by this very run is not checked against itself
            reason = refit_reason(
                created_at=current["created_at"], last_fit_at=current.get("last_fit_at"), now=started,
                refit_every_hours=refit_every_hours, distortion_ratio=drift.get("distortion_ratio"),
                drift_threshold=drift_threshold,
            )
            if reason:
                logger.info("refitting: %s", reason)
                fit = fit_codebook_flow(out=template, warm_start=current["path"], **fit_settings)
                if fit["fingerprint"] == current["fingerprint"]:
                    action = "refit-unchanged"
                    set_current_task(str(work), current["path"], current["fingerprint"], current.get("reason") or reason, now, since=current.get("since"))
                else:
                    action, previous = "refit", current
                    set_current_task(str(work), fit["path"], fit["fingerprint"], reason, now)
                    current = read_current_task(str(work))
                    encoded.append(encode(current))
                    drift_after = drift_task(current["path"], encoded[-1]["new_receipts"])

        report = work / "reports" / f"{started.strftime('%Y-%m-%dT%H-%M-%SZ')}-{(flow_run.get_id() or 'local')[:8]}.md"
        summary: dict[str, Any] = {
            "started_at": now,
            "work_dir": str(work),
            "input_root": str(root),
            "codebook": current["path"],
            "fingerprint": current["fingerprint"],
            "parent_fingerprint": current["parent_fingerprint"],
            "codes_dir": encoded[-1]["out_dir"],
            "manifest": encoded[-1]["manifest"],
            "report": str(report),
            "action": action,
            "reason": reason,
            "encode": [brief(e) for e in encoded],
            "drift": drift,
            "drift_after_refit": drift_after,
            "previous_codebook": previous["path"] if previous else None,
            "previous_codes_dir": str(codes_dir(work, previous["fingerprint"])) if previous else None,
            "params": dict(fit_settings, id_column=id_column, refit_every_hours=refit_every_hours, drift_threshold=drift_threshold),
            "flow_run_id": flow_run.get_id(),
        }
        markdown = report_markdown(summary)
        write_report_task(str(report), markdown, summary)
    create_markdown_artifact(markdown=markdown, key=REPORT_ARTIFACT_KEY, description=f"vq-pipeline: {action}, {work}")
    summary["seconds"] = time.perf_counter() - t0
    logger.info(
        "codebook %s (%s); encoded %s files; report %s", current["fingerprint"][:12], action,
        sum(len(e["encoded"]) for e in encoded), report,
    )
    return summary
