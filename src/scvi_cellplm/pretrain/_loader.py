"""Mini-batches of whole sentences streamed from a :class:`~scvi_cellplm.pretrain.Corpus`.

The sampler is a pure function of ``(seed, epoch, world size, rank)``: every rank computes the same
global list of mini-batches and takes every ``world_size``-th one, so ranks see disjoint cells and
together every cell of an epoch exactly once. Its position within the epoch is saved in Lightning
checkpoints and skipped on resume, so a resumed run sees the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset, Sampler

from .._constants import DATA_KEYS, REGISTRY_KEYS
from .._exceptions import CheckpointError, InputDataError
from ..data import pack_sentences
from ._corpus import Corpus

logger = logging.getLogger(__name__)



class CorpusDataset(Dataset):
    """Read the cells of a mini-batch of sentences from the corpus.

    Items are ``(sentence ids, padding flag)``; the result holds the keys the
    :class:`~scvi_cellplm.module.CellPLMModule` and its training plan consume: counts over the
    vocabulary (a sparse CSR tensor), batch, dataset and platform codes, the sentence number of
    each cell within the mini-batch and its global cell id (``DATA_KEYS.INDICES_KEY``).
    """

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus

    def __len__(self) -> int:
        return self.corpus.n_sentences

    def __getitem__(self, item: tuple[np.ndarray, bool]) -> dict:
        sentence_ids, padding = item
        corpus = self.corpus
        blocks, ids, datasets, sentence = [], [], [], []
        for k, i in enumerate(sentence_ids):
            d, rows = corpus.sentence(int(i))
            blocks.append(corpus.read(d, rows))
            ids.append(corpus.offsets[d] + rows)
            datasets.append(np.full(len(rows), d))
            sentence.append(np.full(len(rows), k))
        x = sparse.vstack(blocks, format="csr")
        cell_ids = np.concatenate(ids)
        return {
            REGISTRY_KEYS.X_KEY: _csr_tensor(x),
            REGISTRY_KEYS.BATCH_KEY: torch.from_numpy(corpus.batch_codes[cell_ids].astype(np.int64))[:, None],
            REGISTRY_KEYS.DATASET_KEY: torch.from_numpy(np.concatenate(datasets).astype(np.int64))[:, None],
            DATA_KEYS.PLATFORM_KEY: torch.from_numpy(corpus.platform_codes[cell_ids].astype(np.int64))[:, None],
            DATA_KEYS.SENTENCE_KEY: torch.from_numpy(np.concatenate(sentence).astype(np.int64)),
            DATA_KEYS.INDICES_KEY: torch.from_numpy(cell_ids.astype(np.int64)),
            DATA_KEYS.PADDING_KEY: torch.tensor(bool(padding)),
        }


def _csr_tensor(x) -> torch.Tensor:
    """Convert a scipy CSR matrix to a torch sparse CSR tensor (float32)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(x.indptr.astype(np.int64)),
            torch.from_numpy(x.indices.astype(np.int64)),
            torch.from_numpy(x.data.astype(np.float32)),
            size=x.shape,
            check_invariants=False,
        )


class CorpusSampler(Sampler):
    """Mini-batches of whole sentences (at most ``max_cells`` cells), dealt to DDP ranks.

    Each epoch, sentences are shuffled with ``(seed, epoch)`` and packed into mini-batches; the
    global list is made a multiple of ``num_replicas`` long by splitting mini-batches of several
    sentences in two (and, only when no mini-batch can be split, by repeating mini-batches flagged
    as padding, trained with weight 0), then rank ``r`` takes mini-batches ``r, r + R, ...``. No
    cell is dropped or trained twice in an epoch.

    Parameters
    ----------
    sentence_sizes
        Number of cells of each sentence.
    max_cells
        Cell budget of a mini-batch.
    seed
        Seed of the shuffle.
    shuffle
        Shuffle sentences every epoch.
    num_replicas, rank
        DDP world size and this process's rank.
    """

    def __init__(
        self,
        sentence_sizes: np.ndarray,
        max_cells: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise InputDataError(f"`rank` must be in [0, {num_replicas}), got {rank}.")
        self.sentence_sizes = np.asarray(sentence_sizes)
        self.max_cells = int(max_cells)
        self.seed, self.shuffle = int(seed), shuffle
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self.start = 0  # mini-batches of this epoch to skip on the next iteration (resume)
        self._cache: tuple[int, list] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle (Lightning calls this at the start of every epoch)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def global_batches(self, epoch: int | None = None) -> list[tuple[np.ndarray, bool]]:
        """All ranks' mini-batches of ``epoch`` as ``(sentence ids, padding)``, in dealing order."""
        epoch = self.epoch if epoch is None else epoch
        order = np.arange(len(self.sentence_sizes))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        sizes = self.sentence_sizes[order]
        packed = pack_sentences([range(int(n)) for n in sizes], self.max_cells)
        batches = [order[b] for b in packed]
        world = self.num_replicas
        while len(batches) % world:
            # split the mini-batch with the most sentences (the first such, deterministically)
            counts = np.array([len(b) for b in batches])
            j = int(np.argmax(counts))
            if counts[j] < 2:
                break
            half = len(batches[j]) // 2
            batches[j : j + 1] = [batches[j][:half], batches[j][half:]]
        out = [(b, False) for b in batches]
        if len(out) % world:
            n_pad = world - len(out) % world
            logger.warning("Padding %d DDP rank(s) with repeated mini-batches of weight 0.", n_pad)
            out += [(b, True) for b in batches[:n_pad]]
        return out

    def epoch_batches(self) -> list[tuple[np.ndarray, bool]]:
        """Return the mini-batches of this rank in the current epoch."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.global_batches()[self.rank :: self.num_replicas])
        return self._cache[1]

    def __iter__(self):
        batches = self.epoch_batches()
        start, self.start = self.start, 0
        yield from batches[start:]

    def __len__(self) -> int:
        return len(self.epoch_batches())


class CorpusDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over a :class:`CorpusSampler` that Lightning can checkpoint.

    Its state is the epoch and the number of mini-batches handed out in it.
    """

    def __init__(self, dataset: CorpusDataset, sampler: CorpusSampler, **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.sampler.start
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        """Epoch, mini-batches consumed in it, and the sampler's seed and world size."""
        s = self.sampler
        return {"epoch": s.epoch, "consumed": self.consumed, "seed": s.seed, "num_replicas": s.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        """Resume in the saved epoch after the mini-batches already consumed."""
        s = self.sampler
        if state.get("seed") != s.seed:
            raise CheckpointError(
                f"The checkpoint was trained with seed {state.get('seed')}, not {s.seed}: resume with "
                f"`seed={state.get('seed')}`."
            )
        consumed = int(state["consumed"])
        if state.get("num_replicas") != s.num_replicas:  # same global position, other dealing
            consumed = consumed * int(state["num_replicas"]) // s.num_replicas
            logger.warning("Resuming on %d devices from a checkpoint of %s: the rest of this epoch is "
                           "approximate.", s.num_replicas, state.get("num_replicas"))
        s.epoch, s.start = int(state["epoch"]), consumed
        self.consumed = consumed


class CorpusDataModule(pl.LightningDataModule):
    """Training mini-batches of a :class:`~scvi_cellplm.pretrain.Corpus` for Lightning (no validation).

    The rank and world size come from the trainer.

    Parameters
    ----------
    corpus
        The corpus.
    max_cells
        Cell budget of a mini-batch (default: the corpus's sentence budget).
    seed
        Seed of the shuffle.
    num_workers
        DataLoader worker processes (each opens its own file handles).
    """

    def __init__(self, corpus: Corpus, max_cells: int | None = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.corpus = corpus
        self.max_cells = max_cells or corpus.max_cells
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self) -> CorpusDataLoader:
        """Rank-aware, resumable loader of whole sentences."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = CorpusSampler(self.corpus.sentence_sizes, self.max_cells, seed=self.seed,
                                num_replicas=world, rank=rank)
        return CorpusDataLoader(CorpusDataset(self.corpus), sampler, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0)
