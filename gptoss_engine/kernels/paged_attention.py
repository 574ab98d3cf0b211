"""Paged attention with sinks and an optional sliding window over the block-major KV pools.

One program per (sequence, tile of BLOCK_Q query tokens, KV head). The tile's rows are its
BLOCK_Q tokens x the GQA group's query heads, so one K/V tile loaded from the pool serves every
query head that shares it (8:1 for gpt-oss). Keys are gathered per row through the block table
(logical block key // block_size -> physical block), so any block size works and a block the
sliding window dropped (-1) is never touched: only keys in [first query pos - window + 1, last
query pos] are visited.

The sink joins the softmax denominator with no value: the online softmax starts from it
(running max = sink, running sum = exp(sink - sink) = 1, accumulator 0), which also keeps every
row's denominator >= 1 (no 0/0 on padded rows).

Decode with few (sequence, KV head) programs (batch 1: 8 for gpt-oss) is split over the keys
(flash-decoding): `_decode_split_kernel` runs SPLITS programs per (sequence, KV head), each over
a contiguous key range, and writes its unnormalized partial (max, sum, accumulator);
`_decode_combine_kernel` merges the splits and the sink. The split count depends on the batch
size only, so a captured graph stays valid for any sequence length.

Grid bounds come from the host ints batch.max_query_len and the tensor shapes only; the loop over
keys reads seq_lens and positions on the device. Nothing here syncs the host, so a decode step
can be captured in a CUDA graph and replayed with other sequence lengths.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_engine.step_batch import StepBatch

_LOG2E = 1.4426950408889634


def prefill_tiles(window: int | None, max_query_len: int) -> tuple[int, int, int, int]:
    """Prefill tile: (query rows = tokens x GQA group, keys per loop trip, warps, stages). From the
    H100 sweep with the split key loop (bench/attn_kernel_bench.py, PERF_NOTES v9): a sliding layer
    sees ~window keys a row, so small tiles waste fewer masked keys (8k: 341 -> 190 us); a long
    full-window prefill wants the widest key trips with 2 stages (8k: 1756 -> 1703 us), a short one
    more tiles in flight (1k: 165 -> 95 us)."""
    if window is not None:
        return (64, 32, 4, 2)
    return (128, 128, 4, 2) if max_query_len >= 4096 else (128, 64, 4, 3)


@triton.jit
def _attn_trip(q, m_i, l_i, acc, start, lo, hi, q_pos, window, scale_log2, head_base, table, d,
               s_pb, s_pkv, s_ps, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               SLIDING: tl.constexpr, MASKED: tl.constexpr):
    """One tile of BLOCK_N keys from `start` folded into the online softmax (m_i, l_i, acc).
    MASKED=False is for tiles every row may see whole (inside each row's causal range and window,
    blocks present): no block-table mask, no per-element causal/window select."""
    kpos = start + tl.arange(0, BLOCK_N)
    if MASKED:
        k_in = kpos < hi
        if SLIDING:
            k_in = k_in & (kpos >= lo)
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_in, other=-1)
        k_ok = k_in & (blk >= 0)
        base = head_base + blk.to(tl.int64) * s_pb + (kpos % BLOCK_SIZE) * s_ps
        k = tl.load(base[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(base[:, None] + s_pkv + d[None, :], mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        allowed = k_ok[None, :] & (kpos[None, :] <= q_pos[:, None])
        if SLIDING:
            allowed = allowed & (kpos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        blk = tl.load(table + kpos // BLOCK_SIZE)
        base = head_base + blk.to(tl.int64) * s_pb + (kpos % BLOCK_SIZE) * s_ps
        k = tl.load(base[:, None] + d[None, :])
        v = tl.load(base[:, None] + s_pkv + d[None, :])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        p = tl.exp2(s * scale_log2 - m_new[:, None])   # one FFMA an element
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _paged_attn_kernel(q_ptr, pool_ptr, out_ptr, tables_ptr, qstart_ptr, seqlen_ptr, pos_ptr, sinks_ptr,
                       scale_log2, window,
                       s_qt, s_qh, s_ot, s_oh,
                       s_pb, s_pkv, s_ps, s_ph, s_tb,
                       BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
                       SPLIT_LOOP: tl.constexpr):
    seq = tl.program_id(0)
    qtile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(qstart_ptr + seq)
    q_len = tl.load(qstart_ptr + seq + 1) - q_start
    if qtile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seqlen_ptr + seq)

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP
    r = tl.arange(0, BLOCK_M)
    qi = qtile * BLOCK_Q + r // GROUP                 # query index inside the sequence
    head = kvh * GROUP + r % GROUP
    row_ok = qi < q_len
    tok = (q_start + qi).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tok[:, None] * s_qt + head[:, None] * s_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = tl.load(pos_ptr + tok, mask=row_ok, other=0).to(tl.int32)

    # Keys this tile can see: causal up to its last query, and the window back from its first.
    max_q = tl.max(tl.where(row_ok, q_pos, 0))
    min_q = tl.min(tl.where(row_ok, q_pos, 2147483647))
    hi = tl.minimum(max_q + 1, seq_len)
    lo = 0
    if SLIDING:
        lo = tl.maximum(min_q - window + 1, 0)
    lo_tile = lo // BLOCK_N * BLOCK_N
    # Whole tiles in [u_lo, u_hi) are visible to every row: after the window's start for the last
    # query, and at or before the first query's own position. Only the tiles outside that range
    # (the diagonal, the window's trailing edge) pay for masks. A row's q_pos is its absolute
    # position, so keys < min_q are in every row's causal range (and their blocks are present:
    # the block manager drops only blocks wholly outside every query's window).
    u_lo = hi        # SPLIT_LOOP off: the first (masked) loop takes every tile
    u_hi = hi
    if SPLIT_LOOP:
        u_lo = lo_tile
        if SLIDING:
            u_lo = tl.maximum(tl.cdiv(tl.maximum(max_q - window + 1, 0), BLOCK_N) * BLOCK_N, lo_tile)
        u_lo = tl.minimum(u_lo, hi)
        u_hi = tl.minimum(tl.maximum((min_q + 1) // BLOCK_N * BLOCK_N, u_lo), hi)

    m_i = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634  # log2(e): exp2 domain
    l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    head_base = pool_ptr + kvh * s_ph
    table = tables_ptr + seq.to(tl.int64) * s_tb
    for start in range(lo_tile, u_lo, BLOCK_N):
        m_i, l_i, acc = _attn_trip(q, m_i, l_i, acc, start, lo, hi, q_pos, window, scale_log2, head_base, table, d,
                                   s_pb, s_pkv, s_ps, BLOCK_SIZE, BLOCK_N, SLIDING, True)
    for start in range(u_lo, u_hi, BLOCK_N):
        m_i, l_i, acc = _attn_trip(q, m_i, l_i, acc, start, lo, hi, q_pos, window, scale_log2, head_base, table, d,
                                   s_pb, s_pkv, s_ps, BLOCK_SIZE, BLOCK_N, SLIDING, False)
    for start in range(u_hi, hi, BLOCK_N):
        m_i, l_i, acc = _attn_trip(q, m_i, l_i, acc, start, lo, hi, q_pos, window, scale_log2, head_base, table, d,
                                   s_pb, s_pkv, s_ps, BLOCK_SIZE, BLOCK_N, SLIDING, True)
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * s_ot + head[:, None] * s_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _decode_split_kernel(q_ptr, pool_ptr, part_ptr, ml_ptr, tables_ptr, qstart_ptr, seqlen_ptr, pos_ptr,
                         scale_log2, window, num_heads,
                         s_qt, s_qh, s_pb, s_pkv, s_ps, s_ph, s_tb,
                         BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                         SLIDING: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(qstart_ptr + seq)
    if tl.load(qstart_ptr + seq + 1) == tok:
        return  # no query token for this sequence: the combine kernel skips it too
    r = tl.arange(0, BLOCK_M)           # the GQA group's heads, padded to tl.dot's 16 rows
    head = kvh * GROUP + r
    row_ok = r < GROUP
    d = tl.arange(0, HEAD_DIM)
    tok = tok.to(tl.int64)
    q = tl.load(q_ptr + tok * s_qt + head[:, None] * s_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = tl.load(pos_ptr + tok).to(tl.int32)
    hi = tl.minimum(q_pos + 1, tl.load(seqlen_ptr + seq))
    lo = 0
    if SLIDING:
        lo = tl.maximum(q_pos - window + 1, 0)
    # This split's share of [lo, hi), in whole BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + split * chunk
    s_hi = tl.minimum(s_lo + chunk, hi)
    # Finite start (not -inf): an empty split then writes m = -1e30, l = 0 and weighs nothing.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    head_base = pool_ptr + kvh * s_ph
    table = tables_ptr + seq.to(tl.int64) * s_tb
    for start in range(s_lo, s_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < s_hi
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=-1)
        k_ok = k_ok & (blk >= 0)
        base = head_base + blk.to(tl.int64) * s_pb + (kpos % BLOCK_SIZE) * s_ps
        k = tl.load(base[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(base[:, None] + s_pkv + d[None, :], mask=k_ok[:, None], other=0.0)
        s = tl.where(k_ok[None, :], tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    idx = (seq.to(tl.int64) * num_heads + head) * SPLITS + split   # [BLOCK_M] partial rows
    tl.store(part_ptr + idx[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
    tl.store(ml_ptr + idx * 2, m_i, mask=row_ok)
    tl.store(ml_ptr + idx * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _decode_combine_kernel(part_ptr, ml_ptr, out_ptr, qstart_ptr, sinks_ptr, num_heads, s_ot, s_oh,
                           HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(qstart_ptr + seq)
    if tl.load(qstart_ptr + seq + 1) == tok:
        return
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    idx = (seq.to(tl.int64) * num_heads + head) * SPLITS + sp
    m = tl.load(ml_ptr + idx * 2)
    l = tl.load(ml_ptr + idx * 2 + 1)
    acc = tl.load(part_ptr + idx[:, None] * HEAD_DIM + d[None, :])   # issued before the reductions
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634  # log2(e): exp2 domain
    m_all = tl.maximum(tl.max(m, 0), sink)
    w = tl.exp2(m - m_all)
    denom = tl.exp2(sink - m_all) + tl.sum(l * w, 0)   # the sink joins the denominator only
    out = tl.sum(acc * w[:, None], 0) / denom
    tl.store(out_ptr + tok.to(tl.int64) * s_ot + head * s_oh + d, out.to(out_ptr.dtype.element_ty))


# Decode tiles: (query rows, keys a trip, warps, stages) of the unsplit kernel (a decode tile's rows are
# one token's GQA group, padded to tl.dot's 16) and (keys a trip, warps, stages) of the split kernel.
DECODE_TILES = (16, 64, 4, 2)
SPLIT_TILES = (32, 4, 2)


def decode_splits(num_seqs: int, num_kv_heads: int, window: int | None = None) -> int:
    """Key splits per (sequence, KV head) for a decode step (1 = the unsplit kernel): ~1024 programs,
    none from 512 (batch 64 x 8 KV heads already streams the KV at ~2.5 TB/s), at most 4 over a
    sliding window's few keys. CUDA-graph sweep on the H100 (bench/attn_kernel_bench.py --decode,
    PERF_NOTES v6): batch 16 at 1k context 25.3 -> 15.6 us per full layer, batch 8 14.1 -> 11.6."""
    programs = num_seqs * num_kv_heads
    if programs >= 512:
        return 1
    return min(4 if window else 32, triton.next_power_of_2(triton.cdiv(1024, programs)))


def _paged_decode_split(q: torch.Tensor, layer_pool: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
                        batch: StepBatch, sinks: torch.Tensor, scale: float, window: int | None,
                        splits: int) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = layer_pool.shape[3]
    group = num_heads // num_kv_heads
    num_seqs = batch.seq_lens.shape[0]
    part = torch.empty((num_seqs, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    ml = torch.empty((num_seqs, num_heads, splits, 2), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, splits)](
        q, layer_pool, part, ml, block_tables, batch.query_start_loc, batch.seq_lens, batch.positions,
        float(scale) * _LOG2E, int(window or 0), num_heads,
        q.stride(0), q.stride(1),
        layer_pool.stride(0), layer_pool.stride(1), layer_pool.stride(2), layer_pool.stride(3),
        block_tables.stride(0),
        BLOCK_SIZE=layer_pool.shape[2], GROUP=group, HEAD_DIM=head_dim, BLOCK_M=max(16, group),
        BLOCK_N=SPLIT_TILES[0], SPLITS=splits, SLIDING=window is not None, num_warps=SPLIT_TILES[1],
        num_stages=SPLIT_TILES[2])
    _decode_combine_kernel[(num_seqs, num_heads)](
        part, ml, out, batch.query_start_loc, sinks, num_heads, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS=splits, num_warps=1)


def paged_attention(q: torch.Tensor, pool: torch.Tensor, layer_in_pool: int, block_tables: torch.Tensor,
                    batch: StepBatch, sinks: torch.Tensor, scale: float, window: int | None,
                    splits: int | None = None,
                    tiles: tuple[int, int, int, int] | None = None,
                    split_loop: bool = True) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]; same contract as gptoss_engine.attention.paged_attention.
    `splits` overrides decode_splits' choice for a decode step (tests use it); `tiles` overrides
    prefill_tiles' choice (query rows per tile, keys per trip, warps, stages; the bench's sweep);
    `split_loop=False` masks every key tile (the kernel before the split, for the bench's comparison)."""
    if q.dim() != 3 or pool.dim() != 6:
        raise ValueError(f"q must be [T, Hq, D] and pool [blocks, layers, 2, bs, kv_heads, D]; "
                         f"got {tuple(q.shape)} and {tuple(pool.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = pool.shape[3], pool.shape[4]
    if pool.shape[5] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit pool {tuple(pool.shape)} (head_dim, GQA group)")
    if pool.stride(5) != 1 or block_tables.stride(1) != 1:
        raise ValueError("pool and block_tables must be contiguous in their last dimension")
    group = num_heads // num_kv_heads
    if group & (group - 1) or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"GQA group ({group}) and head_dim ({head_dim}) must be powers of two, head_dim >= 16")
    layer_pool = pool[:, layer_in_pool]  # [blocks, 2, bs, kv_heads, D]: the kernel sees one layer
    out = torch.empty_like(q)
    num_seqs = batch.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    q = q if q.stride(2) == 1 else q.contiguous()
    if batch.max_query_len == 1:
        splits = decode_splits(num_seqs, num_kv_heads, window) if splits is None else splits
        if splits > 1:
            _paged_decode_split(q, layer_pool, out, block_tables, batch, sinks, scale, window, splits)
            return out
    # Decode tiles hold one token (rows = the GQA group, padded to tl.dot's minimum of 16); prefill
    # tiles rows // group tokens x the group (prefill_tiles).
    if batch.max_query_len == 1:
        rows, block_n, warps, stages = DECODE_TILES
    else:
        rows, block_n, warps, stages = tiles or prefill_tiles(window, batch.max_query_len)
    block_q = triton.next_power_of_2(max(1, rows // group))
    grid = (num_seqs, triton.cdiv(batch.max_query_len, block_q), num_kv_heads)
    _paged_attn_kernel[grid](
        q, layer_pool, out, block_tables, batch.query_start_loc, batch.seq_lens, batch.positions, sinks,
        float(scale) * _LOG2E, int(window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        layer_pool.stride(0), layer_pool.stride(1), layer_pool.stride(2), layer_pool.stride(3),
        block_tables.stride(0),
        BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim, BLOCK_Q=block_q, BLOCK_N=block_n,
        SLIDING=window is not None, SPLIT_LOOP=split_loop, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, pool_ptr, slot_ptr, s_kt, s_kh, s_vt, s_vh, s_pb, s_pkv, s_ps, s_ph,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    d = tl.arange(0, HEAD_DIM)
    dst = pool_ptr + (slot // BLOCK_SIZE) * s_pb + (slot % BLOCK_SIZE) * s_ps + h * s_ph + d
    tl.store(dst, tl.load(k_ptr + t * s_kt + h * s_kh + d).to(pool_ptr.dtype.element_ty))
    tl.store(dst + s_pkv, tl.load(v_ptr + t * s_vt + h * s_vh + d).to(pool_ptr.dtype.element_ty))


def write_kv(pool: torch.Tensor, layer_in_pool: int, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Same contract as gptoss_engine.attention.write_kv, without its boolean-mask indexing (which
    syncs the host and so cannot be captured in a CUDA graph): slot -1 rows return in the kernel."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or pool.shape[4] != num_kv_heads or pool.shape[5] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit pool {tuple(pool.shape)}")
    if head_dim & (head_dim - 1) or k.stride(2) != 1 or v.stride(2) != 1 or pool.stride(5) != 1:
        raise ValueError("write_kv needs a power-of-two head_dim, contiguous in the last dimension")
    if num_tokens == 0:
        return
    layer_pool = pool[:, layer_in_pool]
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        k, v, layer_pool, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        layer_pool.stride(0), layer_pool.stride(1), layer_pool.stride(2), layer_pool.stride(3),
        BLOCK_SIZE=pool.shape[3], HEAD_DIM=head_dim, num_warps=1)
