"""BlockManager units: refcounts, sliding-window freeing, prefix hashing, staging, reservations."""
from __future__ import annotations

import pytest

from gptoss_engine.block_manager import BlockManager, NoKVCapacity, SeqBlocks


def full_counts(bm: BlockManager) -> tuple[int, int]:
    c = bm.counts()
    return c.num_free_full, c.num_free_swa


def test_sliding_blocks_freed_once_out_of_window():
    bm = BlockManager(16, 16, block_size=4, sliding_window=6)
    blocks, tokens = SeqBlocks(), list(range(20))
    bm.append(blocks, 0, 20)
    assert len(blocks.full) == 5 and all(b >= 0 for b in blocks.swa)
    bm.commit(blocks, tokens, 20)
    # Next query at 20 reads keys 15..20: logical blocks 3 and 4 stay, 0..2 go back.
    assert blocks.swa[:3] == [-1, -1, -1] and all(b >= 0 for b in blocks.swa[3:])
    assert full_counts(bm) == (11, 14)
    bm.free(blocks)
    assert full_counts(bm) == (16, 16)


def test_prefix_hit_compares_tokens_and_leaves_one_token():
    bm = BlockManager(16, 16, block_size=4, sliding_window=100)
    a = SeqBlocks()
    bm.append(a, 0, 8)
    bm.commit(a, list(range(8)), 8)
    bm.free(a)
    b = SeqBlocks()
    assert bm.match_prefix(b, list(range(8))) == 4  # at most len-1 tokens: one block
    bm.free(b)
    c = SeqBlocks()
    assert bm.match_prefix(c, list(range(9))) == 8
    assert len(c.full) == 2
    bm.free(c)
    assert bm.match_prefix(SeqBlocks(), [0, 1, 2, 99, 4]) == 0


def test_prefix_hit_shortened_without_window_blocks():
    bm = BlockManager(16, 4, block_size=4, sliding_window=4)
    a = SeqBlocks()
    bm.append(a, 0, 12)
    bm.commit(a, list(range(12)), 12)  # swa blocks 0, 1 freed (hashed), block 2 kept
    bm.free(a)
    # Evict all cached sliding blocks: full blocks alone cannot serve a hit.
    taken = [bm.swa.allocate() for _ in range(4)]
    for t in taken:
        bm.swa.release(t)
    assert bm.match_prefix(SeqBlocks(), list(range(13))) == 0


def test_evicted_block_is_no_longer_found():
    bm = BlockManager(2, 0, block_size=4, sliding_window=None)
    a = SeqBlocks()
    bm.append(a, 0, 4)
    bm.commit(a, [1, 2, 3, 4], 4)
    bm.free(a)
    b = SeqBlocks()
    bm.append(b, 0, 8)   # takes both blocks, evicting the cached one
    bm.free(b)
    assert bm.match_prefix(SeqBlocks(), [1, 2, 3, 4, 5]) == 0


def test_stage_reserve_adopt_release():
    bm = BlockManager(8, 8, block_size=4, sliding_window=4)
    s = SeqBlocks()
    bm.append(s, 0, 10)
    bm.commit(s, list(range(10)), 10)
    staged = bm.stage(s, 10)
    assert len(staged.full_block_ids) == 3 and staged.swa_first_logical_block == 1
    assert len(staged.swa_block_ids) == 2 and s.full == []
    r = bm.reserve(10)
    assert (len(r.full_block_ids), len(r.swa_block_ids), r.swa_first_logical_block) == (3, 2, 1)
    assert bm.counts().num_staged == 1 and bm.counts().num_reserved == 1
    with pytest.raises(NoKVCapacity):
        bm.reserve(30)
    d = SeqBlocks()
    bm.adopt(d, r.handle)
    assert d.full == r.full_block_ids and d.swa == [-1] + r.swa_block_ids
    assert not bm.free_reservation(r.handle)
    assert bm.release_staged(staged.handle) and not bm.release_staged(staged.handle)
    bm.free(d)
    assert full_counts(bm) == (8, 8)
    with pytest.raises(RuntimeError, match="released more often"):
        bm.full.release(0)
