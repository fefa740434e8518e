"""Regression guards for inference cost (structural, not timed)."""

from __future__ import annotations

import numpy as np
import pytest

import scvi_cellplm.module.encoder as encoder_mod


def test_embedding_never_runs_the_decoder(trained_small, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("decoder called while embedding")

    monkeypatch.setattr(trained_small.module.decoder, "forward", boom)
    z = trained_small.get_latent_representation()
    assert np.isfinite(z).all()
    with pytest.raises(AssertionError, match="decoder called"):
        trained_small.get_normalized_expression()


def test_encoder_memory_is_bounded_by_the_window(trained_small, small_pancreas, monkeypatch):
    """Every padded activation holds at most ``max_cells_per_batch`` tokens, however many cells."""
    sizes = []
    original = encoder_mod.pad_sentences

    def spy(h, sentence):
        padded, valid, where = original(h, sentence)
        sizes.append(padded.shape[0] * padded.shape[1])
        return padded, valid, where

    monkeypatch.setattr(encoder_mod, "pad_sentences", spy)
    trained_small.max_cells_per_batch = 64
    z = trained_small.get_latent_representation(batch_size=64)
    assert z.shape[0] == small_pancreas.n_obs
    assert max(sizes) <= 64 and len(sizes) >= small_pancreas.n_obs // 64

