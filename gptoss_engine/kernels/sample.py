"""One launch that draws a token for each sampled row, reading its logits once.

The torch form (sampling._draw) runs softmax, an [R, V] exponential-noise tensor, the division and the
argmax as separate passes over the rows' 201k logits: at batch 256 on the H100 1.46 ms a step
against 0.25 for greedy (bench/results/sampler.md). Here one program per draw streams its row once:
the Gumbel-max form argmax(x / T + G), G = -log(-log U) with U uniform, draws from softmax(x / T),
and U comes from Philox (tl.randint4x: one call, four tokens' words) keyed by the draw's 64-bit seed
and the token's position, so no noise tensor is written or read. A row draws only among logits >= its
threshold (top-k / top-p, computed beforehand by sampling._thresholds in raw-logit space; -inf keeps
every token).

The seed fixes the draw: sampling gives a seeded request's token i the seed step_seed(seed, i), so
that token depends on nothing else in the batch and is the same in a prefill and a decode process.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _gumbel_quarter(base, v0, j, r, inv_t, thr, best, best_i, V, Q: tl.constexpr):
    """Fold tokens v0 + c*Q + j (one quarter c of a trip, its Philox lane r) into the running
    per-lane maxima (best, best_i)."""
    offs = v0 + j
    ok = offs < V
    x = tl.load(base + offs, mask=ok, other=float("-inf")).to(tl.float32)
    u = tl.random.uint_to_uniform_float(r)          # [0, 1): G is finite or -inf, never +inf
    score = tl.where(ok & (x >= thr), x * inv_t - tl.log(-tl.log(u)), float("-inf"))
    take = score > best
    return tl.where(take, score, best), tl.where(take, offs, best_i)


@triton.jit
def _gumbel_argmax_kernel(x_ptr, s_x, row_ptr, temp_ptr, thr_ptr, seed_ptr, out_ptr, V,
                          HAS_THR: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    row = tl.load(row_ptr + n)
    inv_t = 1.0 / tl.load(temp_ptr + n).to(tl.float32)
    seed = tl.load(seed_ptr + n)
    if HAS_THR:
        thr = tl.load(thr_ptr + n).to(tl.float32)
    else:
        thr = float("-inf")
    base = x_ptr + row * s_x
    Q: tl.constexpr = BLOCK // 4
    j = tl.arange(0, Q)
    best = tl.full([Q], float("-inf"), tl.float32)
    best_i = tl.zeros([Q], tl.int32)
    for v0 in range(0, V, BLOCK):
        # One Philox call gives four words: Philox counter v0 / 4 + j serves tokens v0 + c*Q + j,
        # c = 0..3 (the counter's ALU work, which bounds this kernel, shared by four tokens).
        r0, r1, r2, r3 = tl.randint4x(seed, v0 // 4 + j)
        best, best_i = _gumbel_quarter(base, v0, j, r0, inv_t, thr, best, best_i, V, Q)
        best, best_i = _gumbel_quarter(base, v0 + Q, j, r1, inv_t, thr, best, best_i, V, Q)
        best, best_i = _gumbel_quarter(base, v0 + 2 * Q, j, r2, inv_t, thr, best, best_i, V, Q)
        best, best_i = _gumbel_quarter(base, v0 + 3 * Q, j, r3, inv_t, thr, best, best_i, V, Q)
    top = tl.max(best, 0)
    # The lowest index among equal maxima (any would do; this one is deterministic).
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_i, V), 0).to(tl.int64))


def gumbel_draw(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None,
                seeds: torch.Tensor, out: torch.Tensor) -> None:
    """For each draw n: out[rows[n]] = a token drawn from softmax(logits[rows[n]] / temperature[n])
    restricted to logits >= threshold[n] (None: no restriction), with Philox noise keyed by seeds[n].
    logits [B, V] (any float dtype, last dimension contiguous); rows, seeds int64 [R]; temperature
    (> 0), threshold float32 [R]; out int64 [B], written at the drawn rows only."""
    R = rows.shape[0]
    if logits.dim() != 2 or logits.stride(1) != 1 or not (temperature.shape == seeds.shape == (R,)):
        raise ValueError(f"gumbel_draw: logits {tuple(logits.shape)}, rows {tuple(rows.shape)}, "
                         f"temperature {tuple(temperature.shape)}, seeds {tuple(seeds.shape)}")
    if R == 0:
        return
    thr = threshold if threshold is not None else temperature
    _gumbel_argmax_kernel[(R,)](logits, logits.stride(0), rows, temperature, thr, seeds, out, logits.shape[1],
                                HAS_THR=threshold is not None, BLOCK=_BLOCK, num_warps=8)
