"""Stable code numbers across refits (:mod:`vq_pipeline.compute.align`, :meth:`Codebook.aligned_to`).

Oracles: brute force over every renumbering (small code counts), hand-computed cases where the
centroid matching and the co-occurrence matching disagree, and the invariant that an alignment only
renumbers (same cells, same centroids, same counts).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_pipeline import Codebook, DimensionMismatchError, InvalidInputError, fit_codebook
from vq_pipeline.compute.align import align_codebook, cooccurrence, kept_rows, match_by_cooccurrence, match_codes
from vq_pipeline.jobs.demo import generate_embeddings


def best_kept(codes: np.ndarray, ref_codes: np.ndarray, n_codes: int) -> int:
    """Brute force: the most rows any renumbering (a permutation of 0..n_codes-1) keeps in their code."""
    return max(kept_rows(codes, ref_codes, np.array(p)) for p in itertools.permutations(range(n_codes)))


def assert_renumbering(aligned: Codebook, new: Codebook, x: torch.Tensor) -> np.ndarray:
    """``aligned`` is ``new`` with its codes renumbered: the returned mapping is a permutation, the
    centroids and counts are moved bit for bit, and every row of ``x`` lands in the same cell."""
    mapping = np.array(aligned.stats["alignment"]["mapping"])
    assert sorted(mapping.tolist()) == list(range(new.n_codes))
    assert torch.equal(aligned.centroids[torch.from_numpy(mapping)], new.centroids)
    assert torch.equal(aligned.counts[torch.from_numpy(mapping)], new.counts)
    assert aligned.metric == new.metric and aligned.settings == new.settings
    assert aligned.parent_fingerprint == new.parent_fingerprint and aligned.data_fingerprint == new.data_fingerprint
    codes_new, codes_aligned = new.encode(x, engine="torch"), aligned.encode(x, engine="torch")
    assert torch.equal(codes_aligned, torch.from_numpy(mapping)[codes_new])  # the same partition, renamed
    return mapping


# ----------------------------------------------------------------------------- the matching itself


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_codes=st.integers(1, 5),
    n_ref=st.integers(1, 5),
    n_rows=st.integers(0, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_cooccurrence_matching_keeps_the_most_rows(n_codes: int, n_ref: int, n_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes, ref_codes = rng.integers(n_codes, size=n_rows), rng.integers(n_ref, size=n_rows)
    # Skewed tables too: most rows on a hidden renumbering.
    hidden = rng.permutation(max(n_codes, n_ref))
    ref_codes = np.where(rng.random(n_rows) < 0.5, ref_codes, hidden[codes] % n_ref)
    table = cooccurrence(codes, ref_codes, n_codes, n_ref)
    assert table.shape == (n_codes, n_ref) and table.sum() == n_rows
    mapping = match_by_cooccurrence(table, rng.random((n_codes, n_ref)))
    assert sorted(mapping.tolist()) == list(range(n_codes))
    assert kept_rows(codes, ref_codes, mapping) == best_kept(codes, ref_codes, n_codes)
    assert np.array_equal(match_by_cooccurrence(table), match_by_cooccurrence(table))  # deterministic


def test_rectangular_tables_hand_computed() -> None:
    # More new codes than reference numbers: 0 -> 0, 2 -> 1, and the unmatched code 1 takes number 2.
    table = np.array([[5, 0], [0, 0], [1, 4]])
    assert match_by_cooccurrence(table).tolist() == [0, 2, 1]
    # Two unmatched codes take the unused numbers in the order of their own index.
    assert match_codes(np.array([[0.0, 0.0], [0.0, 9.0], [0.0, 0.0], [7.0, 0.0]]), maximize=True).tolist() == [
        2,
        1,
        3,
        0,
    ]
    # Fewer new codes: reference number 2 does not exist in the new codebook, whatever it holds.
    table = np.array([[0, 0, 9], [3, 1, 0]])
    assert match_by_cooccurrence(table).tolist() == [1, 0]
    # Ties in the rows are broken by centroid distance: code 1 is nearer reference number 0.
    assert match_by_cooccurrence(np.zeros((2, 2), dtype=np.int64), np.array([[5.0, 1.0], [1.0, 5.0]])).tolist() == [
        1,
        0,
    ]


# ----------------------------------------------------------------------------- codebooks


def test_a_shuffled_copy_is_put_back_in_order_by_both_methods() -> None:
    x = torch.from_numpy(generate_embeddings(3000, 16, 12, seed=0))
    ref = fit_codebook(x, 12, seed=0, engine="torch")
    perm = torch.from_numpy(np.random.default_rng(1).permutation(12))
    shuffled = Codebook(centroids=ref.centroids[perm], counts=ref.counts[perm], metric=ref.metric)
    assert shuffled.fingerprint != ref.fingerprint
    for aligned in (shuffled.aligned_to(ref, x, engine="torch"), shuffled.aligned_to(ref)):
        assert torch.equal(aligned.centroids, ref.centroids) and torch.equal(aligned.counts, ref.counts)
        assert aligned.fingerprint == ref.fingerprint
        a = aligned.stats["alignment"]
        assert a["mapping"] == perm.tolist() and a["renumbered"] == 12 - int((perm == torch.arange(12)).sum())
        assert a["reference"] == ref.fingerprint and a["unaligned_fingerprint"] == shuffled.fingerprint
    a = shuffled.aligned_to(ref, x, engine="torch").stats["alignment"]
    assert a["method"] == "cooccurrence" and a["rows"] == 3000 and a["kept"] == 1.0 and a["churn"] == 0.0
    assert a["kept_unaligned"] < 0.5
    assert shuffled.aligned_to(ref).stats["alignment"]["method"] == "centroids"


def test_cooccurrence_and_centroid_matching_disagree_hand_computed() -> None:
    """1-d: reference codes at 0 and 10 (boundary 5), new codes at 6 and 30 (boundary 18). Closest
    centroids pair 6 with 0 (36 + 400 < 16 + 900), but most rows (7..13) lie in new cell 6 and
    reference cell 10: co-occurrence pairs 6 with 10 and keeps 7 of 10 rows, against 3."""
    ref = Codebook(centroids=torch.tensor([[0.0], [10.0]]), counts=torch.tensor([2, 8]), metric="l2")
    new = Codebook(centroids=torch.tensor([[6.0], [30.0]]), counts=torch.tensor([9, 1]), metric="l2")
    x = torch.tensor([[1.0], [2.0], [7.0], [8.0], [9.0], [10.0], [11.0], [12.0], [13.0], [25.0]])
    by_centroids = new.aligned_to(ref, x, method="centroids", engine="torch")
    by_rows = new.aligned_to(ref, x, engine="torch")
    assert by_centroids.stats["alignment"]["mapping"] == [0, 1] and by_centroids.stats["alignment"]["kept"] == 0.3
    assert by_rows.stats["alignment"]["mapping"] == [1, 0] and by_rows.stats["alignment"]["kept"] == 0.7
    assert by_rows.centroids.tolist() == [[30.0], [6.0]] and by_rows.counts.tolist() == [1, 9]
    assert by_rows.stats["alignment"]["kept_unaligned"] == 0.3 and by_rows.stats["alignment"]["churn"] == pytest.approx(
        0.3
    )
    codes, ref_codes = new.encode(x).numpy(), ref.encode(x).numpy()
    assert round(0.7 * len(x)) == best_kept(codes, ref_codes, 2)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n_codes,n_ref", [(5, 5), (6, 4), (4, 6)])
def test_refits_are_renumbered_to_the_best_numbering(metric: str, n_codes: int, n_ref: int) -> None:
    x = torch.from_numpy(generate_embeddings(2000, 8, 6, seed=3))
    ref = fit_codebook(x, n_ref, metric=metric, seed=0, engine="torch")
    new = fit_codebook(x, n_codes, metric=metric, seed=11, engine="torch")
    aligned = new.aligned_to(ref, x, engine="torch")
    mapping = assert_renumbering(aligned, new, x)
    codes, ref_codes = new.encode(x).numpy(), ref.encode(x).numpy()
    kept = kept_rows(codes, ref_codes, mapping)
    assert kept == best_kept(codes, ref_codes, n_codes) and aligned.stats["alignment"]["kept"] == kept / len(x)
    assert kept_rows(aligned.encode(x).numpy(), ref_codes) == kept
    by_centroids = new.aligned_to(ref, x, method="centroids", engine="torch")
    assert_renumbering(by_centroids, new, x)
    assert by_centroids.stats["alignment"]["kept"] <= aligned.stats["alignment"]["kept"]
    # Numpy rows give the same result, twice over: deterministic.
    again = new.aligned_to(ref, x.numpy(), engine="torch")
    assert again.to_bytes() == aligned.to_bytes()


def test_cooccurrence_keeps_more_rows_than_centroid_matching_on_held_out_data() -> None:
    train = torch.from_numpy(generate_embeddings(6000, 32, 24, seed=1))
    held_out = torch.from_numpy(generate_embeddings(4000, 32, 24, seed=2))
    ref = fit_codebook(train, 32, seed=0, engine="torch")
    new = fit_codebook(train, 32, seed=1, engine="torch")
    by_rows = new.aligned_to(ref, train, engine="torch")
    by_centroids = new.aligned_to(ref, method="centroids")
    ref_codes, new_codes = ref.encode(held_out).numpy(), new.encode(held_out).numpy()
    kept = {
        name: kept_rows(cb.encode(held_out).numpy(), ref_codes) / len(held_out)
        for name, cb in {"none": new, "centroids": by_centroids, "cooccurrence": by_rows}.items()
    }
    # The best any renumbering can do on these very rows (the cells differ: no numbering keeps them all).
    best = kept_rows(new_codes, ref_codes, match_by_cooccurrence(cooccurrence(new_codes, ref_codes, 32, 32)))
    kept["best"] = best / len(held_out)
    assert kept["best"] - 0.01 <= kept["cooccurrence"] <= kept["best"], kept
    assert kept["cooccurrence"] >= kept["centroids"] and kept["none"] < 0.2, kept


def test_the_alignment_is_saved_and_read_back_byte_exact(tmp_path) -> None:
    x = torch.from_numpy(generate_embeddings(1500, 8, 6, seed=4))
    ref = fit_codebook(x, 6, seed=0, engine="torch")
    aligned = fit_codebook(x, 6, seed=5, engine="torch").aligned_to(ref, x, engine="torch")
    loaded = Codebook.load(aligned.save(tmp_path / "aligned.safetensors"))
    assert loaded.stats["alignment"] == aligned.stats["alignment"] and loaded.to_bytes() == aligned.to_bytes()
    assert (tmp_path / "aligned.safetensors").read_bytes() == aligned.to_bytes()
    assert json.loads(aligned.to_metadata()["stats"])["alignment"]["reference"] == ref.fingerprint
    # A file without an alignment (every file written before it existed) still loads, and aligns.
    plain = Codebook.load(ref.save(tmp_path / "plain.safetensors"))
    assert "alignment" not in plain.stats and plain.to_bytes() == ref.to_bytes()
    assert plain.aligned_to(loaded, x, engine="torch").stats["alignment"]["reference"] == loaded.fingerprint


def test_what_cannot_be_aligned_is_refused_with_a_fix() -> None:
    x = torch.from_numpy(generate_embeddings(500, 8, 4, seed=0))
    l2 = fit_codebook(x, 4, engine="torch")
    with pytest.raises(InvalidInputError, match=r"reference metric='cosine' but this codebook has metric='l2'.*Fix:"):
        l2.aligned_to(fit_codebook(x, 4, metric="cosine", engine="torch"))
    with pytest.raises(DimensionMismatchError, match=r"reference dim=4 but this codebook has dim=8.*Fix:"):
        l2.aligned_to(fit_codebook(x[:, :4].contiguous(), 4, engine="torch"))
    with pytest.raises(InvalidInputError, match=r"method='cooccurrence' with x=None.*Fix:"):
        l2.aligned_to(l2, method="cooccurrence")
    with pytest.raises(InvalidInputError, match=r"method='nearest'"):
        l2.aligned_to(l2, x, method="nearest")
    with pytest.raises(DimensionMismatchError):
        l2.aligned_to(l2, x[:, :4].contiguous())
    with pytest.raises(InvalidInputError, match=r"code pairs.*Fix:"):
        big = Codebook(centroids=torch.randn(8200, 8), counts=torch.zeros(8200, dtype=torch.int64), metric="l2")
        big.aligned_to(big)
    assert align_codebook(l2, l2, x).stats["alignment"]["renumbered"] == 0


@pytest.mark.parametrize("codec", ["residual", "product"])
def test_multi_level_codebooks_are_renumbered_level_by_level(codec: str) -> None:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data.astype("float32"))
    ref = fit_codebook(x, 8, codec=codec, levels=2, seed=0, engine="torch", device="cpu")
    perms = [torch.randperm(8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    shuffled = Codebook(
        centroids=torch.stack([ref.centroids[lv][p] for lv, p in enumerate(perms)]),
        counts=torch.stack([ref.counts[lv][p] for lv, p in enumerate(perms)]),
        metric=ref.metric,
        codec=codec,
    )
    assert np.array_equal(shuffled.decode(shuffled.encode(x)), ref.decode(ref.encode(x)))  # same cells
    for aligned in (shuffled.aligned_to(ref, x, engine="torch"), shuffled.aligned_to(ref)):
        # a pure renumbering is undone exactly, level by level
        assert torch.equal(aligned.centroids, ref.centroids) and torch.equal(aligned.counts, ref.counts)
    record = shuffled.aligned_to(ref, x, engine="torch").stats["alignment"]
    assert record["kept"] == 1.0 and record["kept_per_level"] == [1.0, 1.0] and record["kept_unaligned"] < 1.0
    assert [sorted(m) for m in record["mapping"]] == [list(range(8))] * 2
    with pytest.raises(InvalidInputError, match="expected the same codec and levels"):
        shuffled.aligned_to(fit_codebook(x, 8, seed=0, engine="torch", device="cpu"))
