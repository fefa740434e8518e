"""scvi-hub: a model card generated from the model, and folders that ``scvi.hub.HubModel`` loads.

``HubModel.load_model`` imports ``metadata.model_parent_module`` and takes the class named
``metadata.model_cls_name`` from it, then calls its ``load(local_dir, adata=...)``. The metadata
written here names ``scvi_cellplm`` and the model's class, so a folder written by
:meth:`~scvi_cellplm.CellPLM.to_hub` loads through scvi-hub like an scvi-tools model.
``HubModelCardHelper`` knows only scvi-tools' own classes, so the card is written here.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .._presets import PRESETS
from ..io._genes import is_ensembl

PARENT_MODULE = "scvi_cellplm"
"""``model_parent_module`` of the scvi-hub metadata: the package exports every model class."""
CITATION = ("Wen, H., Tang, W., Dai, X., Ding, J., Jin, W., Xie, Y. & Tang, J. CellPLM: Pre-training of "
            "Cell Language Model Beyond Single Cells. The Twelfth International Conference on Learning "
            "Representations (ICLR), 2024.")
BIBTEX = """@inproceedings{Wen2024,
  title     = {{CellPLM}: Pre-training of Cell Language Model Beyond Single Cells},
  author    = {Wen, Hongzhi and Tang, Wenzhuo and Dai, Xinnan and Ding, Jiayuan and Jin, Wei and
               Xie, Yuying and Tang, Jiliang},
  booktitle = {The Twelfth International Conference on Learning Representations ({ICLR})},
  year      = {2024}
}"""
_ARCHITECTURE = ("n_hidden", "n_layers", "n_heads", "n_latent", "latent_distribution", "attention",
                 "positional_encoding", "norm", "n_spatial_neighbors", "gene_likelihood")


def identifier_type(genes) -> str:
    """Describe the identifiers of a gene vocabulary: Ensembl gene ids, gene symbols, or a mix."""
    genes = [str(g) for g in genes]
    share = float(np.mean([is_ensembl(g) for g in genes])) if genes else 0.0
    if share >= 0.95:
        return "Ensembl gene ids"
    if share <= 0.05:
        return "gene symbols"
    return f"mixed ({share:.0%} Ensembl gene ids, the rest symbols)"


def preset_name(model) -> str:
    """Name the model's architecture: an official checkpoint, a preset of ``PRESETS``, or custom."""
    official = getattr(model, "official_config", None)
    if official:
        return f"official checkpoint {official.get('name', '(unnamed)')}"
    kwargs = model.backbone_kwargs_
    for name, preset in PRESETS.items():
        keys = ("n_hidden", "n_layers", "n_heads", "n_latent", "latent_distribution", "attention")
        if all(preset.get(k) == kwargs.get(k) for k in keys):
            return name
    return "custom"


def _table(rows) -> str:
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _categories(model, key: str) -> str:
    registry = model.adata_manager.registry["field_registries"].get(key)
    if registry is None:
        return "none"
    mapping = [str(c) for c in registry["state_registry"].get("categorical_mapping", [])]
    shown = ", ".join(mapping[:10]) + (f", ... ({len(mapping)} in all)" if len(mapping) > 10 else "")
    original = registry["state_registry"].get("original_key")
    if not original or original.startswith("_scvi"):  # not registered: one placeholder category
        return "not registered"
    return f"{len(mapping)} (`{original}`: {shown})"


def _version(package: str = "scvi-cellplm") -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def model_card(model, license_info: str, *, metrics: dict | None = None, description: str | None = None,
               training_data: str | None = None, training_data_url: str | None = None,
               training_code_url: str | None = None) -> str:
    """Return the Markdown model card (with its YAML header) of ``model``; see ``HubMixin.model_card``."""
    import scvi
    import yaml

    name = type(model).__name__
    n_cells = model.adata_manager.registry["field_registries"].get("X", {}).get("summary_stats", {}).get("n_cells")
    vocabulary = list(model.gene_vocabulary)
    kwargs = model.backbone_kwargs_
    header = yaml.safe_dump({
        "library_name": "scvi-tools",
        "license": license_info,
        "tags": ["biology", "genomics", "single-cell", "foundation-model", "scvi-cellplm",
                 f"model_cls_name:{name}", f"scvi_version:{scvi.__version__}",
                 f"anndata_version:{_version('anndata')}", "modality:rna"],
    }, sort_keys=False).strip()
    model_table = _table([
        ("class", f"`{PARENT_MODULE}.{name}`"),
        ("preset", preset_name(model)),
        ("architecture", ", ".join(f"{k}={kwargs[k]}" for k in _ARCHITECTURE if k in kwargs)),
        ("parameters", f"{sum(p.numel() for p in model.module.parameters()):,}"),
        ("gene vocabulary", f"{len(vocabulary):,} genes, {identifier_type(vocabulary)}"),
        ("trained", "yes" if model.is_trained_ else "no"),
        ("files", "`model.safetensors` (weights), `metadata.json` (setup, vocabulary), `adata.h5ad` if shared"),
    ])
    data_table = _table([
        ("cells", f"{n_cells:,}" if isinstance(n_cells, int) else "unknown"),
        ("genes registered", f"{model._registered_var().shape[0]:,}"),
        ("batches", _categories(model, "batch")),
        ("samples", _categories(model, "sample")),
        ("labels", _categories(model, "labels")),
        ("training data url", training_data_url or "Not provided."),
        ("training code url", training_code_url or "Not provided."),
    ])
    setup = json.dumps({k: v for k, v in model.adata_manager.registry["setup_args"].items() if v is not None},
                       indent=2, default=str)
    metric_text = _table((k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()) \
        if metrics else "Not provided."
    description = description or ("A CellPLM model: a single-cell foundation model whose tokens are cells "
                                  "(Wen et al., ICLR 2024).")
    return f"""---
{header}
---

# {name} (scvi-cellplm)

{description}

CellPLM embeds each cell's expression through a learned gene table; the cells of one sentence (a
sample, or a window of a large one) attend to each other in a transformer, and a (Gaussian-mixture)
VAE latent gives the cell embedding. Written by
[scvi-cellplm](https://github.com/scverse/scvi-cellplm) {_version()}.

# Usage

```python
import scvi.hub
import scvi_cellplm

hub_model = scvi.hub.HubModel("path/to/this/folder")
hub_model.load_model(adata=adata)          # adata=None: the adata.h5ad of the folder
model = hub_model.model                    # or scvi_cellplm.{name}.load("path/to/this/folder", adata)
adata.obsm["X_cellplm"] = model.get_latent_representation()
```

The data's genes are matched to the model's vocabulary by identifier (Ensembl ids or symbols,
offline), never by position; set the data up with `{name}.setup_anndata` (raw counts) first.

# Model

{model_table}

# Training data

{training_data or "Not described by the uploader."}

{data_table}

Arguments of `setup_anndata`:

```json
{setup}
```

# Metrics

{metric_text}

# Licence

{license_info}

# Citation

{CITATION}

```bibtex
{BIBTEX}
```
"""


def write_hub_files(model, dir_path: str, card: str, training_data_url: str | None, overwrite: bool):
    """Write the scvi-hub metadata and model card into ``dir_path``; return the ``HubModel``."""
    try:
        from huggingface_hub import ModelCard
        from scvi.hub import HubMetadata, HubModel
    except ImportError as err:
        raise ImportError("scvi-hub needs `huggingface_hub`: pip install 'scvi-cellplm[hub]'.") from err
    import scvi

    metadata = HubMetadata(scvi_version=scvi.__version__, anndata_version=_version("anndata"),
                           model_cls_name=type(model).__name__, training_data_url=training_data_url,
                           model_parent_module=PARENT_MODULE)
    hub_model = HubModel(os.fspath(dir_path), metadata=metadata, model_card=ModelCard(card))
    hub_model.save(overwrite=overwrite)
    return hub_model


class HubMixin:
    """``model_card`` and ``to_hub``: share a model the scvi-hub way."""

    def model_card(self, license_info: str, *, metrics: dict | None = None, description: str | None = None,
                   training_data: str | None = None, training_data_url: str | None = None,
                   training_code_url: str | None = None) -> str:
        """Return a model card (Markdown with a YAML header, as the Hugging Face Hub reads it).

        Generated from the model: class, preset, architecture, parameter count, gene vocabulary
        (size and identifier type: Ensembl ids or symbols), training data (cells, genes, batches,
        samples, labels, setup arguments), the metrics given, the licence and the citation of
        CellPLM (Wen et al., ICLR 2024).

        Parameters
        ----------
        license_info
            Licence of the weights, as a Hugging Face licence id (e.g. ``"cc-by-4.0"``, ``"mit"``,
            ``"other"``).
        metrics
            Scores to report, ``name -> value`` (e.g. ``{"ARI": 0.71}``).
        description
            A paragraph on the model.
        training_data
            A paragraph on the training data (source, tissue, species, preprocessing).
        training_data_url, training_code_url
            Where the training data and code are.
        """
        return model_card(self, license_info, metrics=metrics, description=description,
                          training_data=training_data, training_data_url=training_data_url,
                          training_code_url=training_code_url)

    def to_hub(self, dir_path: str, license_info: str, *, metrics: dict | None = None,
               description: str | None = None, training_data: str | None = None,
               training_data_url: str | None = None, training_code_url: str | None = None,
               save_anndata: bool = True, overwrite: bool = False):
        """Save the model as an scvi-hub folder and return its :class:`scvi.hub.HubModel`.

        The folder holds what :meth:`save` writes, the model card (``README.md``, see
        :meth:`model_card`) and scvi-hub's ``_scvi_required_metadata.json`` (naming
        ``scvi_cellplm`` and this class), so ``scvi.hub.HubModel(dir_path).load_model()`` returns
        this model. Needs ``huggingface_hub`` (``pip install 'scvi-cellplm[hub]'``).

        Parameters
        ----------
        dir_path
            Folder to write (created).
        license_info
            Licence of the weights (see :meth:`model_card`).
        metrics, description, training_data, training_code_url
            Written into the model card.
        training_data_url
            Also written into scvi-hub's metadata, where ``HubModel.load_model`` downloads the data
            from when no AnnData is given or saved; scvi-tools checks the address online.
        save_anndata
            Save the AnnData with the model, so ``load_model()`` needs no ``adata``.
        overwrite
            Replace existing files.

        Returns
        -------
        :class:`scvi.hub.HubModel`
        """
        card = self.model_card(license_info, metrics=metrics, description=description,
                               training_data=training_data, training_data_url=training_data_url,
                               training_code_url=training_code_url)
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as err:  # before anything is written
            raise ImportError("scvi-hub needs `huggingface_hub`: pip install 'scvi-cellplm[hub]'.") from err
        self.save(dir_path, overwrite=overwrite, save_anndata=save_anndata)
        return write_hub_files(self, dir_path, card, training_data_url, overwrite)
