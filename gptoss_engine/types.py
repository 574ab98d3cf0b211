"""Request-level dataclasses of the engine's public API (the daemons convert protobuf to these)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"        # model stop token (from the harmony encoding) or a user stop token id
    LENGTH = "length"    # max_tokens or the context limit
    ABORT = "abort"      # cancelled by the caller


class InvalidRequest(ValueError):
    """A request the engine cannot take (bad sampling values, prompt too long, ...). Message is user-facing."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0               # 0 = off
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> None:
        """Raise InvalidRequest naming the bad field."""
        if not (0.0 <= self.temperature <= 100.0):
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not (0 <= self.top_logprobs <= 20):
            raise InvalidRequest(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass
class TokenOutput:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One increment of a request's stream; the last one has finish_reason set."""
    request_id: str
    tokens: list[TokenOutput]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
