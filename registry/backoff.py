"""Retry pacing shared by registration and discovery while etcd is unreachable."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    initial_s: float = 0.1
    max_s: float = 2.0
    _next_s: float = 0.0

    def next_delay(self) -> float:
        """Exponential with +-20% jitter, so that many workers do not hammer a returning etcd at once."""
        self._next_s = min(self.max_s, self._next_s * 2) if self._next_s else self.initial_s
        return self._next_s * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next_s = 0.0
