"""Block ids -> contiguous byte buffers, the message plan both sides agree on, and the checksum.

Both pools are block-major, so a run of consecutive block ids is one contiguous slice. Per pool
the sender and the receiver each know both sides' run lengths (exchanged in the header), and:
  - equal run lengths: one message per run, straight from source slice into destination slice;
  - different: one message for the whole pool; a side with several runs gathers/scatters through
    one contiguous staging buffer, a side with a single run uses its slice directly.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gptoss_engine.kv_layout import KVCache, KVLayout

def runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """[(first_block, count)] for each run of consecutive ids, in order."""
    out: list[tuple[int, int]] = []
    for b in block_ids:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def check_block_ids(pool: torch.Tensor, block_ids: Sequence[int], what: str) -> None:
    n = int(pool.shape[0])
    bad = [b for b in block_ids if not (0 <= int(b) < n)]
    if bad:
        raise ValueError(f"{what} block ids out of range [0, {n}): {bad[:8]}")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"{what} block ids repeat: {list(block_ids)[:16]}")


def _as_bytes(t: torch.Tensor) -> Any:
    """A buffer ucxx accepts: numpy view for CPU (torch CPU tensors lack the buffer protocol),
    the tensor itself on CUDA (__cuda_array_interface__). Viewed as uint8 since neither numpy nor
    the CUDA array interface knows bfloat16."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat


@dataclass
class PoolPlan:
    """How one pool's blocks move: the buffers to send (sender) or receive into (receiver), and
    for a receiver with a staging buffer, where to scatter it afterwards."""
    buffers: list[Any]
    staging: torch.Tensor | None = None
    scatter_ids: torch.Tensor | None = None
    pool: torch.Tensor | None = None

    def finish_receive(self) -> None:
        if self.staging is not None:
            self.pool.index_copy_(0, self.scatter_ids, self.staging)


def plan_pool(pool: torch.Tensor, own_ids: Sequence[int], peer_run_lengths: Sequence[int],
              sending: bool) -> PoolPlan:
    own_runs = runs(own_ids)
    if not own_ids:
        return PoolPlan([])
    if [n for _, n in own_runs] == list(peer_run_lengths):
        return PoolPlan([_as_bytes(pool[first:first + n]) for first, n in own_runs])
    if len(own_runs) == 1:
        first, n = own_runs[0]
        return PoolPlan([_as_bytes(pool[first:first + n])])
    ids = torch.tensor(list(own_ids), dtype=torch.long, device=pool.device)
    if sending:
        staging = pool.index_select(0, ids)
        return PoolPlan([_as_bytes(staging)])
    staging = torch.empty((len(own_ids), *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    return PoolPlan([_as_bytes(staging)], staging=staging, scatter_ids=ids, pool=pool)


def layout_dict(layout: KVLayout) -> dict:
    """The fields both sides must agree on, as sent in the request (dtype by name)."""
    return {"block_size": layout.block_size, "num_full_layers": layout.num_full_layers,
            "num_swa_layers": layout.num_swa_layers, "num_kv_heads": layout.num_kv_heads,
            "head_dim": layout.head_dim, "sliding_window": layout.sliding_window,
            "dtype": str(layout.dtype).removeprefix("torch.")}


def kv_checksum(kv: KVCache, full_block_ids: Sequence[int], swa_block_ids: Sequence[int]) -> int:
    """CRC-32 of the blocks' bytes in the given order (full blocks, then swa blocks).

    Chained run by run, so it does not depend on how ids group into runs (sender and receiver
    may differ). zlib.crc32 measured 1.6 GB/s on this CPU vs 0.2 GB/s for a position-weighted
    torch sum; CUDA blocks are copied to the host run by run first (slow: meant for tests and
    debugging; the descriptor's checksum 0 means "not computed")."""
    crc = 0
    for pool, ids in ((kv.full, full_block_ids), (kv.swa, swa_block_ids)):
        for first, n in runs(ids):
            crc = zlib.crc32(pool[first:first + n].reshape(-1).view(torch.uint8).cpu().numpy(), crc)
    return crc
