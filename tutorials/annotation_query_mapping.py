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
# # Cell-type annotation and query mapping
#
# A common use of a single-cell foundation model: learn cell types from an annotated
# *reference*, then label a new *query* dataset. This tutorial does both with CellPLM
# {cite:p}`Wen2024` on the pancreas data bundled with the package {cite:p}`Baron2016`:
#
# 1. pretrain a small CellPLM on two libraries (the reference), without labels;
# 2. fine-tune it into a cell-type classifier, {class}`~scvi_cellplm.CellPLMAnnotator`, on the
#    reference's labels;
# 3. map the third library (the query) onto the reference with
#    {meth}`CellPLM.load_query_data <scvi_cellplm.CellPLM.load_query_data>` (scArches style: the
#    reference weights stay fixed, only an embedding of the new library is learned), and look at
#    reference and query in one embedding;
# 4. predict the query's cell types into `query.obs["cellplm_prediction"]` and compare them with
#    the authors' annotation, which the models never saw, in a confusion matrix.
#
# Everything runs on a CPU in a few minutes.

# %%
import logging
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without widgets
logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0"

import anndata as ad
import matplotlib.pyplot as plt
import pandas as pd
import scanpy as sc
import scvi
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, f1_score

import scvi_cellplm
from scvi_cellplm import CellPLM, CellPLMAnnotator

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "scvi_cellplm"):
    logging.getLogger(name).setLevel(logging.WARNING)
scvi.settings.seed = 0
sc.settings.verbosity = 0

MAX_CELLS = 512  # sentence (window) size
PRETRAIN_EPOCHS = 60
FINETUNE = {"max_epochs": 20, "enable_progress_bar": False}
QUERY_EPOCHS = 20

# %% [markdown]
# ## Reference and query
#
# 1,937 pancreas cells from three sequencing libraries, raw counts in `.layers["counts"]`. The
# libraries `human1_lib1` and `human1_lib2` are the reference; `human1_lib3` plays a new dataset
# to annotate. The query's labels are put aside and used only for scoring at the end.

# %%
adata = scvi_cellplm.datasets.pancreas_demo()
is_query = (adata.obs["batch"] == "human1_lib3").to_numpy()
reference = adata[~is_query].copy()
query = adata[is_query].copy()
query_truth = query.obs.pop("cell_type")
print(f"reference: {reference.n_obs} cells, query: {query.n_obs} cells")
reference.obs["cell_type"].value_counts().to_frame("reference cells").T

# %% [markdown]
# ## Pretraining on the reference
#
# The paper's masked-reconstruction pretraining, without labels. The library (`batch_key`) feeds
# the decoder and defines the sentences: the cells of one library attend to each other, in
# windows of at most `max_cells_per_batch` cells.

# %%
CellPLM.setup_anndata(reference, layer="counts", batch_key="batch")
model = CellPLM(reference, max_cells_per_batch=MAX_CELLS)
model.train(max_epochs=PRETRAIN_EPOCHS, enable_progress_bar=False)

# %% [markdown]
# ## Fine-tuning a classifier
#
# {meth}`CellPLMAnnotator.from_cellplm_model <scvi_cellplm.CellPLMAnnotator.from_cellplm_model>`
# copies the pretrained network and adds a small classification head on the cell embedding.
# Fine-tuning trains head and backbone on the labelled cells, with a cross-entropy loss (cells
# labelled `"Unknown"` would still give context through attention, but none are here).

#
# By default the annotator fine-tunes on windows of at most 128 cells of each library (many more
# optimisation steps than whole libraries give) and predicts with the model's windows.

# %%
annotator = CellPLMAnnotator.from_cellplm_model(model, labels_key="cell_type")
annotator.train(**FINETUNE)
annotator

# %% [markdown]
# ## Mapping the query onto the reference
#
# {meth}`CellPLM.load_query_data <scvi_cellplm.CellPLM.load_query_data>` sets the query up like the
# reference, adds a row for the new library to the decoder's batch table, and freezes every
# reference weight: training learns only how the new library's counts differ. The query cells'
# embeddings come from the reference encoder, so they land in the reference's space.

# %%
query_model = CellPLM.load_query_data(query, model)
query_model.train(max_epochs=QUERY_EPOCHS, enable_progress_bar=False)
reference.obsm["X_cellplm"] = model.get_latent_representation()
query.obsm["X_cellplm"] = query_model.get_latent_representation()

# %% [markdown]
# ## Predicting the query's cell types
#
# The annotator predicts labels for any AnnData with the reference's genes; the new library is
# no obstacle, because the encoder does not take the library as input. `soft=True` gives the
# class probabilities, whose maximum is a simple confidence score. The query has no label column;
# as for scANVI, scvi-tools adds one filled with the unlabelled category (`"Unknown"`) and says so.

# %%
query.obs["cellplm_prediction"] = annotator.predict(query)
probabilities = annotator.predict(query, soft=True)
query.obs["cellplm_confidence"] = probabilities.max(axis=1).to_numpy()
query.obs[["cellplm_prediction", "cellplm_confidence"]].head()

# %% [markdown]
# ## One embedding for reference and query
#
# UMAP of the reference and the mapped query together: the query's cells should fall onto the
# reference cells of their type, and the predictions should agree with the (held-back) labels.

# %%
joint = ad.concat({"reference": reference, "query": query}, label="dataset", index_unique=None)
joint.obs["cell type"] = pd.concat([reference.obs["cell_type"], query_truth]).astype("category")
joint.obs["prediction"] = query.obs["cellplm_prediction"].reindex(joint.obs_names)  # NaN: reference
sc.pp.neighbors(joint, use_rep="X_cellplm", random_state=0)
sc.tl.umap(joint, random_state=0)
fig, axes = plt.subplots(1, 3, figsize=(18, 5))
for ax, color in zip(axes, ["dataset", "cell type", "prediction"]):
    sc.pl.umap(joint, color=color, ax=ax, show=False, frameon=False, legend_fontsize=7,
               title=color if color != "prediction" else "CellPLM prediction (query)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## How good are the predictions?
#
# Accuracy counts correct cells, so it is dominated by the abundant types (beta cells are 45% of
# the query); the macro-averaged F1 score weighs every cell type equally, so the rare types count.

# %%
truth = query_truth.astype(str).to_numpy()
predicted = query.obs["cellplm_prediction"].astype(str).to_numpy()
print(f"accuracy {accuracy_score(truth, predicted):.3f}, "
      f"macro F1 {f1_score(truth, predicted, average='macro'):.3f}")

# %% [markdown]
# The confusion matrix, normalised by row: the fraction of the query's cells of each annotated
# type (rows) that got each predicted label (columns). Types with very few cells are the hardest;
# some do not occur in the reference at all, and a classifier can only predict labels it has seen.

# %%
labels = sorted(set(truth) | set(predicted))
fig, ax = plt.subplots(figsize=(9, 8))
ConfusionMatrixDisplay.from_predictions(
    truth, predicted, labels=labels, normalize="true", values_format=".2f", cmap="Blues",
    xticks_rotation=90, ax=ax, colorbar=False,
)
ax.set(title="query (human1_lib3): annotated vs predicted", xlabel="CellPLM prediction",
       ylabel="annotated cell type")
fig.tight_layout()
plt.show()

# %% [markdown]
# Counts per type, to read the matrix with: a row of a type with three cells is three cells.

# %%
pd.DataFrame({
    "query cells": pd.Series(truth).value_counts(),
    "reference cells": reference.obs["cell_type"].value_counts(),
}).fillna(0).astype(int)

# %% [markdown]
# ## Where to go from here
#
# - The same calls work with an official checkpoint as the backbone
#   ({meth}`CellPLM.from_official <scvi_cellplm.CellPLM.from_official>`, see
#   {doc}`official_checkpoints`), which is the paper's setting.
# - The benchmark in {doc}`../user_guide/benchmarks_downstream` runs this annotation for each
#   library in turn and compares it with scANVI and a logistic regression on PCA.
# - `freeze_encoder=True` trains the head only: the reference embedding then stays exactly as
#   pretrained.
