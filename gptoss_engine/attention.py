"""Paged attention over the block-major KV pools (kv_layout.py), with gpt-oss's sinks and sliding window.

The reference here is plain PyTorch, one sequence at a time. On CUDA, when the Triton kernels
import, `paged_attention` and `write_kv` dispatch to `gptoss_engine.kernels.paged_attention`
(same signatures); the references then only serve as the parity baseline. The dispatch matters
for `write_kv` beyond speed: the reference's boolean-mask indexing syncs the host, which breaks
CUDA-graph capture of a decode step.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from gptoss_engine.step_batch import StepBatch


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from gptoss_engine.kernels import paged_attention as kernels
    except ImportError:
        return None
    return kernels


def write_kv(pool: torch.Tensor, layer_in_pool: int, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this step's K/V [T, kv_heads, D] at slots block*bs+offset; slot -1 = not stored (padding)."""
    if k.is_cuda and (kernels := _kernels()) is not None:
        kernels.write_kv(pool, layer_in_pool, slot_mapping, k, v)
        return
    write_kv_reference(pool, layer_in_pool, slot_mapping, k, v)


def write_kv_reference(pool: torch.Tensor, layer_in_pool: int, slot_mapping: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> None:
    block_size = pool.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    pool[blocks, layer_in_pool, 0, offsets] = k[keep].to(pool.dtype)
    pool[blocks, layer_in_pool, 1, offsets] = v[keep].to(pool.dtype)


def paged_attention(q: torch.Tensor, pool: torch.Tensor, layer_in_pool: int, block_tables: torch.Tensor,
                    batch: StepBatch, sinks: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]. A query at position p attends to the keys at positions
    [p-window+1 .. p] (sliding) or [0 .. p] (full) of its own sequence, read through block_tables."""
    if q.is_cuda and (kernels := _kernels()) is not None:
        return kernels.paged_attention(q, pool, layer_in_pool, block_tables, batch, sinks, scale, window)
    return paged_attention_reference(q, pool, layer_in_pool, block_tables, batch, sinks, scale, window)


def paged_attention_reference(q: torch.Tensor, pool: torch.Tensor, layer_in_pool: int,
                              block_tables: torch.Tensor, batch: StepBatch, sinks: torch.Tensor,
                              scale: float, window: int | None) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = pool.shape[3], pool.shape[4]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = batch.query_start_loc.tolist()
    seq_lens = batch.seq_lens.tolist()
    for i, seq_len in enumerate(seq_lens):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        q_pos = batch.positions[s:e]
        first_key = 0 if window is None else max(0, int(q_pos.min()) - window + 1)
        k_pos = torch.arange(first_key, seq_len, device=q.device)
        blocks = block_tables[i, k_pos // block_size].long()
        if bool((blocks < 0).any()):
            missing = sorted(set((k_pos[blocks < 0] // block_size).tolist()))
            raise ValueError(f"sequence {i}: logical blocks {missing} needed for attention have no physical block")
        kv = pool[blocks, layer_in_pool, :, k_pos % block_size].float()  # [K, 2, Hkv, D]
        keys = kv[:, 0].repeat_interleave(group, dim=1)                   # [K, Hq, D]
        values = kv[:, 1].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * scale  # [Hq, Q, K]
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        # The sink is one extra logit per head in the softmax denominator; it carries no value.
        sink = sinks.float()[:, None, None].expand(num_heads, e - s, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
