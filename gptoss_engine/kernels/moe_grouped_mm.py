"""Prefill MoE: dequantize the layer's MXFP4 experts to bf16 once, then torch's grouped GEMM.

At prefill every expert sees hundreds of rows, so the experts' FLOPs, not their bytes, set the
time. The fused kernels in moe_mxfp4 dequantize each weight tile once per row block of every
program, in registers, and reach a fraction of the tensor cores' rate; here one pass writes the
layer's experts as bf16 into a scratch buffer (20b: 1.6 GB written per layer, ~0.6 ms, against
~1 TFLOP of expert math at 8k tokens) and `torch.nn.functional.grouped_mm` (CUTLASS on sm90) runs
both projections over the token-sorted pairs.

The scratch buffer is owned by this module (one per device and shape, reused by every layer and
step: a layer's experts are dead once its down projection has run), so a long prefill does not
allocate per layer. It is only worth its bytes when enough rows share each expert: moe_mxfp4.moe_experts
picks this path from GROUPED_MM_MIN_ROWS mean rows per expert on sm_90.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptoss_engine.kernels.e2m1 import dequant_words_bf16, e2m1_x2e14, scale_x2e14
from gptoss_engine.kernels.routing import sort_pairs
from gptoss_engine.moe import ExpertWeights, PairOutputs

# Dequant tile: 8 rows x 1024 k, 4 warps (H100, two sweeps with bench/prefill_attn_probe.py, PERF_NOTES
# v23: a 20b layer's gate_up 573-574 -> 539-543 us, down 321-323 -> 280-308 against 16 x 512).
_ROWS, _BK, _DEQUANT_WARPS = 8, 1024, 4
_ACT_BLOCK = 1024                       # bias + SwiGLU columns a program
_GATHER_ROWS, _GATHER_BLOCK = 4, 1024   # gather tile


@triton.jit
def _dequant_perm(blk_ptr, scl_ptr, out_ptr, rows, num_rows, K, s_b, s_s, s_o,
                  BK: tl.constexpr, ONE_MUL: tl.constexpr):
    """_dequant_kernel's tile from blocks in mxfp4.WORD_BITS order (sm_90), read as int32 words and
    dequantized by the PTX word dequant into k order (e2m1.dequant_words_bf16)."""
    ROWS: tl.constexpr = rows.shape[0]
    W: tl.constexpr = BK // 8
    kw = tl.program_id(1) * W + tl.arange(0, W)
    row_ok = rows[:, None] < num_rows
    r64 = rows[:, None].to(tl.int64)
    words = tl.load(blk_ptr.to(tl.pointer_type(tl.int32)) + r64 * (s_b // 4) + kw[None, :],
                    mask=row_ok & (kw[None, :] < K // 8), other=0)
    gw = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)
    s = tl.load(scl_ptr + r64 * s_s + gw[None, :], mask=row_ok & (gw[None, :] < K // 32), other=127)
    w = dequant_words_bf16(words, s, ROWS, W, ONE_MUL, True)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    tl.store(out_ptr + r64 * s_o + k[None, :], w, mask=row_ok & (k[None, :] < K))


@triton.jit
def _dequant_kernel(blk_ptr, scl_ptr, out_ptr, num_rows, K, s_b, s_s, s_o,
                    ROWS: tl.constexpr, BK: tl.constexpr, PERM: tl.constexpr, ONE_MUL: tl.constexpr):
    """out[r, k] = e2m1(blk[r, k/2] nibble) * 2^(scl[r, k/32] - 127) as bf16; even k = low nibble.
    Both nibbles of a byte are joined into adjacent columns in registers so every store is a
    contiguous run (stride-2 stores of each half ran at a tenth of the bandwidth, PERF_NOTES v5).
    PERM: blocks in mxfp4.WORD_BITS order, through the PTX dequant (_dequant_perm)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    if PERM:
        _dequant_perm(blk_ptr, scl_ptr, out_ptr, rows, num_rows, K, s_b, s_s, s_o, BK, ONE_MUL)
    else:
        kb = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
        ok = (rows[:, None] < num_rows) & (kb[None, :] < K // 2)
        b = tl.load(blk_ptr + rows[:, None].to(tl.int64) * s_b + kb[None, :], mask=ok, other=0).to(tl.int32)
        s = tl.load(scl_ptr + rows[:, None].to(tl.int64) * s_s + kb[None, :] // 16, mask=ok, other=127).to(tl.int32)
        sc = scale_x2e14(s)
        lo = e2m1_x2e14(b & 0xF)
        hi = e2m1_x2e14(b >> 4)
        w = tl.reshape(tl.join((lo * sc).to(tl.bfloat16), (hi * sc).to(tl.bfloat16)), (ROWS, BK))
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * s_o + k[None, :], w,
                 mask=(rows[:, None] < num_rows) & (k[None, :] < K))


@triton.jit
def _bias_swiglu_kernel(h_ptr, expert_ptr, bias_ptr, act_ptr, I, limit, alpha, s_h, s_bias, s_a,
                        BLOCK: tl.constexpr):
    """act[r] = swiglu(h[r] + gate_up_bias[expert[r]]) over interleaved (gate, up) columns; bf16 out.
    The interleaved pairs are loaded as one contiguous run and split in registers (stride-2 loads of
    each half ran at half the bandwidth: 0.39 ms a layer at 8k, PERF_NOTES v6)."""
    r = tl.program_id(0)
    c2 = tl.program_id(1) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    ok2 = c2 < 2 * I
    e = tl.load(expert_ptr + r).to(tl.int64)
    hb = tl.load(h_ptr + r.to(tl.int64) * s_h + c2, mask=ok2, other=0.0).to(tl.float32) \
        + tl.load(bias_ptr + e * s_bias + c2, mask=ok2, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(hb, (BLOCK, 2)))
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    tl.store(act_ptr + r.to(tl.int64) * s_a + cols, act.to(act_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, n, H, s_x, s_o, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[r] = x[idx[r]], ROWS rows x BLOCK columns a program."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (r < n)[:, None] & (cols < H)[None, :]
    src = tl.load(idx_ptr + r, mask=r < n, other=0).to(tl.int64)
    v = tl.load(x_ptr + src[:, None] * s_x + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + r[:, None].to(tl.int64) * s_o + cols[None, :], v, mask=ok)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] as bf16 [len(idx), H], one launch: torch's index moved the ~4x-replicated rows at
    ~2 TB/s (8k prefill: 119 us a layer, PERF_NOTES v10). x not bf16 (an fp32 engine) is cast first."""
    x = x.to(torch.bfloat16).contiguous()
    n, H = idx.shape[0], x.shape[1]
    out = torch.empty((n, H), dtype=torch.bfloat16, device=x.device)
    if n:
        _gather_kernel[(triton.cdiv(n, _GATHER_ROWS), triton.cdiv(H, _GATHER_BLOCK))](
            x, idx, out, n, H, x.stride(0), out.stride(0), ROWS=_GATHER_ROWS, BLOCK=_GATHER_BLOCK, num_warps=4)
    return out


# Scratch for the dequantized experts, per (device, projection): reused by every layer and step (a
# layer's bf16 experts are dead once its grouped GEMM has run: the stream orders the next layer's
# dequant after it). Bounded by _SCRATCH_BYTES: models with more experts (120b) go in chunks.
_scratch: dict[tuple[torch.device, int], torch.Tensor] = {}
_SCRATCH_BYTES = 1 << 31


def _scratch_view(device: torch.device, slot: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """This module's bf16 scratch `slot`, as [E, N, K]; allocated once (on the caller's stream)."""
    n = shape[0] * shape[1] * shape[2]
    buf = _scratch.get((device, slot))
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.bfloat16, device=device)
        _scratch[(device, slot)] = buf
    return buf[:n].view(shape)


def _dequantize(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """Packed [E, N, K/32, 16] / [E, N, K/32] (of `w`, whose layout they have) -> bf16 `out` [E, N, K]
    on the current stream."""
    E, N, G = scales.shape
    K = G * 32
    o2 = out.view(E * N, K)
    b2 = blocks.reshape(E * N, K // 2)
    s2 = scales.reshape(E * N, G)
    _dequant_kernel[(triton.cdiv(E * N, _ROWS), triton.cdiv(K, _BK))](
        b2, s2, o2, E * N, K, b2.stride(0), s2.stride(0), o2.stride(0), ROWS=_ROWS, BK=_BK, PERM=w.permuted,
        ONE_MUL=w.one_mul, num_warps=_DEQUANT_WARPS)
    return out


def dequantized_copy(w: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """New bf16 tensors (gate_up [E, 2I, H], down [E, H, I]) holding `w`'s packed experts exactly
    (e2m1 x 2^k is exact in bf16): ExpertWeights.gate_up_bf16 / down_bf16."""
    gu_b, gu_s, d_b, d_s = w.gate_up_blocks, w.gate_up_scales, w.down_blocks, w.down_scales
    assert gu_b is not None and gu_s is not None and d_b is not None and d_s is not None  # packed
    gu = torch.empty((gu_s.shape[0], gu_s.shape[1], gu_s.shape[2] * 32), dtype=torch.bfloat16, device=gu_b.device)
    d = torch.empty((d_s.shape[0], d_s.shape[1], d_s.shape[2] * 32), dtype=torch.bfloat16, device=d_b.device)
    return _dequantize(gu_b, gu_s, gu, w), _dequantize(d_b, d_s, d, w)


def _chunk(w: ExpertWeights, hidden: int) -> int:
    """Experts per scratch fill: all of them when the layer's bf16 experts fit _SCRATCH_BYTES."""
    E, two_i = w.gate_up_scales.shape[0], w.gate_up_scales.shape[1]  # type: ignore[union-attr]
    per_expert = (two_i * hidden + hidden * (two_i // 2)) * 2
    return max(1, min(E, _SCRATCH_BYTES // per_expert))


def _views(w: ExpertWeights, e1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch views for experts [0, e1) of `w`'s shapes: (gate_up [e1, 2I, H], down [e1, H, I])."""
    gu_s, d_s = w.gate_up_scales, w.down_scales
    assert gu_s is not None and d_s is not None
    return (_scratch_view(gu_s.device, 0, (e1, gu_s.shape[1], gu_s.shape[2] * 32)),
            _scratch_view(d_s.device, 1, (e1, d_s.shape[1], d_s.shape[2] * 32)))


def _grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b_t, offs=offs)


def moe_experts_grouped_mm(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w: ExpertWeights, swiglu_limit: float, alpha: float = 1.702) -> PairOutputs:
    """x [T, H] -> the expert outputs of every pair, in expert-sorted rows, without routing weight or
    down bias (the PairOutputs' reader adds both while summing); moe_mxfp4.moe_expert_pairs' contract
    (packed `w`, CUDA, sm90)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    gu_b, gu_s, d_b, d_s = w.gate_up_blocks, w.gate_up_scales, w.down_blocks, w.down_scales
    assert gu_b is not None and gu_s is not None and d_b is not None and d_s is not None  # packed
    E, two_i = gu_s.shape[0], gu_s.shape[1]
    I = two_i // 2
    # Sorted rows by expert (stable): the token each row reads, each pair's row, each row's expert,
    # and where each expert's rows end (the GEMMs' group offsets).
    token, row_of_pair, expert, ends = sort_pairs(topk_ids, E)
    xs = _gather_rows(x, token)
    act = torch.empty((xs.shape[0], I), dtype=torch.bfloat16, device=x.device)
    y: torch.Tensor | None = None
    dense = w.gate_up_bf16 is not None and w.down_bf16 is not None
    chunk = E if dense else _chunk(w, H)
    # Rows of experts [e0, e1) are the sorted rows [ends[e0-1], ends[e1-1]): with one chunk that is
    # every row and no host sync; with several, one .tolist() per layer (prefill runs eagerly).
    bounds = [0] + ends.tolist() if chunk < E else None
    for e0 in range(0, E, chunk):
        e1 = min(E, e0 + chunk)
        lo, hi = (bounds[e0], bounds[e1]) if bounds is not None else (0, xs.shape[0])
        if hi == lo:
            continue
        offs = ends[e0:e1] if bounds is None else ends[e0:e1] - bounds[e0]
        if dense:
            gu, d = w.gate_up_bf16, w.down_bf16
        else:
            gu, d = _views(w, e1 - e0)
            _dequantize(gu_b[e0:e1], gu_s[e0:e1], gu, w)
            _dequantize(d_b[e0:e1], d_s[e0:e1], d, w)
        h = _grouped_mm(xs[lo:hi], gu.transpose(1, 2), offs)                         # [rows, 2I] bf16
        _bias_swiglu_kernel[(hi - lo, triton.cdiv(I, _ACT_BLOCK))](
            h, expert[lo:hi], w.gate_up_bias, act[lo:hi], I, float(swiglu_limit), float(alpha),
            h.stride(0), w.gate_up_bias.stride(0), act.stride(0), BLOCK=_ACT_BLOCK, num_warps=4)
        part = _grouped_mm(act[lo:hi], d.transpose(1, 2), offs)                      # [rows, H] bf16
        if bounds is None:
            y = part   # one chunk: every row, no copy
        else:
            if y is None:
                y = torch.empty((xs.shape[0], H), dtype=torch.bfloat16, device=x.device)
            y[lo:hi] = part
    assert y is not None
    return PairOutputs(y, k, x.dtype, row_of_pair=row_of_pair, weights=topk_weights.reshape(-1).contiguous(),
                       ids=topk_ids.reshape(-1).contiguous(), bias=w.down_bias)
