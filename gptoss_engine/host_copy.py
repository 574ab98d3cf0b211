"""Per-step values to the device without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory with non_blocking=False, and
PyTorch then synchronises the stream: the host waits for every launch queued before it (the
forward in flight), which stalls the overlap scheduler. Everything a step sends goes through
`to_device` instead: one pinned buffer, one asynchronous copy.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(arrays: Sequence[np.ndarray | Sequence[float]], dtype: torch.dtype,
              device: torch.device) -> list[torch.Tensor]:
    """1-D device tensors of `arrays`' values, from ONE host->device copy: they are packed into a
    host buffer (pinned on CUDA, so the copy is async; PyTorch's pinned allocator keeps the
    buffer from reuse until the copy is done) and the device copy is split into views. Each
    piece starts 64-byte aligned: Triton specializes kernels on pointer alignment, so an
    unaligned view would compile (and run) another variant."""
    arrays = [a if isinstance(a, np.ndarray) else np.asarray(a) for a in arrays]
    align = 64 // torch.empty((), dtype=dtype).element_size()
    sizes = [int(a.size) for a in arrays]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // align) * align)
    host = torch.empty(offsets[-1], dtype=dtype, pin_memory=device.type == "cuda")
    buf = host.numpy()
    for a, off, size in zip(arrays, offsets, sizes):
        buf[off:off + size] = a.ravel()
    dev = host.to(device, non_blocking=True)
    return [dev[off:off + size] for off, size in zip(offsets, sizes)]
