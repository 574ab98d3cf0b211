"""Dense bf16 GEMV for decode steps of 1-2 tokens: y = x @ W^T (+ b) for the attention projections
and lm_head, sm_80+ (cp.async).

At batch 1 the q|k|v (5120 x 2880) and o (2880 x 4096) projections are 53 MB of bf16 a layer that
cuBLAS streamed at ~2 TB/s (ncu at 7fbf131: GEMV-shaped GEMMs of 80-96 CTAs, 56-62% of DRAM's
peak, and o adds a split-K reduce launch); lm_head (1.16 GB) ran at 2.4-2.8 TB/s. A GEMV does one
FMA a weight a token, so what matters is the bytes each SM keeps in flight. Here one warp is one
program: it owns R weight rows and streams them in trips of 256 columns (32 lanes x 8 bf16) through a ring of S
shared-memory stages filled by cp.async (16 bytes a lane a row a trip), so S - 1 trips are in flight
without holding registers; x's columns of the trip travel in the same stage. Every lane reads back
only the bytes it copied itself (cp.async.wait_group orders a thread's own copies), so the ring
needs no cross-warp handshake. Grid: one program per R rows (2560 for q|k|v at R = 2: ~19 warps an
SM, all resident at once).

Measured (bench/gemv_bench.py, weights cold, H100): 1 token q|k|v 13.4 us against cuBLAS's 13.3,
o 10.4 against 13.8, lm_head 386 against 485 (3.0 TB/s). The kernel takes any token count (one
accumulator a token), but from 3 tokens cuBLAS is as fast or faster on q|k|v (4 tokens: 13.6
against 15.3-17.6 us): MAX_TOKENS is 2.
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

MAX_TOKENS = 2       # see the docstring
_CONFIG = (2, 4)     # (R rows a program, S ring stages)
_CONFIG_OVERRIDE: tuple[int, int] | None = None   # bench sweeps


@gluon.jit
def _issue(w_ring, x_ring, w_ptr, x_ptr, rows, row_ok, t_idx, t_ok, k0, K, s_wn, s_xt, stage,
           LW: gl.constexpr, LX: gl.constexpr):
    """cp.async of trip k0's columns, [R, 256] of W and [TP, 256] of x, into ring stage `stage`
    (zero-filled past K and for padding tokens), as one commit group."""
    cw = k0 + gl.arange(0, 256, layout=gl.SliceLayout(0, LW))
    cw = gl.max_contiguous(gl.multiple_of(cw, 8), 8)
    wp = w_ptr + gl.expand_dims(rows.to(gl.int64) * s_wn, 1) + gl.expand_dims(cw, 0)
    cp.async_copy_global_to_shared(w_ring.index(stage), wp, mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(cw < K, 0))
    cx = k0 + gl.arange(0, 256, layout=gl.SliceLayout(0, LX))
    cx = gl.max_contiguous(gl.multiple_of(cx, 8), 8)
    xp = x_ptr + gl.expand_dims(t_idx.to(gl.int64) * s_xt, 1) + gl.expand_dims(cx, 0)
    cp.async_copy_global_to_shared(x_ring.index(stage), xp, mask=gl.expand_dims(t_ok, 1) & gl.expand_dims(cx < K, 0))
    cp.commit_group()


@gluon.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, T, N, K: gl.constexpr, s_xt, s_wn, s_yt,
                 R: gl.constexpr, S: gl.constexpr, TP: gl.constexpr, HAS_BIAS: gl.constexpr):
    # [TP tokens, R rows, 256 columns]: a lane holds 8 consecutive columns of every row and token.
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 1, 32], [1, 1, 1], [2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(0, L3)
    LX: gl.constexpr = gl.SliceLayout(1, L3)
    LY: gl.constexpr = gl.SliceLayout(2, L3)
    SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    pid = gl.program_id(0)
    rows = pid * R + gl.arange(0, R, layout=gl.SliceLayout(1, LW))
    row_ok = rows < N
    t_idx = gl.arange(0, TP, layout=gl.SliceLayout(1, LX))
    t_ok = t_idx < T
    w_ring = gl.allocate_shared_memory(gl.bfloat16, [S, R, 256], SH)
    x_ring = gl.allocate_shared_memory(gl.bfloat16, [S, TP, 256], SH)
    TRIPS: gl.constexpr = (K + 255) // 256
    for i in gl.static_range(S - 1):
        _issue(w_ring, x_ring, w_ptr, x_ptr, rows, row_ok, t_idx, t_ok, i * 256, K, s_wn, s_xt, i, LW, LX)
    acc = gl.zeros([TP, R, 256], gl.float32, L3)
    for it in range(TRIPS):
        # Stage (it + S - 1) % S was read in trip it - 1, whose values this thread has used already.
        _issue(w_ring, x_ring, w_ptr, x_ptr, rows, row_ok, t_idx, t_ok, (it + S - 1) * 256, K, s_wn, s_xt,
               (it + S - 1) % S, LW, LX)
        cp.wait_group(S - 1)    # trip it's group is complete; S - 1 trips stay in flight
        w = w_ring.index(it % S).load(LW).to(gl.float32)
        xv = x_ring.index(it % S).load(LX).to(gl.float32)
        acc = acc + gl.expand_dims(w, 0) * gl.expand_dims(xv, 1)
    cp.wait_group(0)
    y = gl.sum(acc, axis=2)
    rows_y = pid * R + gl.arange(0, R, layout=gl.SliceLayout(0, LY))
    t_y = gl.arange(0, TP, layout=gl.SliceLayout(1, LY))
    if HAS_BIAS:
        y = y + gl.expand_dims(gl.load(b_ptr + rows_y, mask=rows_y < N, other=0.0).to(gl.float32), 0)
    ok = gl.expand_dims(t_y < T, 1) & gl.expand_dims(rows_y < N, 0)
    gl.store(y_ptr + gl.expand_dims(t_y * s_yt, 1) + gl.expand_dims(rows_y, 0), y.to(gl.bfloat16), mask=ok)


@functools.cache
def _has_cp_async(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def gemv_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether dense_gemv takes these operands (the caller's test; cuBLAS otherwise)."""
    return (x.is_cuda and _has_cp_async(x.device) and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS
            and x.dtype == w.dtype == torch.bfloat16
            and x.stride(1) == 1 and w.stride(1) == 1 and w.shape[1] % 8 == 0
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
            # Row strides that Triton's launcher marks divisible by 16 elements: only then does it
            # know every row starts 16-byte aligned, as the 16-byte copies need.
            and x.stride(0) % 16 == 0 and w.stride(0) % 16 == 0)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] bf16 (T <= MAX_TOKENS), w [N, K] bf16, bias [N] or None -> [T, N] bf16 (fp32 sums,
    one rounding, as F.linear's)."""
    if not gemv_takes(x, w) or x.shape[1] != w.shape[1]:
        raise ValueError(f"dense_gemv: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}: needs bf16, "
                         f"1-{MAX_TOKENS} rows, matching K (a multiple of 8), row strides a multiple of 16 elements, "
                         "16-byte aligned data")
    T, K = x.shape
    N = w.shape[0]
    R, S = _CONFIG_OVERRIDE or _CONFIG
    y = torch.empty((T, N), dtype=torch.bfloat16, device=x.device)
    b = bias if bias is not None else w
    _gemv_kernel[(triton.cdiv(N, R),)](x, w, b, y, T, N, K, x.stride(0), w.stride(0), y.stride(0),
                                       R=R, S=S, TP=triton.next_power_of_2(T), HAS_BIAS=bias is not None,
                                       num_warps=1)
    return y
