"""The KV cache's memory layout: two block pools, each block-major.

    full pool: [num_full_blocks, num_full_layers, 2 (K, V), block_size, num_kv_heads, head_dim]
    swa  pool: [num_swa_blocks,  num_swa_layers,  2 (K, V), block_size, num_kv_heads, head_dim]

Block-major means one physical block holds every layer's K and V for block_size tokens, so a
sequence's KV is a handful of large contiguous pieces (runs of consecutive block ids) that a
transfer can move without per-layer descriptors. Full-attention layers keep every block of a
sequence; sliding-window layers keep only the blocks that hold the last `sliding_window`
positions: older ones go back to the pool (still hashed for prefix caching until reused).

Layer i is a full layer if config.layer_types[i] == "full_attention"; its index inside its pool is
the number of layers of the same kind before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    block_size: int
    num_full_layers: int
    num_swa_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    dtype: torch.dtype

    @property
    def bytes_per_full_block(self) -> int:
        return self._block_bytes(self.num_full_layers)

    @property
    def bytes_per_swa_block(self) -> int:
        return self._block_bytes(self.num_swa_layers)

    def _block_bytes(self, num_layers: int) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def swa_blocks_per_window(self) -> int:
        """Sliding blocks a sequence needs for its window (+1: the window straddles a block edge)."""
        return -(-self.sliding_window // self.block_size) + 1


@dataclass
class KVCache:
    layout: KVLayout
    full: torch.Tensor  # [num_full_blocks, num_full_layers, 2, bs, kv_heads, head_dim]
    swa: torch.Tensor   # [num_swa_blocks, num_swa_layers, 2, bs, kv_heads, head_dim]

    @classmethod
    def allocate(cls, layout: KVLayout, num_full_blocks: int, num_swa_blocks: int,
                 device: torch.device | str) -> "KVCache":
        shape = (layout.block_size, layout.num_kv_heads, layout.head_dim)
        full = torch.zeros((num_full_blocks, layout.num_full_layers, 2, *shape), dtype=layout.dtype, device=device)
        swa = torch.zeros((num_swa_blocks, layout.num_swa_layers, 2, *shape), dtype=layout.dtype, device=device)
        return cls(layout, full, swa)

    @property
    def num_full_blocks(self) -> int:
        return int(self.full.shape[0])

    @property
    def num_swa_blocks(self) -> int:
        return int(self.swa.shape[0])
