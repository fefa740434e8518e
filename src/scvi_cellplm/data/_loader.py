"""Data loading by whole sentences, on top of scvi-tools' AnnTorchDataset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset, Sampler

from .._constants import DATA_KEYS, REGISTRY_KEYS
from .._exceptions import InputDataError
from ._sentences import make_sentences, pack_sentences, random_sentences


class SentenceDataset(Dataset):
    """Fetch the cells of several sentences in one call, with per-cell sentence ids.

    Items are lists of sentences (arrays of obs indices). Cells come back sorted by obs index
    (what backed AnnData needs); ``DATA_KEYS.SENTENCE_KEY`` holds each cell's sentence number
    within the mini-batch and ``DATA_KEYS.INDICES_KEY`` its obs index. With ``gene_index`` (the
    vocabulary row of each column, from :func:`~scvi_cellplm.data.align_to_vocabulary`), every
    mini-batch carries it as ``DATA_KEYS.GENE_INDEX_KEY``: the module reads genes by identity.
    """

    def __init__(self, adata_manager, load_sparse_tensor: bool = False,
                 gene_index: np.ndarray | None = None) -> None:
        self.inner = adata_manager.create_torch_dataset(load_sparse_tensor=load_sparse_tensor)
        self.gene_index = None if gene_index is None else torch.as_tensor(gene_index, dtype=torch.long)
        # sparse rows with duplicated entries are summed per mini-batch (as scipy reads them); an
        # in-memory matrix in canonical format needs no check at all
        x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        self.check_duplicates = load_sparse_tensor and not (
            sparse.issparse(x) and x.format in ("csr", "csc") and x.has_canonical_format)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, sentences: list[np.ndarray]) -> dict:
        idx = np.concatenate(sentences)
        sid = np.repeat(np.arange(len(sentences)), [len(s) for s in sentences])
        order = np.argsort(idx, kind="stable")
        idx, sid = idx[order], sid[order]
        data = self.inner[idx]
        data = {k: v if torch.is_tensor(v) else torch.as_tensor(v) for k, v in data.items()}
        if self.check_duplicates:
            data[REGISTRY_KEYS.X_KEY] = sum_duplicates(data[REGISTRY_KEYS.X_KEY])
        data[DATA_KEYS.SENTENCE_KEY] = torch.as_tensor(sid, dtype=torch.long)
        data[DATA_KEYS.INDICES_KEY] = torch.as_tensor(idx, dtype=torch.long)
        if self.gene_index is not None:
            data[DATA_KEYS.GENE_INDEX_KEY] = self.gene_index
        return data


def sum_duplicates(x: torch.Tensor) -> torch.Tensor:
    """Return a sparse CSR/CSC tensor with duplicated entries summed and indices sorted.

    scipy reads a duplicated entry as the sum of its copies; torch's sparse compressed tensors keep
    them apart, so an elementwise function (``log1p``) of the copies would differ from that of the
    sum. Tensors already in canonical form (and dense ones) are returned as they are.
    """
    if x.layout == torch.sparse_csr:
        ptr, idx = x.crow_indices(), x.col_indices()
    elif x.layout == torch.sparse_csc:
        ptr, idx = x.ccol_indices(), x.row_indices()
    else:
        return x
    if idx.numel() < 2:
        return x
    outer = torch.repeat_interleave(torch.arange(len(ptr) - 1, device=ptr.device), ptr.diff())
    if bool(((outer[1:] != outer[:-1]) | (idx[1:] > idx[:-1])).all()):
        return x
    csr = x.layout == torch.sparse_csr
    pairs = torch.stack([outer, idx] if csr else [idx, outer])
    # a new COO tensor (x.to_sparse_coo() is marked coalesced and would keep the copies)
    coo = torch.sparse_coo_tensor(pairs, x.values(), x.shape).coalesce()
    return coo.to_sparse_csr() if csr else coo.to_sparse_csc()


class SentenceSampler(Sampler):
    """Yield mini-batches of whole sentences, each at most ``max_cells`` cells.

    ``sentences`` is a list, or a function of the epoch returning that epoch's sentences (drawn
    anew each epoch, e.g. :func:`~scvi_cellplm.data.random_sentences` seeded by the epoch). With
    ``num_replicas > 1`` (DDP), mini-batches are dealt round-robin to ranks after a shuffle
    seeded by ``seed + epoch``, so ranks see disjoint cells; the last ranks may get one batch fewer
    unless ``pad=True`` repeats batches to equalise counts.
    """

    def __init__(
        self,
        sentences: list[np.ndarray] | Callable[[int], list[np.ndarray]],
        max_cells: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
    ) -> None:
        self.sentences = sentences
        self.max_cells = max_cells
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad = pad

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle (Lightning calls this at the start of every epoch)."""
        self.epoch = epoch

    def _batches(self) -> list[list[np.ndarray]]:
        sentences = self.sentences(self.epoch) if callable(self.sentences) else self.sentences
        order = np.arange(len(sentences))
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(order)
        packed = pack_sentences([sentences[i] for i in order], self.max_cells)
        batches = [[sentences[order[j]] for j in b] for b in packed]
        if self.num_replicas > 1:
            if self.pad and len(batches) % self.num_replicas:
                extra = self.num_replicas - len(batches) % self.num_replicas
                batches = batches + batches[:extra]
            batches = batches[self.rank :: self.num_replicas]
        return batches

    def __iter__(self):
        self.epoch_batches = self._batches()
        yield from self.epoch_batches

    def __len__(self) -> int:
        return len(self._batches())


def sentence_dataloader(
    adata_manager,
    sentences: list[np.ndarray] | Callable[[int], list[np.ndarray]],
    max_cells: int,
    *,
    shuffle: bool = False,
    load_sparse_tensor: bool = False,
    seed: int = 0,
    gene_index: np.ndarray | None = None,
    **kwargs,
) -> DataLoader:
    """Return a :class:`~torch.utils.data.DataLoader` over whole sentences (see :class:`SentenceDataset`)."""
    sampler = SentenceSampler(sentences, max_cells, shuffle=shuffle, seed=seed)
    dataset = SentenceDataset(adata_manager, load_sparse_tensor=load_sparse_tensor,
                              gene_index=gene_index)
    kwargs.setdefault("num_workers", 0)
    return DataLoader(dataset, sampler=sampler, batch_size=None, **kwargs)


def split_within_groups(
    codes: np.ndarray, validation_size: float, seed: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Hold out a seeded random fraction of each group's cells for validation.

    Groups are the non-negative values of ``codes`` (negative codes take part in neither side).
    Each group keeps at least one training cell (``floor(validation_size * n) < n``).

    Returns
    -------
    ``(train, validation)``: sorted obs indices per group code.
    """
    if not 0.0 <= validation_size < 1.0:
        raise InputDataError(f"`validation_size` must be in [0, 1), got {validation_size}.")
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    for code in np.unique(codes[codes >= 0]):
        members = rng.permutation(np.flatnonzero(codes == code))
        n_val = int(np.floor(validation_size * len(members)))
        val[int(code)] = np.sort(members[:n_val])
        train[int(code)] = np.sort(members[n_val:])
    return train, val


def concat_sorted(groups: dict[int, np.ndarray]) -> np.ndarray:
    """All indices of ``groups`` in one sorted array (empty without groups)."""
    return np.sort(np.concatenate(list(groups.values()))) if groups else np.array([], dtype=np.int64)


class SentenceDataSplitter(pl.LightningDataModule):
    """Split cells into training and validation *within each sample*, then build sentences.

    Not scvi-tools' ``DataSplitter``: it splits cells at random and batches them by index, but a
    CellPLM mini-batch must hold whole sentences (cells of one sample attend to each other).

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    sample_codes
        Sample code of each cell.
    max_cells
        Cell budget of a sentence and of a mini-batch.
    windower
        See :func:`~scvi_cellplm.data.make_sentences`.
    validation_size
        Fraction of each sample's cells held out for validation (0 disables validation).
    seed
        Seed of the split and of the shuffling.
    gene_index
        Vocabulary row of each registered column (see :class:`SentenceDataset`).
    train_sentences
        ``"windows"``: training sentences are the samples, windowed like at inference (contiguous
        in space or expression). ``"random"``: each epoch, every sample's training cells are cut
        into new random sentences of at most ``max_cells`` (:func:`~.random_sentences`; seeded by
        ``seed`` and the epoch, identical on every DDP rank). Validation always uses windows.
    """

    def __init__(
        self,
        adata_manager,
        sample_codes: np.ndarray,
        max_cells: int,
        windower: Callable[[np.ndarray], list[np.ndarray]] | None = None,
        validation_size: float = 0.1,
        seed: int = 0,
        gene_index: np.ndarray | None = None,
        train_sentences: Literal["windows", "random"] = "windows",
        **loader_kwargs,
    ) -> None:
        super().__init__()
        if train_sentences not in ("windows", "random"):
            raise InputDataError(f"`train_sentences` must be 'windows' or 'random', got {train_sentences!r}.")
        self.train_sentences = train_sentences
        self.adata_manager = adata_manager
        self.gene_index = gene_index
        self.max_cells = max_cells
        self.windower = windower
        self.seed = seed
        self.loader_kwargs = loader_kwargs
        self.sample_codes = np.asarray(sample_codes).reshape(-1)
        train, val = split_within_groups(self.sample_codes, validation_size, seed)
        self.train_idx, self.val_idx = concat_sorted(train), concat_sorted(val)
        self.test_idx = np.array([], dtype=int)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        self._train_loader: DataLoader | None = None

    def _loader(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        if shuffle and self.train_sentences == "random":
            codes, max_cells, seed = self.sample_codes, self.max_cells, self.seed

            def sentences(epoch: int) -> list[np.ndarray]:
                return random_sentences(codes, max_cells, indices, np.random.default_rng([seed, epoch]))
        else:
            sentences = make_sentences(self.sample_codes, self.max_cells, self.windower, indices=indices)
        return sentence_dataloader(
            self.adata_manager, sentences, self.max_cells, shuffle=shuffle, seed=self.seed,
            gene_index=self.gene_index, **self.loader_kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Mini-batches of whole sentences of the training cells, reshuffled every epoch.

        Built once (windowing a large sample costs a PCA or a graph cut): ``train`` asks for it
        to count the steps of an epoch before Lightning does.
        """
        if self._train_loader is None:
            self._train_loader = self._loader(self.train_idx, shuffle=True)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        """Mini-batches of whole sentences of the validation cells (``[]`` without any)."""
        return self._loader(self.val_idx, shuffle=False) if self.n_val else []


__all__ = [
    "SentenceDataSplitter",
    "SentenceDataset",
    "SentenceSampler",
    "sentence_dataloader",
]
