"""Torch's threads follow the CPUs that other processes leave idle (vq_pipeline.runtime.share_cpus): the
rule on hand-made cases, the real thing against real busy processes, and results that do not depend on
the thread count."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from sklearn.datasets import load_digits

from vq_pipeline import fit_codebook, runtime
from vq_pipeline.runtime import share_cpus, threads_to_use


@pytest.mark.parametrize(
    "ceiling, cpus, busy, own, expected",
    [
        (2, 2, 2.0, 2.0, 2),  # only this process: every CPU
        (2, 2, 2.0, 0.7, 1),  # two busy processes beside it: one thread
        (2, 2, 1.9, 0.9, 1),  # one busy process: the one idle CPU
        (2, 2, 0.3, 0.0, 2),  # a little activity elsewhere rounds away
        (8, 16, 5.0, 1.0, 8),  # never above the ceiling
        (4, 4, 4.0, 0.1, 1),  # at least one thread
        (2, 2, 0.5, 1.0, 2),  # own time above the machine's busy time (clock skew): no others
    ],
)
def test_threads_follow_the_cpus_other_processes_leave_idle(
    ceiling: int, cpus: int, busy: float, own: float, expected: int
) -> None:
    assert threads_to_use(ceiling, cpus, busy, own) == expected


@pytest.fixture
def fresh_share(monkeypatch):
    """share_cpus from a first look, with torch's thread count put back afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_share", runtime._CpuShare())
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_busy_processes_on_every_cpu_leave_one_thread_and_a_user_count_is_the_ceiling(fresh_share) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(2)
    spin = "import os, sys\nos.sched_setaffinity(0, {int(c) for c in sys.argv[1:]})\nwhile True:\n    pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", spin, *map(str, cpus)]) for _ in cpus]
    try:
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline and 1 not in seen:
            time.sleep(runtime.SHARE_CHECK_SECONDS + 0.05)  # this process idle: every busy CPU is another's
            seen.append(share_cpus())
        assert seen[-1] == 1 and torch.get_num_threads() == 1, seen
    finally:
        for p in busy:
            p.kill()
            p.wait()
    torch.set_num_threads(3)  # the user's own choice from now on
    time.sleep(runtime.SHARE_CHECK_SECONDS + 0.05)
    assert share_cpus() in (1, 2, 3) and runtime._share.ceiling == 3


def test_it_is_off_on_request(fresh_share, monkeypatch) -> None:
    monkeypatch.setenv(runtime.SHARE_ENV, "0")
    torch.set_num_threads(2)
    assert share_cpus() is None and torch.get_num_threads() == 2


def test_codebooks_do_not_depend_on_the_thread_count() -> None:
    digits = torch.tensor(load_digits().data, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        prints = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for kw in ({}, {"codec": "residual", "levels": 2}, {"metric": "cosine"}):
                prints.append(fit_codebook(digits, 16, seed=0, engine="torch", device="cpu", **kw).fingerprint)
        assert prints[:3] == prints[3:]
    finally:
        torch.set_num_threads(before)
