"""Fused residual add + RMSNorm, which may also finish the MoE: one launch instead of the ~8 torch
element-wise ops of `x + delta` followed by `RMSNorm` (cast, square, mean, add eps, rsqrt, two
multiplies, cast), and without the MoE's own launch that sums each token's k expert outputs.

Same arithmetic as the torch path in model.RMSNorm: the sum is rounded to x's dtype first (it is
the residual stream the next layer adds to), then normalized in fp32 and scaled by the fp32 weight.
A delta given as PairOutputs (moe.py) is summed over the k pairs in fp32 and rounded to its dtype
before the add, exactly as `sum_pairs` would have written it: fused or not, the same bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_engine.moe import PairOutputs

# Columns per program of the stand-alone pair sum (20b: 3 programs per token).
_SUM_BLOCK = 1024


@triton.jit
def _pair_delta(y_ptr, row_ptr, wt_ptr, id_ptr, bias_ptr, t, cols, ok, s_y, s_bias,
                TOPK: tl.constexpr, ROWS: tl.constexpr, WEIGHTED: tl.constexpr):
    """fp32 sum over token t's k pairs of PairOutputs' terms, columns `cols`."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for j in tl.static_range(TOPK):
        p = t * TOPK + j
        if ROWS:
            row = tl.load(row_ptr + p).to(tl.int64)
        else:
            row = p
        y = tl.load(y_ptr + row * s_y + cols, mask=ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            e = tl.load(id_ptr + p).to(tl.int64)
            y = tl.load(wt_ptr + p).to(tl.float32) * \
                (y + tl.load(bias_ptr + e * s_bias + cols, mask=ok, other=0.0).to(tl.float32))
        acc += y
    return acc


@triton.jit
def _sum_pairs(y_ptr, row_ptr, wt_ptr, id_ptr, bias_ptr, out_ptr, H, s_y, s_bias, s_o,
               TOPK: tl.constexpr, ROWS: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = _pair_delta(y_ptr, row_ptr, wt_ptr, id_ptr, bias_ptr, t, cols, ok, s_y, s_bias, TOPK, ROWS, WEIGHTED)
    tl.store(out_ptr + t * s_o + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def normed(s, w_ptr, cols, ok, H, eps):
    """RMSNorm of one row s [BLOCK] (zero past H) in fp32, times the fp32 weight at `cols`. The weight
    is loaded before the row's reduction (whose barriers no load crosses): at decode its DRAM latency
    then hides under the sum instead of following it."""
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    h = s.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / H + eps)
    return w * h


@triton.jit
def _add_rmsnorm(x_ptr, d_ptr, w_ptr, sum_ptr, h_ptr, row_ptr, wt_ptr, id_ptr, bias_ptr, H, eps,
                 s_x, s_d, s_s, s_h, s_bias,
                 BLOCK: tl.constexpr, TOPK: tl.constexpr, ROWS: tl.constexpr, WEIGHTED: tl.constexpr):
    """TOPK = 0: d is a [T, H] delta; TOPK < 0: no delta (x's norm only); else d is PairOutputs.y,
    summed here (and rounded to the sum's dtype, as the stand-alone sum would store it)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0)
    if TOPK < 0:    # no delta: the norm of x alone (nothing to store but h)
        s = x
    else:
        if TOPK == 0:
            d = tl.load(d_ptr + row * s_d + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            d = _pair_delta(d_ptr, row_ptr, wt_ptr, id_ptr, bias_ptr, row, cols, ok, s_d, s_bias, TOPK, ROWS,
                            WEIGHTED)
            d = d.to(sum_ptr.dtype.element_ty).to(tl.float32)
        s = (x.to(tl.float32) + d).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * s_s + cols, s, mask=ok)
    tl.store(h_ptr + row * s_h + cols, normed(s, w_ptr, cols, ok, H, eps).to(h_ptr.dtype.element_ty), mask=ok)


def _pair_args(p: PairOutputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, dict[str, object]]:
    """(rows, weights, ids, bias, bias row stride, constexprs) of `p` for the kernels; unused pointers
    point at y (never read: the constexprs compile their loads out)."""
    weighted = p.weights is not None
    if weighted and (p.ids is None or p.bias is None):
        raise ValueError("PairOutputs with routing weights needs ids and bias too")
    if p.y.dim() != 2 or p.y.stride(1) != 1:
        raise ValueError(f"PairOutputs.y must be [rows, H] with a unit last stride, got {tuple(p.y.shape)}")
    y = p.y
    rows = p.row_of_pair if p.row_of_pair is not None else y
    wts, ids, bias = (p.weights, p.ids, p.bias) if weighted else (y, y, y)
    return rows, wts, ids, bias, bias.stride(0), dict(TOPK=p.k, ROWS=p.row_of_pair is not None, WEIGHTED=weighted)


def sum_pairs(p: PairOutputs) -> torch.Tensor:
    """PairOutputs -> the summed delta [T, H] in p.dtype (fp32 sum in pair order, one launch)."""
    H = p.y.shape[1]
    out = torch.empty((p.num_tokens, H), dtype=p.dtype, device=p.y.device)
    if p.num_tokens == 0:
        return out
    rows, wts, ids, bias, s_bias, flags = _pair_args(p)
    _sum_pairs[(p.num_tokens, triton.cdiv(H, _SUM_BLOCK))](
        p.y, rows, wts, ids, bias, out, H, p.y.stride(0), s_bias, out.stride(0), BLOCK=_SUM_BLOCK, num_warps=4,
        **flags)
    return out


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | PairOutputs, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rmsnorm(x + delta) * weight), both [T, H] in x's dtype; x [T, H] with a unit last
    stride (the model's hidden states), delta [T, H] or the MoE's PairOutputs for those T tokens."""
    T, H = x.shape
    pairs = delta if isinstance(delta, PairOutputs) else None
    d_shape = (pairs.num_tokens, pairs.y.shape[1]) if pairs is not None else tuple(delta.shape)  # type: ignore[union-attr]
    if d_shape != (T, H) or weight.shape != (H,) or (pairs is not None and pairs.dtype != x.dtype):
        raise ValueError(f"add_rmsnorm: x {tuple(x.shape)}, delta {d_shape}, weight {tuple(weight.shape)}")
    x = x.contiguous()
    total = torch.empty_like(x)
    h = torch.empty_like(x)
    if T == 0:
        return total, h
    block = triton.next_power_of_2(H)
    if pairs is None:
        d = delta.contiguous()  # type: ignore[union-attr]
        rows, wts, ids, bias, s_bias, flags = d, d, d, d, 0, dict(TOPK=0, ROWS=False, WEIGHTED=False)
    else:
        d = pairs.y
        rows, wts, ids, bias, s_bias, flags = _pair_args(pairs)
    _add_rmsnorm[(T,)](x, d, weight, total, h, rows, wts, ids, bias, H, float(eps), x.stride(0), d.stride(0),
                       total.stride(0), h.stride(0), s_bias, BLOCK=block, num_warps=8 if block >= 2048 else 4,
                       **flags)
    return total, h


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight [T, H] in x's dtype: add_rmsnorm's kernel with no delta (the first layer's
    input norm)."""
    T, H = x.shape
    if weight.shape != (H,):
        raise ValueError(f"rmsnorm: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    x = x.contiguous()
    h = torch.empty_like(x)
    if T == 0:
        return h
    block = triton.next_power_of_2(H)
    _add_rmsnorm[(T,)](x, x, weight, x, h, x, x, x, x, H, float(eps), x.stride(0), 0, 0, h.stride(0), 0,
                       BLOCK=block, num_warps=8 if block >= 2048 else 4, TOPK=-1, ROWS=False, WEIGHTED=False)
    return h
