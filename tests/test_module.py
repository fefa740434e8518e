"""The pure-torch module: attention, embedder, latent, decoder, masking."""

from __future__ import annotations

import pytest
import torch

from scvi_cellplm import InputDataError
from scvi_cellplm.module import (
    CellPLMModule,
    FlowAttention,
    GMVAELatent,
    SampleNorm,
    SoftmaxAttention,
    VAELatent,
    normalize_coordinates,
    sample_input_mask,
    sample_kept_cells,
)
from scvi_cellplm.module.encoder import CellEncoder, pad_sentences


def _counts(n=40, g=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(n, g, generator=gen) * 3, generator=gen)


@pytest.mark.parametrize("attention", [FlowAttention, SoftmaxAttention])
def test_padded_sentences_equal_separate_runs(attention):
    """Several sentences in one padded call give what each gives alone."""
    torch.manual_seed(0)
    attn = attention(16, 4, 0.0).eval()
    a, b = torch.randn(1, 7, 16), torch.randn(1, 3, 16)
    alone_a = attn(a, torch.ones(1, 7, dtype=torch.bool))
    alone_b = attn(b, torch.ones(1, 3, dtype=torch.bool))
    padded = torch.zeros(2, 7, 16)
    padded[0], padded[1, :3] = a[0], b[0]
    valid = torch.zeros(2, 7, dtype=torch.bool)
    valid[0], valid[1, :3] = True, True
    together = attn(padded, valid)
    torch.testing.assert_close(together[0], alone_a[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(together[1, :3], alone_b[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_sentences", [1, 3])
def test_in_place_inference_equals_autograd_path_and_bf16_stays_close(n_sentences):
    """Embedding without autograd (in-place, chunked blocks; per-head products; weights cast
    once under autocast) gives the training-path result, and bfloat16 autocast stays close."""
    from scvi_cellplm.module import encoder as encoder_module

    torch.manual_seed(0)
    enc = CellEncoder(64, 2, 4, attention="flowformer", dropout=0.1).eval()
    h = torch.randn(50, 64)
    sentence = torch.arange(50) % n_sentences
    with torch.enable_grad():
        reference = enc(h.clone(), sentence).detach()
    chunk = encoder_module.CHUNK_TOKENS
    try:
        encoder_module.CHUNK_TOKENS = 16  # several chunks, a partial last one
        with torch.no_grad():
            in_place = enc(h.clone(), sentence)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = enc(h.clone(), sentence).float()
    finally:
        encoder_module.CHUNK_TOKENS = chunk
    torch.testing.assert_close(in_place, reference, atol=1e-5, rtol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(low, reference, dim=1)
    assert cosine.min() > 0.99
    assert not torch.equal(low, reference)  # bf16 really ran


def test_pad_sentences_round_trip():
    h = torch.randn(9, 4)
    sentence = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0])
    padded, valid, where = pad_sentences(h, sentence)
    assert padded.shape == (3, 4, 4)
    assert int(valid.sum()) == 9
    torch.testing.assert_close(padded[where], h)


def test_encoder_cells_attend_only_within_their_sentence():
    torch.manual_seed(0)
    enc = CellEncoder(16, 2, 4, attention="flowformer", dropout=0.0).eval()
    h = torch.randn(10, 16)
    sentence = torch.tensor([0] * 4 + [1] * 6)
    out = enc(h, sentence)
    h2 = h.clone()
    h2[4:] = torch.randn(6, 16)  # change only sentence 1
    out2 = enc(h2, sentence)
    torch.testing.assert_close(out[:4], out2[:4])
    assert not torch.allclose(out[4:], out2[4:])


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
@pytest.mark.parametrize("attention", ["flowformer", "sdpa"])
def test_module_shapes_and_deterministic_eval(latent, attention):
    torch.manual_seed(0)
    m = CellPLMModule(30, n_batch=2, n_hidden=16, n_layers=1, n_heads=2, n_latent=6,
                      n_clusters=3, latent_distribution=latent, attention=attention)
    x = _counts()
    tensors = {"X": x, "sentence": torch.tensor([0] * 15 + [1] * 25),
               "batch": torch.zeros(40, 1)}
    m.eval()
    inf1, gen1 = m(tensors, compute_loss=False)
    inf2, _ = m(tensors, compute_loss=False)
    assert inf1["qzm"].shape == (40, 6) and inf1["z"].dtype == torch.float32
    torch.testing.assert_close(inf1["z"], inf2["z"], rtol=0, atol=0)
    torch.testing.assert_close(gen1["px_scale"].sum(1), torch.ones(40))
    m.train()
    mask = sample_input_mask(tensors["sentence"], 30)
    _, _, loss = m(tensors, inference_kwargs={"input_mask": mask}, loss_kwargs={"input_mask": mask})
    assert torch.isfinite(loss.loss)
    loss.loss.backward()
    assert m.embedder.gene_table.grad is not None


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_inference_without_autograd_equals_autograd_on_large_sentences(latent):
    """Above one chunk of cells, inference without autograd (chunked latent layer, chunked
    library sums over sparse counts, in-place final norm) gives the autograd path's outputs."""
    torch.manual_seed(0)
    m = CellPLMModule(30, n_hidden=16, n_layers=1, n_heads=2, n_latent=6, n_clusters=3,
                      latent_distribution=latent).eval()
    n = 9000  # > 2 chunks of 4096
    x = _counts(n=n)
    sentence = torch.zeros(n, dtype=torch.long)
    with torch.enable_grad():
        reference = m.inference(x, sentence)
    with torch.no_grad():
        result = m.inference(x.to_sparse_csr(), sentence)
    for key in ("qzm", "z", "library", "h"):
        torch.testing.assert_close(result[key], reference[key].detach(), atol=1e-5, rtol=1e-5)
    assert result["latent_loss"].keys() == reference["latent_loss"].keys()
    for term, value in result["latent_loss"].items():
        torch.testing.assert_close(value, reference["latent_loss"][term].detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("density", [0.01, 0.7])  # sparse product / chunked dense product
def test_sparse_and_dense_inputs_embed_identically(density):
    torch.manual_seed(0)
    m = CellPLMModule(300, n_hidden=16, n_layers=1, n_heads=2, n_latent=6).eval()
    x = _counts(n=5000, g=300) * (torch.rand(5000, 300) < density)
    sentence = torch.arange(5000) // 700
    dense = m.inference(x, sentence)["qzm"]
    csr = m.inference(x.to_sparse_csr(), sentence)["qzm"]
    torch.testing.assert_close(dense, csr, atol=1e-5, rtol=1e-5)


def test_input_target_sum_embeds_relative_expression_of_dense_and_sparse_counts():
    """Scaled to one total, a cell read twice as deep embeds the same; raw counts (None) do not."""
    torch.manual_seed(0)
    x = _counts(n=40, g=50) * (torch.rand(40, 50) < 0.3)
    deeper = x.clone()
    deeper[:20] *= 3.0
    sentence = torch.arange(40) // 20
    for target, invariant in ((1e4, True), (None, False)):
        torch.manual_seed(0)
        m = CellPLMModule(50, n_hidden=16, n_layers=1, n_heads=2, n_latent=6, input_target_sum=target).eval()
        out = m.inference(x, sentence)
        same = torch.allclose(m.inference(deeper, sentence)["qzm"], out["qzm"], atol=1e-4, rtol=1e-4)
        assert same == invariant, target
        torch.testing.assert_close(m.inference(x.to_sparse_csr(), sentence)["qzm"], out["qzm"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["library"], x.sum(1))  # the decoder keeps the observed library
    with pytest.raises(InputDataError, match="input_target_sum"):
        CellPLMModule(50, input_target_sum=0.0)


def test_sample_norm_takes_out_what_a_sample_shares_and_keeps_what_its_cells_differ_in():
    """Tokens of one sample shifted and scaled feature by feature (a batch effect) normalise to the
    same tokens; differences between the cells of a sample survive; LayerNorm per cell does not
    remove the shift."""
    torch.manual_seed(0)
    norm = SampleNorm(8, prior_cells=0.0).eval()
    h = torch.randn(50, 8)
    shifted = h * (1 + torch.rand(8)) + 3 * torch.randn(8)
    with torch.no_grad():
        out = norm(torch.cat([h, shifted]), torch.arange(100) // 50)
        torch.testing.assert_close(out[:50], out[50:], atol=2e-3, rtol=2e-3)  # up to eps
        assert out[:50].std(0).min() > 0.1  # the cells still differ
        layer = torch.nn.functional.layer_norm(torch.cat([h, shifted]), (8,))
    assert (layer[:50] - layer[50:]).abs().max() > 0.5


def test_sample_norm_gives_one_cells_sentence_a_defined_token_and_learns_population_statistics():
    torch.manual_seed(0)
    norm = SampleNorm(8)
    before = norm.running_mean.clone()
    norm(torch.randn(64, 8) + 5, torch.zeros(64))  # training: the running statistics move
    assert not torch.equal(norm.running_mean, before)
    norm.requires_grad_(False)  # frozen (a query model's reference part): so are its statistics
    frozen = norm.running_mean.clone()
    norm(torch.randn(64, 8) - 5, torch.zeros(64))
    assert torch.equal(norm.running_mean, frozen)
    norm.eval()
    after = norm.running_mean.clone()
    with torch.no_grad():
        single = norm(torch.randn(2, 8) + 5, torch.arange(2))  # two one-cell sentences
    assert torch.equal(norm.running_mean, after)  # not at inference
    assert torch.isfinite(single).all() and not torch.allclose(single[0], single[1])


def test_sample_norm_module_output_depends_on_the_sentence_not_on_the_mini_batch(monkeypatch):
    """With token_norm="sample" a cell's embedding is set by its own sentence: the same in any
    row order, next to any other sentence, chunked or not; a sentence with other cells moves it."""
    from scvi_cellplm.module import _norm

    torch.manual_seed(0)
    m = CellPLMModule(30, n_hidden=16, n_layers=1, n_heads=2, n_latent=6, latent_distribution="vae",
                      token_norm="sample").eval()
    assert m.sample_norm is not None and "embedder.norm.weight" not in m.state_dict()
    x, sentence = _counts(n=60), torch.arange(60) // 20
    with torch.no_grad():
        z = m.inference(x, sentence)["qzm"]
        perm = torch.randperm(60)
        torch.testing.assert_close(m.inference(x[perm], sentence[perm])["qzm"], z[perm], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.inference(x[:20], sentence[:20])["qzm"], z[:20], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m.inference(x[:20], torch.arange(20) // 10)["qzm"], z[:20], atol=1e-3)
        monkeypatch.setattr(_norm, "CHUNK_CELLS", 7)
        torch.testing.assert_close(m.inference(x, sentence)["qzm"], z, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():
        torch.testing.assert_close(m.inference(x, sentence)["qzm"].detach(), z, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputDataError, match="token_norm"):
        CellPLMModule(30, token_norm="batch")


@pytest.mark.parametrize("sparse", [True, False])
def test_bf16_expression_products_stay_close_and_centring_stays_float32(sparse):
    """Under bf16 autocast at inference the dense products (densified chunks of sparse input,
    or dense input) run in bf16 (close to float32, not equal); with a centre the expression
    stays float32 (the subtraction would expose bf16 rounding)."""
    from scvi_cellplm.module.embedder import GeneEmbedder

    torch.manual_seed(0)
    emb = GeneEmbedder(300, 64, dropout=0.0, norm="layernorm").eval()
    x = _counts(n=500, g=300) * (torch.rand(500, 300) < 0.5)
    x = x.to_sparse_csr() if sparse else x
    center = torch.rand(300)
    with torch.no_grad():
        reference = emb.expression(x)
        centred = emb.expression(x, center=center)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = emb.expression(x)
            low_centred = emb.expression(x, center=center)
    assert low.dtype == torch.float32
    assert not torch.equal(low, reference)  # bf16 really ran
    assert torch.nn.functional.cosine_similarity(low, reference, dim=1).min() > 0.999
    torch.testing.assert_close(low_centred, centred)


def test_genes_outside_vocabulary_are_ignored():
    """The gene index comes with each call: columns outside the vocabulary (-1) change nothing,
    are predicted as 0, and the same cells in vocabulary order give the same embedding."""
    torch.manual_seed(0)
    index = torch.tensor([0, 1, -1, 3])
    m = CellPLMModule(5, n_hidden=8, n_layers=1, n_heads=2, n_latent=4).eval()
    x = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    x_other = x.clone()
    x_other[0, 2] = 50.0  # an unmatched gene must not change anything
    s = torch.zeros(1, dtype=torch.long)
    z = m.inference(x, s, gene_index=index)["qzm"]
    torch.testing.assert_close(z, m.inference(x_other, s, gene_index=index)["qzm"])
    in_vocabulary_order = torch.tensor([[1.0, 2.0, 0.0, 3.0, 0.0]])
    torch.testing.assert_close(z, m.inference(in_vocabulary_order, s)["qzm"])
    scale = m.generative(m.inference(x, s, gene_index=index)["z"], torch.tensor([6.0]),
                         gene_index=index)["px_scale"]
    assert scale[0, 2] == 0 and torch.isclose(scale.sum(), torch.tensor(1.0))


def test_vae_and_gmvae_sample_only_in_training():
    h = torch.randn(5, 12)
    for layer in (VAELatent(12, 4), GMVAELatent(12, 4, 3)):
        a = layer(h, sample=False)["z"]
        torch.testing.assert_close(a, layer(h, sample=False)["z"], rtol=0, atol=0)
        assert not torch.allclose(layer(h, sample=True)["z"], a)


def test_gmvae_embedding_is_the_posterior_mean_over_its_mixture():
    """Default: sum over clusters of q(y|h) times E[z|h,y]; "cluster": E[z|h,y] at the most likely y."""
    torch.manual_seed(0)
    layer, h = GMVAELatent(12, 4, 3).eval(), torch.randn(7, 12)
    out = layer(h, sample=False)
    means = torch.stack([
        layer.mean(torch.relu(layer.hidden(torch.cat([h, torch.eye(3)[k].expand(7, 3)], 1)))) for k in range(3)
    ], 1)
    probs = out["cluster_probs"]
    torch.testing.assert_close(out["qzm"], (probs.unsqueeze(-1) * means).sum(1))
    torch.testing.assert_close(out["z"], out["qzm"])
    assert (out["qzv"] >= 0).all()
    layer.embedding = "cluster"
    cluster = layer(h, sample=False)
    torch.testing.assert_close(cluster["qzm"], means[torch.arange(7), probs.argmax(1)])
    for term in ("kl_gaussian", "kl_categorical"):  # evaluation losses do not depend on the rule
        torch.testing.assert_close(out[term], cluster[term])
    with pytest.raises(InputDataError, match="gmvae_embedding"):
        GMVAELatent(12, 4, 3, embedding="mode")


def test_gmvae_mean_embedding_moves_smoothly_between_clusters():
    """Along a path between two cells, the mean embedding has no jump where the cluster changes."""
    torch.manual_seed(0)
    layer = GMVAELatent(12, 4, 3).eval()
    a, b = 3 * torch.randn(12), 3 * torch.randn(12)
    path = torch.stack([a + t * (b - a) for t in torch.linspace(0, 1, 401)])
    with torch.no_grad():
        assert layer(path, sample=False)["cluster_probs"].argmax(1).unique().numel() > 1  # crosses a boundary
    for rule, bounded in (("mean", True), ("cluster", False)):
        layer.embedding = rule
        with torch.no_grad():
            steps = layer(path, sample=False)["qzm"].diff(dim=0).norm(dim=1)
        assert (steps.max() < 5 * steps.median()) == bounded, rule


def test_input_mask_rates_per_sentence():
    sentence = torch.tensor([0] * 400 + [1] * 100)
    gen = torch.Generator().manual_seed(0)
    mask = sample_input_mask(sentence, 200, mask_cell_rate=0.75, mask_gene_rate=0.25,
                             beta_ratio=False, generator=gen)
    masked_cells = mask.any(1)
    assert int(masked_cells[:400].sum()) == 300 and int(masked_cells[400:].sum()) == 75
    assert abs(mask[masked_cells].float().mean().item() - 0.25) < 0.02
    beta = sample_input_mask(sentence, 200, generator=gen)
    expected = 5 / (2 + 4 / 0.25)  # mean of the official Beta(5, 4 / rate - 3)
    assert abs(beta[beta.any(1)].float().mean().item() - expected) < 0.03


def test_cell_dropout_keeps_every_sentence():
    sentence = torch.tensor([0] * 10 + [1] * 1 + [2] * 5)
    keep = sample_kept_cells(sentence, drop_cell_rate=0.3)
    kept = sentence[keep]
    assert int((kept == 0).sum()) == 7 and int((kept == 1).sum()) == 1
    assert int((kept == 2).sum()) == 4


def test_coordinate_normalisation_is_translation_and_scale_invariant():
    coords = torch.rand(20, 2) * 100
    sentence = torch.tensor([0] * 10 + [1] * 10)
    ref = normalize_coordinates(coords, sentence)
    moved = normalize_coordinates(coords * 7.5 + torch.tensor([300.0, -20.0]), sentence)
    torch.testing.assert_close(ref, moved, atol=1e-5, rtol=1e-5)
    assert ref.min() >= 0 and ref.max() <= 1 + 1e-6


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_positional_encoding_reaches_the_output(kind):
    torch.manual_seed(0)
    m = CellPLMModule(30, n_hidden=16, n_layers=1, n_heads=2, n_latent=6,
                      positional_encoding=kind).eval()
    x, s = _counts(), torch.zeros(40, dtype=torch.long)
    coords = torch.rand(40, 2)
    z = m.inference(x, s, coords)["qzm"]
    z_shuffled = m.inference(x, s, coords[torch.randperm(40)])["qzm"]
    z_scaled = m.inference(x, s, coords * 1000 + 5)["qzm"]
    assert not torch.allclose(z, z_shuffled, atol=1e-4)
    torch.testing.assert_close(z, z_scaled, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="coordinates"):
        m.inference(x, s)


def test_position_dropout_hides_whole_sentences_in_training_only():
    from scvi_cellplm.train import CellPLMTrainingPlan

    torch.manual_seed(0)
    m = CellPLMModule(30, n_hidden=16, n_layers=1, n_heads=2, n_latent=6, positional_encoding="sinusoidal")
    plan = CellPLMTrainingPlan(m, drop_position_rate=0.5, drop_cell_rate=0.0)
    sentence = torch.arange(40) // 2  # 20 sentences of 2 cells
    batch = {"X": _counts(), "sentence": sentence, "spatial": torch.rand(40, 2)}
    hidden = plan._corrupt(batch, drop_cells=True)[0]["spatial"].isnan().all(dim=1)
    per_sentence = torch.zeros(20).index_add_(0, sentence, hidden.float())
    assert set(per_sentence.tolist()) == {0.0, 2.0}  # both cells of a sentence or neither
    assert 0 < int(per_sentence.bool().sum()) < 20
    assert not plan._corrupt(batch, drop_cells=False)[0]["spatial"].isnan().any()  # validation
    with pytest.raises(ValueError, match="drop_position_rate"):
        CellPLMTrainingPlan(m, drop_position_rate=1.5)


def test_inference_chunks_are_small_on_cpu_and_large_bounded_on_accelerators():
    """Row chunks of the inference path: the CPU size on a CPU; on an accelerator large, but a
    chunk of a wide temporary stays within GPU_CHUNK_ELEMENTS, and never below the CPU size."""
    from scvi_cellplm.module._chunks import GPU_CHUNK_ELEMENTS, GPU_CHUNK_ROWS, rows_per_chunk

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rows_per_chunk(2048, cpu, 2048) == 2048
    assert rows_per_chunk(2048, cuda) == GPU_CHUNK_ROWS
    wide = rows_per_chunk(4096, cuda, 20_000)
    assert 4096 < wide < GPU_CHUNK_ROWS and wide * 20_000 <= GPU_CHUNK_ELEMENTS
    assert rows_per_chunk(4096, cuda, 10**9) == 4096
