"""Routing kernels: router top-k + softmax, and the expert-sorted layout the grouped MoE kernel reads.

route: at decode sizes the router GEMM (x @ W^T + b) is a Triton GEMV spread over many programs, and
the last of a token's programs to finish takes its top-k (one launch).

add_rmsnorm_route: the post-attention residual add + RMSNorm (norm.add_rmsnorm) and route on its
output in one launch: each router program recomputes its token's add + norm (a row of L2-resident
reads) rather than waiting for a launch of its own.

topk_softmax: logits [T, E] -> (topk_ids [T, k] int64, weights [T, k] fp32) in one launch, replacing
torch.topk + softmax (two launches and a sort per layer at decode). One program per token holds its
E logits in registers and takes the k largest by repeated max (ties -> lowest expert id, as
torch.topk on CUDA gives for distinct values; equal logits are vanishingly rare), in descending
order, then the softmax over those k.

sort_by_expert: the T*k (token, expert) pairs sorted by expert (stable), each expert's run padded to
a multiple of the row block, in one launch; the torch formulation (histogram, cumsums, a radix
argsort, scatters, searchsorted) was ~20 launches per layer, 1.4 ms of an 11 ms batch-64 step
(profile, PERF_NOTES v6).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_engine.kernels import arrival
from gptoss_engine.kernels.norm import add_rmsnorm, normed


@triton.jit
def _topk_softmax_row(logits, e, t, ids_ptr, wts_ptr, TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Token t's fp32 logits [BLOCK_E] (-inf past E) -> its k largest (descending, ties to the lowest
    id) and their softmax, stored as row t of ids / wts."""
    BLOCK_E: tl.constexpr = logits.shape[0]
    slot = tl.arange(0, BLOCK_K)
    vals = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for j in tl.static_range(TOPK):
        m = tl.max(logits, 0)
        idx = tl.min(tl.where(logits == m, e, BLOCK_E), 0)
        vals = tl.where(slot == j, m, vals)
        ids = tl.where(slot == j, idx.to(tl.int64), ids)
        logits = tl.where(e == idx, float("-inf"), logits)
    p = tl.exp(vals - tl.max(vals, 0))
    p = p / tl.sum(p, 0)
    ok = slot < TOPK
    tl.store(ids_ptr + t * TOPK + slot, ids, mask=ok)
    tl.store(wts_ptr + t * TOPK + slot, p, mask=ok)


@triton.jit
def _topk_softmax_kernel(logits_ptr, ids_ptr, wts_ptr, E, s_lt, TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + t.to(tl.int64) * s_lt + e, mask=e < E, other=float("-inf")).to(tl.float32)
    _topk_softmax_row(logits, e, t, ids_ptr, wts_ptr, TOPK, BLOCK_K)


@triton.jit
def _logits_topk(acc, bias, t, e, e_ok, x_ptr, logits_ptr, count_ptr, ids_ptr, wts_ptr, E, s_lt,
                 TOPK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """A program's EB router sums acc (fp32) of token t -> + bias (b[e], fp32; loaded by the caller
    before its reductions), rounded to x's dtype (as F.linear's output is) and stored as fp32 logits;
    the last of t's programs to finish takes the top-k and softmax of all E (_topk_softmax_row)."""
    tl.store(logits_ptr + t * s_lt + e, (acc + bias).to(x_ptr.dtype.element_ty).to(tl.float32), mask=e_ok)
    # Arrival count of t's programs (zero between launches: the last one resets it). The barrier puts
    # every thread's logit stores before the one-thread release of the count; the last program's
    # loads come after its acquire and skip L1 (other SMs wrote those logits).
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + t, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        ee = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + t * s_lt + ee, mask=ee < E, other=float("-inf"), cache_modifier=".cg")
        _topk_softmax_row(logits, ee, t, ids_ptr, wts_ptr, TOPK, BLOCK_K)
        tl.atomic_xchg(count_ptr + t, 0)


@triton.jit
def _router_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, count_ptr, ids_ptr, wts_ptr, E, H, s_xt, s_we, s_lt,
                   EB: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Program (token t, expert block): EB router logits of t, x[t] @ W[e]^T + b[e] with an fp32
    sum, then _logits_topk: one launch, not two."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * EB + tl.arange(0, EB)
    e_ok = e < E
    bias = tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((EB,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        xv = tl.load(x_ptr + t * s_xt + hh, mask=h_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e[:, None] * s_we + hh[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0)
        acc += tl.sum(wv.to(tl.float32) * xv[None, :], 1)
    _logits_topk(acc, bias, t, e, e_ok, x_ptr, logits_ptr, count_ptr, ids_ptr, wts_ptr, E, s_lt, TOPK, BLOCK_E,
                 BLOCK_K)


@triton.jit
def _add_norm_router_kernel(x_ptr, d_ptr, nw_ptr, sum_ptr, h_ptr, w_ptr, b_ptr, logits_ptr, count_ptr, ids_ptr,
                            wts_ptr, E, H, eps, s_x, s_d, s_s, s_h, s_we, s_lt,
                            EB: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """_router_kernel on the post-attention residual add + RMSNorm it computes itself: each of token
    t's programs forms s = x[t] + d[t] and h = rmsnorm(s) (norm.add_rmsnorm's arithmetic, the same
    bits) from L2-resident rows, and the expert block 0's program stores them for the MoE and the
    next residual add. One launch where add_rmsnorm + route were two."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    # The router rows first: they come from DRAM (the step's weight stream has evicted them from L2),
    # and nothing they need waits on the norm, so their latency hides under it.
    e = tl.program_id(1) * EB + tl.arange(0, EB)
    e_ok = e < E
    wv = tl.load(w_ptr + e[:, None] * s_we + cols[None, :], mask=e_ok[:, None] & ok[None, :], other=0.0)
    bias = tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + t * s_x + cols, mask=ok, other=0.0)
    d = tl.load(d_ptr + t * s_d + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x.to(tl.float32) + d).to(sum_ptr.dtype.element_ty)
    h = normed(s, nw_ptr, cols, ok, H, eps).to(h_ptr.dtype.element_ty)
    if tl.program_id(1) == 0:
        tl.store(sum_ptr + t * s_s + cols, s, mask=ok)
        tl.store(h_ptr + t * s_h + cols, h, mask=ok)
    acc = tl.zeros((EB,), dtype=tl.float32) + tl.sum(wv.to(tl.float32) * h.to(tl.float32)[None, :], 1)
    _logits_topk(acc, bias, t, e, e_ok, h_ptr, logits_ptr, count_ptr, ids_ptr, wts_ptr, E, s_lt, TOPK, BLOCK_E,
                 BLOCK_K)


# Up to this many tokens the router is one launch (_router_kernel) spread over (token, block of
# ROUTER_EB experts) programs, the last of a token's programs taking its top-k. cuBLAS's split-K GEMV,
# its reduce and the top-k were three (~8 us a layer at 20b decode, PERF_NOTES v6); one program per
# token reading the whole router weight was one launch, but it waited on its loads in sequence: 9.0
# us a layer at batch 1 and 8.9 at batch 64 (PERF_NOTES v10); the GEMV then topk_softmax were two
# (4.7 + 1.5 us at batch 1). Beyond: cuBLAS (prefill-sized GEMMs), then topk_softmax.
ROUTER_GEMV_MAX_TOKENS = 256
ROUTER_EB = 4

# The router's arrival counters (kernels/arrival.py): one per token.
_COUNTERS = "routing"


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (topk_ids [T, k] int64, weights [T, k] fp32): softmax over the k largest of
    x @ weight^T + bias (weight [E, H]); the same result as F.linear + topk_softmax."""
    T, H = x.shape
    E = weight.shape[0]
    if T > ROUTER_GEMV_MAX_TOKENS or weight.shape[1] != H or weight.stride(1) != 1 or x.stride(1) != 1:
        return topk_softmax(torch.nn.functional.linear(x, weight, bias), top_k)
    if not 1 <= top_k <= E:
        raise ValueError(f"route(): top_k must be in [1, {E}], got {top_k}")
    logits = torch.empty((T, E), dtype=torch.float32, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=x.device)
    wts = torch.empty((T, top_k), dtype=torch.float32, device=x.device)
    if T:
        count = arrival.counters(_COUNTERS, x.device, ROUTER_GEMV_MAX_TOKENS)
        _router_kernel[(T, triton.cdiv(E, ROUTER_EB))](
            x, weight, bias, logits, count, ids, wts, E, H, x.stride(0), weight.stride(0),
            logits.stride(0), EB=ROUTER_EB, BLOCK_H=min(triton.next_power_of_2(H), 4096), TOPK=top_k,
            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k), num_warps=8)
    return ids, wts


# The fused add + norm + router holds a whole row in one program's registers.
_FUSED_MAX_HIDDEN = 4096


def add_rmsnorm_route(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor,
                      top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + delta, h = rmsnorm(x + delta) * norm_weight, topk_ids, topk_weights of route(h, weight,
    bias, top_k)): norm.add_rmsnorm then route, the same bits, in one launch up to
    ROUTER_GEMV_MAX_TOKENS tokens (x, delta [T, H] in one dtype); two launches beyond."""
    T, H = x.shape
    E = weight.shape[0]
    if (T > ROUTER_GEMV_MAX_TOKENS or H > _FUSED_MAX_HIDDEN or tuple(delta.shape) != (T, H)
            or delta.dtype != x.dtype or norm_weight.shape != (H,) or weight.shape[1] != H or weight.stride(1) != 1):
        total, h = add_rmsnorm(x, delta, norm_weight, eps)
        return (total, h, *route(h, weight, bias, top_k))
    if not 1 <= top_k <= E:
        raise ValueError(f"route(): top_k must be in [1, {E}], got {top_k}")
    x, delta = x.contiguous(), delta.contiguous()
    total, h = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty((T, E), dtype=torch.float32, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=x.device)
    wts = torch.empty((T, top_k), dtype=torch.float32, device=x.device)
    if T:
        count = arrival.counters(_COUNTERS, x.device, ROUTER_GEMV_MAX_TOKENS)
        _add_norm_router_kernel[(T, triton.cdiv(E, ROUTER_EB))](
            x, delta, norm_weight, total, h, weight, bias, logits, count, ids, wts, E, H,
            float(eps), x.stride(0), delta.stride(0), total.stride(0), h.stride(0), weight.stride(0),
            logits.stride(0), EB=ROUTER_EB, BLOCK_H=triton.next_power_of_2(H), TOPK=top_k,
            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k), num_warps=8)
    return total, h, ids, wts


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as (torch.topk(logits, k).indices, softmax(values)) for logits [T, E]."""
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"logits must be [T, E] with 1 <= top_k <= E; got {tuple(logits.shape)}, k={top_k}")
    T, E = logits.shape
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    wts = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, wts
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    _topk_softmax_kernel[(T,)](logits, ids, wts, E, logits.stride(0), TOPK=top_k,
                               BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k),
                               num_warps=1)
    return ids, wts


# Pairs per loop trip of the one program (its one-hot [chunk, experts] tile stays ~4K elements), and
# the most pairs it takes: beyond (prefill-sized batches) the sequential trips would cost more than
# torch's parallel sort, and the GEMMs dwarf either.
_SORT_TILE = 4096
SORT_MAX_PAIRS = 4096


@triton.jit
def _sort_by_expert_kernel(ids_ptr, sorted_ptr, block_expert_ptr, n, cap, E,
                           BM: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_NB: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    # Rows per expert, padded to whole BM blocks, and where each expert's run starts.
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        ex = tl.load(ids_ptr + i, mask=i < n, other=-1).to(tl.int32)
        counts += tl.sum((ex[:, None] == e[None, :]).to(tl.int32), 0)
    padded = (counts + BM - 1) // BM * BM
    pend = tl.cumsum(padded, 0)
    pstart = pend - padded
    # Padding rows hold n (kernels read them as "no pair"); then every pair goes to its row.
    for r0 in range(0, cap, CHUNK):
        r = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + r, tl.full((CHUNK,), n, dtype=tl.int32), mask=r < cap)
    tl.debug_barrier()      # the scatter below overwrites rows other threads filled
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        ex = tl.load(ids_ptr + i, mask=i < n, other=-1).to(tl.int32)
        onehot = (ex[:, None] == e[None, :]).to(tl.int32)
        # Stable: a pair's rank is the number of earlier pairs with its expert.
        rank = tl.sum((tl.cumsum(onehot, 0) - 1 + seen[None, :]) * onehot, 1)
        row = tl.sum(pstart[None, :] * onehot, 1) + rank
        tl.store(sorted_ptr + row, i, mask=i < n)
        seen += tl.sum(onehot, 0)
    # Expert of each row block: how many experts' padded runs end at or before its first row.
    real = (e < E).to(tl.int32)
    for b0 in range(0, cap // BM, BLOCK_NB):
        b = b0 + tl.arange(0, BLOCK_NB)
        idx = tl.sum((pend[None, :] <= (b * BM)[:, None]).to(tl.int32) * real[None, :], 1)
        tl.store(block_expert_ptr + b, tl.where(idx < E, idx, -1), mask=b < cap // BM)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                   cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (t*k + j, expert topk_ids[t, j]) sorted by expert, stable, each expert's run padded to a
    multiple of block_m: (sorted_pair [cap] int32, padding rows = T*k; block_expert [cap // block_m]
    int32, -1 past the last run). `cap` (a multiple of block_m) bounds the padded rows; at most
    SORT_MAX_PAIRS pairs. Sync-free and static-shaped, so CUDA graphs can capture it."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    if n > SORT_MAX_PAIRS or cap % block_m:
        raise ValueError(f"sort_by_expert: {n} pairs (max {SORT_MAX_PAIRS}), cap {cap} for block {block_m}")
    sorted_pair = torch.empty(cap, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(cap // block_m, dtype=torch.int32, device=flat.device)
    block_e = triton.next_power_of_2(num_experts)
    _sort_by_expert_kernel[(1,)](flat.contiguous(), sorted_pair, block_expert, n, cap, num_experts,
                                 BM=block_m, BLOCK_E=block_e, CHUNK=max(16, _SORT_TILE // block_e),
                                 BLOCK_NB=max(16, _SORT_TILE // block_e), num_warps=8)
    return sorted_pair, block_expert


# Prefill-sized sorts (moe_grouped_mm): a counting sort over many programs, three launches in all
# (counts per chunk, offsets, scatter) where torch's stable argsort and the bookkeeping around it
# were ~16 launches a layer. Each program's one-hot [chunk, experts] tile stays ~8K elements.
_PAIR_SORT_TILE = 8192


@triton.jit
def _chunk_counts_kernel(ids_ptr, counts_ptr, n, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    ex = tl.load(ids_ptr + i, mask=i < n, other=-1).to(tl.int32)
    e = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + c * BLOCK_E + e, tl.sum((ex[:, None] == e[None, :]).to(tl.int32), 0))


@triton.jit
def _chunk_offsets_kernel(counts_ptr, base_ptr, ends_ptr, P, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program: base[c, e] = where chunk c's pairs of expert e start in the sorted order (all of
    expert e's earlier chunks, after every lower expert); ends[e] = end of expert e's run."""
    e = tl.arange(0, BLOCK_E)
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        total += tl.sum(tl.load(counts_ptr + p[:, None] * BLOCK_E + e[None, :], mask=(p < P)[:, None], other=0), 0)
    ends = tl.cumsum(total, 0)
    running = ends - total
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        cnt = tl.load(counts_ptr + p[:, None] * BLOCK_E + e[None, :], mask=(p < P)[:, None], other=0)
        tl.store(base_ptr + p[:, None] * BLOCK_E + e[None, :], running[None, :] + tl.cumsum(cnt, 0) - cnt,
                 mask=(p < P)[:, None])
        running += tl.sum(cnt, 0)
    tl.store(ends_ptr + e, ends, mask=e < E)


@triton.jit
def _chunk_scatter_kernel(ids_ptr, base_ptr, token_ptr, row_of_pair_ptr, expert_ptr, n, top_k,
                          CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    ok = i < n
    ex = tl.load(ids_ptr + i, mask=ok, other=-1).to(tl.int32)
    onehot = (ex[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)
    # Stable: a pair's rank is the number of earlier pairs of its chunk with its expert.
    rank = tl.sum((tl.cumsum(onehot, 0) - onehot) * onehot, 1)
    row = tl.load(base_ptr + c * BLOCK_E + ex, mask=ok, other=0) + rank
    tl.store(token_ptr + row, (i // top_k).to(tl.int64), mask=ok)
    tl.store(row_of_pair_ptr + i, row.to(tl.int64), mask=ok)
    tl.store(expert_ptr + row, ex, mask=ok)


def sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """topk_ids [T, k] -> the T*k pairs (t*k + j, expert topk_ids[t, j]) sorted by expert, stable, unpadded
    (moe_grouped_mm's layout): (token [n] int64: the token of each sorted row, row_of_pair [n]
    int64: the sorted row of each pair, expert [n] int32: the expert of each sorted row, ends [E]
    int32: where each expert's rows end). The order of torch.argsort(pairs, stable=True), in three
    launches, no host sync. Every id must be in [0, num_experts)."""
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).contiguous()
    n = flat.numel()
    device = flat.device
    block_e = triton.next_power_of_2(num_experts)
    chunk = max(16, _PAIR_SORT_TILE // block_e)
    P = max(1, triton.cdiv(n, chunk))
    counts = torch.empty((P, block_e), dtype=torch.int32, device=device)
    base = torch.empty((P, block_e), dtype=torch.int32, device=device)
    token = torch.empty(n, dtype=torch.int64, device=device)
    row_of_pair = torch.empty(n, dtype=torch.int64, device=device)
    expert = torch.empty(n, dtype=torch.int32, device=device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    _chunk_counts_kernel[(P,)](flat, counts, n, CHUNK=chunk, BLOCK_E=block_e, num_warps=4)
    _chunk_offsets_kernel[(1,)](counts, base, ends, P, num_experts, BLOCK_P=max(16, _PAIR_SORT_TILE // block_e),
                                BLOCK_E=block_e, num_warps=4)
    _chunk_scatter_kernel[(P,)](flat, base, token, row_of_pair, expert, n, top_k, CHUNK=chunk, BLOCK_E=block_e,
                                num_warps=4)
    return token, row_of_pair, expert, ends
