"""Drift of newly encoded rows against a codebook's training baseline: distortion ratio and
code-usage divergence, from the receipts an encode run writes (no table is read again).

A multi-level codebook's receipts count codes per level: usage divergence is measured per level
against that level's training counts (``per_level``), and the report's ``usage_divergence`` (with its
bias and excess) is the mean over the levels, so that it stays on the flat scale (bits, 0..1).

A scalar or binary codebook counts codes per dimension (its levels are its dimensions), so the same
measures apply per dimension; its report adds what is particular to its codec (:func:`codec_drift`):
for scalar codes ``clipped``, the share of new values outside the calibrated range against the
training share, for binary codes ``bit_balance``, the share of ones per dimension against training.

The report also tells the story behind the numbers: the codes whose share of rows grew or shrank the
most against training (:func:`code_shifts`, with a few ids of new rows per code read back from the
encoded outputs by :func:`example_ids`), the drift of each input partition (hive keys such as
``date=2026-11-01/source=a`` in the input file's path: :func:`partition_drift`), and, when the code
usage of one run is too few rows to judge, the counts pooled with those earlier runs left pending
(``pending``: see :func:`vq_pipeline.jobs.workdir.read_usage_pending`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vq_pipeline.codebook import Codebook
from vq_pipeline.fitting.multilevel import stated_objective
from vq_pipeline.io import tables
from vq_pipeline.io.table_writer import packed_codes

#: Codes listed as the largest gains and the largest losses of share (:func:`code_shifts`).
TOP_SHIFTS = 5
#: Ids of new rows shown per listed code (:func:`example_ids`).
EXAMPLE_IDS = 3
#: Partitions measured one by one at most (:func:`partition_drift`): the ones with the most new rows.
MAX_PARTITIONS = 50


def drift_report(
    codebook: Codebook,
    records: Sequence[dict[str, Any]],
    *,
    baseline: bool = False,
    pending: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantization distortion and code usage of newly encoded outputs against the training baseline.

    Args:
        records: receipts of encoded outputs (they carry distance sums and code counts).
        pending: code counts that earlier runs left too few to judge (``rows``, ``code_counts``,
            ``runs``; :func:`vq_pipeline.jobs.workdir.read_usage_pending`): the report's ``usage_pool``
            pools them with these records' counts.
        baseline: the records are the rows the codebook was just fitted on (the run that fitted it
            encoded them). Their distortion (1.0) and divergence (0.0) against themselves measure
            nothing, so none is reported: ``rows`` is 0, ``baseline_rows`` and
            ``baseline_mean_distance`` describe them, and ``note`` says "baseline: the codebook was
            fitted on these rows".

    Returns:
        ``rows`` (rows measured); ``mean_distance`` on the new data and ``train_mean_distance`` at
        fit time; ``distortion_ratio`` (new / train; 1.0 means no drift); ``codes_used``;
        ``usage_divergence``: the Jensen-Shannon divergence (bits, 0..1) between the new and the
        training code distributions; ``usage_divergence_expected``: its expected value for rows
        drawn from the training distribution itself, the finite-sample bias
        ``(k - 1) / (8 ln 2) * (1 / rows + 1 / train_rows)`` with ``k`` the codes used in training
        (second order: close from about 5 rows per code, too low below); ``usage_divergence_excess``:
        the divergence above that bias; ``train_rows``, ``n_codes``, ``baseline`` and ``note``;
        ``code_shifts`` (:func:`code_shifts` of the new rows); ``usage_pool``: the code usage the usage
        rule judges, this run's counts pooled with ``pending`` (``rows``, ``pending_rows``, ``runs``,
        ``usage_divergence``, ``usage_divergence_expected``, ``usage_divergence_excess``), None for a
        baseline or when there are no rows at all.

        A multi-level codebook's report also has ``codec``, ``levels`` and ``per_level`` (one dict per
        level: ``level``, ``codes_used``, ``usage_divergence``, ``usage_divergence_expected``,
        ``usage_divergence_excess``); its ``codes_used`` counts the codes used over all levels (of
        ``levels * n_codes``), its usage divergence, bias and excess are the means over the levels, and
        its distances are to the reconstruction (training: the codebook's reconstruction error).
        A scalar or binary codebook's levels are its dimensions, and its report adds ``clipped`` or
        ``bit_balance`` (:func:`codec_drift`).
    """
    multi = codebook.codec != "flat"
    rows = sum(r["rows"] for r in records)
    q_all = codebook.counts.double().numpy().reshape(codebook.levels, -1)  # (levels, n_codes)
    q = q_all[0]  # (n_codes,)
    train_rows = int(codebook.stats.get("n_rows") or q.sum())
    # The sum of encode's distances over the training rows (1 - cos under cosine, for every codec).
    train_mean = (stated_objective(codebook) or 0.0) / max(train_rows, 1)
    report: dict[str, Any] = {
        "rows": rows,
        "mean_distance": None,
        "train_mean_distance": train_mean,
        "distortion_ratio": None,
        "codes_used": 0,
        "usage_divergence": None,
        "usage_divergence_expected": None,
        "usage_divergence_excess": None,
        "train_rows": train_rows,
        "n_codes": codebook.n_codes,
        "baseline": baseline,
        "note": None,
        "code_shifts": {"gains": [], "losses": []},
        "usage_pool": None,
        **({"codec": codebook.codec, "levels": codebook.levels, "per_level": []} if multi else {}),
    }
    if baseline:
        note = "baseline: the codebook was fitted on these rows"
        report.update(rows=0, baseline_rows=rows, baseline_mean_distance=None, note=note)
    pool = pooled_counts(codebook, records, pending)
    if not baseline and pool["rows"] > 0:
        counts_pool = np.asarray(pool["code_counts"], dtype=np.float64).reshape(codebook.levels, -1)
        pooled = [_usage_divergence(counts_pool[lv], q_all[lv], pool["rows"]) for lv in range(codebook.levels)]
        report["usage_pool"] = {
            "rows": pool["rows"],
            "pending_rows": pool["rows"] - rows,
            "runs": pool["runs"],
            **{key: float(np.mean([d[key] for d in pooled])) for key in pooled[0]},
        }
    if rows == 0:
        return report
    mean = sum(r["distance_sum"] for r in records) / rows
    counts = np.sum([np.asarray(r["code_counts"], dtype=np.float64) for r in records], axis=0)  # (n_codes,)
    counts = counts.reshape(codebook.levels, -1)  # (levels, n_codes)
    report["codes_used"] = int((counts > 0).sum())
    if baseline:
        if multi:
            report["per_level"] = [{"level": lv, "codes_used": int((c > 0).sum())} for lv, c in enumerate(counts)]
        return {**report, "baseline_mean_distance": mean}
    report.update(codec_drift(codebook, records, counts, rows))
    per_level = [_usage_divergence(counts[lv], q_all[lv], rows) for lv in range(codebook.levels)]
    if multi:
        report["per_level"] = [
            {"level": lv, "codes_used": int((counts[lv] > 0).sum()), **d} for lv, d in enumerate(per_level)
        ]
    report["code_shifts"] = code_shifts(counts, q_all, multi=multi)
    return {
        **report,
        "mean_distance": mean,
        "distortion_ratio": mean / train_mean if train_mean > 0 else (1.0 if mean == 0 else float("inf")),
        **{key: float(np.mean([d[key] for d in per_level])) for key in per_level[0]},
    }


def codec_drift(codebook: Codebook, records: Sequence[dict[str, Any]], counts: np.ndarray, rows: int) -> dict[str, Any]:
    """What a scalar or binary codebook's drift report adds (``{}`` for other codecs).

    Args:
        records: the receipts measured (a scalar codebook's carry ``clipped``, the values outside the range).
        counts: their (dim, n_codes) code counts. rows: their rows.

    Returns:
        scalar: ``clipped``: ``share`` (of the new values, outside the range the fit calibrated; None when a
        receipt lacks the count), ``train_share`` (the fit's ``stats["clipped"]``, None when not recorded)
        and ``change``. binary: ``bit_balance``: ``ones_share`` and ``train_ones_share`` (means over the
        dimensions of the share of rows with bit 1), ``mean_shift`` and ``max_shift`` (mean and largest
        change of a dimension's share of ones against training) and ``max_shift_dim``.
    """
    if codebook.codec == "scalar":
        known = all("clipped" in r for r in records)
        share = sum(int(r["clipped"]) for r in records) / (rows * codebook.dim) if known and rows else None
        train = codebook.stats.get("clipped")
        train = float(train) if isinstance(train, int | float) and not isinstance(train, bool) else None
        change = share - train if share is not None and train is not None else None
        return {"clipped": {"share": share, "train_share": train, "change": change}}
    if codebook.codec == "binary":
        train = codebook.counts.double().numpy().reshape(codebook.dim, -1)  # (dim, 2)
        ones = counts[:, 1] / np.maximum(counts.sum(axis=1), 1)  # (dim,)
        train_ones = train[:, 1] / np.maximum(train.sum(axis=1), 1)  # (dim,)
        shift = np.abs(ones - train_ones)  # (dim,)
        return {
            "bit_balance": {
                "ones_share": float(ones.mean()),
                "train_ones_share": float(train_ones.mean()),
                "mean_shift": float(shift.mean()),
                "max_shift": float(shift.max()),
                "max_shift_dim": int(shift.argmax()),
            }
        }
    return {}


def _usage_divergence(counts: np.ndarray, train_counts: np.ndarray, rows: int) -> dict[str, float]:
    """Jensen-Shannon divergence (bits) of one level's new code counts ``counts`` (n_codes,) from its
    training counts ``train_counts`` (n_codes,), with its finite-sample bias and the excess over it."""
    p = counts / counts.sum()  # (n_codes,)
    q_rows = train_counts.sum()
    q = train_counts / q_rows if q_rows > 0 else np.full_like(train_counts, 1.0 / len(train_counts))  # (n_codes,)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    divergence = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    # JS ~ chi^2 / (8 n ln 2) for small differences: a sample of the training distribution itself
    # scores (k - 1) / (8 ln 2) * (1/rows + 1/train_rows) bits on average, more when rows are few.
    expected = float((max(int((q > 0).sum()), 1) - 1) / (8 * np.log(2)) * (1 / rows + 1 / max(float(q_rows), 1.0)))
    return {
        "usage_divergence": divergence,
        "usage_divergence_expected": expected,
        "usage_divergence_excess": divergence - expected,
    }


def pooled_counts(
    codebook: Codebook, records: Sequence[dict[str, Any]], pending: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The code counts of ``records`` (receipts) added to ``pending`` (counts earlier runs left to
    judge): ``rows``, ``code_counts`` (a list of ``levels * n_codes`` ints) and ``runs`` (the runs
    pooled: ``pending``'s plus one when ``records`` hold rows)."""
    size = codebook.levels * codebook.n_codes
    counts = np.zeros(size, dtype=np.int64)
    rows = 0
    for r in records:
        counts += np.asarray(r["code_counts"], dtype=np.int64).reshape(size)
        rows += int(r["rows"])
    runs = 1 if rows else 0
    if pending and pending.get("rows"):
        counts += np.asarray(pending["code_counts"], dtype=np.int64).reshape(size)
        rows += int(pending["rows"])
        runs += int(pending.get("runs") or 1)
    return {"rows": rows, "code_counts": [int(c) for c in counts], "runs": runs}


def code_shifts(
    counts: np.ndarray, train_counts: np.ndarray, *, multi: bool = False, top: int = TOP_SHIFTS
) -> dict[str, list[dict[str, Any]]]:
    """The codes whose share of the new rows moved most against their training share.

    Args:
        counts: the new rows' counts, (levels, n_codes). train_counts: the training counts, (levels, n_codes).
        multi: give each code's ``level`` (a multi-level codebook: shares are within each level).

    Returns:
        ``gains`` (share grew, largest first) and ``losses`` (share shrank, largest first), at most
        ``top`` each; one dict per code: ``code``, ``rows`` (new rows with the code), ``share`` (of the
        new rows), ``train_share`` and ``change`` (``share - train_share``), and ``level`` when ``multi``.
        Ties keep the lower level and code first.
    """
    counts = np.asarray(counts, dtype=np.float64)
    train = np.asarray(train_counts, dtype=np.float64)
    totals, train_totals = counts.sum(axis=1, keepdims=True), train.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)  # (levels, n_codes)
    q = np.divide(train, train_totals, out=np.zeros_like(train), where=train_totals > 0)  # (levels, n_codes)
    change = p - q
    flat = change.ravel()
    index = np.arange(flat.size)

    def entry(i: int) -> dict[str, Any]:
        level, code = divmod(int(i), counts.shape[1])
        return {
            **({"level": level} if multi else {}),
            "code": code,
            "rows": int(counts[level, code]),
            "share": float(p[level, code]),
            "train_share": float(q[level, code]),
            "change": float(change[level, code]),
        }

    gains = [i for i in np.lexsort((index, -flat)) if flat[i] > 0][:top]
    losses = [i for i in np.lexsort((index, flat)) if flat[i] < 0][:top]
    return {"gains": [entry(i) for i in gains], "losses": [entry(i) for i in losses]}


def partition_of(key: str) -> str:
    """The hive partition of an input file's relative path ``key``: its folder names of the form
    ``name=value``, joined with ``/`` (``date=2026-11-01/source=a/part-0.parquet`` →
    ``date=2026-11-01/source=a``); ``""`` when it has none."""
    folders = Path(key).parts[:-1]
    return "/".join(f for f in folders if "=" in f and not f.startswith("="))


def partition_drift(
    codebook: Codebook, records: Sequence[dict[str, Any]], *, limit: int = MAX_PARTITIONS
) -> list[dict[str, Any]]:
    """The drift of each input partition: the receipts ``records`` grouped by the hive partition of
    their ``key`` (:func:`partition_of`), each group measured as :func:`drift_report` measures all.

    Returns:
        One dict per partition, most new rows first (then by name), at most ``limit``: ``partition``
        (``""`` for files outside any partition), ``files``, ``rows``, ``mean_distance``,
        ``distortion_ratio``, ``codes_used``, ``usage_divergence``, ``usage_divergence_expected`` and
        ``usage_divergence_excess``. Empty when no file lies in a partition.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(partition_of(str(r.get("key", ""))), []).append(r)
    if set(groups) <= {""}:
        return []
    keys = (
        "rows",
        "mean_distance",
        "distortion_ratio",
        "codes_used",
        "usage_divergence",
        "usage_divergence_expected",
        "usage_divergence_excess",
    )
    out = []
    for name, group in groups.items():
        d = drift_report(codebook, group)
        out.append({"partition": name, "files": len(group), **{k: d[k] for k in keys}})
    out.sort(key=lambda g: (-g["rows"], g["partition"]))
    return out[:limit]


def _unpacked(frame: Any, codec: str, dim: int, bits: int) -> np.ndarray:
    """The (rows, dim) codes of a scalar or binary code table's packed ``codes`` column (bits in numpy's
    ``packbits`` order; 4-bit codes two per byte, the even dimension in the low nibble)."""
    packed = packed_codes(frame)  # (rows, width) uint8
    if codec == "binary":
        return np.unpackbits(packed, axis=1)[:, :dim]
    if bits == 4:
        return np.stack([packed & 0x0F, packed >> 4], axis=2).reshape(len(packed), -1)[:, :dim]
    return packed


def example_ids(
    out_dir: str | Path,
    records: Sequence[dict[str, Any]],
    shifts: dict[str, list[dict[str, Any]]],
    *,
    id_column: str,
    n: int = EXAMPLE_IDS,
) -> dict[str, list[dict[str, Any]]]:
    """``shifts`` (:func:`code_shifts`) with up to ``n`` ids of new rows per listed code (``ids``), read
    from the encoded outputs of ``records`` (receipts, whose ``output`` is relative to ``out_dir``) in
    receipt order and then row order; a code of a multi-level codebook is looked up in its level."""
    wanted = {(e.get("level", 0), e["code"]) for e in [*shifts["gains"], *shifts["losses"]]}
    found: dict[tuple[int, int], list[Any]] = {k: [] for k in wanted}
    for r in records:
        if all(len(v) >= n for v in found.values()):
            break
        output = Path(out_dir) / r["output"]
        multi = "levels" in r
        frame = tables.scan(tables.Source(str(output), r["output"])).select(id_column, "codes" if multi else "code")
        frame = frame.collect()
        ids = frame.get_column(id_column).to_list()
        if r.get("codec") in ("scalar", "binary"):
            codes = _unpacked(frame, r["codec"], int(r["levels"]), int(r.get("bits") or 8))  # (rows, dim)
        else:
            codes = frame.get_column("codes" if multi else "code").to_numpy()
            codes = codes.reshape(len(ids), -1)  # (rows, levels)
        for level, code in wanted:
            have = found[(level, code)]
            if len(have) < n:
                rows = np.flatnonzero(codes[:, level] == code)[: n - len(have)]
                have.extend(v if isinstance(v, int | str) else str(v) for v in (ids[i] for i in rows))
    return {
        side: [{**e, "ids": found[(e.get("level", 0), e["code"])]} for e in entries] for side, entries in shifts.items()
    }
