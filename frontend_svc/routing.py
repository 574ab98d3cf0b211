"""Picking a worker among the live instances of a component: round-robin, random, least-loaded.

Least-loaded adds the frontend's own in-flight count per instance to the load the worker last
published (records update every few seconds; our own count is current)."""
from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol


class Instance(Protocol):
    instance_id: int
    grpc_address: str
    role: str

    @property
    def load(self): ...


class Router:
    def __init__(self, mode: str, rng: random.Random | None = None):
        if mode not in ("round-robin", "random", "least-loaded"):
            raise ValueError(f"unknown router mode {mode!r}")
        self.mode = mode
        self._rng = rng or random.Random()
        self._counters: dict[str, itertools.count] = defaultdict(itertools.count)
        self.inflight: dict[int, int] = defaultdict(int)

    def pick(self, component: str, candidates: Sequence[Instance], exclude: set[int] = frozenset()) -> Instance | None:
        """One of `candidates` (excluded ids only if nothing else is left); None if there are none."""
        live = sorted(candidates, key=lambda r: r.instance_id)
        pool = [r for r in live if r.instance_id not in exclude] or live
        if not pool:
            return None
        if self.mode == "random":
            return self._rng.choice(pool)
        if self.mode == "least-loaded":
            return min(pool, key=lambda r: (r.load.num_running + r.load.num_waiting + self.inflight[r.instance_id],
                                            r.instance_id))
        return pool[next(self._counters[component]) % len(pool)]

    def begin(self, instance_id: int) -> None:
        self.inflight[instance_id] += 1

    def end(self, instance_id: int) -> None:
        self.inflight[instance_id] -= 1
        if self.inflight[instance_id] <= 0:
            del self.inflight[instance_id]
