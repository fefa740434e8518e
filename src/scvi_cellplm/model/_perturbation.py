"""Perturbation prediction by fine-tuning CellPLM (experimental)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi.data import AnnDataManager, fields

from .._constants import DATA_KEYS, MODULE_KEYS, REGISTRY_KEYS
from .._exceptions import GeneAlignmentError, InputDataError
from ..data import registered_gene_ids
from ..data._perturbation import PerturbationDataSplitter, log_normalize
from ..io._genes import align_genes
from ..module._perturbation import CellPLMPerturbationModule
from ._base import CellPLMBase
from ._cellplm import CellPLM
from ._inference import checked_indices
from ._setup import anndata_fields, check_obs_keys
from ._transfer import transfer

logger = logging.getLogger(__name__)

Perturbation = str | Sequence[str]
_NO_GENE = ("", "ctrl", "control")


class CellPLMPerturbation(CellPLMBase):
    """A CellPLM backbone with a perturbation head: post-perturbation expression of control cells.

    .. warning::
       Experimental. Tested on real control cells with synthetic perturbations of known effect
       (a knock-out plus a scaling of target genes), not yet on a real Perturb-seq screen.

    The paper's task :cite:p:`Wen2024`: given control cells and a set of perturbed genes,
    predict the expression after the perturbation. Fine-tuning pairs sentences of control
    cells (with the perturbed genes set to zero in the input and their learned perturbation
    embedding added to every cell token) with random cells of the same perturbation (from the
    same sample when it has any), and minimises the squared error to their
    ``log1p(counts / total * target_sum)`` expression. Perturbations are sets of genes, so
    combinations of genes seen one at a time in training can be asked for.

    Build it from a (pre)trained :class:`~scvi_cellplm.CellPLM` with :meth:`from_cellplm_model`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_head_hidden
        Hidden width of the prediction head.
    zero_perturbed_genes
        Set the input counts of perturbed genes to zero (knock-out); the perturbation embedding
        is added either way.
    target_sum
        Library size of the predicted (and fitted) ``log1p`` normalised expression.
    training_perturbations
        Perturbations with training cells (default: read from the registered AnnData).
    head_genes
        Gene ids of the head's inputs and predictions (default: the registered genes). Another
        AnnData is matched to them by identifier in :meth:`predict`.
    **kwargs
        Backbone hyperparameters, as for :class:`~scvi_cellplm.CellPLM`.

    Examples
    --------
    >>> pert = CellPLMPerturbation.from_cellplm_model(model, adata, perturbation_key="perturbation")
    >>> pert.train(max_epochs=100)
    >>> pred = pert.predict(perturbations=["KLF1", "KLF1+CEBPA"])  # AnnData: perturbations x genes
    """

    _plan_defaults = {"mask_cell_rate": 0.0, "drop_cell_rate": 0.0, "n_steps_kl_warmup": None,
                      "n_steps_lr_warmup": 10}

    def __init__(
        self,
        adata: AnnData | None = None,
        n_head_hidden: int = 256,
        zero_perturbed_genes: bool = True,
        target_sum: float = 1e4,
        training_perturbations: Sequence[str] | None = None,
        head_genes: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(adata, **kwargs)
        self.head_genes_ = list(registered_gene_ids(self.adata_manager) if head_genes is None else head_genes)
        setup = self._setup_args()
        self.perturbation_key = setup["perturbation_key"]
        self.control_category = str(setup["control_category"])
        self.target_sum = float(target_sum)
        labels = self._perturbation_labels(self.adata_manager, required=training_perturbations is None)
        if training_perturbations is None:
            training_perturbations = sorted(set(labels) - {self.control_category})
        self.training_perturbations_ = [str(p) for p in training_perturbations]
        genes = [g for p in self.training_perturbations_ for g in self._parse(p)]
        self._gene_positions(genes, self.adata_manager, "training perturbations")
        self.perturbed_genes_ = sorted(set(genes))
        baseline = None
        if labels is not None and (labels == self.control_category).any():
            baseline = torch.as_tensor(self._control_mean(np.flatnonzero(labels == self.control_category)))
        with warnings.catch_warnings():  # the overlap was reported for the registered data
            warnings.simplefilter("ignore")
            alignment = align_genes(self.head_genes_, self.gene_vocabulary)
        self.module = CellPLMPerturbationModule(
            self.module, len(self.head_genes_),
            gene_index=None if alignment.is_identity else torch.as_tensor(alignment.index),
            n_head_hidden=n_head_hidden, zero_perturbed_genes=zero_perturbed_genes, baseline=baseline,
        )
        self._model_summary_string = (
            f"CellPLMPerturbation (experimental): {len(self.training_perturbations_)} training "
            f"perturbations of {len(self.perturbed_genes_)} genes; backbone: " + self._model_summary_string
        )
        self.init_params_ = {
            "kwargs": {"kwargs": dict(kwargs)},
            "non_kwargs": {
                "n_head_hidden": n_head_hidden,
                "zero_perturbed_genes": zero_perturbed_genes,
                "target_sum": self.target_sum,
                "training_perturbations": list(self.training_perturbations_),
                "head_genes": list(self.head_genes_),
            },
        }

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str = "perturbation",
        control_category: str = "control",
        layer: str | None = None,
        batch_key: str | None = None,
        sample_key: str | None = None,
        spatial_key: str | None = None,
        gene_id_key: str | None = None,
        **kwargs,
    ) -> None:
        """Register counts and the CellPLM fields; ``perturbation_key`` names each cell's perturbation.

        Parameters
        ----------
        adata
            AnnData with raw counts of control and perturbed cells.
        perturbation_key
            Key in ``adata.obs``: ``control_category`` for control cells, else the perturbed
            genes joined by ``"+"`` (e.g. ``"KLF1"``, ``"KLF1+CEBPA"``; ``"ctrl"`` tokens, as in
            ``"KLF1+ctrl"``, are ignored). Genes are names in ``adata.var_names``.
        control_category
            Value of control cells.
        layer, batch_key, sample_key, spatial_key, gene_id_key
            As in :meth:`scvi_cellplm.CellPLM.setup_anndata`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if "source_registry" not in kwargs:
            check_obs_keys(adata, perturbation_key=perturbation_key)
            values = adata.obs[perturbation_key].astype(str)
            if not (values == str(control_category)).any():
                raise InputDataError(
                    f"No control cells: no value of adata.obs[{perturbation_key!r}] equals "
                    f"control_category={control_category!r} (values: {list(values.unique()[:5])})."
                )
        labels = fields.CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, None)
        manager = AnnDataManager(
            fields=anndata_fields(adata, layer, batch_key, sample_key, labels, spatial_key),
            setup_method_args=setup_method_args,
        )
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @classmethod
    def setup_mudata(cls, *args, **kwargs):
        """Not supported: register the RNA modality as an AnnData with :meth:`setup_anndata`."""
        raise InputDataError("CellPLMPerturbation takes an AnnData; use `setup_anndata`.")

    @classmethod
    def from_cellplm_model(
        cls,
        model: CellPLM,
        adata: AnnData | None = None,
        perturbation_key: str = "perturbation",
        control_category: str = "control",
        *,
        n_head_hidden: int = 256,
        zero_perturbed_genes: bool = True,
        target_sum: float = 1e4,
        max_cells_per_batch: int | None = None,
        **setup_kwargs,
    ) -> CellPLMPerturbation:
        """Build a perturbation model whose backbone starts from ``model``'s weights.

        Parameters
        ----------
        model
            A trained :class:`~scvi_cellplm.CellPLM` (pretrained, or from official weights).
        adata
            Control and perturbed cells (default: the model's AnnData). Its genes are aligned to
            the model's gene vocabulary.
        perturbation_key, control_category
            See :meth:`setup_anndata`.
        n_head_hidden, zero_perturbed_genes, target_sum
            See :class:`CellPLMPerturbation`.
        max_cells_per_batch
            Sentence size of the control cells (default: the model's).
        **setup_kwargs
            Replace the model's setup arguments (``layer``, ``batch_key``, ``sample_key``, ...).
        """
        adata = model.adata if adata is None else adata
        args = model.adata_manager.registry["setup_args"]
        setup = {k: args.get(k) for k in ("layer", "batch_key", "sample_key", "spatial_key", "gene_id_key")}
        cls.setup_anndata(adata, perturbation_key=perturbation_key, control_category=control_category,
                          **{**setup, **setup_kwargs})
        overrides = {} if max_cells_per_batch is None else {"max_cells_per_batch": max_cells_per_batch}
        return transfer(cls, adata, model, overrides, n_head_hidden=n_head_hidden,
                        zero_perturbed_genes=zero_perturbed_genes, target_sum=target_sum)

    # ------------------------------------------------------------------ perturbations
    def _parse(self, perturbation: Perturbation) -> tuple[str, ...]:
        """Return the genes of a perturbation (``"A+B"`` or ``["A", "B"]``); control is ``()``."""
        if isinstance(perturbation, str):
            if perturbation == self.control_category:
                return ()
            tokens = perturbation.split("+")
        else:
            tokens = list(perturbation)
        return tuple(t for t in (str(t).strip() for t in tokens) if t.lower() not in _NO_GENE)

    def _name(self, perturbation: Perturbation) -> str:
        if isinstance(perturbation, str):
            return perturbation
        return "+".join(self._parse(perturbation)) or self.control_category

    def _gene_positions(self, genes: Sequence[str], manager: AnnDataManager, what: str) -> np.ndarray:
        """Head column of each gene (a head gene id, or a var name of ``manager``'s data)."""
        lookup = {g: i for i, g in enumerate(self.head_genes_)}
        ids = registered_gene_ids(manager)
        var = self._registered_var(manager)
        lookup.update({str(name): lookup[g] for name, g in zip(var.index, ids) if g in lookup})
        unknown = sorted({g for g in genes if g not in lookup})
        if unknown:
            raise InputDataError(
                f"The {what} name genes that are not among the model's {len(self.head_genes_)} genes: "
                f"{unknown[:10]}. Genes are matched to adata.var_names; keep perturbed genes when "
                "selecting highly variable genes."
            )
        return np.array([lookup[g] for g in genes], dtype=np.int64)

    def _encode(self, perturbations: Sequence[Perturbation], manager: AnnDataManager) -> np.ndarray:
        """``(n_perturbations, n_vars)`` multi-hot matrix of the perturbed genes."""
        out = np.zeros((len(perturbations), len(self.head_genes_)), dtype=np.float32)
        for row, p in enumerate(perturbations):
            out[row, self._gene_positions(self._parse(p), manager, "perturbations")] = 1.0
        return out

    def _in_head_genes(self, adata: AnnData | None) -> AnnData | None:
        """``adata`` with the head's genes as its columns, in the head's order, matched by id."""
        if adata is None:
            return None
        adata = self._validate_anndata(adata)
        ids = registered_gene_ids(self.get_anndata_manager(adata, required=True))
        if ids == self.head_genes_:
            return adata
        cols = pd.Index(ids).get_indexer(self.head_genes_)
        if (cols < 0).any():
            lacking = [g for g, c in zip(self.head_genes_, cols) if c < 0]
            raise GeneAlignmentError(
                f"The AnnData lacks {len(lacking)} of the perturbation model's "
                f"{len(self.head_genes_)} genes (e.g. {lacking[:5]}): the head reads and predicts "
                "exactly its training genes, matched by identifier."
            )
        logger.info("Perturbation model: the AnnData's genes matched to its %d genes by identifier.",
                    len(cols))
        return adata[:, cols].copy()

    def _perturbation_labels(self, manager: AnnDataManager, required: bool) -> np.ndarray | None:
        obs = manager.adata.obs
        if self.perturbation_key not in obs:
            if required:
                raise InputDataError(
                    f"adata.obs[{self.perturbation_key!r}] (the perturbation of each cell) is missing."
                )
            return None
        return obs[self.perturbation_key].astype(str).to_numpy()

    def _control_mean(self, cells: np.ndarray, chunk: int = 4096) -> np.ndarray:
        x = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        total = np.zeros(x.shape[1], dtype=np.float64)
        for start in range(0, len(cells), chunk):
            rows = x[cells[start : start + chunk]]
            rows = rows.toarray() if sparse.issparse(rows) else np.asarray(rows)
            total += log_normalize(rows.astype(np.float32), self.target_sum).sum(0)
        return (total / max(len(cells), 1)).astype(np.float32)

    # ------------------------------------------------------------------ training
    def _data_splitter(self, max_cells_per_batch: int | None, validation_size: float, seed: int,
                       train_sentences: str = "windows"):
        manager = self.adata_manager
        labels = self._perturbation_labels(manager, required=True)
        categories = sorted(set(labels) - {self.control_category})
        multi_hot = self._encode([self.control_category, *categories], manager)
        codes = np.searchsorted(categories, labels) + 1
        codes[labels == self.control_category] = 0
        if not categories:
            raise InputDataError("The AnnData has no perturbed cells to train on.")
        sentences = self._sentences(manager, np.flatnonzero(codes == 0))
        self.training_perturbations_ = sorted(set(self.training_perturbations_) | set(categories))
        self.perturbed_genes_ = sorted({g for p in self.training_perturbations_ for g in self._parse(p)})
        self.init_params_["non_kwargs"]["training_perturbations"] = list(self.training_perturbations_)
        return PerturbationDataSplitter(
            manager, sentences, self._sample_codes(manager), codes, multi_hot,
            max_cells_per_batch or self.max_cells_per_batch, target_sum=self.target_sum,
            validation_size=validation_size, seed=seed,
        )

    def train(self, max_epochs: int | None = 100, *, lr: float = 1e-3, max_cells_per_batch: int | None = None,
              plan_kwargs: dict | None = None, **kwargs):
        """Fine-tune on pairs of control sentences and perturbed cells (no masking).

        An epoch uses each perturbed cell about once as a target. ``max_cells_per_batch`` is the
        cell budget of a mini-batch (default: the model's); the control sentences themselves are
        cut at the model's ``max_cells_per_batch``, as in :meth:`predict`. Other arguments as
        :meth:`CellPLM.train <scvi_cellplm.CellPLM.train>`; ``validation_size`` holds out a fraction
        of each perturbation's cells.
        """
        return super().train(max_epochs, lr=lr, max_cells_per_batch=max_cells_per_batch,
                             plan_kwargs=plan_kwargs, **kwargs)

    # ------------------------------------------------------------------ prediction
    @torch.inference_mode()
    def predict(
        self,
        adata: AnnData | None = None,
        perturbations: Sequence[Perturbation] | None = None,
        *,
        indices: Sequence[int] | None = None,
        aggregate: bool = True,
        batch_size: int | None = None,
    ) -> AnnData:
        """Predicted expression of the control cells after each perturbation.

        Parameters
        ----------
        adata
            Cells to perturb in silico: its control cells (``control_category`` in
            ``obs[perturbation_key]``, or all cells when that column is absent). Default: the
            training AnnData.
        perturbations
            Gene sets, as ``"A"``, ``"A+B"`` or ``["A", "B"]`` (``control_category``: none).
            Default: the training perturbations.
        indices
            The control cells to use (overrides the selection above).
        aggregate
            Return the mean over control cells (one row per perturbation); else one row per
            control cell and perturbation.
        batch_size
            Cell budget of an inference mini-batch (whole sentences are kept together).

        Returns
        -------
        AnnData of predicted ``log1p(counts / total * target_sum)`` in ``.X`` with the model's
        genes as ``var``. Aggregated: obs = perturbations (``obs["perturbation"]``,
        ``obs["n_perturbed_genes"]``, ``obs["n_control_cells"]``); per cell: obs
        ``"perturbation"`` and ``"control_cell"``. ``uns["cellplm_perturbation"]`` records the
        scale and the control category.

        Raises
        ------
        ~scvi_cellplm.InputDataError
            A perturbation names a gene the model does not have, or there are no control cells.
        """
        adata = self._validate_anndata(self._in_head_genes(adata))
        manager = self.get_anndata_manager(adata, required=True)
        if indices is None:
            labels = adata.obs[self.perturbation_key].astype(str).to_numpy() \
                if self.perturbation_key in adata.obs else None
            cells = np.arange(adata.n_obs) if labels is None else np.flatnonzero(labels == self.control_category)
        else:
            cells = checked_indices(indices, adata.n_obs)
        if len(cells) == 0:
            raise InputDataError(f"No control cells ({self.perturbation_key} == {self.control_category!r}).")
        perturbations = list(self.training_perturbations_ if perturbations is None else perturbations)
        names = list(dict.fromkeys(self._name(p) for p in perturbations))
        multi_hot = torch.as_tensor(self._encode(names, manager))
        genes = sorted({g for p in names for g in self._parse(p)})
        unseen = [g for g in genes if g not in set(self.perturbed_genes_)]
        if unseen:
            warnings.warn(
                f"Genes never perturbed in training: {unseen[:10]}. Their predicted effect comes only "
                "from the learned projection of their gene embeddings (an untested extrapolation).",
                UserWarning, stacklevel=2,
            )
        module = self.module
        n_vars = multi_hot.shape[1]
        predictions = []
        for row in range(len(names)):

            def compute(tensors: dict, hot=multi_hot[row]) -> torch.Tensor:
                n = tensors[REGISTRY_KEYS.X_KEY].shape[0]
                inputs = module._get_inference_input({**tensors, DATA_KEYS.PERTURBATION_KEY: hot.expand(n, -1)})
                h = module.inference(**inputs)
                return module.generative(**module._get_generative_input(tensors, h))[MODULE_KEYS.PREDICTION_KEY]

            values = self._collect(compute, adata, cells, batch_size, context="indices", n_cols=n_vars)
            predictions.append(values.mean(0, keepdims=True) if aggregate else values)
        out = np.stack(predictions)
        var = self._registered_var(manager).copy()  # the head genes, in the head's order
        uns = {"cellplm_perturbation": {"scale": f"log1p(counts / total * {self.target_sum:g})",
                                        "control_category": self.control_category}}
        if aggregate:
            obs_df = pd.DataFrame(
                {"perturbation": names,
                 "n_perturbed_genes": [len(self._parse(p)) for p in names],
                 "n_control_cells": len(cells)},
                index=pd.Index(names, name=None),
            )
            return AnnData(out[:, 0], obs=obs_df, var=var, uns=uns)
        cell_names = adata.obs_names[cells].astype(str)
        obs_df = pd.DataFrame({
            "perturbation": pd.Categorical(np.repeat(names, len(cells)), categories=names),
            "control_cell": np.tile(cell_names, len(names)),
        })
        obs_df.index = [f"{c}:{p}" for p in names for c in cell_names]
        return AnnData(out.reshape(-1, n_vars), obs=obs_df, var=var, uns=uns)


__all__ = ["CellPLMPerturbation"]
