"""Cell embeddings: ``get_latent_representation`` and ``embed`` (CellPLM and the annotator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .._constants import MODULE_KEYS, SLOTS
from .._exceptions import InputDataError
from ._transfer import backbone_of


class LatentMixin:
    """The cell embedding of models whose module has a CellPLM latent layer.

    Not scvi-tools' ``VAEMixin``/``EmbeddingMixin``: those iterate fixed-size index batches, while
    a CellPLM cell's embedding depends on its whole sentence, so every call goes through the
    sentence engine (:meth:`~scvi_cellplm.model._inference.SentenceInferenceMixin._collect`).
    """

    def _latent_module(self):
        return backbone_of(self.module)

    def get_latent_representation(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        return_cluster_probs: bool = False,
        precision: Literal["32", "bf16"] = "32",
        out=None,
    ) -> np.ndarray:
        """Cell embeddings ``(n_cells, n_latent)`` in the order of ``indices`` (default: all).

        Cells are processed sentence by sentence, so a cell's embedding depends only on its
        sentence and the weights, never on ``batch_size`` or on the other samples. With
        ``give_mean`` (default) the result is deterministic. ``adata`` may be any AnnData: its
        genes are matched to the model's vocabulary by identifier (column order and extra genes do
        not matter; see :meth:`gene_alignment`), and new batches or samples need no setup.

        Works on backed AnnData (``anndata.read_h5ad(path, backed="r")``) with memory bounded by
        the sentence size: cells are read from disk one mini-batch at a time, and large samples
        are windowed from a subsample-fitted PCA projected chunk by chunk. With ``out``, each
        mini-batch's rows are written as soon as they are computed, so no ``(n_cells, n_latent)``
        array is held in memory (see :meth:`embed` for writing into a backed file's ``obsm``).

        Parameters
        ----------
        adata
            AnnData (default: the model's).
        indices
            Cells to embed.
        give_mean
            Posterior mean (most likely cluster for the GMVAE); else a posterior sample.
        batch_size
            Cell budget of an inference mini-batch (default: ``max_cells_per_batch``); whole
            sentences are always kept together.
        return_cluster_probs
            Return the GMVAE cluster probabilities ``(n_cells, n_clusters)`` instead.
        precision
            ``"32"`` (exact) or ``"bf16"`` (autocast to bfloat16: faster on CPUs and GPUs with
            bf16 units; cosine similarity to fp32 embeddings is reported in the benchmark).
        out
            Array-like of shape ``(n_cells, n_latent)`` (``n_clusters`` columns with
            ``return_cluster_probs``) to write into, mini-batch by mini-batch in increasing row
            order: an :class:`h5py.Dataset`, a zarr array or a :class:`numpy.memmap`. Returned.

        Returns
        -------
        Array for ``adata.obsm["X_cellplm"]`` (``out`` when given).
        """
        if precision not in ("32", "bf16"):
            raise InputDataError(f"`precision` must be '32' or 'bf16', got {precision!r}.")
        backbone = self._latent_module()
        if return_cluster_probs and backbone.latent_distribution != "gmvae":
            raise InputDataError("Cluster probabilities exist only for the 'gmvae' latent.")
        key = (MODULE_KEYS.CLUSTER_PROBS_KEY if return_cluster_probs
               else MODULE_KEYS.QZM_KEY if give_mean else MODULE_KEYS.Z_KEY)
        device = self.device.type

        def compute(tensors: dict) -> torch.Tensor:
            inputs = backbone._get_inference_input(tensors)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return backbone.inference(**inputs, sample=not give_mean)[key]

        n_cols = backbone.latent.n_clusters if return_cluster_probs else backbone.n_latent
        return self._collect(compute, adata, indices, batch_size, out=out, n_cols=n_cols)

    def embed(self, adata=None, key_added: str = SLOTS.EMBEDDING, **kwargs) -> None:
        """Write the embedding to ``adata.obsm[key_added]`` (default ``"X_cellplm"``).

        For a backed AnnData opened for writing (``anndata.read_h5ad(path, backed="r+")``), the
        embedding is streamed into the file's ``obsm/{key_added}`` mini-batch by mini-batch (an
        existing entry is replaced), so memory stays bounded by the sentence size whatever the
        number of cells; ``anndata.read_h5ad(path)`` reads it back as ``.obsm[key_added]``.
        ``**kwargs`` go to :meth:`get_latent_representation` (e.g. ``precision="bf16"``).

        Examples
        --------
        >>> adata = anndata.read_h5ad("atlas.h5ad", backed="r+")
        >>> CellPLM.setup_anndata(adata, batch_key="sample")
        >>> model = CellPLM.from_official("ckpt/20231027_85M", adata)
        >>> model.embed(adata)  # writes atlas.h5ad:/obsm/X_cellplm chunk by chunk
        """
        adata = self._validate_anndata(adata)
        if not adata.isbacked:
            adata.obsm[key_added] = self.get_latent_representation(adata, **kwargs)
            return
        if adata.file._filemode not in ("r+", "a"):
            raise InputDataError(
                "Streaming the embedding into a backed file needs it open for writing: "
                "`anndata.read_h5ad(path, backed='r+')`; or pass `out=` (an h5py/zarr array) "
                "to `get_latent_representation`."
            )
        backbone = self._latent_module()
        n_cols = backbone.latent.n_clusters if kwargs.get("return_cluster_probs") else backbone.n_latent
        group = adata.file["obsm"]
        if key_added in group:
            del group[key_added]
        dataset = group.create_dataset(key_added, (adata.n_obs, n_cols), dtype=np.float32,
                                       chunks=(min(adata.n_obs, 4096), n_cols))
        dataset.attrs["encoding-type"], dataset.attrs["encoding-version"] = "array", "0.2.0"
        self.get_latent_representation(adata, out=dataset, **kwargs)
        adata.file._file.flush()
