"""Fused residual add + RMSNorm: one launch instead of the ~8 torch element-wise ops of
`x + delta` followed by `RMSNorm` (cast, square, mean, add eps, rsqrt, two multiplies, cast).

Same arithmetic as the torch path in model.RMSNorm: the sum is rounded to x's dtype first (it is
the residual stream the next layer adds to), then normalized in fp32 and scaled by the fp32 weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm(x_ptr, d_ptr, w_ptr, sum_ptr, h_ptr, H, eps, s_x, s_d, s_s, s_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * s_d + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x + d).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * s_s + cols, s, mask=ok)
    h = s.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / H + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * s_h + cols, (w * h).to(h_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rmsnorm(x + delta) * weight), both [T, H] in x's dtype; x, delta [T, H] with a unit
    last stride (the model's hidden states)."""
    T, H = x.shape
    if delta.shape != x.shape or weight.shape != (H,):
        raise ValueError(f"add_rmsnorm: x {tuple(x.shape)}, delta {tuple(delta.shape)}, weight {tuple(weight.shape)}")
    x, delta = x.contiguous(), delta.contiguous()
    total = torch.empty_like(x)
    h = torch.empty_like(x)
    block = triton.next_power_of_2(H)
    _add_rmsnorm[(T,)](x, delta, weight, total, h, H, float(eps), x.stride(0), delta.stride(0),
                       total.stride(0), h.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return total, h
