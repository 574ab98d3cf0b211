"""MoE experts over packed MXFP4 weights: token-sorted grouped GEMM, one launch per projection.

The experts stay in the checkpoint's packed form on the GPU (4.25 bits per weight, so 120b fits
one 80 GB card; only the scale rows are padded at load, mxfp4.pad_scales) and are dequantized
inside the kernel: on sm_90 by inline PTX (kernels/e2m1.py) into the register operand of wgmma,
elsewhere by `tl.dot_scaled` (bf16 activations x e2m1 weights with e8m0 scales). From a few tokens
to ~2k this kernel runs; below, the GEMVs (moe_gemv_mma on sm_90 with bf16 activations, up to 4
mean rows an expert; moe_gemv elsewhere); above, dequant + CUTLASS (moe_grouped_mm).

Routing is turned into a static-shape layout without a host sync (so the whole thing can be
captured in a CUDA graph): the T*k (token, expert) pairs are sorted by expert (one launch,
routing.sort_by_expert) and each expert's run is padded to a multiple of BLOCK_M.
Program (m, n) of a launch reads the expert
id of row block m (-1 = past the end: return at once), so an expert no token picked costs no bytes
of weight traffic -- what makes batch-1 decode memory-bound on the touched experts only.

    gate_up: x[token] @ W_gu[e]^T + b  -> interleaved (gate = even col, up = odd col) -> swiglu
             -> inter[sorted row]            (fused, inter is [padded rows, I] bf16)
    down:    inter[sorted row] @ W_d[e]^T + b -> out_pairs[pair] * routing weight
    out[t] = sum over the k pairs of token t  (moe_experts; moe_expert_pairs leaves it to the next
             fused add + RMSNorm, kernels/norm.py)
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gptoss_engine import mxfp4
from gptoss_engine.kernels.e2m1 import (dequant_asm, dequant_words_bf16, dequant_words_codes, e2m1_x2e14, load_scales,
                                         scale_x2e14)
from gptoss_engine.kernels.moe_gemv import moe_experts_gemv
from gptoss_engine.kernels.moe_gemv_mma import (TOKEN_BLOCK, mma_gemv_takes, moe_experts_gemv_mma,
                                                 moe_experts_gemv_mma_tokens)
from gptoss_engine.kernels.moe_grouped_mm import moe_experts_grouped_mm
from gptoss_engine.kernels.routing import SORT_MAX_PAIRS, sort_by_expert
from gptoss_engine.moe import ExpertWeights, PairOutputs, summed

# Up to this many (token, expert) pairs the GEMV kernels (moe_gemv) run instead of the grouped GEMM:
# each pair then streams its expert's rows once, and the pairs are too few to share a tensor-core tile.
# At 32 pairs (20b batch 8) the grouped kernel won, 189 against 213 us (its dequant costs fewer
# instructions a weight; PERF_NOTES v11); at 16 the GEMV, 118 against 126.
GEMV_MAX_PAIRS = 16
# The same for the mma GEMV (moe_gemv_mma, sm_90 with bf16 x): one (token, expert) pair a program row.
# Beyond, up to TOKENS_GEMV_MAX_ROWS mean rows per expert, its token-grouped form (an expert's rows read
# once for up to 8 of its tokens), then the grouped kernel. Kernel times with routing, us a layer
# (PERF_NOTES v15; per-pair / token-grouped / grouped): 20b T=1 34.0 / 38.9 / 57.5, T=4 101 / 98 / 124,
# T=8 179 / 133 / 165, T=32 (4 rows an expert) – / 217 / 250, T=64 (8 rows) – / 282 / 254;
# 120b T=16 358 / 344 / 419, T=64 (2 rows) – / 710 / 848, T=128 (4 rows) – / 842 / 981.
GEMV_MMA_MAX_PAIRS = 16
TOKENS_GEMV_MAX_ROWS = 4


# From this many mean rows per expert (prefill) the experts are dequantized to bf16 once per layer and
# multiplied by torch's grouped GEMM (moe_grouped_mm) instead of the fused kernels. The same with bf16
# expert copies kept (no dequant pass): below it the bf16 grouped GEMM lost to the packed kernels too
# (1k tokens, 128 rows an expert: 47.2 against 33.4 ms a prefill, PERF_NOTES v9).
GROUPED_MM_MIN_ROWS = 256
# The grouped kernels' weights-left (SWAP) product on permuted words without re-pairing the dequant's
# bf16 pairs into k order (_word_pair_tiles: the activations take the permutation): 430 -> 374 SASS a
# gate_up trip; 20b batch 64 even (8.220 -> 8.197 ms a step), batch 256 14.336 -> 14.042 (H100,
# PERF_NOTES v21).
WORD_PAIRS = True


@dataclass(frozen=True)
class _Routing:
    sorted_pair: torch.Tensor   # [P] int32, pair index (t*k + j) per padded sorted row; num_pairs = padding
    block_expert: torch.Tensor  # [P // BLOCK_M] int32, expert of each row block; -1 = unused block
    block_m: int


def _route(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> _Routing:
    """Sort (token, expert) pairs by expert, pad each expert's run to block_m. Sync-free."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    # Upper bound on padded rows: at most min(E, n) experts are non-empty, each wastes < block_m rows.
    cap = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    if n <= SORT_MAX_PAIRS:
        return _Routing(*sort_by_expert(flat, num_experts, block_m, cap), block_m)
    return _Routing(*route_torch(flat, num_experts, block_m, cap), block_m)


def route_torch(flat: torch.Tensor, num_experts: int, block_m: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """routing.sort_by_expert's result with torch ops (~20 launches): for more pairs than it takes."""
    n = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_expert = flat[order]
    rank = torch.arange(n, device=dev) - start[sorted_expert]
    dest = padded_start[sorted_expert] + rank
    sorted_pair = torch.full((cap,), n, dtype=torch.int32, device=dev)
    sorted_pair.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, cap, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pair, block_expert


MODE_DOT_SCALED: tl.constexpr = tl.constexpr(0)   # tl.dot_scaled(bf16, e2m1): Triton upcasts the weights
MODE_FP32: tl.constexpr = tl.constexpr(1)         # hand dequant, fp32 dot: Triton's CPU interpreter
MODE_ASM: tl.constexpr = tl.constexpr(3)          # dequant by bit placement in inline PTX (sm_90), bf16 dot
MODE_ASM1: tl.constexpr = tl.constexpr(4)         # ... with one scale multiply: every scale <= 128 (e2m1.py)



@triton.jit
def _dequant_half(nib, sc, R: tl.constexpr, BK: tl.constexpr):
    """nib [R, BK//2] nibbles (one of a byte's two) with group scales sc [R, BK//32] from
    scale_x2e14 -> [R, BK//2] fp32 weights."""
    scb = tl.reshape(tl.broadcast_to(sc[:, :, None], (R, BK // 32, 16)), (R, BK // 2))
    return e2m1_x2e14(nib) * scb


@triton.jit
def _word_pair_tiles(words, s, at, N: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, ONE_MUL: tl.constexpr):
    """One trip's weights [N, BK] and activations [BK, BM] in one k order for the SWAP product, from
    permuted words [N, BK/8]. Read the stored words of a row as (t, i): word t BK/32 + i, i < BK/32.
    The word dequant gives bf16 pairs (k0,k2), (k4,k6), (k1,k3), (k5,k7); the MMA's register operand
    gives quad lane t the k pairs t and t + 4 of every 16-k block. So pair q = 2 j0 + j2 of word
    (t, i) is made the pair (slot j2, lane t) of block 2 i + j0: column c = 32 i + 16 j0 + 8 j2 + 2 t
    + h holds the word's code 4 j2 + 2 h + j0, and lane t's registers are its own words' pairs as the
    dequant left them (dequant_words_bf16 re-pairs them into k order: 4 PRMT a word, 15% of the
    gate_up loop). The activations, a few rows, take the permutation instead (the product is the
    same but for the order of the fp32 sums)."""
    k0, k1, k2, k3, k4, k5, k6, k7 = dequant_words_codes(words, s, N, BK // 8, ONE_MUL, True)
    # [N, words, j0, j2, h]: join stacks on a new last axis, so j0 is joined first.
    c = tl.join(tl.join(tl.join(k0, k1), tl.join(k4, k5)), tl.join(tl.join(k2, k3), tl.join(k6, k7)))
    w = tl.reshape(tl.permute(tl.reshape(c, (N, 4, BK // 32, 2, 2, 2)), (0, 2, 3, 4, 1, 5)), (N, BK))
    # k = 8 (t BK/32 + i) + 4 j2 + 2 h + j0, laid out as (i, j0, j2, t, h).
    at = tl.reshape(tl.permute(tl.reshape(at, (4, BK // 32, 2, 2, 2, BM)), (1, 4, 2, 0, 3, 5)), (BK, BM))
    return w, at


@triton.jit
def _expert_tile(a_rows, row_ok, wb, ws, cols, col_ok, s_bn, s_sn, K,
                 BM: tl.constexpr, N: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr, SWAP: tl.constexpr,
                 PAD_S: tl.constexpr, PERM: tl.constexpr, PAIRS: tl.constexpr):
    """[BM, N] fp32 = a [BM, K] @ one expert's packed MXFP4 weight columns `cols` (K-loop shared by
    the gate_up and down kernels). a_rows: [BM, 1] row pointers; wb/ws: the expert's blocks/scales.

    SWAP computes the transposed product W [N, K] @ a^T [K, BM] instead: the dequantized weights are
    then the left operand, which Hopper's wgmma may take straight from registers (the right operand
    must sit in shared memory), and a few token rows fill the MMA's narrow N side instead of padding
    its 64-row M side. Returned transposed back to [BM, N] either way.

    PERM: the blocks' words are in mxfp4.WORD_BITS order, which only the PTX modes read (the
    dispatcher checks); they are loaded as int32 words, since the byte form's asm packs whichever
    4 bytes a thread's registers hold next, not one word's (the layout puts rows r and r + 8 there).
    PAIRS (with SWAP and PERM): the weights stay in the dequant's register pairs and the activations
    take the k order that makes them the MMA's operand as they are (_word_pair_tiles).

    Every load of the loop must be one Triton can turn into an asynchronous copy (>= 4 aligned
    contiguous bytes), or each trip waits a full memory latency for it: PAD_S (scale rows padded to
    a 16-byte stride covering every trip, see mxfp4.pad_scales) drops the mask that made the
    scale loads byte-wise, and activations are loaded as contiguous rows (PERF_NOTES v6)."""
    if SWAP:
        acc = tl.zeros((N, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, N), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kb = k0 // 2 + tl.arange(0, BK // 2)
        kg = k0 // 32 + tl.arange(0, BK // 32)
        ks = k0 + tl.arange(0, BK)
        # Scales [N, BK/32]; the padding columns hold 127 (x1) and meet zero-masked weights.
        s = load_scales(ws, cols, col_ok, s_sn, kg, K, 127, PAD_S)
        if SWAP:
            at = tl.load(tl.trans(a_rows) + ks[:, None], mask=tl.trans(row_ok[:, None]) & (ks[:, None] < K),
                         other=0.0)                                             # [BK, BM]
        else:
            a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)  # [BM, BK]
        if MODE == MODE_DOT_SCALED:
            # dot_scaled takes bf16 activations only: fp32/fp16 inputs (an fp32 engine on CUDA)
            # are rounded to bf16 here, in registers, rather than failing to compile.
            if SWAP:
                b = tl.load(wb + cols[:, None].to(tl.int64) * s_bn + kb[None, :],
                            mask=col_ok[:, None] & (kb[None, :] < K // 2), other=0)
                acc = tl.dot_scaled(b, s, "e2m1", at.to(tl.bfloat16), None, "bf16", acc=acc)
            else:
                bt = tl.load(wb + cols[None, :].to(tl.int64) * s_bn + kb[:, None],
                             mask=col_ok[None, :] & (kb[:, None] < K // 2), other=0)
                acc = tl.dot_scaled(a.to(tl.bfloat16), None, "bf16", bt, s, "e2m1", acc=acc)
        else:
            # Hand dequant: the low nibble of byte c holds k = 2c, the high nibble k = 2c + 1
            # (mxfp4.py); joining the two halves puts each byte's pair side by side -- the
            # adjacent-k pairs the MMA operand wants -- so the weights meet contiguous activations.
            if PERM:
                # Permuted words (PTX modes only): read as int32 words, dequantized a whole word at a time.
                kw = k0 // 8 + tl.arange(0, BK // 8)
                words = tl.load(wb.to(tl.pointer_type(tl.int32)) + cols[:, None].to(tl.int64) * (s_bn // 4)
                                + kw[None, :], mask=col_ok[:, None] & (kw[None, :] < K // 8), other=0)
                if SWAP and PAIRS:
                    w, at = _word_pair_tiles(words, s, at, N, BK, BM, MODE == MODE_ASM1)
                else:
                    w = dequant_words_bf16(words, s, N, BK // 8, MODE == MODE_ASM1, True)
            else:
                b = tl.load(wb + cols[:, None].to(tl.int64) * s_bn + kb[None, :],
                            mask=col_ok[:, None] & (kb[None, :] < K // 2), other=0)
                if MODE == MODE_ASM or MODE == MODE_ASM1:
                    w_lo, w_hi = dequant_asm(b, s, N, BK // 2, MODE == MODE_ASM1)
                else:
                    sc = scale_x2e14(s)
                    w_lo = _dequant_half(b & 0xF, sc, N, BK)
                    w_hi = _dequant_half(b >> 4, sc, N, BK)
                w = tl.reshape(tl.join(w_lo, w_hi), (N, BK))
            if SWAP and PERM and PAIRS:
                acc = tl.dot(w, at.to(w.dtype), acc)        # both already in _word_pair_tiles' k order
            elif SWAP:
                # Permute k the same way in both operands (the product is unchanged): the MMA's
                # register operand gives quad lane t the byte pairs t, t+4 of every 16-k block, so
                # in stored order each thread's bytes lay 4 apart and were loaded one by one.
                # Reading the stored tile as (t, block, pair, nibble) makes them one contiguous run
                # per thread -- 16-byte shared loads instead of byte loads (-26% loop instructions,
                # PERF_NOTES v6); the activations, a few rows, take the permutation instead.
                w = tl.reshape(tl.permute(tl.reshape(w, (N, 4, BK // 16, 2, 2)), (0, 2, 3, 1, 4)), (N, BK))
                at = tl.reshape(tl.permute(tl.reshape(at, (4, BK // 16, 2, 2, BM)), (1, 2, 0, 3, 4)), (BK, BM))
                acc = tl.dot(w, at.to(w.dtype), acc)
            else:
                acc = tl.dot(a.to(w.dtype), tl.trans(w), acc)
    if SWAP:
        res = tl.trans(acc)
    else:
        res = acc
    return res


@triton.jit
def _gate_up_kernel(x_ptr, blk_ptr, scl_ptr, bias_ptr, inter_ptr, sorted_pair_ptr, block_expert_ptr,
                    num_pairs, H, I, limit, alpha,
                    s_xt, s_be, s_bn, s_se, s_sn, s_bias_e, s_it,
                    TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    MODE: tl.constexpr, SWAP: tl.constexpr, PAD_S: tl.constexpr, PERM: tl.constexpr,
                    PAIRS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_pair_ptr + rows)
    row_ok = pair < num_pairs
    token = pair // TOPK
    # 2*BN consecutive gate_up columns = BN interleaved (gate, up) pairs.
    cols = pid_n * 2 * BN + tl.arange(0, 2 * BN)
    col_ok = cols < 2 * I
    acc = _expert_tile(x_ptr + token[:, None].to(tl.int64) * s_xt, row_ok,
                       blk_ptr + expert.to(tl.int64) * s_be, scl_ptr + expert.to(tl.int64) * s_se,
                       cols, col_ok, s_bn, s_sn, H, BM, 2 * BN, BK, MODE, SWAP, PAD_S, PERM, PAIRS)
    acc += tl.load(bias_ptr + expert * s_bias_e + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    gate, up = tl.split(tl.reshape(acc, (BM, BN, 2)))
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    ocols = pid_n * BN + tl.arange(0, BN)
    tl.store(inter_ptr + rows[:, None].to(tl.int64) * s_it + ocols[None, :], act.to(inter_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (ocols[None, :] < I))


@triton.jit
def _down_kernel(inter_ptr, blk_ptr, scl_ptr, bias_ptr, weight_ptr, out_ptr, sorted_pair_ptr, block_expert_ptr,
                 num_pairs, H, I,
                 s_it, s_be, s_bn, s_se, s_sn, s_bias_e, s_ot,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr, SWAP: tl.constexpr,
                 PAD_S: tl.constexpr, PERM: tl.constexpr, PAIRS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_pair_ptr + rows)
    row_ok = pair < num_pairs
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < H
    acc = _expert_tile(inter_ptr + rows[:, None].to(tl.int64) * s_it, row_ok,
                       blk_ptr + expert.to(tl.int64) * s_be, scl_ptr + expert.to(tl.int64) * s_se,
                       cols, col_ok, s_bn, s_sn, I, BM, BN, BK, MODE, SWAP, PAD_S, PERM, PAIRS)
    acc += tl.load(bias_ptr + expert * s_bias_e + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    wt = tl.load(weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    tl.store(out_ptr + pair[:, None].to(tl.int64) * s_ot + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of the grouped MoE kernels."""
    bm: int             # token rows per program (each expert's run is padded to a multiple)
    bn: int             # output columns per program (gate_up: interleaved pairs, so 2*bn weight rows)
    bk: int             # input elements per K-loop trip
    warps: int
    stages: int
    mode: int = 0       # MODE_DOT_SCALED / MODE_FP32 / MODE_ASM / MODE_ASM1 (the kernel's constexprs)
    swap: bool = False  # weights as the left MMA operand (_expert_tile)
    # The down kernel's own tiles where they differ (its bm and mode are this one's: the two share the
    # routing and the dequant); None: these.
    down: Tiles | None = None


@functools.cache
def _is_sm90(device: torch.device) -> bool:
    """Hopper: the inline-PTX dequant (bf16x2 mul) and torch's grouped GEMM need sm_90."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _tiles(num_pairs: int, num_experts: int, sm90: bool) -> Tiles:
    """Default tiles from the mean rows per expert (CUDA-graph sweeps on the H100, PERF_NOTES v5/v6).
    On sm_90 every size below the grouped_mm threshold takes weights-left tiles with the PTX dequant:
    the dequant's integer work bounds these kernels, so a tile holds each expert's rows in as few
    row blocks as possible (every block dequantizes the weights again)."""
    rows_per_expert = num_pairs / num_experts
    if sm90:
        # The down kernel (K = I, N = H) takes twice the output rows a program: T=64 270 -> 255 us a
        # layer, T=256 463 -> 438, T=1024 1166 -> 1085 (each kernel's tiles swept with the other's
        # fixed; gate_up keeps 64, PERF_NOTES v14).
        down = Tiles(0, 128, 128, 4, 3, MODE_ASM, True)
        if rows_per_expert <= 16:
            return Tiles(16, 64, 128, 4, 3, MODE_ASM, True, down=down)
        if rows_per_expert <= 48:
            return Tiles(32, 64, 128, 4, 3, MODE_ASM, True, down=down)
        return Tiles(64, 64, 128, 4, 3, MODE_ASM, True, down=down)     # 128-row blocks lost (v6)
    if rows_per_expert <= 16:
        return Tiles(16, 64, 128, 4, 4)
    if rows_per_expert <= 64:
        return Tiles(64, 64, 128, 4, 3)
    if rows_per_expert <= 512:
        return Tiles(128, 64, 128, 4, 3)
    return Tiles(256, 64, 128, 8, 3)        # long prefill: compute-bound tiles


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w: ExpertWeights,
                swiglu_limit: float, alpha: float = 1.702, **options: object) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]); x [T, H] -> [T, H] (bf16,
    fp16 or fp32; on the tensor cores the activations enter as bf16). Options: moe_expert_pairs'."""
    return summed(moe_expert_pairs(x, topk_ids, topk_weights, w, swiglu_limit, alpha, **options))  # type: ignore[arg-type]


def moe_expert_pairs(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w: ExpertWeights,
                     swiglu_limit: float, alpha: float = 1.702, *, interpret: bool = False,
                     tiles: Tiles | None = None, gemv: bool | None = None,
                     grouped_mm: bool | None = None, gemv_asm: bool | None = None,
                     gemv_mma: bool | None = None, gemv_tokens: bool | None = None) -> torch.Tensor | PairOutputs:
    """moe_experts before its last step: the k weighted expert outputs of every token, as PairOutputs
    (each path's own form of them), for the next fused add + RMSNorm to sum; dense `w`: the sum.

    Packed `w` holds the checkpoint tensors (gate_up_blocks [E, 2I, H/32, 16] u8, gate_up_scales
    [E, 2I, H/32] u8, gate_up_bias [E, 2I]; down_* likewise with [E, H, I/32, ...]).
    interpret=True runs the fp32 hand-dequant mode (Triton's CPU interpreter has no dot_scaled and no
    bf16 dot). `tiles` overrides _tiles' choice (tests and the bench's sweeps use it).
    gemv: True/False forces the small-batch (per-pair) GEMV path on/off; None picks it for
    T*k <= GEMV_MAX_PAIRS (GEMV_MMA_MAX_PAIRS where the mma form runs).
    grouped_mm: likewise for the prefill path (moe_grouped_mm); None picks it on sm_90 from
    GROUPED_MM_MIN_ROWS mean rows per expert. gemv_asm: the GEMV's PTX dequant (default: on sm_90).
    gemv_mma: the GEMV on mma.sync (moe_gemv_mma; default: where the PTX dequant runs, x is bf16 and
    its rows are 8-byte aligned); False keeps the FMA GEMV.
    gemv_tokens: True forces the token-grouped mma GEMV (moe_gemv_mma), False keeps it off; None
    picks it where the mma form runs, no other path was asked for, and GEMV_MMA_MAX_PAIRS < T*k <=
    TOKENS_GEMV_MAX_ROWS * E.
    """
    if not w.packed:
        # Dense bf16 experts (a dequantized checkpoint) are not this kernel's format.
        from gptoss_engine.moe import moe_experts_reference
        return moe_experts_reference(x, topk_ids, topk_weights, w, swiglu_limit, alpha)
    gu_blk, gu_scl, gu_bias = w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias
    d_blk, d_scl, d_bias = w.down_blocks, w.down_scales, w.down_bias
    assert gu_blk is not None and gu_scl is not None and d_blk is not None and d_scl is not None  # packed
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    T, H = x.shape
    E, two_i = gu_blk.shape[0], gu_blk.shape[1]
    I = two_i // 2
    if gu_blk.shape[2] * 32 != H or d_blk.shape[1] != H or d_blk.shape[2] * 32 != I:
        raise ValueError(f"expert shapes {tuple(gu_blk.shape)} / {tuple(d_blk.shape)} do not match hidden {H}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must be [T, k]")
    k = topk_ids.shape[1]
    if T == 0:
        return PairOutputs(torch.empty_like(x), k, x.dtype)
    x = x.contiguous()
    num_pairs = T * k
    gu_blk = gu_blk.reshape(E, two_i, H // 2)
    d_blk = d_blk.reshape(E, H, I // 2)
    sm90 = _is_sm90(x.device)
    one_mul = w.one_mul
    asm = sm90 if gemv_asm is None else gemv_asm
    mma = gemv_mma if gemv_mma is not None else (asm and mma_gemv_takes(x))
    if gemv_tokens is None:
        gemv_tokens = (mma and gemv is None and tiles is None and grouped_mm is None
                       and GEMV_MMA_MAX_PAIRS < num_pairs <= TOKENS_GEMV_MAX_ROWS * E)
    if gemv_tokens:
        r = _route(topk_ids, E, TOKEN_BLOCK)
        return moe_experts_gemv_mma_tokens(x, topk_ids, topk_weights, r.sorted_pair, r.block_expert,
                                           gu_blk, gu_scl, gu_bias, d_blk, d_scl, d_bias, swiglu_limit, alpha,
                                           one_mul=one_mul, permuted=w.permuted)
    if gemv is None:
        gemv = tiles is None and num_pairs <= (GEMV_MMA_MAX_PAIRS if mma else GEMV_MAX_PAIRS)
    if gemv:
        if mma:
            return moe_experts_gemv_mma(x, topk_ids, topk_weights, gu_blk, gu_scl, gu_bias, d_blk, d_scl, d_bias,
                                        swiglu_limit, alpha, one_mul=one_mul, permuted=w.permuted)
        return moe_experts_gemv(x, topk_ids, topk_weights, gu_blk, gu_scl, gu_bias, d_blk, d_scl, d_bias,
                                swiglu_limit, alpha, asm=asm, one_mul=asm and one_mul, permuted=w.permuted)
    if (tiles is None and grouped_mm is not False and sm90 and not interpret
            and (grouped_mm or num_pairs >= GROUPED_MM_MIN_ROWS * E)):
        return moe_experts_grouped_mm(x, topk_ids, topk_weights, w, swiglu_limit, alpha)
    t = tiles or _tiles(num_pairs, E, sm90)
    if interpret:
        t = Tiles(t.bm, t.bn, t.bk, t.warps, t.stages, mode=1, swap=t.swap)
    elif t.mode == MODE_ASM and one_mul:
        t = dataclasses.replace(t, mode=int(MODE_ASM1))
    if w.permuted and t.mode not in (MODE_ASM, MODE_ASM1):
        raise ValueError("experts in the permuted word layout (ExpertWeights.permuted, sm_90) are read by the PTX "
                         f"dequant modes only, not mode {t.mode}")
    bm, bn, bk, warps, stages = t.bm, t.bn, t.bk, t.warps, t.stages
    td = t if t.down is None else dataclasses.replace(t.down, bm=bm, mode=t.mode)
    # Unmasked scale loads need every trip's groups inside the (padded) rows: ceil(K / bk) trips.
    pad_gu, pad_d = mxfp4.unmasked_scale_reads(gu_scl, bk), mxfp4.unmasked_scale_reads(d_scl, td.bk)
    r = _route(topk_ids, E, bm)
    cap = r.sorted_pair.numel()
    inter = torch.empty((cap, I), dtype=x.dtype, device=x.device)
    grid = (cap // bm, triton.cdiv(I, bn))
    _gate_up_kernel[grid](
        x, gu_blk, gu_scl, gu_bias, inter, r.sorted_pair, r.block_expert,
        num_pairs, H, I, float(swiglu_limit), float(alpha),
        x.stride(0), gu_blk.stride(0), gu_blk.stride(1), gu_scl.stride(0), gu_scl.stride(1), gu_bias.stride(0),
        inter.stride(0),
        TOPK=k, BM=bm, BN=bn, BK=bk, MODE=t.mode, SWAP=t.swap, PAD_S=pad_gu, PERM=w.permuted, PAIRS=WORD_PAIRS,
        num_warps=warps, num_stages=stages)
    pair_out = torch.empty((num_pairs, H), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    grid = (cap // bm, triton.cdiv(H, td.bn))
    _down_kernel[grid](
        inter, d_blk, d_scl, d_bias, weights, pair_out, r.sorted_pair, r.block_expert,
        num_pairs, H, I,
        inter.stride(0), d_blk.stride(0), d_blk.stride(1), d_scl.stride(0), d_scl.stride(1), d_bias.stride(0),
        pair_out.stride(0),
        BM=bm, BN=td.bn, BK=td.bk, MODE=td.mode, SWAP=td.swap, PAD_S=pad_d, PERM=w.permuted, PAIRS=WORD_PAIRS,
        num_warps=td.warps, num_stages=td.stages)
    return PairOutputs(pair_out, k, x.dtype)
