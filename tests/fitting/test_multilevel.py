"""Multi-level codebooks (residual and product): fit, encode, decode, stats, file, tables, resume.

Oracles: float64 brute-force greedy encoding, the flat fits each level must equal, byte-exact file
round trips, and :func:`vq_pipeline.compute.semantic_ids.collision_stats` on the codes encode returns."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import fit_tables
import torch
from sklearn.datasets import load_digits

from vq_pipeline import Codebook, CodebookFileError, InvalidInputError, collision_stats, fit_codebook
from vq_pipeline.compute.levels import beam_residuals, beam_width
from vq_pipeline.jobs.mappers import serial
from vq_pipeline.validate import normalize_rows

KW = dict(engine="torch", device="cpu", seed=0)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().data.astype(np.float32)  # (1797, 64), real handwritten digits


@pytest.fixture(scope="module")
def residual(digits: np.ndarray) -> Codebook:
    return fit_codebook(digits, 16, codec="residual", levels=3, **KW)


def greedy_oracle(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy residual codes by float64 brute force, and the margin of every choice."""
    r = x.astype(np.float64)
    codes, margins = [], []
    for c in centroids.astype(np.float64):
        d = ((r[:, None, :] - c[None]) ** 2).sum(2)  # (n, n_codes)
        two = np.sort(d, axis=1)[:, :2]
        k = d.argmin(1)
        codes.append(k)
        margins.append(two[:, 1] - two[:, 0])
        r = r - c[k]
    return np.stack(codes, 1), np.stack(margins, 1)


def test_residual_encode_and_decode_match_a_float64_oracle(digits: np.ndarray, residual: Codebook) -> None:
    codes = residual.encode(digits)
    assert codes.shape == (1797, 3) and codes.dtype == np.int64
    want, margin = greedy_oracle(digits, residual.centroids.numpy())
    clear = (margin > 1e-4 * (1 + (digits.astype(np.float64) ** 2).sum(1, keepdims=True))).all(1)  # no near-tie
    assert clear.mean() > 0.95
    assert np.array_equal(codes[clear], want[clear])
    decoded = residual.decode(codes)
    oracle = sum(residual.centroids.numpy()[lv].astype(np.float64)[codes[:, lv]] for lv in range(3))
    assert decoded.dtype == np.float32 and np.allclose(decoded, oracle, atol=1e-4)
    # stats belong to these codes: error, usage, collisions
    err = ((digits.astype(np.float64) - oracle) ** 2).sum(1).mean()
    assert residual.stats["mse"] == pytest.approx(err, rel=1e-5)
    want_coll = collision_stats(codes)
    assert residual.stats["collision_rate"] == pytest.approx(want_coll["collision_rate"])
    assert residual.stats["n_unique"] == want_coll["n_unique"]
    assert [lv["used_codes"] for lv in residual.stats["levels"]] == want_coll["usage"]
    # each level lowers the error the levels before it left
    mses = [lv["mse"] for lv in residual.stats["levels"]]
    assert mses[0] > mses[1] > mses[2] == pytest.approx(err, rel=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_residual_level_0_is_the_flat_codebook_of_the_same_settings(digits: np.ndarray, metric: str) -> None:
    # init="auto" starts residual codebooks (level 0 too) from init="progressive"
    flat = fit_codebook(digits, 16, metric=metric, init="progressive", **KW)
    res = fit_codebook(digits, 16, metric=metric, codec="residual", levels=2, **KW)
    assert res.settings["init"] == "progressive"
    assert torch.equal(res.centroids[0], flat.centroids) and torch.equal(res.counts[0], flat.counts)
    assert torch.equal(res.level(0).centroids, flat.centroids) and res.level(0).metric == metric
    if metric == "cosine":  # decode reconstructs unit vectors
        norms = np.linalg.norm(res.decode(res.encode(digits)), axis=1)
        assert np.allclose(norms, 1, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_product_levels_are_independent_flat_fits_per_slice(digits: np.ndarray, metric: str) -> None:
    prod = fit_codebook(digits, 8, metric=metric, codec="product", levels=4, **KW)
    assert prod.centroids.shape == (4, 8, 16) and prod.dim == 64
    x = digits
    if metric == "cosine":
        x = normalize_rows(torch.from_numpy(digits)).numpy()  # rows are normalized first, as the fit does
    codes = prod.encode(digits)
    for lv in range(4):
        part = np.ascontiguousarray(x[:, lv * 16 : (lv + 1) * 16])
        flat = fit_codebook(part, 8, metric="l2", **KW)
        assert torch.equal(prod.centroids[lv], flat.centroids), lv
        assert prod.stats["levels"][lv]["iterations"] == flat.stats["iterations"]
        assert np.array_equal(codes[:, lv], flat.encode(part))
    dec = prod.decode(codes)
    want = np.concatenate([prod.centroids.numpy()[lv][codes[:, lv]] for lv in range(4)], axis=1)
    if metric == "cosine":
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(dec, want, atol=1e-6)


def test_beam_search_is_never_worse_than_greedy_and_better_on_average(digits: np.ndarray, residual: Codebook) -> None:
    greedy = residual.encode(digits)
    err_g = ((digits - residual.decode(greedy)) ** 2).sum(1)
    for beam in (2, 5):
        codes, dist = residual.encode(digits, beam=beam, return_distances=True)
        err_b = ((digits - residual.decode(codes)) ** 2).sum(1)
        assert (err_b <= err_g * (1 + 1e-5) + 1e-4).all()
        assert err_b.mean() < err_g.mean()
        assert np.allclose(dist, err_b, rtol=1e-4, atol=1e-3)  # the distance is to the reconstruction


def test_multi_level_files_round_trip_byte_for_byte_and_flat_files_keep_format_1_0(
    tmp_path: Path, digits: np.ndarray, residual: Codebook
) -> None:
    path = residual.save(tmp_path / "rq.safetensors")
    back = Codebook.load(path)
    assert back.to_bytes() == residual.to_bytes() and back.fingerprint == residual.fingerprint
    assert (back.codec, back.levels, back.n_codes, back.dim) == ("residual", 3, 16, 64)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    meta = json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"]
    assert (meta["format_version"], meta["codec"], meta["levels"]) == ("1.1", "residual", "3")
    flat = fit_codebook(digits[:200], 4, **KW)
    (n,) = struct.unpack("<Q", flat.to_bytes()[:8])
    flat_meta = json.loads(flat.to_bytes()[8 : 8 + n])["__metadata__"]
    assert flat_meta["format_version"] == "1.0" and "codec" not in flat_meta and "codec" not in flat.settings
    # A multi-level header that lies about its levels is refused, naming what it expected.
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"levels":"3"')
    raw[at : at + 12] = b'"levels":"4"'
    with pytest.raises(CodebookFileError, match=r"expected dtype F32 and shape \[4, 16, 64\]"):
        Codebook.from_bytes(bytes(raw))


def test_streamed_and_partitioned_multi_level_fits_equal_the_in_memory_fit(tmp_path: Path, digits: np.ndarray) -> None:
    files = []
    for i, part in enumerate(np.array_split(digits, 3)):
        f = tmp_path / f"p{i}.parquet"
        pl.DataFrame({"embedding": part}).write_parquet(f)
        files.append(f)

    for codec, levels in (("residual", 2), ("product", 4)):
        mem = fit_codebook(digits, 8, codec=codec, levels=levels, **KW)
        streamed = fit_tables(
            files, column="embedding", n_codes=8, codec=codec, levels=levels, data_budget=0, batch_rows=500, **KW
        )
        parted = fit_tables(
            files, column="embedding", n_codes=8, codec=codec, levels=levels, mapper=serial, scratch=tmp_path, **KW
        )
        assert streamed.stats["mode"] == "streamed" and parted.stats["mode"] == "partitioned"
        for got in (streamed, parted):
            assert got.codec == codec and got.centroids.shape == mem.centroids.shape
            # the same init sample would differ (streamed fits seed from a sample): compare by quality
            assert got.stats["mse"] == pytest.approx(mem.stats["mse"], rel=0.05)
        # streamed and partitioned read the same sample and run the same Lloyd: equal to float rounding
        assert torch.allclose(streamed.centroids, parted.centroids, atol=1e-4)
        assert torch.equal(streamed.counts, parted.counts)


@pytest.mark.parametrize("codec,levels", [("residual", 3), ("product", 4)])
def test_an_interrupted_multi_level_fit_resumes_to_the_same_codebook(
    tmp_path: Path, digits: np.ndarray, codec: str, levels: int
) -> None:
    data = tmp_path / "d.parquet"
    pl.DataFrame({"embedding": digits}).write_parquet(data)
    kwargs = dict(column="embedding", n_codes=8, codec=codec, levels=levels, data_budget=0, batch_rows=700, **KW)
    fresh: list = []
    want = fit_tables([data], progress=lambda e: fresh.append(e), **kwargs)
    n_fresh = sum(hasattr(e, "objective") for e in fresh)  # iterations of all levels
    ckpt = tmp_path / "fit.ckpt"
    assert n_fresh >= 6
    for stop_at in (2, n_fresh - 2):  # early (level 0 of residual; first rounds of product) and late
        events = []

        def stop(event, events=events, stop_at=stop_at) -> None:
            if hasattr(event, "objective"):
                events.append(event)
                if len(events) == stop_at:
                    raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fit_tables([data], checkpoint=ckpt, progress=stop, **kwargs)
        assert ckpt.exists()
        after: list = []
        got = fit_tables([data], checkpoint=ckpt, progress=lambda e: after.append(e), **kwargs)
        assert not ckpt.exists()
        # the rerun resumed: it did only the iterations the first run had not done
        assert sum(hasattr(e, "objective") for e in after) <= n_fresh - stop_at + 1
        assert torch.equal(got.centroids, want.centroids) and torch.equal(got.counts, want.counts)
        strip = {"created_at": "", "timings": {}}
        assert {**got.summary(), **strip} == {**want.summary(), **strip}


def test_bad_multi_level_settings_are_refused_before_any_work(digits: np.ndarray, residual: Codebook) -> None:
    with pytest.raises(
        InvalidInputError, match=r"levels=5 does not divide dim=64.*Fix: pick levels from the divisors of 64"
    ):
        fit_codebook(digits, 8, codec="product", levels=5, **KW)
    with pytest.raises(InvalidInputError, match=r"levels=3 with codec='flat'"):
        fit_codebook(digits, 8, levels=3, **KW)
    with pytest.raises(InvalidInputError, match=r"codec="):
        fit_codebook(digits, 8, codec="pq", levels=2, **KW)
    with pytest.raises(InvalidInputError, match=r"given init is supported for flat codebooks only"):
        fit_codebook(digits, 8, codec="residual", levels=2, init=torch.zeros(8, 64), **KW)
    with pytest.raises(InvalidInputError, match=r"top_k=2 with a residual codebook"):
        residual.encode(digits, top_k=2)
    prod = fit_codebook(digits[:300], 4, codec="product", levels=2, **KW)
    with pytest.raises(InvalidInputError, match=r"beam=3 with a product codebook"):
        prod.encode(digits, beam=3)
    with pytest.raises(InvalidInputError, match=r"codes.shape=\(5,\); expected \(n_rows, 3\)"):
        residual.decode(np.zeros(5, np.int64))
    with pytest.raises(InvalidInputError, match=r"codes\[1, 2\]=16 is out of range"):
        residual.decode(np.array([[0, 0, 0], [0, 0, 16]]))
    with pytest.raises(InvalidInputError, match=r"expected the same codec and levels"):
        residual.aligned_to(prod)
    s = pl.Series("codes", residual.encode(digits[:4]).tolist(), dtype=pl.List(pl.Int64))
    out = residual.decode(s)  # polars List rows in, polars Array out
    assert isinstance(out, pl.Series) and out.dtype == pl.Array(pl.Float32, 64)
    assert np.allclose(out.to_numpy(), residual.decode(residual.encode(digits[:4])))


def test_beam_residuals_keep_the_best_partial_tuples_of_a_brute_force_search() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g)
    prefix = torch.randn(2, 5, 3, generator=g)  # two levels of five codes: 25 tuples per row
    got = beam_residuals(x, prefix, 4, memory_budget=2**20).reshape(40, 4, 3)
    for row in range(40):
        # every (k0, k1) tuple's residual, exactly; a beam of 4 over 2 levels keeps the best 4 of
        # the extensions of level 0's best 4, which here (5 codes) is every tuple with k0 in the top 4
        r0 = x[row].double() - prefix[0].double()  # (5, 3)
        top0 = r0.square().sum(1).argsort()[:4]
        cands = [(float((r0[a] - prefix[1, b].double()).square().sum()), a, b) for a in top0.tolist() for b in range(5)]
        want = sorted(cands)[:4]
        norms = got[row].double().square().sum(1)
        assert torch.allclose(norms, torch.tensor([w[0] for w in want], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert beam_width(4, 5, 2) == 4 and beam_width(8, 2, 1) == 2 and beam_width(3, 5, 0) == 1


def test_residual_levels_are_fitted_on_the_beams_residuals(digits: np.ndarray) -> None:
    cb = fit_codebook(digits, 8, codec="residual", levels=2, train_beam=3, **KW)
    assert cb.settings["train_beam"] == 3
    rows = beam_residuals(torch.from_numpy(digits), cb.centroids[:1], 3, memory_budget=2**28)  # (3n, 64)
    assert rows.shape == (3 * 1797, 64)
    level1 = fit_codebook(rows, 8, init="progressive", **KW)
    assert torch.equal(cb.centroids[1], level1.centroids)
    # counts are the training rows' codes as encode gives them (greedy), one row each
    assert torch.equal(cb.counts[1], torch.bincount(torch.from_numpy(cb.encode(digits)[:, 1]), minlength=8))
    greedy = fit_codebook(digits, 8, codec="residual", levels=2, train_beam=1, **KW)
    assert torch.equal(greedy.centroids[0], cb.centroids[0]) and not torch.equal(greedy.centroids[1], cb.centroids[1])


def test_progressive_init_stops_each_step_by_the_fits_tol(digits: np.ndarray) -> None:
    """The progressive init's steps stop like the fit: at most N_ITER updates, fewer once an update lowers the
    step's objective by at most ``tol``. The keyword reaches every step (a tol no update can beat stops each
    step after its first update, which moves the result), and the fit passes its own ``tol``."""
    from vq_pipeline.compute.engines import get_engine
    from vq_pipeline.compute.progressive import progressive_dims

    x = torch.from_numpy(digits)
    eng = get_engine("torch", torch.device("cpu"), x.shape[1])

    def init(tol: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return progressive_dims(x, 16, generator=g, engine=eng, memory_budget=2**26, device=torch.device("cpu"), tol=tol)

    def objective(c: torch.Tensor) -> float:
        return float(torch.cdist(x.double(), c.double()).square().min(dim=1).values.sum())

    full, quick = init(0.0), init(1.0)
    assert torch.equal(full, init(0.0))  # deterministic
    assert not torch.equal(full, quick)
    assert objective(full) < objective(quick)
    # A fit's init follows its tol: the residual fit at tol=0 starts from the tol=0 init.
    fit = fit_codebook(x, 16, codec="residual", levels=1, init="progressive", n_iter=0, tol=0.0, seed=0)
    fit_q = fit_codebook(x, 16, codec="residual", levels=1, init="progressive", n_iter=0, tol=1.0, seed=0)
    assert not torch.equal(fit.centroids, fit_q.centroids)
