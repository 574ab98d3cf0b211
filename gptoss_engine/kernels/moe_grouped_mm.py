"""Prefill MoE: dequantize the layer's MXFP4 experts to bf16 once, then torch's grouped GEMM.

At prefill every expert sees hundreds of rows, so the experts' FLOPs, not their bytes, set the
time. The fused kernels in moe_mxfp4 dequantize each weight tile once per row block of every
program, in registers, and reach a fraction of the tensor cores' rate; here one pass writes the
layer's experts as bf16 into a scratch buffer (20b: 1.6 GB written per layer, ~0.6 ms, against
~1 TFLOP of expert math at 8k tokens) and `torch.nn.functional.grouped_mm` (CUTLASS on sm90) runs
both projections over the token-sorted pairs.

The scratch buffer is owned by this module (one per device and shape, reused by every layer and
step: a layer's experts are dead once its down projection has run), so a long prefill does not
allocate per layer. It is only worth its bytes when enough rows share each expert: callers pick
this path above PAIRS_PER_EXPERT mean rows per expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptoss_engine.moe import ExpertWeights

# Mean (token, expert) rows per expert above which dequantize + grouped GEMM beats the fused kernels.
PAIRS_PER_EXPERT = 256
_ROWS, _BK = 16, 256


@triton.jit
def _dequant_kernel(blk_ptr, scl_ptr, out_ptr, num_rows, K, s_b, s_s, s_o,
                    ROWS: tl.constexpr, BK: tl.constexpr):
    """out[r, k] = e2m1(blk[r, k/2] nibble) * 2^(scl[r, k/32] - 127) as bf16; even k = low nibble."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
    ok = (rows[:, None] < num_rows) & (kb[None, :] < K // 2)
    b = tl.load(blk_ptr + rows[:, None].to(tl.int64) * s_b + kb[None, :], mask=ok, other=0).to(tl.int32)
    s = tl.load(scl_ptr + rows[:, None].to(tl.int64) * s_s + kb[None, :] // 16, mask=ok, other=127).to(tl.int32)
    sc = ((s + 14) << 23).to(tl.float32, bitcast=True)    # 2^(s-127) * 2^14 (bit placement below)
    lo = (((b & 8) << 12) | ((b & 7) << 9)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (((b & 0x80) << 8) | ((b & 0x70) << 5)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    o = out_ptr + rows[:, None].to(tl.int64) * s_o + 2 * kb[None, :]
    tl.store(o, (lo * sc).to(tl.bfloat16), mask=ok)
    tl.store(o + 1, (hi * sc).to(tl.bfloat16), mask=ok)


_scratch: dict[tuple[torch.device, int], torch.Tensor] = {}


def _dequantize(blocks: torch.Tensor, scales: torch.Tensor, slot: int) -> torch.Tensor:
    """Packed [E, N, K/32, 16] / [E, N, K/32] -> bf16 [E, N, K] in this module's scratch `slot`."""
    E, N, G = scales.shape
    K = G * 32
    key = (blocks.device, slot)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < E * N * K:
        buf = torch.empty(E * N * K, dtype=torch.bfloat16, device=blocks.device)
        _scratch[key] = buf
    out = buf[:E * N * K].view(E * N, K)
    b2 = blocks.reshape(E * N, K // 2)
    s2 = scales.reshape(E * N, G)
    _dequant_kernel[(triton.cdiv(E * N, _ROWS), triton.cdiv(K, _BK))](
        b2, s2, out, E * N, K, b2.stride(0), s2.stride(0), out.stride(0), ROWS=_ROWS, BK=_BK, num_warps=4)
    return out.view(E, N, K)


def _grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b_t, offs=offs)


def moe_experts_grouped_mm(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w: ExpertWeights, swiglu_limit: float, alpha: float = 1.702) -> torch.Tensor:
    """x [T, H] bf16 -> [T, H]; same function as moe_mxfp4.moe_experts (packed `w`, CUDA, sm90)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w.gate_up_scales.shape[0]                                        # type: ignore[union-attr]
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)   # no bincount: it syncs the host on CUDA
    xs = x.to(torch.bfloat16)[order // k]
    gu = _dequantize(w.gate_up_blocks, w.gate_up_scales, 0)             # type: ignore[arg-type]
    h = _grouped_mm(xs, gu.transpose(1, 2), offs)                        # [P, 2I]
    h = h.float() + w.gate_up_bias.float()[expert]
    gate = h[:, 0::2].clamp(max=swiglu_limit)
    up = h[:, 1::2].clamp(min=-swiglu_limit, max=swiglu_limit)
    act = (gate * torch.sigmoid(alpha * gate) * (up + 1)).to(torch.bfloat16)
    d = _dequantize(w.down_blocks, w.down_scales, 1)                     # type: ignore[arg-type]
    y = _grouped_mm(act, d.transpose(1, 2), offs).float()                # [P, H]
    y = (y + w.down_bias.float()[expert]) * topk_weights.reshape(-1)[order].float()[:, None]
    pair_out = torch.empty_like(y)
    pair_out[order] = y
    return pair_out.view(T, k, H).sum(dim=1).to(x.dtype)
