"""Continuous-batching policy: which sequences compute how many tokens this step (no tensors here).

FCFS by arrival. Running sequences go first (decode steps and unfinished prompt chunks), then
waiting ones are admitted in order while the token budget (max_num_tokens), the batch size and
the KV blocks allow. A prompt longer than the remaining budget is split into chunks (chunked
prefill). When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the waiting queue to be recomputed (its
outputs so far are kept and become part of what it recomputes). The engine refuses at admission
any request that could not run even alone with the whole cache, so this always makes progress.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from gptoss_engine.block_manager import BlockManager
from gptoss_engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_tokens: int, max_batch_size: int,
                 enable_chunked_prefill: bool) -> None:
        self.bm = block_manager
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []   # sorted by arrival
        self.running: list[Sequence] = []   # sorted by arrival
        # Fixed by the pool sizes; _chunk runs for every sequence every step.
        self._chunk_cap = block_manager.max_swa_chunk() if enable_chunked_prefill else None

    def add_waiting(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds its blocks (an adopted hand-off)."""
        seq.status = SeqStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: drop it and free whatever blocks it still holds."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq.blocks)
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = seq.num_uncomputed
        if self._chunk_cap is not None:
            budget = min(budget, self._chunk_cap)
        if n <= budget:
            return n
        return budget if self.enable_chunked_prefill else 0

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq.blocks)
        seq.num_computed_tokens = 0
        self.add_waiting(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < self.max_batch_size:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            fits = self.bm.can_append(seq.blocks, seq.num_computed_tokens, n)
            while not fits and self.running[-1] is not seq:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                fits = self.bm.can_append(seq.blocks, seq.num_computed_tokens, n)
            if fits:
                self.bm.append(seq.blocks, seq.num_computed_tokens, n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
            else:  # it is the newest running sequence itself that does not fit
                self.running.pop(i)
                self._preempt(seq)
                preempted.append(seq)
        # No admissions in a step that had to preempt: the freed blocks go to the older ones first.
        while not preempted and self.waiting and budget > 0 and len(scheduled) < self.max_batch_size:
            seq = self.waiting[0]
            if not seq.blocks.full:
                cached = self.bm.match_prefix(seq.blocks, seq.token_ids)
                seq.num_computed_tokens = cached
                if not seq.outputs:
                    seq.num_cached_tokens = cached
            n = self._chunk(seq, budget)
            if n == 0 or not self.bm.can_append(seq.blocks, seq.num_computed_tokens, n):
                # Wait (FCFS: nobody overtakes it). Cache hits go back: free, still findable.
                self.bm.free(seq.blocks)
                seq.num_computed_tokens = 0
                break
            self.bm.append(seq.blocks, seq.num_computed_tokens, n)
            self.waiting.pop(0)
            self.add_running(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return SchedulerOutput(scheduled, preempted)
