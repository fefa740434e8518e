"""Expression outputs of the decoder: denoised and imputed expression.

As scvi-tools' ``RNASeqMixin``, but decoding through the sentence engine, with batches matched to
the decoder's by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.data import AnnDataManager

from .._constants import MODULE_KEYS, REGISTRY_KEYS, SLOTS
from .._exceptions import InputDataError
from ._inference import checked_indices


class ExpressionMixin:
    """``get_normalized_expression``, ``impute`` and ``denoise`` of models with a CellPLM decoder.

    Not scvi-tools' ``RNASeqMixin`` (fixed-size index batches, batches decoded by registry code):
    here whole sentences are decoded, and batches are matched to the decoder's by name, so data
    with other or new batch categories decodes correctly or asks for ``transform_batch``.
    """

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[int | str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        batch_size: int | None = None,
        return_numpy: bool = False,
        transform_dataset: str | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Denoised expression: the decoder's normalised means, scaled to ``library_size``.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.
        transform_batch
            Batch categories to decode every cell as (averaged); default: each cell's own batch.
        gene_list
            Genes to return (default: all registered genes).
        library_size
            Total counts each cell is scaled to, or ``"latent"`` for its observed library (over the
            genes its dataset measured). Ignored for ``gene_likelihood="gaussian"``, whose
            predictions are on the scale of the data.
        return_numpy
            Return an array instead of a DataFrame (obs names × gene names).
        transform_dataset
            Decode every cell as if measured by this dataset (category of ``dataset_key``), e.g.
            the reference when imputing genes a spatial panel lacks.

        Returns
        -------
        Values for ``adata.layers["cellplm_denoised"]``.
        """
        adata = self._validate_anndata(adata)
        indices = None if indices is None else checked_indices(indices, adata.n_obs)
        manager = self.get_anndata_manager(adata, required=True)
        var_names = self._registered_var(manager).index
        genes = np.arange(len(var_names))
        if gene_list is not None:
            missing = [g for g in gene_list if g not in var_names]
            if missing:
                raise InputDataError(f"`gene_list` has genes not in the AnnData: {missing[:5]}.")
            genes = var_names.get_indexer(gene_list)
        decode_batches = self._decoder_batches(manager, transform_batch)
        dataset_code = None
        if transform_dataset is not None:
            mapping = list(manager.get_state_registry(REGISTRY_KEYS.DATASET_KEY).categorical_mapping)
            if transform_dataset not in mapping:
                raise InputDataError(f"`transform_dataset` must be one of {mapping}, got {transform_dataset!r}.")
            dataset_code = mapping.index(transform_dataset)
        module = self.module
        keep = torch.as_tensor(genes)

        def compute(tensors: dict) -> torch.Tensor:
            inputs = module._get_inference_input(tensors)
            res = module.inference(**inputs)
            gen_inputs = module._get_generative_input(tensors, res)
            dataset = gen_inputs[MODULE_KEYS.DATASET_INDEX_KEY]
            gen_inputs["decode_dataset_index"] = (
                None if dataset_code is None else torch.full_like(dataset, dataset_code))
            acc = 0.0
            for decoder_batch in decode_batches:
                gen_inputs[MODULE_KEYS.BATCH_INDEX_KEY] = decoder_batch(tensors[REGISTRY_KEYS.BATCH_KEY])
                gen = module.generative(**gen_inputs)
                if module.gene_likelihood == "gaussian":
                    acc = acc + gen[MODULE_KEYS.PX_SCALE_KEY]  # predictions on the data's scale
                elif library_size == "latent":
                    acc = acc + gen[MODULE_KEYS.PX_RATE_KEY]
                else:
                    acc = acc + gen[MODULE_KEYS.PX_SCALE_KEY] * library_size
            return (acc / len(decode_batches))[:, keep]

        out = self._collect(compute, adata, indices, batch_size, n_cols=len(genes))
        if return_numpy:
            return out
        obs_names = adata.obs_names if indices is None else adata.obs_names[indices]
        return pd.DataFrame(out, index=obs_names, columns=var_names[genes])

    def _decoder_batches(self, manager: AnnDataManager, transform_batch) -> list:
        """Return one function per decoding pass: a mini-batch's batch codes -> the decoder's.

        With ``transform_batch`` (category names), one pass per category; else one pass with each
        cell's own batch, matched to the decoder's categories by name (a batch the decoder was not
        trained on asks for ``transform_batch``). Models without a batch input to the decoder get
        one pass with ``None``.
        """
        known = self.decoder_batch_categories_
        if not self.batch_in_decoder:
            if transform_batch is not None:
                raise InputDataError("This model's decoder reads no batch: drop `transform_batch`.")
            return [lambda batch: None]
        if transform_batch is not None:
            wanted = [str(b) for b in np.atleast_1d(transform_batch)]
            unknown = [b for b in wanted if b not in known]
            if unknown:
                raise InputDataError(f"`transform_batch` names batches the model was not trained on: "
                                     f"{unknown[:5]}; known: {known[:10]}.")
            codes = [known.index(b) for b in wanted]
            return [lambda batch, code=code: torch.full_like(batch.view(-1, 1), code) for code in codes]
        mapping = [str(c) for c in manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping]
        lookup = torch.as_tensor([known.index(c) if c in known else -1 for c in mapping])
        new = [c for c, code in zip(mapping, lookup.tolist()) if code < 0]

        def own(batch: torch.Tensor) -> torch.Tensor:
            codes = lookup.to(batch.device)[batch.view(-1).long()].view(-1, 1)
            if bool((codes < 0).any()):
                raise InputDataError(
                    f"Some cells belong to batches the model was not trained on ({new[:5]}); decode "
                    f"them as known batches with `transform_batch=[...]` (e.g. {known[:3]})."
                )
            return codes

        return [own]

    def impute(
        self,
        adata: AnnData | None = None,
        genes: Sequence[str] | None = None,
        indices: Sequence[int] | None = None,
        transform_dataset: str | None = None,
    ) -> pd.DataFrame:
        """Predicted expression of ``genes`` for every cell, on the scale of its own data.

        For a model set up with ``dataset_key`` on a spatial panel joined with a reference,
        this predicts the genes the panel did not measure (counts at the cell's observed library
        for NB; values on the data's scale for the Gaussian likelihood).

        ``transform_dataset`` decodes as that dataset (default: each cell's own).

        Returns
        -------
        DataFrame (cells x genes), e.g. for ``sp_adata.obsm["cellplm_imputed"]``.
        """
        return self.get_normalized_expression(adata, indices=indices, gene_list=genes,
                                              library_size="latent",
                                              transform_dataset=transform_dataset)

    def denoise(
        self,
        adata: AnnData | None = None,
        key_added: str = SLOTS.DENOISED,
        library_size: float | Literal["latent"] = "latent",
        transform_batch: Sequence[str] | None = None,
    ) -> None:
        """Write denoised expression to ``adata.layers[key_added]`` (default ``"cellplm_denoised"``).

        By default each cell keeps its observed library size, so the layer is on the count scale.
        ``transform_batch`` decodes every cell as these (known) batches, as in
        :meth:`get_normalized_expression`: needed for cells of batches the model was not trained on.
        """
        adata = self._validate_anndata(adata)
        adata.layers[key_added] = self.get_normalized_expression(
            adata, library_size=library_size, return_numpy=True, transform_batch=transform_batch
        )
