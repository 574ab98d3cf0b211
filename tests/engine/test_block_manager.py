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


def assert_tables_mirror(bm: BlockManager, live: list[SeqBlocks]) -> None:
    """Each live sequence's table row equals its lists, -1 after them; rows are not shared."""
    rows = [b.row for b in live if b.full]
    assert len(set(rows)) == len(rows)
    for b in live:
        if not b.full:
            assert b.row == -1
            continue
        n = len(b.full)
        assert bm.tables.full[b.row, :n].tolist() == b.full and bm.tables.swa[b.row, :n].tolist() == b.swa
        assert (bm.tables.full[b.row, n:] == -1).all() and (bm.tables.swa[b.row, n:] == -1).all()


def test_block_tables_follow_append_commit_free_stage_adopt():
    import random
    rng = random.Random(0)
    bm = BlockManager(3000, 400, block_size=4, sliding_window=6)
    live = [SeqBlocks() for _ in range(80)]
    tokens = [[rng.randrange(5) for _ in range(400)] for _ in live]   # few values: prefix hits happen
    for b in live:   # more sequences than the tables' initial 64 rows hold blocks at once
        bm.append(b, 0, 1)
    computed = [1] * len(live)
    for _ in range(3000):
        i = rng.randrange(len(live))
        b, op = live[i], rng.random()
        if op < 0.6:   # a step: append then commit (long sequences outgrow the initial 64 columns)
            n = rng.choice([1, 1, 7, 40])
            if computed[i] + n <= 400 and bm.can_append(b, computed[i], n):
                bm.append(b, computed[i], n)
                computed[i] += n
                bm.commit(b, tokens[i], computed[i])
        elif op < 0.7:  # finish or preempt
            bm.free(b)
            computed[i] = 0
        elif op < 0.9 and not b.full:  # admission with a prefix-cache lookup
            computed[i] = bm.match_prefix(b, tokens[i][:rng.randrange(2, 200)])
        elif b.full and b.swa[-1] >= 0:  # prefill-only: stage, then a hand-off adopts it into another sequence
            staged = bm.stage(b, computed[i])
            computed[i] = 0
            j = rng.randrange(len(live))
            if not live[j].full:
                r = bm.reserve(staged.num_tokens)
                bm.adopt(live[j], r.handle)
                computed[j] = staged.num_tokens
            bm.release_staged(staged.handle)
        assert_tables_mirror(bm, live)
    assert bm.tables.full.shape[0] > 64 and bm.tables.full.shape[1] > 64
    for b in live:
        bm.free(b)
    assert full_counts(bm) == (3000, 400) and (bm.tables.full == -1).all() and (bm.tables.swa == -1).all()
