"""Shared test set-up: local caches, and a float64 brute-force oracle with tie-aware comparison."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports pykeops or prefect: project-local KeOps cache, quiet, throwaway Prefect home.
_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VQ_KEOPS_CACHE_DIR", str(_ROOT / ".cache" / "keops"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="vq-prefect-home-"))

from vq_pipeline.runtime import apply_omp_waits  # noqa: E402

apply_omp_waits()  # as the vq command and the flows do, before torch loads OpenMP

import pytest  # noqa: E402
import torch  # noqa: E402

from vq_pipeline.compute.engines import keops  # noqa: E402

ENGINES = ["torch", pytest.param("keops", marks=pytest.mark.skipif(not keops.available(), reason="pykeops unavailable"))]

# The device of the CUDA tests: "cuda", or "cpu" to run the same bodies on the CPU (the dry run of
# benchmarks/gpu_check.sh sets VQ_TEST_DEVICE=cpu, so those tests are exercised without a GPU).
GPU_DEVICE = os.environ.get("VQ_TEST_DEVICE") or "cuda"
if GPU_DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"VQ_TEST_DEVICE={GPU_DEVICE!r}: expected 'cuda' or 'cpu'. Fix: unset it, or set it to cpu for a dry run.")
cuda = pytest.mark.skipif(GPU_DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server and database for every flow run of the session (~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_parts(
    root: Path,
    parts: dict[str, int],
    *,
    dim: int,
    n_topics: int = 10,
    seed: int = 0,
    id_base: int = 0,
    scale: float = 1.0,
    offset: float = 0.0,
):
    """Partition files of clustered embeddings under ``root``: file ``i`` (in key order) holds
    ``generate_embeddings(n, dim, n_topics, seed=seed + i) * scale + offset`` with ids
    ``id_base + 100_000 * i + arange(n)``. Returns each file's rows by key."""
    import numpy as np

    from vq_pipeline.io.table_writer import write_embeddings
    from vq_pipeline.jobs.demo import generate_embeddings

    out = {}
    for i, (key, n) in enumerate(sorted(parts.items())):
        x = generate_embeddings(n, dim, n_topics, seed=seed + i)
        if scale != 1.0 or offset != 0.0:
            x = x * scale + offset
        write_embeddings(root / key, np.arange(n) + id_base + 100_000 * i, x)
        out[key] = x
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes in an encode output folder and, under ``state/``, in its bookkeeping folder
    (``<folder>.vq/``: receipts, manifest), but the lock (its holder note is rewritten by every run)."""
    from vq_pipeline.jobs.encode_state import state_dir

    found = {}
    for root, prefix in ((folder, ""), (state_dir(folder), "state/")):
        if root.exists():
            found.update({prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"})
    return found


def oracle(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """(n_rows, n_codes) float64 distances by brute force: squared L2, or 1 - cos."""
    x64, c64 = x.double(), c.double()
    if metric == "cosine":
        x64 = x64 / x64.norm(dim=1, keepdim=True)
        c64 = c64 / c64.norm(dim=1, keepdim=True)
        return 1.0 - x64 @ c64.T
    return torch.cat([((x64[i : i + 256, None, :] - c64[None]) ** 2).sum(-1) for i in range(0, len(x64), 256)])


def assert_codes_match(codes: torch.Tensor, x: torch.Tensor, c: torch.Tensor, metric: str, *, rtol: float = 1e-5) -> int:
    """Every row's code(s) must be the oracle's, except where the choice is a genuine near-tie.

    A row's k-th code is checked only when the oracle's k-th and (k+1)-th distances differ by more
    than ``rtol`` (relative to the larger, plus a small absolute floor); on a near-tie either answer
    is right, but the chosen code's true distance must still be within the tolerance of the oracle's.
    Returns the number of rows checked strictly, so callers can make sure the test was not vacuous.
    """
    d = oracle(x, c, metric)  # (n, K)
    codes2 = codes.view(codes.shape[0], -1)  # (n, k)
    k = codes2.shape[1]
    ref = d.sort(dim=1)  # (n, K)
    scale = ref.values.abs().amax().clamp_min(1.0)
    tol = rtol * scale
    chosen = d.gather(1, codes2)  # (n, k): true distance of each chosen code
    # Chosen distances must equal the oracle's sorted distances within tolerance, position by position.
    assert torch.all((chosen - ref.values[:, :k]).abs() <= tol), "a chosen code is farther than the oracle's"
    kth_next = ref.values[:, k] if ref.values.shape[1] > k else torch.full_like(ref.values[:, 0], float("inf"))
    gaps = torch.cat([ref.values[:, 1:k] - ref.values[:, : k - 1], (kth_next - ref.values[:, k - 1])[:, None]], dim=1)
    # Position j is unambiguous when it is separated from both neighbours in the sorted order.
    left = torch.cat([torch.full_like(gaps[:, :1], float("inf")), gaps[:, :-1]], dim=1)
    strict = (gaps > tol) & (left > tol)  # (n, k)
    assert torch.equal(codes2[strict], ref.indices[:, :k][strict]), "codes differ from the oracle away from ties"
    return int(strict.all(dim=1).sum())


def fit_tables(inputs, **kw):
    """:func:`vq_pipeline.jobs.fit_tables.fit_from_tables` with ``n_codes`` and the fields of
    ``TableSettings`` and ``FitSettings`` as keywords (a test shorthand); other keywords pass through."""
    from vq_pipeline.jobs.fit_tables import fit_from_tables
    from vq_pipeline.settings import FitSettings, TableSettings

    n_codes = kw.pop("n_codes")
    reading = {k: kw.pop(k) for k in list(kw) if k in TableSettings.__dataclass_fields__}
    fitting = {k: kw.pop(k) for k in list(kw) if k in FitSettings.__dataclass_fields__}
    return fit_from_tables(inputs, n_codes, TableSettings(**reading), FitSettings(**fitting), **kw)


def encode_folder(inputs, codebook, out_dir, **kw):
    """:func:`vq_pipeline.jobs.encode_folder.encode_tables` with the fields of ``EncodeSettings`` and
    ``EncodeOptions`` as keywords (a test shorthand); other keywords pass through."""
    from vq_pipeline.jobs.encode_folder import encode_tables
    from vq_pipeline.settings import EncodeOptions, EncodeSettings

    settings = {k: kw.pop(k) for k in list(kw) if k in EncodeSettings.__dataclass_fields__}
    options = {k: kw.pop(k) for k in list(kw) if k in EncodeOptions.__dataclass_fields__}
    return encode_tables(inputs, codebook, out_dir, EncodeSettings(**settings), EncodeOptions(**options), **kw)
