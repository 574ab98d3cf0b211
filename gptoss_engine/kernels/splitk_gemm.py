"""Dense bf16 y = x @ W^T (+ b) for decode steps of 3-64 tokens, split over K so every SM streams weights.

At batch 8 and 64 the attention projections went to cuBLAS, whose heuristics pick GEMV-shaped tiles
of 64 output columns: q|k|v (5120 x 2880) ran as 80 CTAs and o (2880 x 4096) as 72 on the H100's 132
SMs (grids read from the profiler, PERF_NOTES v23). Here a program owns a BLOCK_N x (K / SPLITS) slab
of W and all of the step's tokens (one BLOCK_M tile: at these sizes x is a few hundred KB that stays
in L2), and the grid is (N / BLOCK_N) x SPLITS programs, enough to cover every SM more than once.

The K split needs a sum across programs. It is a fixed-order one, so the result does not depend on
which program finishes last: each program stores its fp32 partial to a workspace, then counts its
arrival on the tile's counter; the last to arrive sums the SPLITS partials in split order, adds the
bias, rounds once to bf16 and resets the counter to zero for the next launch (the arrival-count
scheme of routing._logits_topk; the counters: kernels/arrival.py).

Where it is used (`wins`) is what bench/splitk_bench.py measured on the H100 (weights cold, PERF_NOTES
v24): lm_head at 3-64 tokens (4 tokens 463 -> 379 us, 8: 395 -> 382, 64: 410 -> 403; 3.06-2.87 TB/s)
and o at 3-32 (8 tokens 14.6 -> 12.4 us, 16: 14.9 -> 13.4, 32: 15.3 -> 14.5). cuBLAS stays faster
for o at 64 tokens (11.7 against 13.9) and for q|k|v at every size (13.5-13.8 against 15.2-17.5).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gptoss_engine.kernels import arrival

MIN_TOKENS = 3        # 1-2 tokens: kernels/gemv's GEMV
MAX_TOKENS = 64       # one BLOCK_M tile of tokens; beyond, cuBLAS's own tiles fill the GPU
ENABLED = True        # False: cuBLAS at every size (the bench's A/B)
WIDE_N = 65536        # lm_head-sized outputs: split-K's tiles (one split) beat cuBLAS at 3-64 tokens
NARROW_MAX_TOKENS = 32   # outputs narrower than K (o: 4096 -> 2880): split-K wins up to here
_MAX_TILES = 4096     # output tiles with a counter each (N / BLOCK_N at the smallest BLOCK_N)
_COUNTERS = "splitk_gemm"   # its arrival counters (kernels/arrival.py): one per output tile
# (BLOCK_N, BLOCK_K, SPLITS or 0 for "enough to cover the SMs twice", warps, stages): sweeps override.
CONFIG_OVERRIDE: tuple[int, int, int, int, int] | None = None


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, k_per_split, s_xm, s_wn, s_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * s_xm + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * s_wn + (k_lo + rk)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k + rk) < k_hi
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=ok)
    else:
        # Partial [split, m, n] of this tile; the workspace is [SPLITS, BLOCK_M, N] fp32.
        part = ws_ptr + (split * BLOCK_M + rm[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(part, acc, mask=n_ok[None, :])
        # The barrier puts every thread's partial stores before the one-thread release of the count;
        # the last program's loads come after its acquire and skip L1 (other SMs wrote those partials).
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLITS - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                total += tl.load(ws_ptr + (s * BLOCK_M + rm[:, None]).to(tl.int64) * N + rn[None, :],
                                 mask=n_ok[None, :], other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out, total.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(count_ptr + tile, 0)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, asked once (takes/wins run on every eager projection)."""
    return torch.cuda.get_device_capability(device)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLITS, warps, stages) for an [M, K] x [N, K]^T product: tiles of 64 output
    columns (x's re-reads from L2 stay at the weight's own bytes at 64 tokens), K trips of 128 in 4
    stages, and the fewest splits that give at least two programs an SM. Past 32 tokens (a 64-row x
    tile) trips of 64 in 3 stages, 48 KB of shared memory a program instead of 128: lm_head at 64
    tokens 419.6 -> 403.0 us (splitk_bench, H100)."""
    block_n, block_k, splits, warps, stages = CONFIG_OVERRIDE or ((64, 128, 0, 4, 4) if M <= 32 else (64, 64, 0, 4, 3))
    if splits == 0:
        tiles = triton.cdiv(N, block_n)
        splits = max(1, min(triton.cdiv(2 * _sm_count(device), tiles), triton.cdiv(K, block_k)))
    return block_n, block_k, splits, warps, stages


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether splitk_linear takes these operands (the caller's test; cuBLAS otherwise)."""
    return (ENABLED and x.is_cuda and x.dim() == 2 and MIN_TOKENS <= x.shape[0] <= MAX_TOKENS
            and x.dtype == w.dtype == torch.bfloat16 and x.stride(1) == 1 and w.stride(1) == 1
            and _capability(x.device) >= (8, 0))


def wins(x: torch.Tensor, w: torch.Tensor) -> bool:
    """takes(x, w), on the GPU generation it was measured on (sm_90: cuBLAS's choices differ on
    others), for a shape where it measured faster than cuBLAS (the docstring): lm_head, or an output
    narrower than its input (o) at up to NARROW_MAX_TOKENS tokens."""
    N, K = w.shape
    return (takes(x, w) and _capability(x.device)[0] == 9
            and (N >= WIDE_N or (N < K and x.shape[0] <= NARROW_MAX_TOKENS)))


def splitk_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, w, b) for x [M, K] (M <= MAX_TOKENS), w [N, K], b [N] or None: [M, N] in x's dtype,
    or F.linear(x, w, b).to(out_dtype) (rounded to x's dtype once, then stored widened) in the same launch."""
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or M > MAX_TOKENS or (b is not None and b.shape != (N,)):
        raise ValueError(f"splitk_linear: x {tuple(x.shape)}, w {tuple(w.shape)}, "
                         f"b {None if b is None else tuple(b.shape)} (at most {MAX_TOKENS} rows)")
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return y
    block_n, block_k, splits, warps, stages = config(M, N, K, x.device)
    tiles = triton.cdiv(N, block_n)
    if tiles > _MAX_TILES:
        splits = 1
    block_m = max(16, triton.next_power_of_2(M))
    k_per_split = triton.cdiv(triton.cdiv(K, block_k), splits) * block_k
    splits = triton.cdiv(K, k_per_split)   # no empty split: each one arrives with a partial
    # The partials' workspace is this call's: torch's allocator is stream-ordered, so whatever reuses
    # the memory after we return runs after this launch (in a captured graph it is the graph's pool).
    ws = torch.empty((splits, block_m, N) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    counters = arrival.counters(_COUNTERS, x.device, _MAX_TILES) if splits > 1 else ws
    _splitk_kernel[(tiles, splits)](
        x, w, b if b is not None else y, y, ws, counters, M, N, K, k_per_split, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=splits, HAS_BIAS=b is not None,
        num_warps=warps, num_stages=stages)
    return y
