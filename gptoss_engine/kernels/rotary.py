"""Rotary embedding on the fused q|k|v projection, one launch per layer.

The torch form (rope.apply_rotary) costs ~12 launches a layer on the decode path (chunk, four
muls, add, sub, cat, for q and for k: ~22 us of a 150 us layer at batch 1, PERF_NOTES v5); here
one program per token rotates every q and k head of that token, in fp32. q is written back in
place (a view of the one projection output, which the attention reads); the rotated k (rounded to the
projection's dtype, as before) and the v go straight into the token's KV-cache slot. So k makes no
round trip through the projection output and the step needs no separate KV-store launch
(attention.write_kv): at 8k prefill tokens that launch alone took 41 us a layer (PERF_NOTES v10).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pool_ptr, slot_ptr, s_t, s_ct, s_st, s_pb, s_pkv, s_ps, s_ph,
                      HQ: tl.constexpr, HQ_P2: tl.constexpr, HKV: tl.constexpr, HKV_P2: tl.constexpr,
                      HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, K_IN_PLACE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    # Every load first, the cache slot's among them (no branch on it): one memory latency a program,
    # which is all a batch-1 step's single program has to wait for.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + t * s_ct + i).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * s_st + i).to(tl.float32)[None, :]
    row = qkv_ptr + t * s_t
    h = tl.arange(0, HQ_P2)
    ok = (h < HQ)[:, None]
    first = row + h[:, None] * (2 * HALF) + i[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    g = tl.arange(0, HKV_P2)
    okk = (g < HKV)[:, None]
    k1p = row + (HQ + g[:, None]) * (2 * HALF) + i[None, :]
    k1 = tl.load(k1p, mask=okk, other=0.0).to(tl.float32)
    k2 = tl.load(k1p + HALF, mask=okk, other=0.0).to(tl.float32)
    d = tl.arange(0, 2 * HALF)
    v = tl.load(row + (HQ + HKV + g[:, None]) * (2 * HALF) + d[None, :], mask=okk, other=0.0)
    tl.store(first, (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty), mask=ok)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty), mask=ok)
    ka = (k1 * cos - k2 * sin).to(qkv_ptr.dtype.element_ty)
    kb = (k2 * cos + k1 * sin).to(qkv_ptr.dtype.element_ty)
    if K_IN_PLACE:
        tl.store(k1p, ka, mask=okk)
        tl.store(k1p + HALF, kb, mask=okk)
    put = okk & (slot >= 0)   # slot -1: a padding row, nothing stored
    dst = pool_ptr + (slot // BLOCK_SIZE) * s_pb + (slot % BLOCK_SIZE) * s_ps + g[:, None] * s_ph
    tl.store(dst + i[None, :], ka.to(pool_ptr.dtype.element_ty), mask=put)
    tl.store(dst + HALF + i[None, :], kb.to(pool_ptr.dtype.element_ty), mask=put)
    tl.store(dst + s_pkv + d[None, :], v.to(pool_ptr.dtype.element_ty), mask=put)


def rotary_store_kv(qkv: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor, pool: torch.Tensor, layer_in_pool: int, slot_mapping: torch.Tensor,
                    k_in_place: bool = False) -> None:
    """qkv [T, (q_heads + 2 kv_heads) * head_dim] (q heads, k heads, v heads): rotate q in place, and
    store the rotated k and the v of token t at pool slot slot_mapping[t] of layer `layer_in_pool`
    (kv_layout: pool [blocks, layers, 2, block_size, kv_heads, head_dim]; slot -1 = not stored). The k
    part of qkv is left as projected, unless `k_in_place` (for an attention that reads k from qkv:
    kernels/prompt_attention.py): then it is rotated there too."""
    T = qkv.shape[0]
    if qkv.shape[1] != (q_heads + 2 * kv_heads) * head_dim or pool.shape[4:] != (kv_heads, head_dim):
        raise ValueError(f"rotary_store_kv: qkv {tuple(qkv.shape)} does not fit {q_heads}+2x{kv_heads} heads "
                         f"of {head_dim} and pool {tuple(pool.shape)}")
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or pool.stride(5) != 1:
        raise ValueError("rotary_store_kv needs qkv, cos, sin and the pool contiguous in their last dimension")
    half = head_dim // 2
    if half & (half - 1):
        raise ValueError(f"head_dim {head_dim} must be twice a power of two")
    if T == 0:
        return
    layer_pool = pool[:, layer_in_pool]
    _rotary_kv_kernel[(T,)](qkv, cos, sin, layer_pool, slot_mapping, qkv.stride(0), cos.stride(0), sin.stride(0),
                            layer_pool.stride(0), layer_pool.stride(1), layer_pool.stride(2), layer_pool.stride(3),
                            HQ=q_heads, HQ_P2=triton.next_power_of_2(q_heads), HKV=kv_heads,
                            HKV_P2=triton.next_power_of_2(kv_heads), HALF=half, BLOCK_SIZE=pool.shape[3],
                            K_IN_PLACE=k_in_place, num_warps=4)
