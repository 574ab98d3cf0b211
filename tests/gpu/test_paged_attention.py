"""Parity of the Triton paged attention with the PyTorch reference (sinks, window, GQA, paging)."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.attention import paged_attention_reference
from gptoss_engine.step_batch import StepBatch

pytestmark = pytest.mark.gpu


def make_batch(cached: list[int], new: list[int], block_size: int, num_blocks: int, window: int | None,
               device: str, gen: torch.Generator) -> StepBatch:
    """Sequences with `cached` context tokens and `new` query tokens each, on shuffled physical blocks.
    With a window, logical blocks wholly before every query's window get -1 (as the block manager
    frees them), so a kernel that reads them would fail."""
    seq_lens = [c + n for c, n in zip(cached, new)]
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(cached), max_blocks), -1, dtype=torch.int32)
    for i, s in enumerate(seq_lens):
        nb = -(-s // block_size)
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
        if window is not None:
            first_needed = max(0, cached[i] - window + 1) // block_size
            tables[i, :first_needed] = -1
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new)])
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    t = int(positions.numel())
    empty = torch.full((t,), -1, dtype=torch.int64)
    return StepBatch(
        input_ids=torch.zeros(t, dtype=torch.int64, device=device), positions=positions.to(device),
        query_start_loc=qsl.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        full_block_tables=tables.to(device), swa_block_tables=tables.to(device),
        full_slot_mapping=empty.to(device), swa_slot_mapping=empty.to(device),
        logits_indices=(qsl[1:] - 1).long().to(device), max_query_len=max(new), max_seq_len=max(seq_lens))


CASES = [
    # (cached, new, window): decode batch, prefill chunk after a prefix, mixed, window crossing blocks
    ([5, 40, 129, 300], [1, 1, 1, 1], None),
    ([5, 40, 129, 300], [1, 1, 1, 1], 128),
    ([0, 37], [70, 19], None),
    ([0, 150, 3], [200, 33, 1], 128),
    ([260], [1], 16),
    # long enough for whole key tiles that every query row sees (the kernel's unmasked loop), with
    # and without a window wider than a tile, after a prefix and from position 0
    ([0, 150], [700, 300], None),
    ([0, 150], [700, 300], 300),
]


@pytest.mark.parametrize("cached,new,window", CASES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("tiles", [None, (128, 128, 4, 2)], ids=["default-tiles", "long-prefill-tiles"])
def test_matches_reference(device: str, interpreted: bool, cached: list[int], new: list[int],
                           window: int | None, block_size: int, tiles: tuple[int, int, int, int] | None) -> None:
    """Every tile shape prefill_tiles picks: its default for the case, and the one it keeps for
    prompts too long to run here."""
    from gptoss_engine.kernels.paged_attention import paged_attention
    gen = torch.Generator().manual_seed(hash((tuple(cached), tuple(new), window, block_size)) % 2**31)
    dtype = torch.float32 if interpreted else torch.bfloat16  # the interpreter has no bf16 dot
    heads, kv_heads, head_dim, layers = 16, 2, 64, 3
    num_blocks = sum(-(-(c + n) // block_size) for c, n in zip(cached, new)) + 4
    batch = make_batch(cached, new, block_size, num_blocks, window, device, gen)
    pool = torch.randn(num_blocks, layers, 2, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    q = torch.randn(batch.positions.numel(), heads, head_dim, generator=gen).to(device, dtype)
    sinks = (torch.randn(heads, generator=gen) * 2).to(device, dtype)
    tables = batch.swa_block_tables
    ref = paged_attention_reference(q, pool, 1, tables, batch, sinks, head_dim ** -0.5, window).float()
    out = paged_attention(q, pool, 1, tables, batch, sinks, head_dim ** -0.5, window, tiles=tiles).float()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if interpreted else 1e-2), rel


DECODE_CASES = [
    # (cached, window): batch 1 long context, a few sequences of unequal length, window crossing blocks
    ([1000], None), ([1000], 128), ([5, 40, 129, 300], None), ([3, 260, 77], 16),
]


@pytest.mark.parametrize("cached,window", DECODE_CASES)
@pytest.mark.parametrize("splits", [1, 4, 32])
def test_decode_splits_match_reference(device: str, interpreted: bool, cached: list[int], window: int | None,
                                       splits: int) -> None:
    """Split-K decode (flash-decoding) against the reference, with more splits than some
    sequences have key tiles (empty splits must weigh nothing)."""
    from gptoss_engine.kernels.paged_attention import paged_attention
    gen = torch.Generator().manual_seed(hash((tuple(cached), window, splits)) % 2**31)
    dtype = torch.float32 if interpreted else torch.bfloat16
    heads, kv_heads, head_dim, block_size = 16, 2, 64, 16
    num_blocks = sum(-(-(c + 1) // block_size) for c in cached) + 4
    batch = make_batch(cached, [1] * len(cached), block_size, num_blocks, window, device, gen)
    pool = torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    q = torch.randn(len(cached), heads, head_dim, generator=gen).to(device, dtype)
    sinks = (torch.randn(heads, generator=gen) * 2).to(device, dtype)
    tables = batch.swa_block_tables
    ref = paged_attention_reference(q, pool, 0, tables, batch, sinks, head_dim ** -0.5, window).float()
    out = paged_attention(q, pool, 0, tables, batch, sinks, head_dim ** -0.5, window, splits=splits).float()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if interpreted else 1e-2), rel


def test_sink_dominates_when_large(device: str, interpreted: bool) -> None:
    """A huge sink logit takes all the probability mass: the output goes to zero."""
    from gptoss_engine.kernels.paged_attention import paged_attention
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float32 if interpreted else torch.bfloat16
    batch = make_batch([10], [1], 16, 4, None, device, gen)
    pool = torch.randn(4, 1, 2, 16, 1, 16, generator=gen).to(device, dtype)
    q = torch.randn(1, 8, 16, generator=gen).to(device, dtype)
    out = paged_attention(q, pool, 0, batch.full_block_tables, batch, torch.full((8,), 80.0, device=device, dtype=dtype),
                          0.25, None)
    assert out.float().abs().max().item() < 1e-6


def test_write_kv_matches_reference(device: str) -> None:
    from gptoss_engine.attention import write_kv_reference
    from gptoss_engine.kernels.paged_attention import write_kv
    gen = torch.Generator().manual_seed(5)
    pool = torch.randn(8, 3, 2, 16, 2, 16, generator=gen).to(device)
    expected = pool.clone()
    k = torch.randn(5, 2, 16, generator=gen).to(device)
    v = torch.randn(5, 2, 16, generator=gen).to(device)
    slots = torch.tensor([3, -1, 17, 127, -1], device=device)
    write_kv_reference(expected, 2, slots, k, v)
    write_kv(pool, 2, slots, k, v)
    assert torch.equal(pool, expected)
