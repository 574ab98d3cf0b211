"""Small-batch MoE over packed MXFP4 experts: GEMV kernels that read each touched expert once.

At decode (a few tokens x top-k pairs) the experts' weights are the whole cost: the grouped GEMM
in moe_mxfp4 pads every expert's rows to a 16-row tile and pays `dot_scaled`'s software e2m1
upcast per program. Here each program streams a contiguous slice of one expert's output rows
(16-byte loads along the packed input dimension), dequantizes in registers and multiplies with
fp32 FMAs; the output dimension is split over many programs so even batch 1 fills the SMs.

    gate_up: program (pair, n-tile): 2*BN interleaved gate_up rows of expert topk_ids[pair]
             -> bias -> clamped SwiGLU -> inter[pair, BN cols] (fp32)
    down:    program (pair, n-tile): (W_d[e] @ inter[pair] + b_d[e]) * routing weight -> part[pair] (fp32)
The k fp32 partials of a token are summed by whoever takes the PairOutputs (kernels/norm.py: the
next fused add + RMSNorm). No sort/scatter routing layout and no atomics: topk_ids index the weights
directly.

e2m1 decoding: kernels/e2m1.py (fp16 bit placement; inline PTX on sm_90).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_engine import mxfp4
from gptoss_engine.kernels.e2m1 import dequant_words_asm, e2m1_x2e14, load_scales, scale_x2e14, unpermute_words
from gptoss_engine.moe import PairOutputs

# (BN gate_up, BN down, BK gate_up, BK down, warps, prefetch): output rows per program (gate_up:
# interleaved pairs, so 2*BN rows), packed input per loop trip, and whether the next trip's loads
# are issued before this trip's arithmetic (_gemv_tile). CUDA-graph sweep on the H100 (PERF_NOTES
# v11, T = 1, 2, 4 tokens): 39.2, 64.3, 115.1 us, against 40.3, 69.6, 115.4 with v6's
# (8, 8, 512, 1024) without prefetch; every other tile was within 2% or slower.
_TILES = (16, 16, 512, 512, 4, True)
_TILES_OVERRIDE: tuple[int, int, int, int, int, bool] | None = None   # bench/moe_kernel_bench.py --gemv-sweep


@triton.jit
def _gemv_loads(x_ptr, w_ptr, s_ptr, rows, row_ok, k0, K, s_wn, s_sn, BK: tl.constexpr, PAD_S: tl.constexpr):
    """One trip's packed weights [R, BK/8] as int32 words (4 bytes, 8 codes: a loop-carried u8 tensor
    would live as one register a byte), activations [BK] and scales [R, BK/32] from k0; all zero
    (no memory touched) when k0 >= K, the prefetch past the last trip. K is a multiple of 32."""
    live = k0 < K
    kw = k0 // 8 + tl.arange(0, BK // 8)
    w = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None].to(tl.int64) * (s_wn // 4) + kw[None, :],
                mask=row_ok[:, None] & (kw[None, :] < K // 8) & live, other=0)
    ks = k0 + tl.arange(0, BK)
    xv = tl.load(x_ptr + ks, mask=(ks < K) & live, other=0.0)
    kg = k0 // 32 + tl.arange(0, BK // 32)
    s = load_scales(s_ptr, rows, row_ok & live, s_sn, kg, K, 0, PAD_S)
    return w, xv, s


@triton.jit
def _lo(pair):
    """bf16x2 word -> its low-half value as fp32 (the bf16 bits placed high)."""
    return (pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def _hi(pair):
    return (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_trip(acc, words, xv, s, R: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, ONE_MUL: tl.constexpr,
               PERM: tl.constexpr):
    """acc[r] += this trip's products. Byte c of the packed row holds k = 2c (low nibble) and 2c + 1
    (PERM: words in mxfp4.WORD_BITS order, the same codes)."""
    # x by position in its word: k = 8j + 4a + 2b + c.
    x_c0, x_c1 = tl.split(tl.reshape(xv.to(tl.float32), (BK // 8, 2, 2, 2)))
    x_0b, x_1b = tl.split(x_c0)         # [BK/8, 2 (a)] for b = 0, 1
    x0, x4 = tl.split(x_0b)
    x2, x6 = tl.split(x_1b)
    x_0b, x_1b = tl.split(x_c1)
    x1, x5 = tl.split(x_0b)
    x3, x7 = tl.split(x_1b)
    if ASM:
        # Four bf16 pairs a word, taken to fp32 by placing their bits (exact).
        p02, p46, p13, p57 = dequant_words_asm(words, s, R, BK // 8, ONE_MUL, PERM)
        prod = _lo(p02) * x0[None, :] + _hi(p02) * x2[None, :] + _lo(p46) * x4[None, :] + _hi(p46) * x6[None, :] \
            + _lo(p13) * x1[None, :] + _hi(p13) * x3[None, :] + _lo(p57) * x5[None, :] + _hi(p57) * x7[None, :]
        acc += tl.sum(prod, 1)
    else:
        if PERM:
            words = unpermute_words(words)
        prod = e2m1_x2e14(words & 0xF) * x0[None, :] + e2m1_x2e14((words >> 4) & 0xF) * x1[None, :] \
            + e2m1_x2e14((words >> 8) & 0xF) * x2[None, :] + e2m1_x2e14((words >> 12) & 0xF) * x3[None, :] \
            + e2m1_x2e14((words >> 16) & 0xF) * x4[None, :] + e2m1_x2e14((words >> 20) & 0xF) * x5[None, :] \
            + e2m1_x2e14((words >> 24) & 0xF) * x6[None, :] + e2m1_x2e14((words >> 28) & 0xF) * x7[None, :]
        part = tl.sum(tl.reshape(prod, (R, BK // 32, 4)), 2)                    # [R, BK/32] per group
        acc += tl.sum(part * scale_x2e14(s), 1)
    return acc


@triton.jit
def _gemv_tile(acc, x_ptr, w_ptr, s_ptr, rows, row_ok, K, s_wn, s_sn, BK: tl.constexpr, ASM: tl.constexpr,
               PAD_S: tl.constexpr, ONE_MUL: tl.constexpr, PERM: tl.constexpr, PREFETCH: tl.constexpr):
    """acc[r] += sum_k dequant(W[rows[r], k]) * x[k] over k in [0, K); W packed [rows, K/2] u8.
    ASM (sm_90): the inline-PTX dequant yields the scaled weights as exact bf16 (~3 instructions a
    weight instead of ~6, and no per-group scale multiply).

    Weights are read as int32 words (8 codes, one scale) and x is split in registers by a k's position
    in its word (_gemv_trip). The loop is deliberately not software-pipelined by Triton (num_stages=1: through shared memory it measured slower, T=8: 271
    vs 250 us; PERF_NOTES v6). PREFETCH instead issues the next trip's loads into registers before
    this trip's arithmetic (a trip's packed weights are a few registers a thread), so each program
    keeps its next bytes in flight while it computes."""
    R: tl.constexpr = rows.shape[0]
    if PREFETCH:
        w, xv, s = _gemv_loads(x_ptr, w_ptr, s_ptr, rows, row_ok, 0, K, s_wn, s_sn, BK, PAD_S)
        for k0 in tl.range(0, K, BK, num_stages=1):
            w_n, xv_n, s_n = _gemv_loads(x_ptr, w_ptr, s_ptr, rows, row_ok, k0 + BK, K, s_wn, s_sn, BK, PAD_S)
            acc = _gemv_trip(acc, w, xv, s, R, BK, ASM, ONE_MUL, PERM)
            w, xv, s = w_n, xv_n, s_n
    else:
        for k0 in tl.range(0, K, BK, num_stages=1):
            w, xv, s = _gemv_loads(x_ptr, w_ptr, s_ptr, rows, row_ok, k0, K, s_wn, s_sn, BK, PAD_S)
            acc = _gemv_trip(acc, w, xv, s, R, BK, ASM, ONE_MUL, PERM)
    return acc


@triton.jit
def _gate_up_gemv(x_ptr, ids_ptr, blk_ptr, scl_ptr, bias_ptr, inter_ptr, H, I, limit, alpha,
                  s_xt, s_be, s_bn, s_se, s_sn, s_bias_e, s_it,
                  TOPK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr,
                  PAD_S: tl.constexpr, ONE_MUL: tl.constexpr, PERM: tl.constexpr, PREFETCH: tl.constexpr):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    token = pair // TOPK
    # 2*BN consecutive gate_up rows = BN interleaved (gate, up) pairs.
    rows = pid_n * 2 * BN + tl.arange(0, 2 * BN)
    row_ok = rows < 2 * I
    acc = tl.zeros((2 * BN,), dtype=tl.float32)
    acc = _gemv_tile(acc, x_ptr + token.to(tl.int64) * s_xt, blk_ptr + expert * s_be, scl_ptr + expert * s_se,
                     rows, row_ok, H, s_bn, s_sn, BK, ASM, PAD_S, ONE_MUL, PERM, PREFETCH)
    acc += tl.load(bias_ptr + expert * s_bias_e + rows, mask=row_ok, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(acc, (BN, 2)))
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    cols = pid_n * BN + tl.arange(0, BN)
    tl.store(inter_ptr + pair.to(tl.int64) * s_it + cols, act, mask=cols < I)


@triton.jit
def _down_gemv(inter_ptr, ids_ptr, wts_ptr, blk_ptr, scl_ptr, bias_ptr, part_ptr, H, I,
               s_it, s_be, s_bn, s_se, s_sn, s_bias_e, s_pt,
               BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, PAD_S: tl.constexpr,
               ONE_MUL: tl.constexpr, PERM: tl.constexpr, PREFETCH: tl.constexpr):
    # One program per (pair, n-tile), not per (token, n-tile) looping over the k experts: k times
    # the programs (and bytes in flight) at batch 1; the k partials are summed by the PairOutputs' reader.
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < H
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    acc = tl.load(bias_ptr + expert * s_bias_e + rows, mask=row_ok, other=0.0).to(tl.float32)
    acc = _gemv_tile(acc, inter_ptr + pair.to(tl.int64) * s_it, blk_ptr + expert * s_be,
                     scl_ptr + expert * s_se, rows, row_ok, I, s_bn, s_sn, BK, ASM, PAD_S, ONE_MUL, PERM,
                     PREFETCH)
    acc *= tl.load(wts_ptr + pair).to(tl.float32)
    tl.store(part_ptr + pair.to(tl.int64) * s_pt + rows, acc, mask=row_ok)


def moe_experts_gemv(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     gu_blk: torch.Tensor, gu_scl: torch.Tensor, gu_bias: torch.Tensor,
                     d_blk: torch.Tensor, d_scl: torch.Tensor, d_bias: torch.Tensor,
                     swiglu_limit: float, alpha: float, asm: bool = False, one_mul: bool = False,
                     permuted: bool = False) -> PairOutputs:
    """x [T, H] -> the T*k weighted, biased expert outputs (fp32). Expert tensors in checkpoint layout,
    blocks flattened to [E, out, in/2]; shapes were checked by the caller (moe_mxfp4.moe_expert_pairs)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    I = gu_blk.shape[1] // 2
    # The kernels read the packed rows as int32 words: every row must start 4-byte aligned (true of
    # whole checkpoint tensors and of expert or row slices of them; not of an arbitrary byte view).
    for t in (gu_blk, d_blk):
        if t.data_ptr() % 4 or any(st % 4 for st in t.stride()[:-1]):
            raise ValueError(f"packed expert blocks must have 4-byte aligned rows (strides {t.stride()})")
    bn_gu, bn_d, bk_gu, bk_d, warps, prefetch = _TILES_OVERRIDE or _TILES
    bk_gu = min(bk_gu, triton.next_power_of_2(H))
    bk_d = min(bk_d, triton.next_power_of_2(I))
    pad_gu, pad_d = mxfp4.unmasked_scale_reads(gu_scl, bk_gu), mxfp4.unmasked_scale_reads(d_scl, bk_d)
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    inter = torch.empty((T * k, I), dtype=torch.float32, device=x.device)
    _gate_up_gemv[(T * k, triton.cdiv(I, bn_gu))](
        x, ids, gu_blk, gu_scl, gu_bias, inter, H, I, float(swiglu_limit), float(alpha),
        x.stride(0), gu_blk.stride(0), gu_blk.stride(1), gu_scl.stride(0), gu_scl.stride(1), gu_bias.stride(0),
        inter.stride(0), TOPK=k, BN=bn_gu, BK=bk_gu, ASM=asm, PAD_S=pad_gu, ONE_MUL=one_mul, PERM=permuted,
        PREFETCH=prefetch,
        num_warps=warps)
    part = torch.empty((T * k, H), dtype=torch.float32, device=x.device)
    _down_gemv[(T * k, triton.cdiv(H, bn_d))](
        inter, ids, wts, d_blk, d_scl, d_bias, part, H, I,
        inter.stride(0), d_blk.stride(0), d_blk.stride(1), d_scl.stride(0), d_scl.stride(1), d_bias.stride(0),
        part.stride(0), BN=bn_d, BK=bk_d, ASM=asm, PAD_S=pad_d, ONE_MUL=one_mul, PERM=permuted,
        PREFETCH=prefetch,
        num_warps=warps)
    return PairOutputs(part, k, x.dtype)
