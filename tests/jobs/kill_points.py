"""kill -9 a child process at a chosen point of its run, the same point on any machine, however loaded.

The child says where it is and waits; the parent kills it there. Nothing depends on how long anything takes.

A child script is :data:`CHILD_PRELUDE` followed by its own code, run as ``python -c SCRIPT POINT ARGS...``.
The prelude counts the child's ``os.replace`` calls (every atomic write of the package ends with one: outputs,
receipts, manifests, checkpoints, codebook files) and the calls of ``at_step()``, which the script passes as
a progress callback (a batch encoded, an iteration done). At ``POINT`` it prints ``at POINT`` and waits to be
killed:

* ``before-replace:N``: the N-th temporary file is complete and synced, not yet renamed into place;
* ``after-replace:N``: the N-th rename is done, nothing after it;
* ``step:N``: the N-th progress callback (mid-file, mid-fit), the output being written still temporary.

With ``POINT`` = ``count`` the child runs to its end and prints ``counts {"replace": R, "step": S}``: the
points that exist (:func:`points`).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
from collections.abc import Sequence

import pytest

CHILD_PRELUDE = """
import json, os, sys, time

POINT = sys.argv.pop(1)
KIND, _, AT = POINT.partition(":")
AT = int(AT or 0)
SEEN = {"replace": 0, "step": 0}


def stop_here():
    print("at " + POINT, flush=True)
    while True:  # killed here by the parent
        time.sleep(3600)


real_replace = os.replace


def replace(*args, **kwargs):
    SEEN["replace"] += 1
    if KIND == "before-replace" and SEEN["replace"] == AT:
        stop_here()
    real_replace(*args, **kwargs)
    if KIND == "after-replace" and SEEN["replace"] == AT:
        stop_here()


os.replace = replace


def at_step(*args, **kwargs):
    SEEN["step"] += 1
    if KIND == "step" and SEEN["step"] == AT:
        stop_here()


def finish():
    print("counts " + json.dumps(SEEN), flush=True)
"""


def count(argv: Sequence[str], **popen: object) -> dict[str, int]:
    """Run the child (``argv`` = ``[python, -c, SCRIPT, ...]``) to its end; its counts of replaces and steps."""
    done = subprocess.run([*argv[:3], "count", *argv[3:]], stdout=subprocess.PIPE, text=True, check=True, **popen)
    line = next(line for line in done.stdout.splitlines() if line.startswith("counts "))
    return json.loads(line.removeprefix("counts "))


def points(counts: dict[str, int], n: int, seed: int) -> list[str]:
    """``n`` points drawn (seeded) from those a run of ``counts`` passes, each kind in turn, in run order per kind."""
    kinds = {
        "before-replace": [f"before-replace:{i}" for i in range(1, counts["replace"] + 1)],
        "after-replace": [f"after-replace:{i}" for i in range(1, counts["replace"] + 1)],
        "step": [f"step:{i}" for i in range(1, counts["step"] + 1)],
    }
    rng = random.Random(seed)
    chosen: list[str] = []
    for i in range(n):
        pool = [p for p in kinds[list(kinds)[i % 3]] if p not in chosen] or [
            p for ps in kinds.values() for p in ps if p not in chosen
        ]
        chosen.append(rng.choice(pool))
    return chosen


def kill_at(argv: Sequence[str], point: str, **popen: object) -> None:
    """Start the child at ``point``, kill -9 it once it says it is there; fail if it ends before."""
    child = subprocess.Popen([*argv[:3], point, *argv[3:]], stdout=subprocess.PIPE, text=True, **popen)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == f"at {point}":
                child.send_signal(signal.SIGKILL)
                assert child.wait() == -signal.SIGKILL, f"{point}: the child was not killed by the signal"
                return
        pytest.fail(f"the child ended (status {child.wait()}) before reaching {point}")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
