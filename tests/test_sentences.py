"""Sentences: windows, packing, sampler."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_cellplm.data import SentenceSampler, bisect_windows, make_sentences, pack_sentences


@pytest.mark.parametrize(("n", "max_cells"), [(1, 5), (10, 10), (1001, 100), (5000, 333)])
def test_windows_cover_every_cell_once_within_budget(n, max_cells):
    coords = np.random.default_rng(0).random((n, 2))
    windows = bisect_windows(coords, max_cells)
    flat = np.concatenate(windows)
    assert sorted(flat.tolist()) == list(range(n))
    assert max(len(w) for w in windows) <= max_cells
    assert len(windows) == int(np.ceil(n / max_cells))


def test_windows_are_spatially_contiguous():
    """Windows of a grid are compact blocks, unlike consecutive-index chunks of shuffled cells."""
    rng = np.random.default_rng(0)
    coords = rng.permutation(np.stack(np.meshgrid(np.arange(40), np.arange(40)), -1).reshape(-1, 2))
    windows = bisect_windows(coords.astype(float), 400)
    spread = np.mean([coords[w].std(0).sum() for w in windows])
    chunks = np.array_split(np.arange(len(coords)), 4)
    spread_chunks = np.mean([coords[c].std(0).sum() for c in chunks])
    assert spread < 0.6 * spread_chunks


def test_sentences_never_mix_samples():
    codes = np.repeat([0, 1, 2], [50, 300, 20])
    feats = np.random.default_rng(0).random((370, 3))
    sentences = make_sentences(codes, 100, lambda m: bisect_windows(feats[m], 100))
    for s in sentences:
        assert len(np.unique(codes[s])) == 1
        assert len(s) <= 100
    assert sorted(np.concatenate(sentences).tolist()) == list(range(370))


def test_oversized_sample_without_features_is_an_error():
    with pytest.raises(ValueError, match="max_cells_per_batch"):  # no windower given
        make_sentences(np.zeros(10, dtype=int), 5)


def test_packing_keeps_sentences_whole():
    sentences = [np.arange(a, b) for a, b in [(0, 30), (30, 80), (80, 90), (90, 190)]]
    batches = pack_sentences(sentences, 100)
    assert sum(len(b) for b in batches) == 4
    for b in batches:
        assert sum(len(sentences[i]) for i in b) <= 100 or len(b) == 1


def test_sampler_shuffles_by_epoch_and_partitions_ranks():
    sentences = [np.arange(i * 10, i * 10 + 10) for i in range(9)]
    s = SentenceSampler(sentences, 20, shuffle=True, seed=1)
    s.set_epoch(0)
    e0 = [np.concatenate(b).tolist() for b in s]
    s.set_epoch(1)
    e1 = [np.concatenate(b).tolist() for b in s]
    assert e0 != e1
    assert sorted(sum(e0, [])) == list(range(90))
    ranks = [SentenceSampler(sentences, 20, shuffle=True, seed=1, num_replicas=2, rank=r,
                             pad=False) for r in range(2)]
    seen = [c for r in ranks for b in r for c in np.concatenate(b).tolist()]
    assert sorted(seen) == list(range(90))
