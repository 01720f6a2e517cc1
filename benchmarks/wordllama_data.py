"""The wordllama token embeddings: a real 32,000 x 256 matrix (MIT), fetched once and cached, split deterministically.

The ``wordllama`` wheel ships ``wordllama/weights/l2_supercat_256.safetensors``, whose 2-d tensor is the
token-embedding matrix (float16; read as float32). It is fetched with ``pip download wordllama --no-deps``
into ``benchmarks/.cache/wordllama/`` (git-ignored), never installed, and the matrix is cached there as
``.npy``. Usable as a module (``load()``, ``split()``) or as a script that prints what it found::

    .venv-bench/bin/python benchmarks/wordllama_data.py
"""

from __future__ import annotations

import glob
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache" / "wordllama"
SHAPE = (32_000, 256)
SPLIT_SEED = 20240
TRAIN_SHARE = 0.8


def wheel(cache: Path = CACHE) -> Path:
    """The cached wordllama wheel, downloaded (no dependencies, not installed) the first time."""
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
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        found = sorted(glob.glob(str(cache / "wordllama-*.whl")))
    if not found:
        raise SystemExit(f"cache={cache}: no wordllama-*.whl after pip download. Fix: check access to the registry.")
    return Path(found[-1])


def load(cache: Path = CACHE) -> np.ndarray:
    """The (32000, 256) float32 token-embedding matrix, from the cached ``.npy`` or the wheel."""
    npy = cache / "wordllama_256.npy"
    if npy.exists():
        x = np.load(npy)
    else:
        from safetensors.numpy import load as st_load

        whl = wheel(cache)
        with zipfile.ZipFile(whl) as z:
            names = [n for n in z.namelist() if n.endswith(".safetensors")]
            found = {f"{n}:{k}": v for n in names for k, v in st_load(z.read(n)).items() if v.shape == SHAPE}
        if len(found) != 1:
            raise SystemExit(
                f"wheel={whl.name}: {len(found)} tensors of shape {SHAPE} (expected 1) among {names}. "
                "Fix: delete the cached wheel and fetch it again, or pick the tensor by name."
            )
        ((key, x),) = found.items()
        print(f"wordllama: {key} {x.shape} {x.dtype} -> float32 {npy}", file=sys.stderr)
        x = np.ascontiguousarray(x.astype(np.float32))  # (32000, 256)
        np.save(npy, x)
    if x.shape != SHAPE or x.dtype != np.float32 or not np.isfinite(x).all():
        raise SystemExit(f"{npy}: shape={x.shape} dtype={x.dtype}, expected finite float32 {SHAPE}. Fix: delete it.")
    return x


def split(x: np.ndarray, seed: int = SPLIT_SEED, n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of the rows (its first ``n_rows`` if given), 80% train then 20% new rows."""
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    if n_rows is not None:
        perm = perm[:n_rows]
    n_train = int(round(TRAIN_SHARE * perm.size))
    return np.ascontiguousarray(x[perm[:n_train]]), np.ascontiguousarray(x[perm[n_train:]])


if __name__ == "__main__":
    x = load()
    train, new = split(x)
    sq = np.square(x.astype(np.float64)).sum(1)
    print(f"{x.shape} {x.dtype}; train {train.shape}, new {new.shape}; mean squared norm {sq.mean():.6g}")
