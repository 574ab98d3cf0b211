"""Arrival counters for kernels whose last program to finish a unit of work does that unit's epilogue
(routing: the last of a token's router programs takes its top-k; splitk_gemm: the last of a tile's K
splits sums the partials). Each program counts its arrival with an acq_rel atomic; the one that sees
the count complete does the epilogue and resets the counter to zero. So a buffer is zero between
launches, and launches one after another on one stream share it.

One buffer per (owner, device), made by the owner's first call. That call must be eager: CUDA graphs
capture the launches after an eager warm-up (cuda_graphs.py), and a buffer first made inside a
capture would live in the graph's private pool, zeroed only when the graph was built.
"""
from __future__ import annotations

import torch

_buffers: dict[tuple[str, torch.device], torch.Tensor] = {}


def counters(owner: str, device: torch.device, size: int) -> torch.Tensor:
    """The owner's int32 counters on `device` (at least `size`), zero between launches. A buffer is
    never replaced: captured graphs hold its address."""
    buf = _buffers.get((owner, device))
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner}: the first call on a device must run eagerly, before graph capture")
        buf = _buffers[(owner, device)] = torch.zeros(size, dtype=torch.int32, device=device)
    elif buf.numel() < size:
        raise ValueError(f"{owner}: {size} arrival counters asked for, {buf.numel()} made by its first call")
    return buf
