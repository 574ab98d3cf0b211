"""Router top-k + softmax in one launch: logits [T, E] -> (topk_ids [T, k] int64, weights [T, k] fp32).

Replaces torch.topk + softmax (two launches and a sort per layer at decode). One program per
token holds its E logits in registers and takes the k largest by repeated max (ties -> lowest
expert id, as torch.topk on CUDA gives for distinct values; equal logits are vanishingly rare),
in descending order, then the softmax over those k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_softmax_kernel(logits_ptr, ids_ptr, wts_ptr, E, s_lt, TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + t.to(tl.int64) * s_lt + e, mask=e < E, other=float("-inf")).to(tl.float32)
    slot = tl.arange(0, BLOCK_K)
    vals = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for j in tl.static_range(TOPK):
        m = tl.max(logits, 0)
        idx = tl.min(tl.where(logits == m, e, BLOCK_E), 0)
        vals = tl.where(slot == j, m, vals)
        ids = tl.where(slot == j, idx.to(tl.int64), ids)
        logits = tl.where(e == idx, float("-inf"), logits)
    p = tl.exp(vals - tl.max(vals, 0))
    p = p / tl.sum(p, 0)
    ok = slot < TOPK
    tl.store(ids_ptr + t * TOPK + slot, ids, mask=ok)
    tl.store(wts_ptr + t * TOPK + slot, p, mask=ok)


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as (torch.topk(logits, k).indices, softmax(values)) for logits [T, E]."""
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"logits must be [T, E] with 1 <= top_k <= E; got {tuple(logits.shape)}, k={top_k}")
    T, E = logits.shape
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    wts = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, wts
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    _topk_softmax_kernel[(T,)](logits, ids, wts, E, logits.stride(0), TOPK=top_k,
                               BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k),
                               num_warps=1)
    return ids, wts
