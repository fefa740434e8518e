# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Official CellPLM checkpoints
#
# The CellPLM authors release pretrained weights with their package (OmicsML/CellPLM) as a pair
# of files, `PREFIX.config.json` and `PREFIX.best.ckpt` — for example `20231027_85M`.
# scvi-cellplm loads such a pair with `CellPLM.from_official`, reproduces the official package's
# embeddings, and writes models back with `to_official`.
#
# This notebook has no internet access and does not ship the 85M-parameter weights, so it first
# **makes** a small checkpoint with the official package itself (random weights, the official
# file layout). With a real checkpoint, skip section 1 and point `from_official` at the files
# you downloaded from the authors' release; everything else is the same.
#
# It needs the official package: `pip install --no-deps cellplm==0.1.0.post2` (installed by
# this project's `test` and `docs` environments).

# %%
import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without widgets
logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0"

import matplotlib.pyplot as plt
import numpy as np
import scvi
import torch

import scvi_cellplm
from scvi_cellplm import CellPLM

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
    logging.getLogger(name).setLevel(logging.WARNING)
scvi.settings.seed = 0

# %% [markdown]
# ## 1. A checkpoint made by the official package
#
# The official configuration of `20231027_85M` has 4 × 1024 Flowformer layers, a VAE latent of
# 512 and 19,374 genes. Ours keeps its layout and every switch, at a size that builds in a second:
# 2 × 64 layers, a VAE latent of 16, and as gene vocabulary the Ensembl ids of the bundled
# pancreas data.

# %%
from CellPLM.model import OmicsFormer  # the official package

adata = scvi_cellplm.datasets.pancreas_demo()  # symbols in var_names, Ensembl ids in var["gene_ids"]
vocabulary = sorted(set(adata.var["gene_ids"]) - {""})

config = {
    "name": "tutorial_small", "enc_mod": "flowformer", "enc_hid": 64, "enc_layers": 2,
    "enc_head": 4, "latent_mod": "vae", "lamda": 5.0, "post_latent_dim": 16,
    "dec_mod": "nbmlp", "dec_hid": 48, "dec_layers": 2, "model_dropout": 0.2,
    "mask_node_rate": 0.75, "mask_feature_rate": 0.25, "drop_node_rate": 0.3,
    "norm": "groupnorm", "w_li": 5.0, "w_en": 5.0, "num_clusters": 8,
    "out_dim": len(vocabulary), "cat_pe": False, "max_batch_size": 4000, "dar": False,
    "input_covariate": False, "ecs": False, "dsbn": False, "dae": True, "mask_beta": True,
    "batch_num": 7, "dataset_num": 3, "gene_list": vocabulary,
}

torch.manual_seed(0)
official = OmicsFormer(**config).eval()
with torch.no_grad():  # random, non-trivial weights everywhere (norms included)
    for name, p in official.named_parameters():
        if "pe_enc.pe_enc" not in name:
            p.add_(torch.randn_like(p) * 0.05)

ckpt = Path("ckpt")
ckpt.mkdir(exist_ok=True)
(ckpt / "tutorial_small.config.json").write_text(json.dumps(config))
torch.save({"model_state_dict": official.state_dict()}, ckpt / "tutorial_small.best.ckpt")
sorted(p.name for p in ckpt.iterdir())

# %% [markdown]
# ## 2. The official pipeline's embedding
#
# The reference: the official `CellEmbeddingPipeline`, which wants Ensembl ids as `var_names` and
# treats each value of `obs["batch"]` as one group of cells attending to each other.


# %%
def official_embedding(prefix: str, adata) -> np.ndarray:
    """Embeddings by the official package (its progress output silenced)."""
    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline

    ensembl = adata[:, adata.var["gene_ids"] != ""].copy()
    ensembl.var_names = ensembl.var["gene_ids"].astype(str).to_numpy()
    ensembl.X = ensembl.layers["counts"]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = CellEmbeddingPipeline(pretrain_prefix=prefix, pretrain_directory=str(ckpt))
        z = pipeline.predict(ensembl, device="cpu", ensembl_auto_conversion=False)
    return z.cpu().numpy()


reference = official_embedding("tutorial_small", adata)
reference.shape

# %% [markdown]
# ## 3. Loading it in scvi-cellplm
#
# Three lines. `setup_anndata` registers raw counts and the batch; the genes may be Ensembl ids
# or, as here, **symbols**: they are matched to the checkpoint's Ensembl vocabulary by identifier
# (never by column position), with tables shipped in the package, offline. Vocabulary genes the
# data lacks would be unmeasured, genes outside the vocabulary dropped;
# `model.gene_alignment(adata).summary()` reports the match.

# %%
CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
model = CellPLM.from_official("ckpt/tutorial_small", adata)
adata.obsm["X_cellplm"] = model.get_latent_representation()
print(model.gene_alignment(adata).summary())

# %% [markdown]
# The official JSON is translated once into ordinary keyword arguments; the model is an ordinary
# {class}`~scvi_cellplm.CellPLM`. `positional_encoding="none"`: the official code computes its
# positional encoding and multiplies it by zero, so the released weights never saw one.

# %%
{k: v for k, v in model.init_params_["non_kwargs"].items() if k != "gene_vocabulary"}

# %% [markdown]
# ## 4. Same numbers
#
# Both embeddings of every cell, compared entry by entry. The project's tests require a maximum
# absolute difference of at most 1e-5, at this size and at the paper's.

# %%
ours = adata.obsm["X_cellplm"]
difference = np.abs(ours - reference)
print(f"max |ours - official| = {difference.max():.2e} over {ours.size:,} values")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].scatter(reference.ravel(), ours.ravel(), s=2, alpha=0.3)
axes[0].set(xlabel="official pipeline", ylabel="scvi-cellplm", title="embedding values")
axes[1].hist(difference.ravel(), bins=50)
axes[1].set(xlabel="|ours - official|", ylabel="values", title="absolute differences",
            yscale="log")
fig.tight_layout()
plt.show()

# %% [markdown]
# ```{note}
# With a **GMVAE** checkpoint (such as `20230926_85M`) the official code draws a random
# Gumbel cluster for every cell even in evaluation mode, so two official runs already disagree
# with each other. scvi-cellplm uses the most likely cluster, which makes its embeddings
# deterministic; the project's tests compare against the official code with its sampler fixed
# to that same choice.
# ```
#
# ## 5. Fine-tune and export
#
# The loaded model trains like any other (here two epochs of masked-reconstruction pretraining
# on the pancreas cells), and `to_official` writes a pair the official package loads.

# %%
model.train(max_epochs=2, enable_progress_bar=False)
adata.obsm["X_cellplm_tuned"] = model.get_latent_representation()

model.to_official("ckpt/tutorial_tuned")
exported = json.loads(Path("ckpt/tutorial_tuned.config.json").read_text())
print({k: exported[k] for k in ("enc_mod", "enc_hid", "enc_layers", "latent_mod", "post_latent_dim")})

reference_tuned = official_embedding("tutorial_tuned", adata)
print(f"fine-tuning changed the embedding by up to "
      f"{np.abs(adata.obsm['X_cellplm_tuned'] - ours).max():.2f}; "
      f"official package on the export vs ours: max |diff| = "
      f"{np.abs(adata.obsm['X_cellplm_tuned'] - reference_tuned).max():.2e}")

# %%
fig, ax = plt.subplots(figsize=(5, 4))
ax.scatter(reference_tuned.ravel(), adata.obsm["X_cellplm_tuned"].ravel(), s=2, alpha=0.3)
ax.set(xlabel="official package, exported checkpoint", ylabel="scvi-cellplm, fine-tuned model",
       title="round trip through the official format")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Safety
#
# `from_official` reads the weights with `torch.load(weights_only=True)`: a checkpoint carrying
# pickled Python objects is refused rather than executed, and a checkpoint that does not match its
# configuration is an error that names the offending keys.

# %%
from scvi_cellplm import CheckpointError

broken = {**config, "enc_hid": 32}  # a config that does not match the weights
(ckpt / "broken.config.json").write_text(json.dumps(broken))
(ckpt / "broken.best.ckpt").write_bytes((ckpt / "tutorial_small.best.ckpt").read_bytes())
try:
    CellPLM.from_official("ckpt/broken", adata)
except CheckpointError as err:
    print(str(err)[:300], "...")

# %% [markdown]
# See {doc}`../user_guide/official_checkpoints` for where the real checkpoints come from and what
# is guaranteed.
