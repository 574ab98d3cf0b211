"""KV cache per attention-TP rank, and the head mapping for a hand-off between a prefill group of
TP=a and a decode group of TP=b.

Rank r of a TP=t group holds KV heads [r*K/t, (r+1)*K/t) of every layer (K = num_key_value_heads),
in the same block-major pools as an unsplit engine (kv_layout.py) with num_kv_heads = K/t. So a
hand-off moves, for each destination rank, the matching head range out of one or more source ranks:
    a == b: rank i -> rank i, all heads;
    a | b (decode splits finer): source rank i feeds destination ranks i*b/a .. (i+1)*b/a - 1;
    b | a (decode splits coarser): destination rank j gathers source ranks j*a/b .. (j+1)*a/b - 1.
In a block the heads are the second-innermost dimension ([.., 2, block_size, heads, head_dim]),
so a head range is strided, not one contiguous run: the sender stages it contiguous (or the
transport takes strided descriptors) when a != b. Other ratios (e.g. 2 -> 3) would split one rank's
heads across ranks unevenly and are refused, as is a TP that does not divide K (no KV-head
replication yet).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss_engine.kv_layout import KVLayout
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.parallel.topology import ParallelConfigError, Topology

HEAD_DIM_OF_POOL = 4  # pools are [blocks, layers, 2 (K, V), block_size, kv_heads, head_dim]


@dataclass(frozen=True)
class HeadTransfer:
    src_rank: int      # attention TP rank in the sending (prefill) group
    dst_rank: int      # attention TP rank in the receiving (decode) group
    src_heads: range   # local KV head indices on the source rank
    dst_heads: range   # local KV head indices on the destination rank (same length)


def rank_kv_layout(config: ModelConfig, topology: Topology, block_size: int, dtype: torch.dtype) -> KVLayout:
    """The KV layout one rank allocates: its share of the KV heads, everything else unchanged."""
    return topology.shard_config(config).kv_layout(block_size, dtype)


def kv_head_transfers(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadTransfer]:
    """Which source rank's heads feed which destination rank's heads; raises ParallelConfigError
    for layouts that cannot be mapped (checked at registration, so a client never waits on it)."""
    for name, tp in (("prefill", src_tp), ("decode", dst_tp)):
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ParallelConfigError(f"{name} attention TP size must be a positive integer, got {tp!r}")
        if num_kv_heads % tp:
            raise ParallelConfigError(f"{name} attention TP size {tp} does not divide num_key_value_heads "
                                      f"({num_kv_heads})")
    if src_tp % dst_tp and dst_tp % src_tp:
        raise ParallelConfigError(f"KV hand-off from TP={src_tp} to TP={dst_tp} is not supported: one size "
                                  f"must divide the other")
    src_n, dst_n = num_kv_heads // src_tp, num_kv_heads // dst_tp
    step = min(src_n, dst_n)  # each transfer is one source rank's share or one destination rank's, the smaller
    transfers = []
    for first in range(0, num_kv_heads, step):
        s, d = first // src_n, first // dst_n
        transfers.append(HeadTransfer(s, d, range(first - s * src_n, first - s * src_n + step),
                                      range(first - d * dst_n, first - d * dst_n + step)))
    return transfers


def copy_heads(transfer: HeadTransfer, src_pool: torch.Tensor, src_blocks: torch.Tensor,
               dst_pool: torch.Tensor, dst_blocks: torch.Tensor) -> None:
    """Apply one transfer between two ranks' pools of the same kind (full or sliding), block i of
    src_blocks -> block i of dst_blocks. The reference a staging sender/receiver must match."""
    if src_blocks.shape != dst_blocks.shape:
        raise ValueError(f"{src_blocks.numel()} source blocks for {dst_blocks.numel()} destination blocks")
    src = src_pool.index_select(0, src_blocks).narrow(HEAD_DIM_OF_POOL, transfer.src_heads.start,
                                                      len(transfer.src_heads))
    dst_pool[dst_blocks, :, :, :, transfer.dst_heads.start:transfer.dst_heads.stop] = src
