"""Drift of newly encoded rows against a codebook's training baseline: distortion ratio and
code-usage divergence, from the receipts an encode run writes (no table is read again).

A multi-level codebook's receipts count codes per level: usage divergence is measured per level
against that level's training counts (``per_level``), and the report's ``usage_divergence`` (with its
bias and excess) is the mean over the levels, so that it stays on the flat scale (bits, 0..1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vq_pipeline.codebook import Codebook
from vq_pipeline.fitting.multilevel import stated_objective


def drift_report(codebook: Codebook, records: Sequence[dict[str, Any]], *, baseline: bool = False) -> dict[str, Any]:
    """Quantization distortion and code usage of newly encoded outputs against the training baseline.

    Args:
        records: receipts of encoded outputs (they carry distance sums and code counts).
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
        the divergence above that bias; ``train_rows``, ``n_codes``, ``baseline`` and ``note``.

        A multi-level codebook's report also has ``codec``, ``levels`` and ``per_level`` (one dict per
        level: ``level``, ``codes_used``, ``usage_divergence``, ``usage_divergence_expected``,
        ``usage_divergence_excess``); its ``codes_used`` counts the codes used over all levels (of
        ``levels * n_codes``), its usage divergence, bias and excess are the means over the levels, and
        its distances are to the reconstruction (training: the codebook's reconstruction error).
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
        **({"codec": codebook.codec, "levels": codebook.levels, "per_level": []} if multi else {}),
    }
    if baseline:
        note = "baseline: the codebook was fitted on these rows"
        report.update(rows=0, baseline_rows=rows, baseline_mean_distance=None, note=note)
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
    per_level = [_usage_divergence(counts[lv], q_all[lv], rows) for lv in range(codebook.levels)]
    if multi:
        report["per_level"] = [
            {"level": lv, "codes_used": int((counts[lv] > 0).sum()), **d} for lv, d in enumerate(per_level)
        ]
    return {
        **report,
        "mean_distance": mean,
        "distortion_ratio": mean / train_mean if train_mean > 0 else (1.0 if mean == 0 else float("inf")),
        **{key: float(np.mean([d[key] for d in per_level])) for key in per_level[0]},
    }


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
