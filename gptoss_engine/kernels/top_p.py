"""Top-p (nucleus) thresholds without sorting the vocabulary.

sampling._thresholds needs, for each row that cuts, the raw logit of the last token the nucleus
keeps: ranked by logit, a token stays while the tokens above it hold less than p of the probability
mass. The torch form sorts the row's 201k logits for that (~5 ms a step at batch 256 on the H100,
PERF_NOTES v17). Here the threshold is found by a radix select over the logits' order-preserving
32-bit keys, weighted by probability: 8 levels of 4-bit digits, most significant first. At each
level a row's 16 digit buckets hold the probability mass of its tokens that match the digits chosen
so far; the chosen digit is the largest whose bucket, with everything above it, reaches p of the
mass. After 8 levels the digits spell the key of the last kept token.

    G(v) = mass of the tokens with logit >= v;   threshold = max{ v a logit : G(v) >= p * W }

which is the sort's answer: sorted descending, the first rank whose inclusive cumulative mass reaches
p * W is the last one whose exclusive mass is below it. Tokens tied with it stay, as there.

Each level is one launch over (row, split of the vocabulary) programs that write their 16 bucket
sums; every program of the next level first replays the choices of all earlier levels from those
sums (a few KB), so no program waits for another. Level 0 also finds each split's maximum (the
softmax's shift) with an online rescale. 8 launches and a final one that decodes the key; each reads
the row once.

sampling._thresholds calls it on CUDA while sampling.TOP_P_RADIX_SELECT is on (the default since it
passed tests/gpu/test_top_p.py on the H100 and beat the sort at batch 1 to 256, PERF_NOTES v20).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)   # exp(x) = exp2(x * log2(e))
_BLOCK = 512
_LEVELS: tl.constexpr = tl.constexpr(8)                   # 4-bit digits of a 32-bit key
_SPLITS = 64        # programs a row a level: 201k logits in 64 splits of ~3.1k


@triton.jit
def _key(x):
    """fp32 -> uint32 whose unsigned order is x's order (negative values flipped, sign bit set on
    the others)."""
    u = x.to(tl.uint32, bitcast=True)
    return u ^ tl.where((u >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)


@triton.jit
def _pick(prefix, above, p_mass, hist_ptr, scale, LEVEL: tl.constexpr):
    """The digit of level LEVEL from its [S, 16] bucket sums (scaled by `scale` [S, 1]): the largest
    nonempty bucket whose mass with the mass above it reaches p_mass; if rounding leaves none, the
    smallest nonempty one. -> (prefix with that digit, mass above the new prefix)."""
    S: tl.constexpr = scale.shape[0]
    bins = tl.arange(0, 16)
    h = tl.sum(tl.load(hist_ptr + tl.arange(0, S)[:, None] * 16 + bins[None, :]) * scale, axis=0)
    suffix = tl.sum(h, axis=0) - (tl.cumsum(h, axis=0) - h)       # mass in buckets >= d
    ok = (above + suffix >= p_mass) & (h > 0)
    d = tl.max(tl.where(ok, bins, -1), axis=0)
    d = tl.where(d >= 0, d, tl.min(tl.where(h > 0, bins, 15), axis=0))
    above = above + tl.sum(tl.where(bins > d, h, 0.0), axis=0)
    return prefix | (d.to(tl.uint32) << (28 - 4 * LEVEL)), above


@triton.jit
def _replay(n, hist_ptr, m_ptr, p, LEVELS: tl.constexpr, S: tl.constexpr):
    """(prefix of the first LEVELS digits, mass above it, p * W, the row's shift M) from the bucket
    sums of levels 0 .. LEVELS - 1."""
    m = tl.load(m_ptr + n * S + tl.arange(0, S))
    big = tl.max(m, axis=0)
    # Level 0's sums were taken against each split's own maximum: rescaled to the row's.
    scale0 = tl.where(m > float("-inf"), tl.exp2((m - big) * _LOG2E), 0.0)[:, None]
    hist0 = hist_ptr + n * (_LEVELS * S * 16)
    total = tl.sum(tl.sum(tl.load(hist0 + tl.arange(0, S)[:, None] * 16 + tl.arange(0, 16)[None, :]) * scale0,
                          axis=1), axis=0)
    p_mass = p * total
    prefix = tl.full((), 0, tl.uint32)
    above = tl.full((), 0.0, tl.float32)
    one = tl.full((S, 1), 1.0, tl.float32)
    for lv in tl.static_range(LEVELS):
        if lv == 0:
            prefix, above = _pick(prefix, above, p_mass, hist0, scale0, lv)
        else:
            prefix, above = _pick(prefix, above, p_mass, hist0 + lv * (S * 16), one, lv)
    return prefix, above, p_mass, big


@triton.jit
def _level_kernel(x_ptr, s_x, rows_ptr, temp_ptr, thr_ptr, p_ptr, hist_ptr, m_ptr, V, CHUNK,
                  LEVEL: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.load(rows_ptr + n)
    inv_t = 1.0 / tl.load(temp_ptr + row).to(tl.float32)
    thr = tl.load(thr_ptr + row)
    base = x_ptr + row.to(tl.int64) * s_x
    bins = tl.arange(0, 16)
    hist = tl.zeros((16,), tl.float32)
    lo = split * CHUNK
    if LEVEL == 0:
        run = tl.full((), float("-inf"), tl.float32)
        for v0 in range(0, CHUNK, BLOCK):
            offs = lo + v0 + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            z = tl.where(x >= thr, x * inv_t, float("-inf"))
            new = tl.maximum(run, tl.max(z, axis=0))
            safe = tl.where(new > float("-inf"), new, 0.0)
            w = tl.exp2((z - safe) * _LOG2E)
            digit = (_key(x) >> 28).to(tl.int32)
            hist = hist * tl.exp2((run - safe) * _LOG2E) + tl.sum(
                tl.where(digit[:, None] == bins[None, :], w[:, None], 0.0), axis=0)
            run = new
        tl.store(m_ptr + n * S + split, run)
    else:
        prefix, above, p_mass, big = _replay(n, hist_ptr, m_ptr, tl.load(p_ptr + n), LEVEL, S)
        high = 32 - 4 * LEVEL
        for v0 in range(0, CHUNK, BLOCK):
            offs = lo + v0 + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            key = _key(x)
            live = (x >= thr) & ((key >> high) == (prefix >> high))
            w = tl.where(live, tl.exp2((x * inv_t - big) * _LOG2E), 0.0)
            digit = ((key >> (28 - 4 * LEVEL)) & 15).to(tl.int32)
            hist += tl.sum(tl.where(digit[:, None] == bins[None, :], w[:, None], 0.0), axis=0)
    tl.store(hist_ptr + ((n * _LEVELS + LEVEL) * S + split) * 16 + bins, hist)


@triton.jit
def _final_kernel(rows_ptr, thr_ptr, p_ptr, hist_ptr, m_ptr, S: tl.constexpr):
    n = tl.program_id(0)
    row = tl.load(rows_ptr + n)
    key, above, p_mass, big = _replay(n, hist_ptr, m_ptr, tl.load(p_ptr + n), _LEVELS, S)
    # The key back to its logit: the inverse of _key.
    u = tl.where((key >> 31) == 1, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    tl.store(thr_ptr + row, tl.maximum(tl.load(thr_ptr + row), u.to(tl.float32, bitcast=True)))


def top_p_thresholds(x: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, p: torch.Tensor,
                     thr: torch.Tensor) -> None:
    """For each cutting row n: thr[rows[n]] = max(thr[rows[n]], the raw logit of the last token that
    top-p p[n] keeps in softmax(x[rows[n]] / temperature[rows[n]]) over the logits >= thr[rows[n]]).
    x [R, V] float (last dimension contiguous); rows int64 [C]; temperature float [R] (> 0); p float
    [C] in (0, 1); thr float32 [R] (-inf: no top-k), updated in place. Queues its launches only."""
    C = rows.shape[0]
    if C == 0:
        return
    if x.dim() != 2 or x.stride(1) != 1 or thr.dtype != torch.float32 or p.shape != (C,):
        raise ValueError(f"top_p_thresholds: x {tuple(x.shape)}, rows {tuple(rows.shape)}, p {tuple(p.shape)}, "
                         f"thr {thr.dtype}")
    V = x.shape[1]
    # A fixed split count, so that a row's sums (and so its threshold, and a seeded draw) do not
    # depend on the rows beside it.
    S = _SPLITS
    chunk = triton.cdiv(triton.cdiv(V, S), _BLOCK) * _BLOCK
    hist = torch.empty((C, _LEVELS.value, S, 16), dtype=torch.float32, device=x.device)
    m = torch.empty((C, S), dtype=torch.float32, device=x.device)
    pf = p.to(torch.float32)
    for level in range(_LEVELS.value):
        _level_kernel[(C, S)](x, x.stride(0), rows, temperature, thr, pf, hist, m, V, chunk,
                              LEVEL=level, S=S, BLOCK=_BLOCK, num_warps=4)
    _final_kernel[(C,)](rows, thr, pf, hist, m, S=S, num_warps=1)
