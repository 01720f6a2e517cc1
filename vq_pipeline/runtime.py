"""Runtime policy of a process that computes: the OpenMP wait policy of torch's runtime.

Nothing here runs on ``import vq_pipeline``. The ``vq`` command and the Prefect flows call
:func:`apply_omp_waits` first thing; a notebook gets it when it first takes a public name that loads
torch (``from vq_pipeline import fit_codebook``), before torch loads its OpenMP runtime, which reads
the policy once. The KeOps cache folder is chosen by the KeOps engine when it first compiles
(:mod:`vq_pipeline.compute.engines.keops`).
"""

from __future__ import annotations

import os
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


__all__ = ["CONTENDED_PRESSURE", "OMP_SPIN_COUNT", "apply_omp_waits", "omp_wait_settings"]
