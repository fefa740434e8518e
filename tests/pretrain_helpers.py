"""Helpers of tests/test_pretrain.py that DDP worker processes must import by name."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from scvi_cellplm.data import INDICES_KEY
from scvi_cellplm.pretrain import PADDING_KEY

FAST = {"accelerator": "cpu", "devices": 1, "progress_bar": False, "logger_kind": "none"}
"""pretrain() keywords of a quick CPU run without logs (add ``model_kwargs``)."""


@pytest.fixture
def one_thread():
    """The CI machine has 2 shared cores: one thread per process is faster and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordCells(pl.Callback):
    """Record the global ids of the cells each rank trains on; save them and the final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not bool(batch[PADDING_KEY]):
            self.seen.append(batch[INDICES_KEY].cpu().numpy())

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.module.state_dict().items()}
        seen = np.concatenate(self.seen) if self.seen else np.zeros(0, dtype=np.int64)
        torch.save({"seen": torch.from_numpy(seen), "state": state, "steps": trainer.global_step},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class Crash(RuntimeError):
    """A simulated crash."""


class CrashAt(pl.Callback):
    """Raise :class:`Crash` when step ``step`` is about to run (its checkpoints are written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash before step {self.step}")
