"""KeOps engine: symbolic (n, m) squared distances reduced by argmin / argKmin, never materialized.

This is the only module that imports pykeops, and it does so lazily: importing pykeops prints, probes
for CUDA, and may compile. Before that import it points KeOps at a cache folder keyed by this CPU,
the compiler flags and the versions (compiled kernels are machine-specific once ``-march=native`` is
used, and one shared folder clashes between concurrent processes), and it sets vectorizing
``CXXFLAGS`` unless the user set their own.

Environment:
    VQ_KEOPS_CACHE_DIR: root of the per-machine cache folders (default ``~/.cache/vq-pipeline/keops``).
    VQ_KEOPS_CXXFLAGS: C++ flags for KeOps' CPU kernels (default: ``NATIVE_CXXFLAGS``); an explicit
        ``CXXFLAGS`` in the environment wins over both.
    VQ_KEOPS_WORKER: optional suffix giving each concurrent worker its own cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
from functools import cache
from pathlib import Path
from typing import Any

import torch

# Without -march KeOps' CPU loops are not vectorized: slower at small widths and far slower at
# embedding widths (figures in the docs' Engines page, "KeOps compilation and its cache").
NATIVE_CXXFLAGS = "-march=native -fno-trapping-math -fno-signed-zeros -fassociative-math"

_import_error: str | None = None
# KeOps compiles a formula on its first call and keeps process-wide state; threads (e.g. concurrent
# encode tasks) take turns.
_call_lock = threading.Lock()


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags: what ``-march=native`` compiles for.

    The name alone is not enough (virtual machines often report a generic one).
    """
    found = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Model", "cpu model", "flags", "Features") and key not in found:
                found[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "|".join(found[k] for k in sorted(found)) or platform.processor() or platform.machine()


def cache_folder(cxxflags: str) -> Path:
    """The KeOps cache folder for this CPU, these flags and these library versions."""
    root = Path(os.environ.get("VQ_KEOPS_CACHE_DIR") or Path.home() / ".cache" / "vq-pipeline" / "keops")
    key = "|".join([_cpu_model(), platform.machine(), cxxflags, sys.version.split()[0], torch.__version__])
    name = f"{platform.machine()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    worker = os.environ.get("VQ_KEOPS_WORKER")
    return (root / name / worker) if worker else (root / name)


@cache
def _lazy_tensor() -> Any:
    """Configure KeOps' environment, import it once, and return ``pykeops.torch.LazyTensor``."""
    global _import_error
    if shutil.which(os.environ.get("CXX", "g++")) is None and not torch.cuda.is_available():
        _import_error = "no C++ compiler (g++) was found on PATH, and KeOps compiles its CPU kernels with it"
        return None
    cxxflags = os.environ.get("CXXFLAGS") or os.environ.get("VQ_KEOPS_CXXFLAGS", NATIVE_CXXFLAGS)
    folder = cache_folder(cxxflags)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in ("CXXFLAGS", "KEOPS_CACHE_FOLDER")}
    os.environ["CXXFLAGS"] = cxxflags
    os.environ["KEOPS_CACHE_FOLDER"] = str(folder)
    os.environ.setdefault("PYKEOPS_VERBOSE", "0")
    try:
        # pykeops prints its CUDA probe on import; keep stdout clean for the command line's summary.
        with contextlib.redirect_stdout(sys.stderr):
            from pykeops.torch import LazyTensor
    except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable", with the reason
        _import_error = f"importing pykeops failed ({type(exc).__name__}: {exc})"
        return None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return LazyTensor


def available() -> bool:
    """Whether pykeops imports and can compile here."""
    return _lazy_tensor() is not None


def unavailable_reason() -> str:
    return _import_error or "pykeops is available"


class KeOpsEngine:
    name = "keops"

    def preferred_chunk_rows(self, n_codes: int, dim: int) -> int:
        """KeOps tiles the reduction itself: large chunks only amortize the call overhead."""
        return 1 << 20

    def nearest(
        self, x: torch.Tensor, c: torch.Tensor, k: int, *, distances: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """See :meth:`vq_pipeline.compute.engines.Engine.nearest` (``min_argmin`` gives the distances for free).

        Exact without further checks: each pair's distance is evaluated in the direct form, so its
        float32 rounding is relative to that distance itself (at most ``gamma_{dim+2}`` of it), never to
        ``|x|^2`` or to the codebook's extent as in a matrix-product expansion; codes are told apart
        whenever their distances differ by more than that.
        """
        LazyTensor = _lazy_tensor()
        x_i = LazyTensor(x[:, None, :])  # (n, 1, dim) symbolic
        c_j = LazyTensor(c[None, :, :])  # (1, m, dim) symbolic
        d_ij = ((x_i - c_j) ** 2).sum(-1)  # (n, m) symbolic, never materialized
        with _call_lock, contextlib.redirect_stdout(sys.stderr):  # first use compiles, and may print
            if k == 1:
                sqdist, idx = d_ij.min_argmin(dim=1)  # (n, 1), (n, 1)
            else:
                sqdist, idx = d_ij.Kmin_argKmin(k, dim=1)  # (n, k), (n, k)
        return sqdist, idx.long()

    def sqdist(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """See :meth:`vq_pipeline.compute.engines.Engine.sqdist`: all m distances via a Kmin reduction."""
        sqdist, idx = self.nearest(x, c, c.shape[0])  # (n, m) sorted, (n, m)
        return torch.empty_like(sqdist).scatter_(1, idx, sqdist)  # (n, m) in centroid order

    def bytes_per_row(self, n_codes: int, dim: int, k: int) -> int:
        # the row itself (moved to the device) and the k (distance, index) outputs
        return 4 * dim + 16 * k
