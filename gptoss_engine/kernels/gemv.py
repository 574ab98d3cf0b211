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

qkv_gemv_rotary is the q|k|v projection with kernels/rotary's work (rotate q and k, store k and v in
the token's cache slot) as the GEMV's epilogue: a program takes the two rows a rotation mixes (d and
d + head_dim/2 of one head), so no other program's output is needed. One launch a layer fewer at
batch 1: 20b 2.273 -> 2.228 ms a step, 120b 3.170 -> 3.111 (H100, bench/decode_ab.py rotary).
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
# The model's q|k|v projection at 1-2 tokens takes qkv_gemv_rotary (rotary + KV store as the GEMV's
# epilogue) instead of dense_gemv then rotary.rotary_store_kv; False for the bench's A/B.
ROTARY_EPILOGUE = True


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
def _row_sums(x_ptr, w_ptr, rows, T, N, K: gl.constexpr, s_xt, s_wn,
              R: gl.constexpr, S: gl.constexpr, TP: gl.constexpr, L3: gl.constexpr):
    """[TP, R, 256] fp32 partial sums (layout L3; summed over the last axis: x[t] . W[rows[r]]) for the
    program's R rows (`rows` in SliceLayout(1, SliceLayout(0, L3))), streamed through the cp.async ring.
    The caller sums: a reduction inside a called Gluon function does not compile (no num-warps there)."""
    LW: gl.constexpr = gl.SliceLayout(0, L3)
    LX: gl.constexpr = gl.SliceLayout(1, L3)
    SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
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
    return acc


@gluon.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, T, N, K: gl.constexpr, s_xt, s_wn, s_yt,
                 R: gl.constexpr, S: gl.constexpr, TP: gl.constexpr, HAS_BIAS: gl.constexpr):
    # [TP tokens, R rows, 256 columns]: a lane holds 8 consecutive columns of every row and token.
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 1, 32], [1, 1, 1], [2, 1, 0])
    LY: gl.constexpr = gl.SliceLayout(2, L3)
    pid = gl.program_id(0)
    rows = pid * R + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(0, L3)))
    rows_y = pid * R + gl.arange(0, R, layout=gl.SliceLayout(0, LY))
    t_y = gl.arange(0, TP, layout=gl.SliceLayout(1, LY))
    if HAS_BIAS:   # loaded before the loop: its latency hides under it
        bias = gl.expand_dims(gl.load(b_ptr + rows_y, mask=rows_y < N, other=0.0).to(gl.float32), 0)
    y = gl.sum(_row_sums(x_ptr, w_ptr, rows, T, N, K, s_xt, s_wn, R, S, TP, L3), axis=2)
    if HAS_BIAS:
        y = y + bias
    ok = gl.expand_dims(t_y < T, 1) & gl.expand_dims(rows_y < N, 0)
    # Rounded to bf16 once (F.linear's result), then stored in y's dtype: an fp32 y (the logits) holds
    # those bf16 values exactly, with no widening pass after.
    gl.store(y_ptr + gl.expand_dims(t_y * s_yt, 1) + gl.expand_dims(rows_y, 0),
             y.to(gl.bfloat16).to(y_ptr.dtype.element_ty), mask=ok)


@gluon.jit
def _gemv_rotary_kernel(x_ptr, w_ptr, b_ptr, y_ptr, cos_ptr, sin_ptr, pool_ptr, slot_ptr, T, N,
                        K: gl.constexpr, s_xt, s_wn, s_yt, s_ct, s_st, s_pb, s_pkv, s_ps, s_ph,
                        HQ: gl.constexpr, HKV: gl.constexpr, HALF: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                        S: gl.constexpr, TP: gl.constexpr, HAS_BIAS: gl.constexpr):
    """The q|k|v projection with rotary_store_kv's work as its epilogue (kernels/rotary.py: the same
    contract). Program p owns rows d and d + HALF of head p // HALF (d = p % HALF): the two halves
    that the rotation mixes, so it rotates its own sums in fp32 before their one bf16 rounding."""
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 1, 32], [1, 1, 1], [2, 1, 0])
    LY: gl.constexpr = gl.SliceLayout(2, L3)
    pid = gl.program_id(0)
    head = pid // HALF
    base = head * (2 * HALF) + pid % HALF
    r_y = gl.arange(0, 2, layout=gl.SliceLayout(0, LY))
    rows_y = base + r_y * HALF
    t_y = gl.arange(0, TP, layout=gl.SliceLayout(1, LY))
    t_ok = t_y < T
    # The epilogue's operands are loaded before the loop, so their latency hides under it.
    cos = gl.expand_dims(gl.load(cos_ptr + t_y * s_ct + pid % HALF, mask=t_ok, other=1.0).to(gl.float32), 1)
    sin = gl.expand_dims(gl.load(sin_ptr + t_y * s_st + pid % HALF, mask=t_ok, other=0.0).to(gl.float32), 1)
    slot = gl.load(slot_ptr + t_y, mask=t_ok, other=-1).to(gl.int64)
    if HAS_BIAS:
        bias = gl.expand_dims(gl.load(b_ptr + rows_y).to(gl.float32), 0)
    rows = base + gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(0, L3))) * HALF
    y = gl.sum(_row_sums(x_ptr, w_ptr, rows, T, N, K, s_xt, s_wn, 2, S, TP, L3), axis=2)
    if HAS_BIAS:
        y = y + bias
    # Row 0 is x1 (first half), row 1 is x2: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin. Each
    # row's partner is summed out of the other row and a zero, which is exact (sum minus self is not).
    first = gl.expand_dims(r_y == 0, 0)
    x1 = gl.expand_dims(gl.sum(gl.where(first, y, 0.0), axis=1), 1)
    x2 = gl.expand_dims(gl.sum(gl.where(first, 0.0, y), axis=1), 1)
    rot = gl.where(first, x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    ok = gl.expand_dims(t_ok, 1) & gl.expand_dims(rows_y < N, 0)
    y_at = y_ptr + gl.expand_dims(t_y * s_yt, 1) + gl.expand_dims(rows_y, 0)
    if head < HQ:
        gl.store(y_at, rot.to(gl.bfloat16), mask=ok)      # q: rotated
    else:
        gl.store(y_at, y.to(gl.bfloat16), mask=ok)        # k and v as projected (rotary_store_kv's contract)
        g = (head - HQ) % HKV
        dst = (pool_ptr + (slot // BLOCK_SIZE) * s_pb + (slot % BLOCK_SIZE) * s_ps + g * s_ph
               + (head >= HQ + HKV).to(gl.int64) * s_pkv)
        at = gl.expand_dims(dst, 1) + gl.expand_dims(r_y * HALF + pid % HALF, 0)
        put = ok & gl.expand_dims(slot >= 0, 1)   # slot -1: a padding row, nothing stored
        if head < HQ + HKV:
            gl.store(at, rot.to(gl.bfloat16).to(pool_ptr.dtype.element_ty), mask=put)
        else:
            gl.store(at, y.to(gl.bfloat16).to(pool_ptr.dtype.element_ty), mask=put)


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


def dense_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [T, K] bf16 (T <= MAX_TOKENS), w [N, K] bf16, bias [N] or None -> [T, N] bf16 (fp32 sums,
    one rounding, as F.linear's), stored as out_dtype: F.linear(x, w, bias).to(out_dtype) in one launch."""
    if not gemv_takes(x, w) or x.shape[1] != w.shape[1]:
        raise ValueError(f"dense_gemv: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}: needs bf16, "
                         f"1-{MAX_TOKENS} rows, matching K (a multiple of 8), row strides a multiple of 16 elements, "
                         "16-byte aligned data")
    T, K = x.shape
    N = w.shape[0]
    R, S = _CONFIG_OVERRIDE or _CONFIG
    y = torch.empty((T, N), dtype=out_dtype, device=x.device)
    b = bias if bias is not None else w
    _gemv_kernel[(triton.cdiv(N, R),)](x, w, b, y, T, N, K, x.stride(0), w.stride(0), y.stride(0),
                                       R=R, S=S, TP=triton.next_power_of_2(T), HAS_BIAS=bias is not None,
                                       num_warps=1)
    return y


def qkv_gemv_rotary(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, q_heads: int, kv_heads: int,
                    head_dim: int, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor, layer_in_pool: int,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """dense_gemv(x, w, bias) followed by rotary.rotary_store_kv on its output, in one launch:
    w is the fused [q|k|v] weight ([(q_heads + 2 kv_heads) * head_dim, K]). Returns qkv [T, N] with q
    rotated and k, v as projected; the rotated k and the v of token t go to pool slot slot_mapping[t]
    (-1: not stored). Same operand rules as dense_gemv, plus cos/sin [T, head_dim // 2] and the pool
    contiguous in their last dimension. The rotation works on the fp32 sums, so q and k are rounded
    to bf16 once (the two-launch path rounds the projection, then the rotation)."""
    T, K = x.shape
    N = w.shape[0]
    half = head_dim // 2
    if (not gemv_takes(x, w) or K != w.shape[1] or N != (q_heads + 2 * kv_heads) * head_dim or head_dim % 2
            or pool.shape[4:] != (kv_heads, head_dim) or cos.shape != (T, half) or sin.shape != (T, half)
            or cos.stride(1) != 1 or sin.stride(1) != 1 or pool.stride(5) != 1):
        raise ValueError(f"qkv_gemv_rotary: x {tuple(x.shape)}, w {tuple(w.shape)}, cos {tuple(cos.shape)}, "
                         f"pool {tuple(pool.shape)} do not fit {q_heads}+2x{kv_heads} heads of {head_dim} "
                         "(and dense_gemv's operand rules)")
    S = (_CONFIG_OVERRIDE or _CONFIG)[1]
    y = torch.empty((T, N), dtype=torch.bfloat16, device=x.device)
    layer_pool = pool[:, layer_in_pool]
    b = bias if bias is not None else w
    _gemv_rotary_kernel[(N // 2,)](
        x, w, b, y, cos, sin, layer_pool, slot_mapping, T, N, K, x.stride(0), w.stride(0), y.stride(0),
        cos.stride(0), sin.stride(0),
        layer_pool.stride(0), layer_pool.stride(1), layer_pool.stride(2), layer_pool.stride(3),
        HQ=q_heads, HKV=kv_heads, HALF=half, BLOCK_SIZE=pool.shape[3], S=S, TP=triton.next_power_of_2(T),
        HAS_BIAS=bias is not None, num_warps=1)
    return y
