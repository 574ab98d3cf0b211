"""Garbage-collector settings for a process that holds one engine for its whole life (a worker
daemon, a benchmark).

Why: a step at batch 256 allocates about a thousand small tracked objects (ScheduledSeq,
TokenOutput, RequestOutput, lists), most of which live as long as their request. With CPython's
default young-generation threshold of 700 a collection ran once or twice every step, and the
surviving per-token objects made the older generations' collections grow with the run:
with this and two smaller changes, bench/host_step_bench.py (CPU, forward stubbed) went from 2.05 to
1.77 ms of host time a step, the sampler's share (where the collections fell) from 0.34 to 0.18
(bench/results/host_step.md). The engine
makes no reference cycles per step, so collecting less often holds back little memory.
"""
from __future__ import annotations

import gc

YOUNG_GENERATION = 20_000


def settle_for_serving() -> tuple[int, int, int]:
    """Call once the engine is built: collect, move everything alive now (model, caches, graphs)
    out of the collector's generations so its full collections never rescan it (~0.6 s over a
    1000-step batch-256 run, measured on the H100 host), and collect the young generation less
    often. Returns the previous thresholds (for undo())."""
    gc.collect()
    gc.freeze()
    previous = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION, previous[1], previous[2])
    return previous


def undo(previous: tuple[int, int, int]) -> None:
    """For a process that goes on without the engine (a benchmark that runs a peer next)."""
    gc.unfreeze()
    gc.set_threshold(*previous)
    gc.collect()
