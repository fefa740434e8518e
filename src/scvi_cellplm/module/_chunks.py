"""Rows per chunk of the in-place inference path, by device.

The inference path (embedder, transformer blocks, latent layer) works on row chunks so that its
temporaries stay bounded at sentences of many thousand cells. On a CPU small chunks keep them in
cache. On a GPU every chunk is one more round of kernel launches and smaller matrix products, and
memory is plentiful: chunks are large, bounded in elements so a wide temporary (a densified chunk
of a 20,000-gene matrix) stays at 1 GiB of float32. Measured on an NVIDIA H200 (paper network,
48,082 cells, one sentence; ``benchmarks/gpu_diagnostics.py``, issue #21): forward 0.28-0.31 s
with the CPU sizes, 0.10 s with these (bf16: 0.29-0.34 s and 0.03 s).
"""

from __future__ import annotations

import torch

GPU_CHUNK_ROWS = 65_536
"""Rows per chunk on an accelerator (at most)."""
GPU_CHUNK_ELEMENTS = 2**28
"""Elements of one chunk's widest temporary on an accelerator (1 GiB of float32)."""


def rows_per_chunk(cpu_rows: int, device: torch.device, row_width: int = 0) -> int:
    """Return the rows per chunk of an inference loop on ``device``.

    ``cpu_rows`` on a CPU; on an accelerator :data:`GPU_CHUNK_ROWS`, fewer where a temporary row
    is ``row_width`` elements wide (at most :data:`GPU_CHUNK_ELEMENTS` elements per chunk), never
    fewer than ``cpu_rows``.
    """
    if device.type == "cpu":
        return cpu_rows
    rows = GPU_CHUNK_ROWS if row_width <= 0 else min(GPU_CHUNK_ROWS, GPU_CHUNK_ELEMENTS // row_width)
    return max(cpu_rows, rows)
