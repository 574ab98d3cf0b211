"""The reference paged attention against plain dense attention, through scattered physical blocks."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.attention import paged_attention, write_kv
from gptoss_engine.moe import ExpertWeights, moe_experts, swiglu
from gptoss_engine.mxfp4 import dense_to_packed, packed_to_dense
from gptoss_engine.step_batch import StepBatch

BS, HQ, HKV, D = 4, 4, 2, 8


def _dense_attention(q, k, v, q_pos, sinks, scale, window):  # noqa: ANN001, ANN202 - test oracle
    """q [Q, Hq, D], k/v [K, Hkv, D] for positions 0..K-1: softmax with the sink, no paging."""
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    k_pos = torch.arange(k.shape[0])
    out = torch.empty_like(q)
    for qi, p in enumerate(q_pos.tolist()):
        ok = (k_pos <= p) & ((k_pos > p - window) if window else True)
        for h in range(HQ):
            s = (k[ok, h] @ q[qi, h]) * scale
            w = torch.softmax(torch.cat([s, sinks[h:h + 1]]), 0)[:-1]
            out[qi, h] = w @ v[ok, h]
    return out


def _setup(seq_lens: list[int], query_lens: list[int], window: int | None, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // BS) for n in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 3
    pool = torch.zeros(num_blocks, 2, 2, BS, HKV, D)
    perm = torch.randperm(num_blocks, generator=g)  # physical blocks deliberately out of order
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    ks, vs, q_rows, positions, slots, starts = [], [], [], [], [], [0]
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        used = -(-n // BS)
        tables[i, :used] = perm[i * max_blocks:i * max_blocks + used].int()
        k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        ks.append(k)
        vs.append(v)
        pos = torch.arange(n - ql, n)
        # cached context written directly; this step's tokens go through write_kv below
        for p in range(n - ql):
            pool[tables[i, p // BS], 1, 0, p % BS], pool[tables[i, p // BS], 1, 1, p % BS] = k[p], v[p]
        if window:
            first_needed = max(0, n - ql - window + 1) // BS
            tables[i, :first_needed] = -1
        positions.append(pos)
        slots.append(torch.stack([tables[i, pos // BS].long() * BS + pos % BS]).flatten())
        q_rows.append(torch.randn(ql, HQ, D, generator=g))
        starts.append(starts[-1] + ql)
    slot_mapping = torch.cat(slots)
    batch = StepBatch(
        input_ids=torch.zeros(starts[-1], dtype=torch.int64), positions=torch.cat(positions),
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        full_block_tables=tables, swa_block_tables=tables, full_slot_mapping=slot_mapping,
        swa_slot_mapping=slot_mapping, logits_indices=torch.tensor(starts[1:]) - 1,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    new_k = torch.cat([k[n - ql:] for k, n, ql in zip(ks, seq_lens, query_lens)])
    new_v = torch.cat([v[n - ql:] for v, n, ql in zip(vs, seq_lens, query_lens)])
    write_kv(pool, 1, slot_mapping, new_k, new_v)
    return pool, batch, torch.cat(q_rows), ks, vs, torch.randn(HQ, generator=g)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_matches_dense(window: int | None) -> None:
    seq_lens, query_lens = [13, 1, 22, 9], [13, 1, 1, 4]  # a prefill, decodes, a chunk on top of context
    pool, batch, q, ks, vs, sinks = _setup(seq_lens, query_lens, window)
    out = paged_attention(q, pool, 1, batch.full_block_tables, batch, sinks, 0.3, window)
    starts = batch.query_start_loc.tolist()
    for i in range(len(seq_lens)):
        s, e = starts[i], starts[i + 1]
        want = _dense_attention(q[s:e], ks[i], vs[i], batch.positions[s:e], sinks, 0.3, window)
        torch.testing.assert_close(out[s:e], want, atol=1e-5, rtol=1e-5)


def test_sinks_lower_attention_mass() -> None:
    pool, batch, q, *_ = _setup([6], [6], None)
    low = paged_attention(q, pool, 1, batch.full_block_tables, batch, torch.full((HQ,), -30.0), 0.3, None)
    high = paged_attention(q, pool, 1, batch.full_block_tables, batch, torch.full((HQ,), 30.0), 0.3, None)
    assert high.abs().max() < 1e-6 < low.abs().max()  # a huge sink takes all the mass and has no value


def test_missing_block_inside_window_is_an_error() -> None:
    pool, batch, q, *_ = _setup([12], [1], None)
    batch.full_block_tables[0, 0] = -1
    with pytest.raises(ValueError, match=r"logical blocks \[0\]"):
        paged_attention(q, pool, 1, batch.full_block_tables, batch, torch.zeros(HQ), 0.3, None)


def test_write_kv_skips_padding_slots() -> None:
    pool = torch.zeros(2, 1, 2, BS, HKV, D)
    k = torch.ones(3, HKV, D)
    write_kv(pool, 0, torch.tensor([5, -1, 0]), k, 2 * k)
    assert pool[1, 0, 0, 1].eq(1).all() and pool[0, 0, 1, 0].eq(2).all()
    assert pool.ne(0).sum() == 2 * 2 * HKV * D  # two tokens written, K and V each


def test_moe_packed_equals_dense_and_swiglu_clamps() -> None:
    g = torch.Generator().manual_seed(0)
    e, h, i = 4, 32, 32
    gate_up = packed_to_dense(*dense_to_packed(torch.randn(e, h, 2 * i, generator=g)))
    down = packed_to_dense(*dense_to_packed(torch.randn(e, i, h, generator=g)))
    gu_b, d_b = torch.randn(e, 2 * i, generator=g), torch.randn(e, h, generator=g)
    x = torch.randn(5, h, generator=g)
    ids = torch.tensor([[0, 1], [3, 2], [1, 1], [2, 0], [3, 0]])
    weights = torch.softmax(torch.randn(5, 2, generator=g), -1)
    dense = moe_experts(x, ids, weights, ExpertWeights(gu_b, d_b, gate_up=gate_up, down=down), 7.0)
    (gb, gs), (db, ds) = dense_to_packed(gate_up), dense_to_packed(down)
    packed = moe_experts(x, ids, weights, ExpertWeights(gu_b, d_b, gate_up_blocks=gb, gate_up_scales=gs,
                                                        down_blocks=db, down_scales=ds), 7.0)
    torch.testing.assert_close(packed, dense)
    # by hand for token 0
    want = sum(weights[0, k] * (swiglu(x[0] @ gate_up[ids[0, k]] + gu_b[ids[0, k]], 7.0, 1.702) @ down[ids[0, k]]
                                + d_b[ids[0, k]]) for k in range(2))
    torch.testing.assert_close(dense[0], want)
    act = swiglu(torch.tensor([100.0, 100.0, 1.0, -100.0]), 7.0, 1.702)  # (gate, up) pairs
    torch.testing.assert_close(act, torch.tensor([7.0 * torch.sigmoid(torch.tensor(7 * 1.702)) * 8.0,
                                                  1.0 * torch.sigmoid(torch.tensor(1.702)) * -6.0]))
    with pytest.raises(ValueError, match="exactly one"):
        ExpertWeights(gu_b, d_b)
