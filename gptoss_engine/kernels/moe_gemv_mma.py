"""Small-batch MoE over packed MXFP4 experts on the tensor cores (sm_90): GEMVs whose products are
mma.sync instructions fed straight from the e2m1 word dequant in registers.

The FMA GEMV (moe_gemv) spends ~6 instructions a weight: the dequant (~2.3), taking each bf16 to
fp32, an FMA, splitting x. Here a warp's weights are the A operand of `mma.sync.m16n8k16` as they
come out of the dequant, with no shared memory and no layout conversion: 229 SASS instructions a
loop trip of 64 weights a thread (3.6 a weight; the dequant is 2.25 of it), 189 on the permuted words
the GPU keeps on sm_90 (mxfp4.WORD_BITS: a word's dequant in 9 integer instructions instead of 14).
That needs each thread to hold exactly the A-fragment registers, so the kernels are written in Gluon (explicit layouts)
and the mma is inline PTX on what each thread holds. Measured (PERF_NOTES v12): 1 token 35-37 us a
layer against the FMA GEMV's 39-40, 4 tokens ~100 against 117, 8 tokens 183-185 against the
grouped kernel's 171-190 (even): well short of the instruction ratio, so at batch 1 the GEMV is no longer bound by
issue but by the bytes each program keeps in flight.

The fragment trick. A thread (g, t) (lane 4g + t) of an m16n8k16 mma supplies A[g][2t, 2t+1],
A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9] and B[2t, 2t+1][g], B[2t+8, 2t+9][g]. The
mma's 16 k's may be any 16 of the row's k's as long as B's rows are the same ones. A thread loads
int32 words (8 codes, one scale: a word never straddles a 32-code group) of two rows, "row a" for
A[g] and "row b" for A[g+8]; the word dequant (e2m1.word_asm, either layout) gives pairs (k0,k2),
(k4,k6), (k1,k3), (k5,k7) of the word. One word of each row feeds two mmas:
    mma 1: A = (a.k0k2, b.k0k2, a.k1k3, b.k1k3), B = (x.k0k2, x.k1k3)
    mma 2: A = (a.k4k6, b.k4k6, a.k5k7, b.k5k7), B = (x.k4k6, x.k5k7)
B's column g is token g's x; one pair is one token, so every column holds the same x and every
column of D the same sums: thread (g, t) ends with row a's and row b's dot over the words of its
four lane-mates t = 0..3. The layout (size [1, 4 U] of words, lanes [8, 4], warps [WN, WK]) gives a
thread 4 U consecutive words (16-byte loads, U scale groups) of each of its two rows, and the
register element j of every lane is the same mma: an accumulator [8 WN, 16 U WK] holds 4 U chains a
thread, summed at the end (D's columns 2t and 2t + 1 of each lane-mate t hold the same sums, hence
the 1/8: exact).

    gate_up: program (pair, n-tile of 8 WN (gate, up) row pairs): row a = gate, row b = up, so the
             SwiGLU takes both sums from the same thread -> inter[pair] (bf16, as the grouped kernel)
    down:    program (pair, n-tile of 16 WN rows): (W_d[e] @ inter[pair] + b_d[e]) * routing weight
             -> part[pair] (fp32; the k partials are summed by the PairOutputs' reader)

Who may call it: sm_90 (the dequant's bf16x2 multiply), packed rows 4-byte aligned, x rows 8-byte
aligned (x is read as int64 pairs of bf16 pairs): moe_experts_gemv_mma checks and raises.
"""
from __future__ import annotations

import re

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from gptoss_engine.kernels.e2m1 import word_asm
from gptoss_engine.moe import PairOutputs


def _word_dequant(asm: str, outs: tuple[str, str, str, str], word: str, scale: str) -> str:
    """E2M1_WORD_ASM's statements with its operands renamed (its scratch registers are declared once
    by the caller's block)."""
    names = dict(zip(("$0", "$1", "$2", "$3", "$4", "$5"), (*outs, word, scale)))
    body = [ln for ln in asm.strip().splitlines() if ln.strip() not in ("{", "}") and not ln.startswith(".reg")]
    return "\n".join(re.sub(r"\$\d", lambda m: names[m.group(0)], ln) for ln in body)


_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"


def _mma_word_asm(dequant: str) -> str:
    """One element of the loop: operands $4/$5 the words of rows a and b, $6/$7 their scale operands,
    $8/$9 x's codes k0..3 and k4..7 of the word as int64 (four bf16); $0..$3 the accumulator (D and
    C of both mmas; the inputs $10..$13 are tied to them, so no register is copied): $0 row a, $2
    row b, and $1/$3 the same sums again (columns 2t + 1)."""
    return "\n".join([
        "{",
        ".reg .b32 y, h, a, b, z, c, m, n, a0, a1, a2, a3, b0, b1, b2, b3, q0, q1, q2, q3, u0, u1, v0, v1;",
        _word_dequant(dequant, ("a0", "a1", "a2", "a3"), "$4", "$6"),
        _word_dequant(dequant, ("b0", "b1", "b2", "b3"), "$5", "$7"),
        "mov.b64 {q0, q1}, $8;",            # (x0, x1), (x2, x3)
        "mov.b64 {q2, q3}, $9;",            # (x4, x5), (x6, x7)
        "prmt.b32 u0, q0, q1, 0x5410;",     # (x0, x2)
        "prmt.b32 u1, q0, q1, 0x7632;",     # (x1, x3)
        "prmt.b32 v0, q2, q3, 0x5410;",     # (x4, x6)
        "prmt.b32 v1, q2, q3, 0x7632;",     # (x5, x7)
        f"{_MMA} {{$0, $1, $2, $3}}, {{a0, b0, a2, b2}}, {{u0, u1}}, {{$0, $1, $2, $3}};",
        f"{_MMA} {{$0, $1, $2, $3}}, {{a1, b1, a3, b3}}, {{v0, v1}}, {{$0, $1, $2, $3}};",
        "}",
    ])


# By dequant form: checkpoint-order words or permuted ones (mxfp4.WORD_BITS), two scale multiplies or one.
MMA_WORD_ASM: gl.constexpr = gl.constexpr(_mma_word_asm(word_asm(False, False)))
MMA_WORD_ASM_1MUL: gl.constexpr = gl.constexpr(_mma_word_asm(word_asm(False, True)))
MMA_PERM_ASM: gl.constexpr = gl.constexpr(_mma_word_asm(word_asm(True, False)))
MMA_PERM_ASM_1MUL: gl.constexpr = gl.constexpr(_mma_word_asm(word_asm(True, True)))

# (WN, WK, U, prefetch) for gate_up and down: warps along rows and along k, 4 U words a thread a row
# (16 WN rows, 128 U WK codes a trip), and whether the next trip's loads are issued before this
# trip's mmas.
_TILES = ((1, 4, 1, True), (1, 4, 1, True))
_TILES_OVERRIDE: tuple[tuple[int, int, int, bool], tuple[int, int, int, bool]] | None = None   # bench sweeps
# From this many pairs the per-pair kernels run the token-grouped kernels' staged loop (every trip's
# weight words copied into shared memory at the start, x loaded in its trip; 76 registers against 72).
# Whole-model decode (bench/decode_ab.py pairstaged / pairstaged4, H100, ms a step, register loop ->
# staged): on checkpoint-order words (PERF_NOTES v19) 20b batch 1 2.158 -> 2.207, 2 2.769 -> 2.719,
# 3 3.463 -> 3.363, 4 4.143 -> 3.952; 120b 1 2.994 -> 3.065, 2 3.915 -> 3.871, 4 5.864 -> 5.612. On
# permuted words (fewer instructions a trip, v20) the register loop wins at every batch: 20b 1 2.227 /
# 2.223, 2 2.721 -> 2.765, 3 3.320 -> 3.376, 4 3.814 -> 3.829; 120b 2 3.965 -> 4.059, 4 5.836 -> 5.911.
# So never by default (the bench and the GPU test set it to compare the two loops).
PAIR_STAGED_MIN_PAIRS = 1 << 30


@gluon.jit
def _scale_loads(s_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_sn, ONE_MUL: gl.constexpr,
                 L: gl.constexpr, W: gl.constexpr):
    """The scale operands of rows a and b for trip kw0 ([R, W], one per word: a word never straddles a
    32-code group), bf16 in both halves: 2^(s-1) (one multiply) or 2^(s-64). Zeros past KW."""
    j = gl.arange(0, W, layout=gl.SliceLayout(0, L))
    g1 = kw0 // 4 + j // 4
    live = g1 < KW // 4
    grp = gl.expand_dims(g1, 0)
    ra = gl.expand_dims(rows_a.to(gl.int64), 1)
    rb = gl.expand_dims(rows_b.to(gl.int64), 1)
    sa = gl.load(s_ptr + ra * s_sn + grp, mask=gl.expand_dims(ok_a, 1) & gl.expand_dims(live, 0), other=0)
    sb = gl.load(s_ptr + rb * s_sn + grp, mask=gl.expand_dims(ok_b, 1) & gl.expand_dims(live, 0), other=0)
    if ONE_MUL:
        sa = sa.to(gl.int32) * 0x00800080 + 126 * 0x00800080
        sb = sb.to(gl.int32) * 0x00800080 + 126 * 0x00800080
    else:
        sa = sa.to(gl.int32) * 0x00800080 + 63 * 0x00800080
        sb = sb.to(gl.int32) * 0x00800080 + 63 * 0x00800080
    return sa, sb


@gluon.jit
def _weight_loads(w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_wn, s_sn, ONE_MUL: gl.constexpr,
                  L: gl.constexpr, W: gl.constexpr):
    """One trip's weights from word kw0: words [R, W] of rows a and b (int32) and their scale
    operands. Zeros (no memory touched) past KW."""
    j = gl.arange(0, W, layout=gl.SliceLayout(0, L))
    wd = kw0 + j
    # Masked by scale group (4 words; KW is a multiple of 4): a mask constant over a thread's 4 words
    # lets their load be one 16-byte load, where `wd < KW` would split it (KW's divisibility is unknown).
    g1 = kw0 // 4 + j // 4
    live2 = gl.expand_dims(g1 < KW // 4, 0)
    wd2 = gl.expand_dims(wd, 0)
    ma = gl.expand_dims(ok_a, 1) & live2
    mb = gl.expand_dims(ok_b, 1) & live2
    ra = gl.expand_dims(rows_a.to(gl.int64), 1)
    rb = gl.expand_dims(rows_b.to(gl.int64), 1)
    wp = w_ptr.to(gl.pointer_type(gl.int32))
    wa = gl.load(wp + ra * (s_wn // 4) + wd2, mask=ma, other=0)
    wb = gl.load(wp + rb * (s_wn // 4) + wd2, mask=mb, other=0)
    sa, sb = _scale_loads(s_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_sn, ONE_MUL, L, W)
    return wa, wb, sa, sb


@gluon.jit
def _loads(x_ptr, w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_wn, s_sn, ONE_MUL: gl.constexpr,
           L: gl.constexpr, W: gl.constexpr):
    """One trip from word kw0: _weight_loads, and x's words as two int64 [W] (codes 0-3, 4-7 of each
    word). Zeros (no memory touched) past KW."""
    wa, wb, sa, sb = _weight_loads(w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_wn, s_sn, ONE_MUL, L, W)
    j = gl.arange(0, W, layout=gl.SliceLayout(0, L))
    wd = kw0 + j
    live = (kw0 // 4 + j // 4) < KW // 4
    xp = x_ptr.to(gl.pointer_type(gl.int64))
    x_lo = gl.expand_dims(gl.load(xp + 2 * wd, mask=live, other=0), 0)
    x_hi = gl.expand_dims(gl.load(xp + 2 * wd + 1, mask=live, other=0), 0)
    return wa, wb, sa, sb, x_lo, x_hi


@gluon.jit
def _mma(acc, wa, wb, sa, sb, x_lo, x_hi, ONE_MUL: gl.constexpr, PERM: gl.constexpr):
    """One trip's two mmas a word into the accumulator quad. PERM: the words are in mxfp4.WORD_BITS
    order (the 9-instruction dequant)."""
    return gl.inline_asm_elementwise((MMA_PERM_ASM_1MUL if ONE_MUL else MMA_PERM_ASM) if PERM
                                     else (MMA_WORD_ASM_1MUL if ONE_MUL else MMA_WORD_ASM),
                                     "=f,=f,=f,=f,r,r,r,r,l,l,0,1,2,3",
                                     [wa, wb, sa, sb, x_lo, x_hi, acc[0], acc[1], acc[2], acc[3]],
                                     dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _mma_rows(x_ptr, w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, KW, s_wn, s_sn, ONE_MUL: gl.constexpr,
              PERM: gl.constexpr, PREFETCH: gl.constexpr, L: gl.constexpr, R: gl.constexpr, W: gl.constexpr,
              TRIPS: gl.constexpr):
    """(row a sums, row b sums) [R] over k in [0, 8 KW): sum_k dequant(W[row, k]) * x[k], fp32.
    TRIPS > 0: the token-grouped kernels' staged loop with every row on the one token."""
    z = gl.zeros([R, W], gl.float32, L)
    acc = (z, z, z, z)
    if TRIPS > 0:
        r0 = gl.arange(0, R, layout=gl.SliceLayout(1, L))
        acc = _tok_rows_staged(x_ptr, gl.expand_dims(r0 * 0, 1).to(gl.int64), gl.expand_dims(r0 >= 0, 1), w_ptr,
                               s_ptr, rows_a, rows_b, ok_a, ok_b, KW, s_wn, s_sn, ONE_MUL, PERM, L, R, W, TRIPS)
    elif PREFETCH:
        wa, wb, sa, sb, x_lo, x_hi = _loads(x_ptr, w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, 0, KW, s_wn, s_sn,
                                            ONE_MUL, L, W)
        for kw0 in range(0, KW, W):
            nwa, nwb, nsa, nsb, nx_lo, nx_hi = _loads(x_ptr, w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, kw0 + W,
                                                      KW, s_wn, s_sn, ONE_MUL, L, W)
            acc = _mma(acc, wa, wb, sa, sb, x_lo, x_hi, ONE_MUL, PERM)
            wa, wb, sa, sb, x_lo, x_hi = nwa, nwb, nsa, nsb, nx_lo, nx_hi
    else:
        for kw0 in range(0, KW, W):
            wa, wb, sa, sb, x_lo, x_hi = _loads(x_ptr, w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_wn,
                                                s_sn, ONE_MUL, L, W)
            acc = _mma(acc, wa, wb, sa, sb, x_lo, x_hi, ONE_MUL, PERM)
    # Columns 2t and 2t + 1 of lane-mates t = 0..3 hold the same sums (every column of D is the
    # same): 8x, exactly. Summing the odd columns too keeps them live; dead, ptxas refills the mma's
    # accumulator quad with a copy each time.
    return gl.sum(acc[0] + acc[1], axis=1) * 0.125, gl.sum(acc[2] + acc[3], axis=1) * 0.125


@gluon.jit
def _gate_up_mma(x_ptr, ids_ptr, blk_ptr, scl_ptr, bias_ptr, inter_ptr, H, I, limit, alpha,
                 s_xt, s_be, s_bn, s_se, s_sn, s_bias_e, s_it,
                 TOPK: gl.constexpr, WN: gl.constexpr, WK: gl.constexpr, U: gl.constexpr, ONE_MUL: gl.constexpr,
                 PERM: gl.constexpr, PREFETCH: gl.constexpr, TRIPS: gl.constexpr):
    L: gl.constexpr = gl.BlockedLayout([1, 4 * U], [8, 4], [WN, WK], [1, 0])
    R: gl.constexpr = 8 * WN
    pair = gl.program_id(0)
    pid_n = gl.program_id(1)
    expert = gl.load(ids_ptr + pair).to(gl.int64)
    token = pair // TOPK
    # Row a = gate row 2c, row b = up row 2c + 1 of the program's R output columns c.
    cols = pid_n * R + gl.arange(0, R, layout=gl.SliceLayout(1, L))
    ok = cols < I
    # Biases first: their latency hides under the loop instead of following it.
    b_gate = gl.load(bias_ptr + expert * s_bias_e + 2 * cols, mask=ok, other=0.0).to(gl.float32)
    b_up = gl.load(bias_ptr + expert * s_bias_e + 2 * cols + 1, mask=ok, other=0.0).to(gl.float32)
    gate, up = _mma_rows(x_ptr + token.to(gl.int64) * s_xt, blk_ptr + expert * s_be, scl_ptr + expert * s_se,
                         2 * cols, 2 * cols + 1, ok, ok, H // 8, s_bn, s_sn, ONE_MUL, PERM, PREFETCH, L, R,
                         16 * U * WK, TRIPS)
    gate = gl.minimum(gate + b_gate, limit)
    up = gl.minimum(gl.maximum(up + b_up, -limit), limit)
    act = gate / (1.0 + gl.exp(-alpha * gate)) * (up + 1.0)
    gl.store(inter_ptr + pair.to(gl.int64) * s_it + cols, act.to(gl.bfloat16), mask=ok)


@gluon.jit
def _down_mma(inter_ptr, ids_ptr, wts_ptr, blk_ptr, scl_ptr, bias_ptr, part_ptr, H, I,
              s_it, s_be, s_bn, s_se, s_sn, s_bias_e, s_pt,
              WN: gl.constexpr, WK: gl.constexpr, U: gl.constexpr, ONE_MUL: gl.constexpr, PERM: gl.constexpr,
              PREFETCH: gl.constexpr,
              TRIPS: gl.constexpr):
    L: gl.constexpr = gl.BlockedLayout([1, 4 * U], [8, 4], [WN, WK], [1, 0])
    R: gl.constexpr = 8 * WN
    pair = gl.program_id(0)
    pid_n = gl.program_id(1)
    expert = gl.load(ids_ptr + pair).to(gl.int64)
    rows_a = pid_n * 2 * R + gl.arange(0, R, layout=gl.SliceLayout(1, L))
    rows_b = rows_a + R
    ok_a = rows_a < H
    ok_b = rows_b < H
    wt = gl.load(wts_ptr + pair).to(gl.float32)
    b_a = gl.load(bias_ptr + expert * s_bias_e + rows_a, mask=ok_a, other=0.0).to(gl.float32)
    b_b = gl.load(bias_ptr + expert * s_bias_e + rows_b, mask=ok_b, other=0.0).to(gl.float32)
    ya, yb = _mma_rows(inter_ptr + pair.to(gl.int64) * s_it, blk_ptr + expert * s_be, scl_ptr + expert * s_se,
                       rows_a, rows_b, ok_a, ok_b, I // 8, s_bn, s_sn, ONE_MUL, PERM, PREFETCH, L, R, 16 * U * WK,
                       TRIPS)
    ya = (ya + b_a) * wt
    yb = (yb + b_b) * wt
    gl.store(part_ptr + pair.to(gl.int64) * s_pt + rows_a, ya, mask=ok_a)
    gl.store(part_ptr + pair.to(gl.int64) * s_pt + rows_b, yb, mask=ok_b)


def _aligned(t: torch.Tensor, nbytes: int) -> bool:
    return t.data_ptr() % nbytes == 0 and all(st * t.element_size() % nbytes == 0 for st in t.stride()[:-1])


def mma_gemv_takes(x: torch.Tensor) -> bool:
    """Whether these kernels take x [T, H] as it is (the dispatcher's test; the FMA GEMV otherwise)."""
    return x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0 and _aligned(x, 8)


def _checked(x: torch.Tensor, gu_blk: torch.Tensor, d_blk: torch.Tensor) -> tuple[int, int, int]:
    """(T, H, I) of operands these kernels can read; ValueError otherwise."""
    T, H = x.shape
    I = gu_blk.shape[1] // 2
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the mma GEMV takes bf16 activations, got {x.dtype}")
    if H % 8 or I % 8:
        raise ValueError(f"hidden {H} and intermediate {I} must be multiples of 8")
    # Packed rows are read as int32 words and x as int64 (four bf16): their rows must be aligned so.
    if not (_aligned(gu_blk, 4) and _aligned(d_blk, 4) and _aligned(x, 8)):
        raise ValueError("the mma GEMV needs 4-byte aligned packed rows and 8-byte aligned x rows")
    return T, H, I


def moe_experts_gemv_mma(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         gu_blk: torch.Tensor, gu_scl: torch.Tensor, gu_bias: torch.Tensor,
                         d_blk: torch.Tensor, d_scl: torch.Tensor, d_bias: torch.Tensor,
                         swiglu_limit: float, alpha: float, one_mul: bool = False,
                         permuted: bool = False) -> PairOutputs:
    """moe_gemv.moe_experts_gemv's contract (x [T, H] -> the T*k weighted, biased expert outputs, fp32)
    on the tensor cores; x must be bf16 (the mma's operand type). Shapes were checked by the caller."""
    T, H, I = _checked(x, gu_blk, d_blk)
    k = topk_ids.shape[1]
    (wn_gu, wk_gu, u_gu, pf_gu), (wn_d, wk_d, u_d, pf_d) = _TILES_OVERRIDE or _TILES
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    staged = T * k >= PAIR_STAGED_MIN_PAIRS
    # bf16 inter: the down mma's operand (the grouped kernel rounds it to bf16 too).
    inter = torch.empty((T * k, I), dtype=torch.bfloat16, device=x.device)
    n_gu = triton.cdiv(I, 8 * wn_gu)
    _gate_up_mma[(T * k, n_gu)](
        x, ids, gu_blk, gu_scl, gu_bias, inter, H, I, float(swiglu_limit), float(alpha),
        x.stride(0), gu_blk.stride(0), gu_blk.stride(1), gu_scl.stride(0), gu_scl.stride(1), gu_bias.stride(0),
        inter.stride(0), TOPK=k, WN=wn_gu, WK=wk_gu, U=u_gu, ONE_MUL=one_mul, PERM=permuted, PREFETCH=pf_gu,
        TRIPS=_staged_trips(H // 8, 16 * u_gu * wk_gu, 8 * wn_gu, staged), num_warps=wn_gu * wk_gu)
    part = torch.empty((T * k, H), dtype=torch.float32, device=x.device)
    _down_mma[(T * k, triton.cdiv(H, 16 * wn_d))](
        inter, ids, wts, d_blk, d_scl, d_bias, part, H, I,
        inter.stride(0), d_blk.stride(0), d_blk.stride(1), d_scl.stride(0), d_scl.stride(1), d_bias.stride(0),
        part.stride(0), WN=wn_d, WK=wk_d, U=u_d, ONE_MUL=one_mul, PERM=permuted, PREFETCH=pf_d,
        TRIPS=_staged_trips(I // 8, 16 * u_d * wk_d, 8 * wn_d, staged), num_warps=wn_d * wk_d)
    return PairOutputs(part, k, x.dtype)



# ---------------------------------------------------------------------------------------------------
# The token-grouped form: one read of an expert's rows for up to 8 of its tokens.
#
# The per-pair kernels above put one token in all 8 of B's columns, so each (token, expert) pair
# streams the expert's rows again and 7/8 of every mma is a copy. Here the pairs are sorted by expert
# (routing.sort_by_expert, each expert's run padded to 8 rows) and B's column g is sorted row g of a
# block: a program (row block of one expert, n-tile) dequantizes each weight word once for up to 8
# tokens, so an expert's rows are read once per 8 of its pairs instead of once per pair. The loop is
# the per-pair one (_mma, the same asm) with x loaded per lane.
#
# Thread (g, t) then holds D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]: row a's and row b's sums for
# the block's tokens 2t and 2t+1, split over its 4 U chains and the WK warps along k. The epilogue
# sums those (not across the lane-mates t, which hold other tokens): a reshape of [R, W] to
# [R, WK, 4, 4 U] names the chain and the lane-mate, and the sums over axes 3 and 1 leave [R, 4].
#
# Blocks of 16 or 32 tokens (two or four B operands a dequantized word) were measured and lost at
# every batch: their registers (96-134 a thread) cost more occupancy than the shared dequant saved
# (PERF_NOTES v15).
# ---------------------------------------------------------------------------------------------------

# (WN, WK, U, prefetch) of the token-grouped gate_up and down kernels; x is loaded in the trip that
# uses it (prefetching it too took 24 more registers and was slower at every size, PERF_NOTES v15).
_TOK_TILES = ((1, 4, 1, True), (1, 4, 1, True))
_TOK_TILES_OVERRIDE: tuple[tuple[int, int, int, bool], tuple[int, int, int, bool]] | None = None   # sweeps
# The token-grouped kernels copy every trip's weight words into shared memory up front (_tok_rows_staged)
# when that takes at most STAGED_MAX_BYTES a program; STAGED = False keeps the register loop (bench A/B).
# Whole-model decode (bench/decode_ab.py staged, H100): 20b batch 32 7.159 -> 7.044 ms, 120b batch 64
# 28.79 -> 28.40; on permuted words (v20) 20b 32 7.032 -> 6.791, 120b 64 28.445 -> 27.215, batch 16
# even. The per-pair kernels can take the same loop (PAIR_STAGED_MIN_PAIRS, above).
STAGED = True
STAGED_MAX_BYTES = 32 * 1024


def _staged_trips(kw: int, w: int, rows: int, staged: bool) -> int:
    """Trips of the staged loop for kw words a row in trips of w words, or 0 (the register loop):
    staging off, or the ring (`rows` rows a and as many b, w words a trip) over the cap."""
    trips = triton.cdiv(kw, w)
    return trips if staged and 2 * rows * w * 4 * trips <= STAGED_MAX_BYTES else 0


@gluon.jit
def _tok_x(x_ptr, x_off, x_ok, kw0, KW, L: gl.constexpr, W: gl.constexpr):
    """One trip's x: the words of the token in row r's column (r mod 8), from x_off [R, 1] (int64
    units) where x_ok; two int64 [R, W] (codes 0-3, 4-7 a word). Loaded as [R, 2 W] int64 with a
    thread's 4 U words' 8 U int64 side by side (16-byte loads), then split into the two halves."""
    LX: gl.constexpr = gl.BlockedLayout([1, 2 * L.size_per_thread[1]], L.threads_per_warp, L.warps_per_cta, [1, 0])
    R: gl.constexpr = x_off.shape[0]
    q = gl.arange(0, 2 * W, layout=gl.SliceLayout(0, LX))
    live = gl.expand_dims((kw0 // 4 + q // 8) < KW // 4, 0)
    xp = x_ptr.to(gl.pointer_type(gl.int64))
    v = gl.load(xp + gl.convert_layout(x_off, LX) + gl.expand_dims(2 * kw0 + q, 0),
                mask=gl.convert_layout(x_ok, LX) & live, other=0)
    lo, hi = gl.split(gl.reshape(v, [R, W, 2]))
    return gl.convert_layout(lo, L), gl.convert_layout(hi, L)


@gluon.jit
def _tok_rows(x_ptr, x_off, x_ok, w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, KW, s_wn, s_sn,
              ONE_MUL: gl.constexpr, PERM: gl.constexpr, PREFETCH: gl.constexpr, L: gl.constexpr, R: gl.constexpr,
              W: gl.constexpr):
    """The accumulator quad [R, W] x 4 over k in [0, 8 KW). PREFETCH: the next trip's weights are
    loaded before this trip's mmas."""
    z = gl.zeros([R, W], gl.float32, L)
    acc = (z, z, z, z)
    if PREFETCH:
        wa, wb, sa, sb = _weight_loads(w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, 0, KW, s_wn, s_sn, ONE_MUL, L, W)
        for kw0 in range(0, KW, W):
            nwa, nwb, nsa, nsb = _weight_loads(w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, kw0 + W, KW, s_wn, s_sn,
                                               ONE_MUL, L, W)
            x_lo, x_hi = _tok_x(x_ptr, x_off, x_ok, kw0, KW, L, W)
            acc = _mma(acc, wa, wb, sa, sb, x_lo, x_hi, ONE_MUL, PERM)
            wa, wb, sa, sb = nwa, nwb, nsa, nsb
    else:
        for kw0 in range(0, KW, W):
            wa, wb, sa, sb = _weight_loads(w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_wn, s_sn, ONE_MUL,
                                           L, W)
            x_lo, x_hi = _tok_x(x_ptr, x_off, x_ok, kw0, KW, L, W)
            acc = _mma(acc, wa, wb, sa, sb, x_lo, x_hi, ONE_MUL, PERM)
    return acc


@gluon.jit
def _stage_words(ring_a, ring_b, w_ptr, rows_a, rows_b, ok_a, ok_b, kw0, KW, s_wn, stage,
                 L: gl.constexpr, W: gl.constexpr):
    """cp.async of trip kw0's words of rows a and b into ring stage `stage`, each thread copying the
    16 bytes it will read back (the layout L of _weight_loads: no other thread's copy is waited for),
    zero-filled past KW; one commit group."""
    j = gl.arange(0, W, layout=gl.SliceLayout(0, L))
    live2 = gl.expand_dims((kw0 // 4 + j // 4) < KW // 4, 0)
    wd2 = gl.expand_dims(kw0 + j, 0)
    wp = w_ptr.to(gl.pointer_type(gl.int32))
    ra = gl.expand_dims(rows_a.to(gl.int64), 1)
    rb = gl.expand_dims(rows_b.to(gl.int64), 1)
    cp.async_copy_global_to_shared(ring_a.index(stage), wp + ra * (s_wn // 4) + wd2,
                                   mask=gl.expand_dims(ok_a, 1) & live2)
    cp.async_copy_global_to_shared(ring_b.index(stage), wp + rb * (s_wn // 4) + wd2,
                                   mask=gl.expand_dims(ok_b, 1) & live2)
    cp.commit_group()


@gluon.jit
def _tok_rows_staged(x_ptr, x_off, x_ok, w_ptr, s_ptr, rows_a, rows_b, ok_a, ok_b, KW, s_wn, s_sn,
                     ONE_MUL: gl.constexpr, PERM: gl.constexpr, L: gl.constexpr, R: gl.constexpr, W: gl.constexpr,
                     TRIPS: gl.constexpr):
    """_tok_rows with every trip's weight words in flight from the start: all TRIPS trips are copied
    into shared memory by cp.async at once (no registers held: the register loop keeps one trip
    ahead, ~1 KB a warp), then consumed in order as their groups complete. The scales (a byte a row
    a trip, one 128-byte line a row) keep the register prefetch; x (L2) is loaded in its trip."""
    SH: gl.constexpr = gl.SwizzledSharedLayout(16, 1, 4, [1, 0])
    ring_a = gl.allocate_shared_memory(gl.int32, [TRIPS, R, W], SH)
    ring_b = gl.allocate_shared_memory(gl.int32, [TRIPS, R, W], SH)
    for i in gl.static_range(TRIPS):
        _stage_words(ring_a, ring_b, w_ptr, rows_a, rows_b, ok_a, ok_b, i * W, KW, s_wn, i, L, W)
    z = gl.zeros([R, W], gl.float32, L)
    acc = (z, z, z, z)
    sa, sb = _scale_loads(s_ptr, rows_a, rows_b, ok_a, ok_b, 0, KW, s_sn, ONE_MUL, L, W)
    for i in gl.static_range(TRIPS):
        nsa, nsb = _scale_loads(s_ptr, rows_a, rows_b, ok_a, ok_b, (i + 1) * W, KW, s_sn, ONE_MUL, L, W)
        x_lo, x_hi = _tok_x(x_ptr, x_off, x_ok, i * W, KW, L, W)
        cp.wait_group(TRIPS - 1 - i)
        wa = ring_a.index(i).load(L)
        wb = ring_b.index(i).load(L)
        acc = _mma(acc, wa, wb, sa, sb, x_lo, x_hi, ONE_MUL, PERM)
        sa, sb = nsa, nsb
    return acc


@gluon.constexpr_function
def _sums_layout(WN, WK, U):
    """The layout of _col_sums' [R, 4]: (row, lane-mate t) where thread (g, t) of every warp along k
    holds row g's sums for its two token columns."""
    return gl.SliceLayout(1, gl.SliceLayout(3, gl.BlockedLayout([1, 1, 1, 4 * U], [8, 1, 4, 1], [WN, WK, 1, 1],
                                                                [3, 2, 1, 0])))


@gluon.jit
def _col_sums(acc, L2: gl.constexpr, R: gl.constexpr, WK: gl.constexpr, U: gl.constexpr):
    """[R, W] accumulator -> [R, 4] (row, lane-mate t): each thread's chains and the WK warps summed."""
    return gl.convert_layout(gl.sum(gl.sum(gl.reshape(acc, [R, WK, 4, 4 * U]), axis=3), axis=1), L2)


@gluon.jit
def _sorted_x(sorted_ptr, blk_row0, r, num_pairs, s_x, TOPK: gl.constexpr, BY_TOKEN: gl.constexpr):
    """([R, 1] int64-unit offset of row r's column's x, [R, 1] whether that sorted row is a pair).
    BY_TOKEN: x rows are tokens (gate_up reads x[pair // k]); else sorted rows (down reads inter)."""
    row = blk_row0 + r % 8
    pair = gl.load(sorted_ptr + row)
    ok = pair < num_pairs
    if BY_TOKEN:
        src = (pair // TOPK).to(gl.int64)
    else:
        src = row.to(gl.int64)
    return gl.expand_dims(gl.where(ok, src, 0) * (s_x // 4), 1), gl.expand_dims(ok, 1)


@gluon.jit
def _gate_up_tok(x_ptr, sorted_ptr, blk_exp_ptr, blk_ptr, scl_ptr, bias_ptr, inter_ptr, num_pairs, H, I, limit,
                 alpha, s_xt, s_be, s_bn, s_se, s_sn, s_bias_e, s_it,
                 TOPK: gl.constexpr, WN: gl.constexpr, WK: gl.constexpr, U: gl.constexpr, ONE_MUL: gl.constexpr,
                 PERM: gl.constexpr, PREFETCH: gl.constexpr, TRIPS: gl.constexpr):
    """Program (row block m of 8 sorted rows, n-tile of R (gate, up) row pairs) -> inter[sorted row]."""
    L: gl.constexpr = gl.BlockedLayout([1, 4 * U], [8, 4], [WN, WK], [1, 0])
    L2: gl.constexpr = _sums_layout(WN, WK, U)
    R: gl.constexpr = 8 * WN
    m = gl.program_id(0)
    pid_n = gl.program_id(1)
    expert = gl.load(blk_exp_ptr + m)
    if expert >= 0:     # -1: a block past the last expert's run
        e64 = expert.to(gl.int64)
        blk_row0 = m * 8
        r = gl.arange(0, R, layout=gl.SliceLayout(1, L))
        cols = pid_n * R + r
        ok = cols < I
        # Biases first, in the epilogue's layout: their latency hides under the loop.
        cols2 = pid_n * R + gl.arange(0, R, layout=gl.SliceLayout(1, L2))
        ok2 = cols2 < I
        b_gate = gl.expand_dims(gl.load(bias_ptr + e64 * s_bias_e + 2 * cols2, mask=ok2, other=0.0), 1)
        b_up = gl.expand_dims(gl.load(bias_ptr + e64 * s_bias_e + 2 * cols2 + 1, mask=ok2, other=0.0), 1)
        x_off, x_ok = _sorted_x(sorted_ptr, blk_row0, r, num_pairs, s_xt, TOPK, True)
        if TRIPS > 0:
            acc = _tok_rows_staged(x_ptr, x_off, x_ok, blk_ptr + e64 * s_be, scl_ptr + e64 * s_se, 2 * cols,
                                   2 * cols + 1, ok, ok, H // 8, s_bn, s_sn, ONE_MUL, PERM, L, R, 16 * U * WK, TRIPS)
        else:
            acc = _tok_rows(x_ptr, x_off, x_ok, blk_ptr + e64 * s_be, scl_ptr + e64 * s_se, 2 * cols, 2 * cols + 1,
                            ok, ok, H // 8, s_bn, s_sn, ONE_MUL, PERM, PREFETCH, L, R, 16 * U * WK)
        t = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, L2)), 0)
        for h in gl.static_range(2):
            # acc[h] (row a = gate) and acc[2 + h] (row b = up): the block's token column 2t + h.
            gate = gl.minimum(_col_sums(acc[h], L2, R, WK, U) + b_gate.to(gl.float32), limit)
            up = _col_sums(acc[2 + h], L2, R, WK, U) + b_up.to(gl.float32)
            up = gl.minimum(gl.maximum(up, -limit), limit)
            act = gate / (1.0 + gl.exp(-alpha * gate)) * (up + 1.0)
            row = blk_row0 + 2 * t + h
            live = gl.load(sorted_ptr + row) < num_pairs
            gl.store(inter_ptr + row.to(gl.int64) * s_it + gl.expand_dims(cols2, 1), act.to(gl.bfloat16),
                     mask=gl.expand_dims(ok2, 1) & live)


@gluon.jit
def _down_tok(inter_ptr, sorted_ptr, blk_exp_ptr, wts_ptr, blk_ptr, scl_ptr, bias_ptr, part_ptr, num_pairs, H, I,
              s_it, s_be, s_bn, s_se, s_sn, s_bias_e, s_pt,
              WN: gl.constexpr, WK: gl.constexpr, U: gl.constexpr, ONE_MUL: gl.constexpr, PERM: gl.constexpr,
              PREFETCH: gl.constexpr,
              TRIPS: gl.constexpr):
    """Program (row block m of 8 sorted rows, n-tile of 2 R output rows) -> part[pair] (weighted,
    biased; fp32)."""
    L: gl.constexpr = gl.BlockedLayout([1, 4 * U], [8, 4], [WN, WK], [1, 0])
    L2: gl.constexpr = _sums_layout(WN, WK, U)
    R: gl.constexpr = 8 * WN
    m = gl.program_id(0)
    pid_n = gl.program_id(1)
    expert = gl.load(blk_exp_ptr + m)
    if expert >= 0:
        e64 = expert.to(gl.int64)
        blk_row0 = m * 8
        r = gl.arange(0, R, layout=gl.SliceLayout(1, L))
        rows_a = pid_n * 2 * R + r
        rows_b = rows_a + R
        ra2 = pid_n * 2 * R + gl.arange(0, R, layout=gl.SliceLayout(1, L2))
        rb2 = ra2 + R
        b_a = gl.expand_dims(gl.load(bias_ptr + e64 * s_bias_e + ra2, mask=ra2 < H, other=0.0), 1)
        b_b = gl.expand_dims(gl.load(bias_ptr + e64 * s_bias_e + rb2, mask=rb2 < H, other=0.0), 1)
        x_off, x_ok = _sorted_x(sorted_ptr, blk_row0, r, num_pairs, s_it, 1, False)
        if TRIPS > 0:
            acc = _tok_rows_staged(inter_ptr, x_off, x_ok, blk_ptr + e64 * s_be, scl_ptr + e64 * s_se, rows_a,
                                   rows_b, rows_a < H, rows_b < H, I // 8, s_bn, s_sn, ONE_MUL, PERM, L, R, 16 * U * WK,
                                   TRIPS)
        else:
            acc = _tok_rows(inter_ptr, x_off, x_ok, blk_ptr + e64 * s_be, scl_ptr + e64 * s_se, rows_a, rows_b,
                            rows_a < H, rows_b < H, I // 8, s_bn, s_sn, ONE_MUL, PERM, PREFETCH, L, R, 16 * U * WK)
        t = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, L2)), 0)
        for h in gl.static_range(2):
            row = blk_row0 + 2 * t + h
            pair = gl.load(sorted_ptr + row)
            live = pair < num_pairs
            wt = gl.load(wts_ptr + pair, mask=live, other=0.0).to(gl.float32)
            base = part_ptr + pair.to(gl.int64) * s_pt
            ya = (_col_sums(acc[h], L2, R, WK, U) + b_a.to(gl.float32)) * wt
            yb = (_col_sums(acc[2 + h], L2, R, WK, U) + b_b.to(gl.float32)) * wt
            gl.store(base + gl.expand_dims(ra2, 1), ya, mask=gl.expand_dims(ra2 < H, 1) & live)
            gl.store(base + gl.expand_dims(rb2, 1), yb, mask=gl.expand_dims(rb2 < H, 1) & live)


# Rows of a token-grouped block: B's 8 columns.
TOKEN_BLOCK = 8


def moe_experts_gemv_mma_tokens(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                                sorted_pair: torch.Tensor, block_expert: torch.Tensor,
                                gu_blk: torch.Tensor, gu_scl: torch.Tensor, gu_bias: torch.Tensor,
                                d_blk: torch.Tensor, d_scl: torch.Tensor, d_bias: torch.Tensor,
                                swiglu_limit: float, alpha: float, one_mul: bool = False,
                                permuted: bool = False) -> PairOutputs:
    """moe_experts_gemv_mma's contract, token-grouped: sorted_pair / block_expert are
    routing.sort_by_expert's for row blocks of TOKEN_BLOCK rows."""
    T, H, I = _checked(x, gu_blk, d_blk)
    k = topk_ids.shape[1]
    cap = sorted_pair.numel()
    if cap % TOKEN_BLOCK or block_expert.numel() != cap // TOKEN_BLOCK:
        raise ValueError(f"routing for row blocks of {TOKEN_BLOCK}: {cap} rows, {block_expert.numel()} blocks")
    (wn_gu, wk_gu, u_gu, pf_gu), (wn_d, wk_d, u_d, pf_d) = _TOK_TILES_OVERRIDE or _TOK_TILES
    n = T * k
    wts = topk_weights.reshape(-1).contiguous()
    # inter by sorted row. Who reads what: gate_up writes the rows that hold a pair; down reads only
    # those (padding rows' x loads are masked), so the rest of the buffer is never touched.
    inter = torch.empty((cap, I), dtype=torch.bfloat16, device=x.device)
    trips_gu = _staged_trips(H // 8, 16 * u_gu * wk_gu, 8 * wn_gu, STAGED)
    trips_d = _staged_trips(I // 8, 16 * u_d * wk_d, 8 * wn_d, STAGED)
    _gate_up_tok[(cap // TOKEN_BLOCK, triton.cdiv(I, 8 * wn_gu))](
        x, sorted_pair, block_expert, gu_blk, gu_scl, gu_bias, inter, n, H, I, float(swiglu_limit), float(alpha),
        x.stride(0), gu_blk.stride(0), gu_blk.stride(1), gu_scl.stride(0), gu_scl.stride(1), gu_bias.stride(0),
        inter.stride(0), TOPK=k, WN=wn_gu, WK=wk_gu, U=u_gu, ONE_MUL=one_mul, PERM=permuted, PREFETCH=pf_gu,
        TRIPS=trips_gu,
        num_warps=wn_gu * wk_gu)
    part = torch.empty((n, H), dtype=torch.float32, device=x.device)
    _down_tok[(cap // TOKEN_BLOCK, triton.cdiv(H, 16 * wn_d))](
        inter, sorted_pair, block_expert, wts, d_blk, d_scl, d_bias, part, n, H, I,
        inter.stride(0), d_blk.stride(0), d_blk.stride(1), d_scl.stride(0), d_scl.stride(1), d_bias.stride(0),
        part.stride(0), WN=wn_d, WK=wk_d, U=u_d, ONE_MUL=one_mul, PERM=permuted, PREFETCH=pf_d, TRIPS=trips_d,
        num_warps=wn_d * wk_d)
    return PairOutputs(part, k, x.dtype)
