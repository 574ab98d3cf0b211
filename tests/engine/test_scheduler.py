"""Scheduler policy against a real BlockManager (no model: steps are simulated)."""
from __future__ import annotations

from gptoss_engine.block_manager import BlockManager
from gptoss_engine.scheduler import Scheduler
from gptoss_engine.sequence import Sequence
from gptoss_engine.types import SamplingParams


def seq(i: int, n: int) -> Sequence:
    return Sequence(f"r{i}", list(range(n)), SamplingParams(max_tokens=100), arrival=i)


def advance(sched: Scheduler, bm: BlockManager) -> list[tuple[str, int]]:
    """One simulated step: commit the computed tokens, append a token where the step reached the end."""
    out = sched.schedule()
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_tokens
        bm.commit(s.seq.blocks, s.seq.token_ids, s.seq.num_computed_tokens)
        if s.seq.num_computed_tokens == len(s.seq.token_ids):
            s.seq.token_ids.append(1)
    return [(s.seq.request_id, s.num_tokens) for s in out.scheduled]


def test_chunked_prefill_budget_and_mixed_steps():
    bm = BlockManager(64, 64, block_size=4, sliding_window=None)
    sched = Scheduler(bm, max_num_tokens=10, max_batch_size=8, enable_chunked_prefill=True)
    sched.add_waiting(seq(0, 6))
    sched.add_waiting(seq(1, 12))
    assert advance(sched, bm) == [("r0", 6), ("r1", 4)]
    assert advance(sched, bm) == [("r0", 1), ("r1", 8)]   # decode and prefill chunk in one step
    assert advance(sched, bm) == [("r0", 1), ("r1", 1)]


def test_batch_size_and_fcfs():
    bm = BlockManager(64, 64, block_size=4, sliding_window=None)
    sched = Scheduler(bm, max_num_tokens=100, max_batch_size=2, enable_chunked_prefill=False)
    for i in range(3):
        sched.add_waiting(seq(i, 3))
    assert [r for r, _ in advance(sched, bm)] == ["r0", "r1"]
    assert len(sched.waiting) == 1


def test_preempts_newest_and_recomputes():
    bm = BlockManager(4, 0, block_size=4, sliding_window=None, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_tokens=100, max_batch_size=8, enable_chunked_prefill=True)
    sched.add_waiting(seq(0, 8))
    sched.add_waiting(seq(1, 8))
    assert advance(sched, bm) == [("r0", 8), ("r1", 8)]   # all 4 blocks used
    out = sched.schedule()                                # r0 needs a 3rd block: r1 is preempted
    assert [s.request_id for s in out.preempted] == ["r1"]
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("r0", 1)]
    r1 = sched.waiting[0]
    assert r1.num_computed_tokens == 0 and r1.blocks.full == [] and len(r1.token_ids) == 9
