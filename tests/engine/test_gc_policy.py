"""gc_policy: what a serving process changes in the garbage collector, and that a benchmark can undo it."""
from __future__ import annotations

import gc

from gptoss_engine import gc_policy


def test_settle_freezes_what_lives_and_raises_only_the_young_threshold_then_undo_restores():
    before = gc.get_threshold()
    keep = [[i] for i in range(1000)]   # long-lived objects, like a model's
    previous = gc_policy.settle_for_serving()
    try:
        assert previous == before
        assert gc.get_threshold() == (gc_policy.YOUNG_GENERATION, before[1], before[2])
        assert gc.get_freeze_count() >= len(keep)
    finally:
        gc_policy.undo(previous)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
