"""Runtime policy of a process that computes: the OpenMP wait policy of torch's runtime, and how many
of torch's threads to use while other processes keep CPUs busy (:func:`share_cpus`).

Nothing here runs on ``import vq_pipeline``. The ``vq`` command and the Prefect flows call
:func:`apply_omp_waits` first thing; a notebook gets it when it first takes a public name that loads
torch (``from vq_pipeline import fit_codebook``), before torch loads its OpenMP runtime, which reads
the policy once. The KeOps cache folder is chosen by the KeOps engine when it first compiles
(:mod:`vq_pipeline.compute.engines.keops`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

#: Spins an idle OpenMP thread of torch's runtime (GNU libgomp) makes before it sleeps, on a CPU that
#: nothing else is using (see :func:`omp_wait_settings`).
OMP_SPIN_COUNT = 100_000
#: CPU pressure (``/proc/pressure/cpu``, "some" over the last 10 s, in percent) from which the CPU counts
#: as shared.
CONTENDED_PRESSURE = 10.0


def omp_wait_settings(environ: Any, pressure: float | None, running: int | None, cpus: int) -> dict[str, str]:
    """The OpenMP wait settings to add to ``environ`` before torch loads its OpenMP runtime.

    Idle OpenMP threads either spin or sleep, and neither is right everywhere (figures in the docs'
    Engines page, "OpenMP waits"): threads that spin without end (``OMP_WAIT_POLICY=ACTIVE``) make
    Lloyd iterations and k-means++ several times slower on a CPU shared with busy processes, and a
    bounded spin slows them there too; threads that sleep at once (``PASSIVE``) pay a wake-up on
    every torch op, which slows both on a quiet CPU. So: nothing when the user chose
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set); ``PASSIVE`` when the CPU is shared at import, by
    its pressure (PSI) from ``CONTENDED_PRESSURE`` on or, without PSI, by at least ``cpus`` other
    runnable tasks; else a bounded spin of ``OMP_SPIN_COUNT``.

    Args:
        environ: the environment (a mapping). pressure: PSI "some avg10", or None when unknown.
        running: runnable tasks other than this one (``/proc/loadavg``), or None. cpus: CPUs this
            process may run on.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    if pressure is not None:
        shared = pressure >= CONTENDED_PRESSURE
    else:
        shared = running is None or running >= cpus
    return {"OMP_WAIT_POLICY": "PASSIVE"} if shared else {"GOMP_SPINCOUNT": str(OMP_SPIN_COUNT)}


def _cpu_pressure() -> float | None:
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split("avg10=", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _other_runnable() -> int | None:
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply_omp_waits(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Add the OpenMP wait settings that :func:`omp_wait_settings` picks for this CPU now to
    ``environ`` (``os.environ`` by default), unless the user chose them; the settings added.

    Effective only before torch is first imported in the process (its OpenMP runtime reads them once).
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return {}  # chosen already (by the user, or by an earlier call): no need to read the CPU's pressure
    chosen = omp_wait_settings(env, _cpu_pressure(), _other_runnable(), _cpus())
    env.update(chosen)
    return chosen


#: Seconds between two looks at the CPUs by :func:`share_cpus` (each reads ``/proc/stat``).
SHARE_CHECK_SECONDS = 0.25
#: Set to 0 to keep torch's thread count as it is, whatever other processes do.
SHARE_ENV = "VQ_SHARE_CPUS"


def threads_to_use(ceiling: int, cpus: int, busy_cpus: float, own_cpus: float) -> int:
    """Threads for torch's next ops: the CPUs that other processes leave idle, rounded, at least 1 and at
    most ``ceiling`` (the count chosen before, by the user or torch).

    Lock-step threads on a shared CPU wait for each other: a thread that the scheduler takes off its
    CPU stalls every parallel op until it runs again (docs' Benchmarks page, "Sharing the CPUs"). So the
    threads follow the CPUs free of others.

    Args:
        ceiling: most threads to use. cpus: CPUs this process may run on. busy_cpus: CPUs busy over
            the last interval (all processes, in CPUs: 1.5 = one and a half CPUs' time). own_cpus: this
            process's share of that (its CPU seconds over the interval's seconds).
    """
    others = max(0.0, busy_cpus - own_cpus)
    return max(1, min(ceiling, math.floor(cpus - others + 0.5)))


def _busy_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of the CPUs ``cpus`` since boot (``/proc/stat``), or None."""
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *fields = line.split()
                if int(name[3:]) not in cpus:
                    continue
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


class _CpuShare:
    """The state of :func:`share_cpus`: the ceiling, the count last set, and the last look."""

    def __init__(self) -> None:
        self.ceiling: int | None = None
        self.set_to: int | None = None
        self.last: tuple[float, float, int, int] | None = None  # (wall, process CPU s, busy, total jiffies)
        self.next_look = 0.0  # time.monotonic() of the next look
        self.cpus: set[int] | None = None


_share = _CpuShare()


def share_cpus() -> int | None:
    """Match torch's intra-op threads to the CPUs that other processes leave idle (:func:`threads_to_use`);
    the threads now in use, or None when it does not apply. Called between ops of long work (every chunk
    of a nearest-code search, every seeding step); it looks at the CPUs at most every
    ``SHARE_CHECK_SECONDS`` and costs nothing between looks.

    It never goes above the count torch had before its first change, and a count the user sets later
    (``torch.set_num_threads``) becomes the new ceiling. Off where ``/proc/stat`` is missing, when one
    thread is all there is, before torch is loaded, and with ``VQ_SHARE_CPUS=0``. Results do not depend
    on the thread count.
    """
    now = time.monotonic()
    s = _share
    if now < s.next_look:
        return s.set_to
    torch = sys.modules.get("torch")  # loaded by the compute code that calls this; never loaded here
    if torch is None or os.environ.get(SHARE_ENV, "1") == "0":
        return None

    current = torch.get_num_threads()
    if s.set_to is None or current != s.set_to:  # first look, or the user chose another count
        s.ceiling = current
    if s.cpus is None:
        try:
            s.cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            s.cpus = set(range(os.cpu_count() or 1))
    jiffies = _busy_jiffies(s.cpus)
    s.next_look = now + SHARE_CHECK_SECONDS
    if jiffies is None or (s.ceiling or 1) <= 1:
        s.last, s.set_to = None, current  # nothing to share now
        return None
    sample = (now, time.process_time(), *jiffies)
    last, s.last = s.last, sample
    if last is None or sample[3] <= last[3] or now <= last[0]:
        s.set_to = current
        return current
    busy = len(s.cpus) * (sample[2] - last[2]) / (sample[3] - last[3])
    own = (sample[1] - last[1]) / (now - last[0])
    threads = threads_to_use(s.ceiling or current, len(s.cpus), busy, own)
    if threads != current:
        torch.set_num_threads(threads)
    s.set_to = threads
    return threads


__all__ = [
    "CONTENDED_PRESSURE",
    "OMP_SPIN_COUNT",
    "SHARE_CHECK_SECONDS",
    "apply_omp_waits",
    "omp_wait_settings",
    "share_cpus",
    "threads_to_use",
]
