"""The one benchmark harness: fresh processes, equal threads, interleaved repeats, CPU pressure, results, data.

Every script in ``benchmarks/`` imports this module and the libraries it measures, never another script.
It imports only the standard library and numpy, so a worker that imports it still imports only the
library it measures.

A measurement runs the way users run a library: in a fresh process that imports only that library,
with the same thread count for everybody, interleaved with the other methods, repeated, medians
reported, with the CPU pressure it ran under (``/proc/pressure/cpu``) beside every figure.

The parent side::

    methods = harness.installed(methods)                 # drops (and says so) peers not installed here
    for r, method in harness.interleave(methods, repeats):
        rec = harness.run_worker(__file__, {"method": method, ...}, log=log_file)   # {"error": ...} on failure
    harness.write_results(harness.results_path("fair", quick), record, markdown)

The worker side (the same script, started with ``--worker SPEC``)::

    if args.worker:
        return harness.serve(worker, args.worker)         # worker(spec) -> dict, written where the parent reads it
    ...
    import faiss; harness.limit_threads(spec["threads"])  # torch / faiss / scikit-learn, whichever is imported
    out, stats = harness.measure(lambda: call())         # wall s, CPU stall, load, extra peak RSS

Data sets: :func:`mixture` / :func:`mixture_files` (seeded gaussian mixtures, offset +3 so not centred),
:func:`wordllama` (the 32,000 x 256 token embeddings of the ``wordllama`` wheel, fetched once into
``benchmarks/.cache/wordllama``) with :func:`split`, and :func:`digits` (scikit-learn's 1,797 x 64).

Results: JSON (every raw number) and markdown (the printed tables) under ``benchmarks/results/``, which is
committed; ``--quick`` smoke runs, logs and caches go to ``benchmarks/.cache/`` (git-ignored).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import glob
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata as _md
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"  # committed
CACHE = BENCH / ".cache"  # git-ignored: downloads, logs, smoke-run results
THREADS = 2
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WORKER_TIMEOUT_S = 3600

# The module a method needs, by the name a user installs it under.
PEER_MODULES = {"faiss": "faiss-cpu", "sklearn": "scikit-learn", "pykeops": "pykeops", "threadpoolctl": "threadpoolctl"}


# ----------------------------------------------------------------------------- in the worker


def serve(worker: Callable[[dict[str, Any]], dict[str, Any]], spec_json: str) -> int:
    """Run ``worker(spec)`` in this (fresh) process and write its record where the parent reads it."""
    spec = json.loads(spec_json)
    rec = worker(spec)
    Path(spec["result"]).write_text(json.dumps(rec))
    return 0


_limits: list[Any] = []  # threadpoolctl limits stay in force while referenced


def limit_threads(threads: int) -> None:
    """Give every already imported library ``threads`` threads (the environment said so too, for OpenMP
    and BLAS). Call it after importing the measured library, so that nothing else is imported."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
    if "sklearn" in sys.modules:
        from threadpoolctl import threadpool_limits

        _limits.append(threadpool_limits(limits=threads))


def psi_total_us() -> int | None:
    """``/proc/pressure/cpu`` "some" total: microseconds some task waited for a CPU (None without PSI)."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class Pressure:
    """The CPU stall share (0 = quiet, 1 = some task always waited for a CPU) since construction."""

    def __init__(self) -> None:
        self.psi0, self.t0 = psi_total_us(), time.perf_counter()

    def stall(self) -> float | None:
        psi1, wall = psi_total_us(), time.perf_counter() - self.t0
        return None if self.psi0 is None or psi1 is None else (psi1 - self.psi0) / 1e6 / max(wall, 1e-9)


def status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    try:
        m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


def measure(call: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``call()`` once: its result, wall time, CPU stall share, load average and extra peak RSS.

    The peak is ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call, minus the RSS
    just before it: ``ru_maxrss`` cannot be used, as Linux carries it across ``exec`` from the parent.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: an honest RSS baseline
    except (OSError, AttributeError):
        pass
    try:  # the peak RSS (VmHWM) starts again from the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    rss0 = status_mib("VmRSS") or 0.0
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pressure = Pressure()
    t0 = time.perf_counter()
    out = call()
    wall = time.perf_counter() - t0
    stall = pressure.stall()
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak1 = (status_mib("VmHWM") or 0.0) if reset else maxrss1
    return out, {
        "wall_s": wall,
        "cpu_stall": stall,
        "load1": os.getloadavg()[0],
        "extra_peak_rss_mib": peak1 - rss0,
        # Without the reset, an earlier peak above the call's own hides it: a lower bound (flagged).
        "peak_rss_hidden": not reset and maxrss1 == maxrss0 and maxrss0 > rss0,
        "peak_from": "VmHWM" if reset else "ru_maxrss",
    }


# ----------------------------------------------------------------------------- in the parent


def version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def missing(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` this interpreter cannot import (looked up, not imported)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def installed(methods: Sequence[str], needs: dict[str, Sequence[str]]) -> list[str]:
    """``methods`` without those whose modules (``needs[method]``) are not installed, each skip said on stderr."""
    keep = []
    for m in methods:
        gone = missing(needs.get(m, ()))
        if gone:
            dists = ", ".join(PEER_MODULES.get(g, g) for g in gone)
            print(
                f"skipping {m}: {', '.join(gone)} not installed in {sys.executable} "
                f"(install {dists}, e.g. the `bench` extra in .venv-bench; see benchmarks/README.md)",
                file=sys.stderr,
                flush=True,
            )
        else:
            keep.append(m)
    return keep


def worker_env(threads: int = THREADS) -> dict[str, str]:
    """This environment with every thread-count variable set to ``threads``, and the checkout's package
    importable when it is not installed."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    if version("vq-pipeline") is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_worker(
    script: str | Path,
    spec: dict[str, Any],
    *,
    threads: int = THREADS,
    log: Any = None,
    timeout: float = WORKER_TIMEOUT_S,
) -> dict[str, Any]:
    """``python script --worker SPEC`` in a fresh process with ``threads`` threads; the record its
    :func:`serve` wrote, plus ``process_s``. A failure gives ``{"error": ...}`` instead of raising, so
    the other methods still run; the worker's output goes to ``log`` (a file), or its tail into the error.
    """
    with tempfile.NamedTemporaryFile(prefix="vq-bench-", suffix=".json", delete=False) as f:
        result = Path(f.name)
    result.unlink()
    spec = {**spec, "threads": threads, "result": str(result)}
    out = {"stdout": log, "stderr": log} if log is not None else {"capture_output": True, "text": True}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)],
            env=worker_env(threads),
            timeout=timeout,
            cwd=str(REPO),
            **out,
        )
        rc: int | str = proc.returncode
        tail = "" if log is not None else (proc.stderr or "")[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = f"timeout after {timeout} s", ""
    process_s = time.perf_counter() - t0
    if rc != 0 or not result.exists():
        result.unlink(missing_ok=True)
        where = "see the log" if log is not None else tail.strip() or "no output"
        return {"error": f"worker exited {rc} ({where})", "process_s": process_s}
    rec = json.loads(result.read_text())
    result.unlink()
    rec["process_s"] = process_s
    return rec


def interleave(methods: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, method): every method once per repeat, the order rotated so that nobody always goes first."""
    methods = list(methods)
    for r in range(repeats):
        k = r % max(len(methods), 1)
        for m in methods[k:] + methods[:k]:
            yield r, m


def median(values: Sequence[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: Any, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def machine_info(dists: Sequence[str] = ("vq-pipeline", "torch", "numpy")) -> dict[str, Any]:
    """CPU, cores, threads, Python, commit (and whether vq_pipeline/ changed since), load, versions."""
    cpu = platform.processor()
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    git = ["git", "-C", str(REPO)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "vq_pipeline"], capture_output=True, text=True)
        modified = bool(dirty.stdout.strip())
    except OSError:
        commit, modified = "unknown", False
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "threads": THREADS,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "vq_pipeline_modified_since_commit": modified,
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        "load_at_start": os.getloadavg()[0],
        "cpu_pressure_available": psi_total_us() is not None,
        "versions": {d: version(d) for d in dists},
    }


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def results_path(name: str, quick: bool = False, started: _dt.datetime | None = None) -> Path:
    """Where a run writes by default: ``benchmarks/results/<name>-<UTC time>.json`` (committed); a
    ``--quick`` smoke run writes ``benchmarks/.cache/results/<name>-quick.json`` (ignored)."""
    if quick:
        return CACHE / "results" / f"{name}-quick.json"
    return RESULTS / f"{name}-{(started or now()):%Y%m%dT%H%MZ}.json"


def log_path(results: Path) -> Path:
    """The workers' output of a run that writes ``results``: under ``benchmarks/.cache/logs/`` (ignored)."""
    return CACHE / "logs" / results.with_suffix(".log").name


def write_results(path: Path, record: dict[str, Any], markdown: str | None = None) -> Path:
    """Write ``record`` as JSON at ``path`` and, when given, the markdown tables beside it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown.rstrip() + "\n")
    return path


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


# ----------------------------------------------------------------------------- data sets

# Mixture centres are drawn N(0, (SPREAD / sqrt(dim))^2) per coordinate: clusters some 5.7 apart against a noise
# of 0.5 along any direction, close enough that no method converges (stops on its own) within 20 iterations.
SPREAD, NOISE, OFFSET = 4.0, 0.5, 3.0


class Mixture:
    """A seeded float32 gaussian mixture of ``k`` centres, offset by +3 (not centred); :meth:`rows` draws more."""

    def __init__(self, dim: int, k: int, seed: int) -> None:
        self.k, self.dim = k, dim
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.standard_normal((k, dim), dtype=np.float32) * np.float32(SPREAD / math.sqrt(dim))

    def rows(self, n: int) -> np.ndarray:
        out = self.centres[self.rng.integers(self.k, size=n)]  # (n, dim)
        out += NOISE * self.rng.standard_normal((n, self.dim), dtype=np.float32)
        out += OFFSET
        return out


def mixture(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    """(n, dim) float32 rows of :class:`Mixture`, in random order."""
    return Mixture(dim, k, seed).rows(n)


def unit_rows(a: np.ndarray) -> np.ndarray:
    a64 = a.astype(np.float64)
    return np.ascontiguousarray((a64 / np.linalg.norm(a64, axis=1, keepdims=True)).astype(np.float32))


def mixture_files(n: int, dim: int, k: int, folder: Path) -> Path:
    """Write one shape's data as ``.npy`` into ``folder``: ``x`` (n, dim), ``x2`` (2n, dim) new rows of the same
    mixture, ``init`` (the first K rows; ``init_cosine`` L2-normalized) and ``codebook`` (the centres + 3;
    ``codebook_cosine`` normalized). Seeded by the shape, so every script and run sees the same rows."""
    folder.mkdir(parents=True, exist_ok=True)
    mix = Mixture(dim, k, seed=7919 * n + 104729 * dim + k)
    x = mix.rows(n)
    np.save(folder / "x.npy", x)
    np.save(folder / "init.npy", np.ascontiguousarray(x[:k]))
    np.save(folder / "init_cosine.npy", unit_rows(x[:k]))
    del x
    np.save(folder / "x2.npy", mix.rows(2 * n))
    book = mix.centres + np.float32(OFFSET)
    np.save(folder / "codebook.npy", book)
    np.save(folder / "codebook_cosine.npy", unit_rows(book))
    return folder


WORDLLAMA_CACHE = CACHE / "wordllama"
WORDLLAMA_SHAPE = (32_000, 256)
SPLIT_SEED = 20240
TRAIN_SHARE = 0.8


def wordllama_wheel(cache: Path = WORDLLAMA_CACHE) -> Path:
    """The cached ``wordllama`` wheel, downloaded once (``pip download --no-deps``; never installed)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(glob.glob(str(cache / "wordllama-*.whl")))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "wordllama",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(cache),
        ]
        subprocess.run(cmd, check=False, stdout=sys.stderr)
        found = sorted(glob.glob(str(cache / "wordllama-*.whl")))
    if not found:
        raise SystemExit(
            f"cache={cache}: no wordllama-*.whl after pip download. Fix: check access to the package registry, "
            f"or put the wheel (or wordllama_256.npy) there by hand."
        )
    return Path(found[-1])


def wordllama(path: Path | None = None) -> np.ndarray:
    """The (32000, 256) float32 token-embedding matrix of the ``wordllama`` wheel (MIT).

    ``path``: a ``.npy``, the wheel, or its ``.safetensors``; default: ``benchmarks/.cache/wordllama/
    wordllama_256.npy``, made from the cached wheel (downloaded the first time)."""
    npy = WORDLLAMA_CACHE / "wordllama_256.npy"
    if path is not None and Path(path).suffix == ".npy":
        npy = Path(path)
    if npy.exists():
        x = np.load(npy)
    else:
        from safetensors.numpy import load as st_load

        src = Path(path) if path is not None else wordllama_wheel()
        if src.suffix == ".whl":
            with zipfile.ZipFile(src) as z:
                blobs = {n: z.read(n) for n in z.namelist() if n.endswith(".safetensors")}
        else:
            blobs = {src.name: src.read_bytes()}
        found = {f"{n}:{k}": v for n, b in blobs.items() for k, v in st_load(b).items() if v.shape == WORDLLAMA_SHAPE}
        if len(found) != 1:
            raise SystemExit(
                f"{src.name}: {len(found)} tensors of shape {WORDLLAMA_SHAPE} (expected 1) among {list(blobs)}. "
                "Fix: delete the cached wheel and fetch it again."
            )
        ((key, x),) = found.items()
        x = np.ascontiguousarray(x.astype(np.float32))  # (32000, 256); stored as float16
        print(f"wordllama: {key} -> float32 {x.shape}", file=sys.stderr)
        if path is None:
            np.save(npy, x)
    if x.shape != WORDLLAMA_SHAPE or x.dtype != np.float32 or not np.isfinite(x).all():
        raise SystemExit(
            f"{npy}: shape={x.shape} dtype={x.dtype}, expected finite float32 {WORDLLAMA_SHAPE}. Fix: delete it."
        )
    return x


def split(x: np.ndarray, seed: int = SPLIT_SEED, n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of the rows (its first ``n_rows`` if given): 80% training rows, then 20% new rows."""
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    if n_rows is not None:
        perm = perm[:n_rows]
    n_train = int(round(TRAIN_SHARE * perm.size))
    return np.ascontiguousarray(x[perm[:n_train]]), np.ascontiguousarray(x[perm[n_train:]])


def digits() -> np.ndarray:
    """scikit-learn's bundled digits, (1797, 64) float32 (8x8 images)."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


def objective(x: np.ndarray, c: np.ndarray) -> float:
    """The k-means objective in float64: the sum over rows of the squared L2 distance to the nearest row of c."""
    c64 = c.astype(np.float64)
    cn = np.square(c64).sum(axis=1)
    total = 0.0
    for lo in range(0, x.shape[0], 4096):
        xb = x[lo : lo + 4096].astype(np.float64)
        d = np.square(xb).sum(axis=1)[:, None] - 2.0 * xb @ c64.T + cn[None, :]
        total += float(np.maximum(d.min(axis=1), 0.0).sum())
    return total
