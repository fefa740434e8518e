"""Training pairs for perturbation prediction: sentences of control cells, perturbed targets."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .._constants import DATA_KEYS, REGISTRY_KEYS
from ._loader import concat_sorted, split_within_groups

Item = tuple[np.ndarray, int, np.ndarray]
"""One training item: control cells (a sentence), a perturbation code, target cells (as many)."""


def log_normalize(x: np.ndarray, target_sum: float) -> np.ndarray:
    """``log1p(x / total * target_sum)`` per row (rows without counts stay 0)."""
    total = x.sum(axis=1, keepdims=True)
    return np.log1p(x / np.maximum(total, 1e-12) * target_sum).astype(np.float32)


class PerturbationPairDataset(Dataset):
    """Fetch a list of items as one mini-batch.

    The control cells of every item form one sentence (with that item's perturbation applied
    to all of them); each control cell is paired with one target cell of the perturbation.
    """

    def __init__(self, adata_manager, multi_hot: np.ndarray, target_sum: float) -> None:
        self.inner = adata_manager.create_torch_dataset()
        self.multi_hot = np.asarray(multi_hot, dtype=np.float32)
        self.target_sum = target_sum

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, items: list[Item]) -> dict:
        controls = np.concatenate([c for c, _, _ in items])
        targets = np.concatenate([t for _, _, t in items])
        cells, inverse = np.unique(np.concatenate([controls, targets]), return_inverse=True)
        data = self.inner[cells]
        n = len(controls)
        out = {k: torch.as_tensor(np.asarray(v)[inverse[:n]]) for k, v in data.items()}
        target_counts = np.asarray(data[REGISTRY_KEYS.X_KEY])[inverse[n:]]
        out[DATA_KEYS.TARGET_KEY] = torch.as_tensor(log_normalize(target_counts, self.target_sum))
        codes = np.repeat([code for _, code, _ in items], [len(c) for c, _, _ in items])
        out[DATA_KEYS.PERTURBATION_KEY] = torch.as_tensor(self.multi_hot[codes])
        out[DATA_KEYS.SENTENCE_KEY] = torch.as_tensor(np.repeat(np.arange(len(items)), [len(c) for c, _, _ in items]))
        out[DATA_KEYS.INDICES_KEY] = torch.as_tensor(controls)
        return out


class PerturbationPairSampler(Sampler):
    """Draw the items of an epoch and group them into mini-batches of ``items_per_batch``.

    Each perturbation gets about one item per ``sentence length`` of its cells, so each target
    cell is used about once per epoch. An item takes a random control sentence and as many
    random target cells of the perturbation, from the sentence's sample when it has any.
    With ``fixed``, the items are drawn once (validation).
    """

    def __init__(
        self,
        sentences: list[np.ndarray],
        sentence_samples: np.ndarray,
        groups: dict[int, np.ndarray],
        sample_codes: np.ndarray,
        items_per_batch: int,
        *,
        seed: int = 0,
        fixed: bool = False,
    ) -> None:
        self.sentences = sentences
        self.sentence_samples = np.asarray(sentence_samples)
        self.groups = {c: np.asarray(v) for c, v in groups.items() if len(v)}
        self.sample_codes = sample_codes
        self.items_per_batch = max(int(items_per_batch), 1)
        self.rng = np.random.default_rng(seed)
        mean_length = float(np.mean([len(s) for s in sentences]))
        self.n_items = {c: max(1, round(len(v) / mean_length)) for c, v in self.groups.items()}
        self.fixed = self._draw() if fixed else None

    def _draw(self) -> list[list[Item]]:
        rng = self.rng
        items: list[Item] = []
        for code, cells in self.groups.items():
            for _ in range(self.n_items[code]):
                s = int(rng.integers(len(self.sentences)))
                sentence = self.sentences[s]
                pool = cells[self.sample_codes[cells] == self.sentence_samples[s]]
                pool = cells if len(pool) == 0 else pool
                items.append((sentence, code, rng.choice(pool, len(sentence), replace=len(pool) < len(sentence))))
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        k = self.items_per_batch
        return [items[i : i + k] for i in range(0, len(items), k)]

    def __iter__(self):
        yield from self.fixed if self.fixed is not None else self._draw()

    def __len__(self) -> int:
        return -(-sum(self.n_items.values()) // self.items_per_batch)


class PerturbationDataSplitter(pl.LightningDataModule):
    """Split each perturbation's cells into training and validation targets.

    The targets are paired with sentences of control cells.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    sentences
        Sentences of control cells (the inputs), e.g. all control cells of each sample.
    sample_codes
        Sample code of each cell.
    codes
        Perturbation code of each cell (row of ``multi_hot``), -1 for cells not to use.
    multi_hot
        ``(n_perturbations, n_input)``: the genes of each perturbation code (control: zeros).
    max_cells
        Cell budget of a mini-batch.
    target_sum
        Library size the targets are normalised to before ``log1p``.
    validation_size
        Fraction of each perturbation's cells held out for validation.
    seed
        Seed of the split and of the pairing.
    """

    def __init__(
        self,
        adata_manager,
        sentences: list[np.ndarray],
        sample_codes: np.ndarray,
        codes: np.ndarray,
        multi_hot: np.ndarray,
        max_cells: int,
        target_sum: float = 1e4,
        validation_size: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.adata_manager = adata_manager
        self.sentences = sentences
        self.sample_codes = np.asarray(sample_codes).reshape(-1)
        self.sentence_samples = np.array([self.sample_codes[s[0]] for s in sentences])
        self.dataset = PerturbationPairDataset(adata_manager, multi_hot, target_sum)
        self.items_per_batch = max(1, max_cells // max(len(s) for s in sentences))
        self.seed = seed
        self.train_groups, self.val_groups = split_within_groups(codes, validation_size, seed)
        self.train_idx, self.val_idx = concat_sorted(self.train_groups), concat_sorted(self.val_groups)
        self.test_idx = np.array([], dtype=int)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)

    def _loader(self, groups: dict, fixed: bool, seed: int) -> DataLoader:
        sampler = PerturbationPairSampler(
            self.sentences, self.sentence_samples, groups, self.sample_codes, self.items_per_batch,
            seed=seed, fixed=fixed,
        )
        return DataLoader(self.dataset, sampler=sampler, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        """Return a loader of new random pairs every epoch."""
        return self._loader(self.train_groups, fixed=False, seed=self.seed)

    def val_dataloader(self) -> DataLoader | list:
        """Return a loader of the same pairs every epoch (``[]`` without validation cells)."""
        return self._loader(self.val_groups, fixed=True, seed=self.seed + 1) if self.n_val else []
