"""The lines a fit's progress becomes (ProgressLines): seeding at most 2 + its seconds, one iteration
line per update the codebook records, objectives told apart, levels named."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_pipeline import fit_codebook
from vq_pipeline.compute.lloyd import IterationProgress, ProgressLines
from vq_pipeline.compute.seeding import InitProgress


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 0.7), min_size=1, max_size=60))
def test_seeding_lines_are_at_most_two_plus_its_seconds(steps: list[float]) -> None:
    times = [sum(steps[: i + 1]) for i in range(len(steps))]
    clock = iter(times)
    lines: list[str] = []
    progress = ProgressLines(lines.append, clock=lambda: next(clock))
    n = len(times)
    for i in range(n):
        progress(InitProgress(chosen=i if i < n - 1 else n, n_codes=n, seconds=times[i]))
    assert 1 <= len(lines) <= 2 + (times[-1] - times[0])
    assert lines[-1].startswith(f"seeding: {n:,}/{n:,}")


@settings(max_examples=100, deadline=None)
@given(st.floats(1.0, 1e6), st.floats(1e-12, 0.5))
def test_consecutive_objectives_are_printed_apart(objective: float, drop: float) -> None:
    lines: list[str] = []
    progress = ProgressLines(lines.append)
    after = objective * (1 - drop)
    for i, (value, change) in enumerate([(objective, None), (after, (after - objective) / objective)], start=1):
        progress(IterationProgress(i, value, 0, 0, 1.0, 0.1, n_iter=5, elapsed=0.1 * i, change=change))
    shown = [line.split("objective ")[1].split()[0].rstrip(",") for line in lines]
    if after != objective:
        assert shown[0] != shown[1], lines


def test_a_fit_logs_one_iteration_line_per_recorded_iteration_and_names_levels() -> None:
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    for kw in (dict(n_iter=7, tol=0.0), dict(n_iter=30, tol=1e-3), dict(codec="residual", levels=2, n_iter=5, tol=1e-4)):
        lines: list[str] = []
        cb = fit_codebook(x, 8, engine="torch", device="cpu", progress=ProgressLines(lines.append), **kw)
        iterations = [line for line in lines if "iteration " in line and "/" in line.split("iteration ")[1][:6]]
        assert len(iterations) == cb.stats["iterations"], lines
        ends = [line for line in lines if " after " in line]
        assert sum(int(line.split(" after ")[1].split()[0]) for line in ends) == cb.stats["iterations"]
        if cb.codec != "flat":
            assert all(line.startswith(("level 1/2, ", "level 2/2, ")) for line in lines), lines
        assert not [line for line in lines if "proven unchanged" in line]
