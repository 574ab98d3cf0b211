"""The per-pair mma GEMV (moe_gemv_mma) with its weights streamed by the copy engine (sm_90 TMA).

Why: at batch 1 the MoE GEMVs move their 52.6 MB a layer at ~1.8 TB/s (PERF_NOTES v22). Every form
that kept more weight bytes in flight did it with registers (a register prefetch two trips deep) or
with per-thread cp.async copies into shared memory (v18's staging: +24 registers, five programs an
SM instead of seven), and lost the gain to occupancy. Here one thread a program hands the copy
engine each trip's tile (`cp.async.bulk.tensor`: the weight words of the program's 16 rows, their
scale bytes and x's words) into a ring of S stages, each completed by an mbarrier; the warps only
wait on that barrier, read the stage into the same registers the register loop uses, and run the
same `_mma` asm. So S - 1 trips (~16 KB a program, ~110 KB an SM) are in flight at the register
loop's register count.

Rows: a program reads 16 consecutive rows of its expert, row a = the first 8, row b = the next 8
(one 2D box a trip). For down that is moe_gemv_mma's pairing; for gate_up (rows interleaved gate,
up) the sums are re-paired in the epilogue: rows 16p + q, q even = gate, odd = up of column 8p + q/2.

Who owns a ring stage: the copy engine from its issue until the stage's mbarrier completes; then the
warps, until every warp has read it (a CTA barrier), after which the issuing thread hands it to the
copy engine again for the trip S ahead. The kernel ends with no copy in flight (the last S trips
issue none), so no shared memory is written after the program exits.

Not yet run on a GPU (written in session 22 after its device time was spent): off by default
(`ON`); tests/gpu/test_moe_mxfp4.py::test_tma_ring_gemv_is_the_register_loop checks it bit-equal to
the register loop, and `bench/decode_ab.py tmaring` times it.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from gptoss_engine.kernels.moe_gemv_mma import _checked, _mma
from gptoss_engine.moe import PairOutputs

# Whether moe_mxfp4's dispatcher takes these kernels for the per-pair GEMV (where `takes` allows).
ON = False
# Ring stages a program; 8 rows a and 8 rows b a program, 4 warps along k, 4 words a thread a row.
STAGES = 4
_R, _WK = 8, 4
_W = 16 * _WK            # words a trip a row (512 codes)


@gluon.jit
def _ring_rows(w_desc, s_desc, x_desc, row0, x_row, KW, ONE_MUL: gl.constexpr, PERM: gl.constexpr,
               S: gl.constexpr):
    """(row a sums, row b sums) [R] fp32 over k: rows row0 + [0, R) and row0 + R + [0, R) of w_desc
    (int32 words [rows, KW]) and s_desc (scale bytes [rows, groups]) against x_desc's row x_row
    (int64, four bf16 each)."""
    R: gl.constexpr = w_desc.block_shape[0] // 2
    W: gl.constexpr = w_desc.block_shape[1]
    L: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [1, gl.num_warps()], [1, 0])
    # Scales [R, W/4] one a thread (its 4 words' group); x [1, 2W] int64, a thread's 8 side by side.
    LS: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [1, gl.num_warps()], [1, 0])
    LX: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, gl.num_warps()], [1, 0])
    ring_w = gl.allocate_shared_memory(gl.int32, [S, 2 * R, W], w_desc.layout)
    ring_s = gl.allocate_shared_memory(gl.uint8, [S, 2 * R, W // 4], s_desc.layout)
    ring_x = gl.allocate_shared_memory(gl.int64, [S, 1, 2 * W], x_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    nbytes: gl.constexpr = (2 * R * W * 4 + 2 * R * (W // 4) + 2 * W * 8)
    trips = gl.cdiv(KW, W)
    for s in gl.static_range(S):
        mbarrier.init(full.index(s), count=1)
    fence_async_shared()
    for s in gl.static_range(S):
        live = s < trips
        mbarrier.expect(full.index(s), nbytes, pred=live)
        tma.async_copy_global_to_shared(w_desc, [row0, s * W], full.index(s), ring_w.index(s), pred=live)
        tma.async_copy_global_to_shared(s_desc, [row0, s * (W // 4)], full.index(s), ring_s.index(s), pred=live)
        tma.async_copy_global_to_shared(x_desc, [x_row, s * 2 * W], full.index(s), ring_x.index(s), pred=live)
    z = gl.zeros([R, W], gl.float32, L)
    acc = (z, z, z, z)
    for i in range(trips):
        st = i % S
        mbarrier.wait(full.index(st), (i // S) & 1)
        stage_w = ring_w.index(st)
        wa = stage_w.slice(0, R).load(L)
        wb = stage_w.slice(R, R).load(L)
        stage_s = ring_s.index(st)
        sa = _word_scales(stage_s.slice(0, R).load(LS), ONE_MUL, L)
        sb = _word_scales(stage_s.slice(R, R).load(LS), ONE_MUL, L)
        stage_x = ring_x.index(st)
        xv = gl.reshape(stage_x.load(LX), [1, W, 2])
        x_lo, x_hi = gl.split(xv)
        x_lo = gl.convert_layout(x_lo, L)
        x_hi = gl.convert_layout(x_hi, L)
        # Every warp holds this stage in registers: it goes back to the copy engine for trip i + S.
        gl.thread_barrier()
        fence_async_shared()
        nxt = i + S
        live = nxt < trips
        bar = full.index(st)
        mbarrier.expect(bar, nbytes, pred=live)
        tma.async_copy_global_to_shared(w_desc, [row0, nxt * W], bar, stage_w, pred=live)
        tma.async_copy_global_to_shared(s_desc, [row0, nxt * (W // 4)], bar, stage_s, pred=live)
        tma.async_copy_global_to_shared(x_desc, [x_row, nxt * 2 * W], bar, stage_x, pred=live)
        acc = _mma(acc, wa, wb, sa, sb, x_lo, x_hi, ONE_MUL, PERM)
    for s in gl.static_range(S):
        mbarrier.invalidate(full.index(s))
    return gl.sum(acc[0] + acc[1], axis=1) * 0.125, gl.sum(acc[2] + acc[3], axis=1) * 0.125


@gluon.jit
def _word_scales(sc, ONE_MUL: gl.constexpr, L: gl.constexpr):
    """Scale bytes [R, W/4] (one a scale group of 4 words) -> the dequant's scale operand [R, W]
    (bf16 2^(s-1) or 2^(s-64) in both halves, moe_gemv_mma._scale_loads'), one a word."""
    if ONE_MUL:
        v = sc.to(gl.int32) * 0x00800080 + 126 * 0x00800080
    else:
        v = sc.to(gl.int32) * 0x00800080 + 63 * 0x00800080
    v2 = gl.join(v, v)
    v4 = gl.join(v2, v2)
    return gl.convert_layout(gl.reshape(v4, [v.shape[0], v.shape[1] * 4]), L)


@gluon.jit
def _gate_up_tma(w_desc, s_desc, x_desc, ids_ptr, bias_ptr, inter_ptr, I, limit, alpha, rows_e, s_bias_e, s_it,
                 TOPK: gl.constexpr, ONE_MUL: gl.constexpr, PERM: gl.constexpr, S: gl.constexpr):
    """Program (pair, p): gate_up rows 16p .. 16p + 15 of the pair's expert (output columns 8p .. 8p + 7)
    -> inter[pair] (bf16, as moe_gemv_mma._gate_up_mma)."""
    R: gl.constexpr = w_desc.block_shape[0] // 2
    pair = gl.program_id(0)
    p = gl.program_id(1)
    expert = gl.load(ids_ptr + pair)
    ya, yb = _ring_rows(w_desc, s_desc, x_desc, expert.to(gl.int32) * rows_e + p * 2 * R, pair // TOPK,
                        w_desc.shape[1], ONE_MUL, PERM, S)
    # Row 2R p + q holds the gate (q even) or the up (q odd) of column R p + q / 2: rows a give columns
    # R p + [0, R/2), rows b the next R/2.
    y = gl.reshape(gl.permute(gl.join(ya, yb), [1, 0]), [R, 2])
    LP: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [gl.num_warps(), 1], [1, 0])
    gate, up = gl.split(gl.convert_layout(y, LP))
    LO: gl.constexpr = gl.SliceLayout(1, LP)
    cols = p * R + gl.arange(0, R, layout=LO)
    ok = cols < I
    b = bias_ptr + expert.to(gl.int64) * s_bias_e
    gate = gl.minimum(gate + gl.load(b + 2 * cols, mask=ok, other=0.0).to(gl.float32), limit)
    up = gl.minimum(gl.maximum(up + gl.load(b + 2 * cols + 1, mask=ok, other=0.0).to(gl.float32), -limit), limit)
    act = gate / (1.0 + gl.exp(-alpha * gate)) * (up + 1.0)
    gl.store(inter_ptr + pair.to(gl.int64) * s_it + cols, act.to(gl.bfloat16), mask=ok)


@gluon.jit
def _down_tma(w_desc, s_desc, x_desc, ids_ptr, wts_ptr, bias_ptr, part_ptr, H, rows_e, s_bias_e, s_pt,
              ONE_MUL: gl.constexpr, PERM: gl.constexpr, S: gl.constexpr):
    """Program (pair, p): down rows 16p .. 16p + 15 of the pair's expert -> part[pair] (fp32, weighted
    and biased, as moe_gemv_mma._down_mma)."""
    R: gl.constexpr = w_desc.block_shape[0] // 2
    pair = gl.program_id(0)
    p = gl.program_id(1)
    expert = gl.load(ids_ptr + pair)
    wt = gl.load(wts_ptr + pair).to(gl.float32)
    ya, yb = _ring_rows(w_desc, s_desc, x_desc, expert.to(gl.int32) * rows_e + p * 2 * R, pair, w_desc.shape[1],
                        ONE_MUL, PERM, S)
    L: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [1, gl.num_warps()], [1, 0])
    rows_a = p * 2 * R + gl.arange(0, R, layout=gl.SliceLayout(1, L))
    rows_b = rows_a + R
    b = bias_ptr + expert.to(gl.int64) * s_bias_e
    ya = (ya + gl.load(b + rows_a, mask=rows_a < H, other=0.0).to(gl.float32)) * wt
    yb = (yb + gl.load(b + rows_b, mask=rows_b < H, other=0.0).to(gl.float32)) * wt
    gl.store(part_ptr + pair.to(gl.int64) * s_pt + rows_a, ya, mask=rows_a < H)
    gl.store(part_ptr + pair.to(gl.int64) * s_pt + rows_b, yb, mask=rows_b < H)


def _layout(bits: int) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=2)


def _descriptors(blk: torch.Tensor, scl: torch.Tensor, x: torch.Tensor) -> tuple[TensorDescriptor, ...]:
    """TMA descriptors of an expert tensor's words [E rows, K/8] (int32), its scale bytes [E rows,
    padded groups] and x [T, K/4] (int64), with one trip's boxes."""
    e, rows = blk.shape[0], blk.shape[1]
    words = blk.reshape(e * rows, -1).view(torch.int32)
    padded = scl.stride(1)
    scales = torch.as_strided(scl, (e * rows, padded), (padded, 1))
    xw = x.view(torch.int64)
    return (TensorDescriptor.from_tensor(words, [2 * _R, _W], _layout(32)),
            TensorDescriptor.from_tensor(scales, [2 * _R, _W // 4], _layout(8)),
            TensorDescriptor(xw, list(xw.shape), list(xw.stride()), [1, 2 * _W], _layout(64)))


def takes(x: torch.Tensor, gu_blk: torch.Tensor, gu_scl: torch.Tensor, d_blk: torch.Tensor,
          d_scl: torch.Tensor) -> bool:
    """Whether these kernels can read the operands: bf16 x, 16-byte aligned rows everywhere (TMA's
    rule), experts' packed rows contiguous, scale rows padded to a 16-byte stride (mxfp4.pad_scales)
    and an expert's rows one after another. A program's 16 rows may run past an expert's last row
    into the next expert's (down, H not a multiple of 16): those rows' sums are never stored."""
    def rows_ok(t: torch.Tensor) -> bool:
        return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(st * t.element_size() % 16 == 0
                                                                     for st in t.stride()[:-1])

    def scales_ok(s: torch.Tensor) -> bool:
        return rows_ok(s) and s.stride(0) == s.shape[1] * s.stride(1) and s.stride(1) % 16 == 0

    return (x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0 and rows_ok(x) and rows_ok(gu_blk) and rows_ok(d_blk)
            and gu_blk.is_contiguous() and d_blk.is_contiguous() and scales_ok(gu_scl) and scales_ok(d_scl))


def moe_experts_gemv_tma(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         gu_blk: torch.Tensor, gu_scl: torch.Tensor, gu_bias: torch.Tensor,
                         d_blk: torch.Tensor, d_scl: torch.Tensor, d_bias: torch.Tensor,
                         swiglu_limit: float, alpha: float, one_mul: bool = False,
                         permuted: bool = False) -> PairOutputs:
    """moe_gemv_mma.moe_experts_gemv_mma's contract, its weights streamed by TMA (`takes` must hold)."""
    T, H, I = _checked(x, gu_blk, d_blk)
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    inter = torch.empty((T * k, I), dtype=torch.bfloat16, device=x.device)
    w_desc, s_desc, x_desc = _descriptors(gu_blk, gu_scl, x)
    _gate_up_tma[(T * k, triton.cdiv(2 * I, 2 * _R))](
        w_desc, s_desc, x_desc, ids, gu_bias, inter, I, float(swiglu_limit), float(alpha), 2 * I, gu_bias.stride(0),
        inter.stride(0), TOPK=k, ONE_MUL=one_mul, PERM=permuted, S=STAGES, num_warps=_WK)
    part = torch.empty((T * k, H), dtype=torch.float32, device=x.device)
    w_desc, s_desc, x_desc = _descriptors(d_blk, d_scl, inter)
    _down_tma[(T * k, triton.cdiv(H, 2 * _R))](
        w_desc, s_desc, x_desc, ids, wts, d_bias, part, H, H, d_bias.stride(0), part.stride(0),
        ONE_MUL=one_mul, PERM=permuted, S=STAGES, num_warps=_WK)
    return PairOutputs(part, k, x.dtype)
