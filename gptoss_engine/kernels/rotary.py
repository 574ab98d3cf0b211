"""Rotary embedding of q and k in place, one launch per layer, on the fused q|k|v projection.

The torch form (rope.apply_rotary) costs ~12 launches a layer on the decode path (chunk, four
muls, add, sub, cat, for q and for k: ~22 us of a 150 us layer at batch 1, PERF_NOTES v5); here
one program per token rotates every q and k head of that token, in fp32, and writes back in place,
so v and the rotated q/k stay views of the one projection output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, s_t, s_ct, s_st,
                   HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_P2)
    i = tl.arange(0, HALF)
    ok = (h < HEADS)[:, None]
    cos = tl.load(cos_ptr + t * s_ct + i).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * s_st + i).to(tl.float32)[None, :]
    first = qkv_ptr + t * s_t + h[:, None] * (2 * HALF) + i[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty), mask=ok)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty), mask=ok)


def rotary_qk_(qkv: torch.Tensor, rotated_heads: int, head_dim: int, cos: torch.Tensor,
               sin: torch.Tensor) -> None:
    """qkv [T, >= rotated_heads * head_dim] (q heads then k heads first): rotate the pairs
    (i, i + D/2) of the first `rotated_heads` heads by cos/sin [T, D/2], in place."""
    T = qkv.shape[0]
    if T == 0:
        return
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("rotary_qk_ needs qkv, cos and sin contiguous in their last dimension")
    half = head_dim // 2
    if half & (half - 1):
        raise ValueError(f"head_dim {head_dim} must be twice a power of two")
    _rotary_kernel[(T,)](qkv, cos, sin, qkv.stride(0), cos.stride(0), sin.stride(0),
                         HEADS=rotated_heads, HEADS_P2=triton.next_power_of_2(rotated_heads), HALF=half,
                         num_warps=4)
