"""One request's state inside the engine: its tokens, how many have KV, its blocks, its outputs.

Every step computes token_ids[num_computed_tokens : num_computed_tokens + n]; when that reaches the
end of token_ids, the step's logits give the next token. The same rule covers a prompt (whole or
in chunks), a decode step, a recompute after preemption, and a hand-off (KV for the prompt arrived
already; the prefill's first token is the next input).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gptoss_engine.block_manager import SeqBlocks
from gptoss_engine.types import FinishReason, SamplingParams, TokenOutput


# Overlap scheduling: the input a sequence's next step takes from the token its previous step is
# still drawing on the device (model_runner.build_batch fills it there; the engine overwrites it
# here once the draw is read back). Never a vocabulary id.
PENDING_TOKEN = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# eq=False: sequences compare by identity, so the scheduler's list `in`/remove never compares
# every field (token lists included) of the other sequences.
@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival: int                       # FCFS order (lower = older = higher priority)
    prefill_only: bool = False         # stop after the first token and stage the prompt's KV
    token_ids: list[int] = field(default_factory=list)
    outputs: list[TokenOutput] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0         # prompt tokens served by the prefix cache or a hand-off
    blocks: SeqBlocks = field(default_factory=SeqBlocks)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    num_pending: int = 0               # draws launched on the device and not read back yet

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_output(self, token: TokenOutput) -> None:
        self.outputs.append(token)
        self.token_ids.append(token.token_id)

    def check_finish(self, eos_token_ids: frozenset[int], max_model_len: int) -> FinishReason | None:
        """Why the sequence ends after its latest token (None: it goes on)."""
        s = self.sampling
        last = self.outputs[-1].token_id
        # Stop tokens are masked for outputs 0..min_tokens-1 (sampling.py), so none can end it earlier.
        if len(self.outputs) > s.min_tokens and (
                last in s.stop_token_ids or (not s.ignore_eos and last in eos_token_ids)):
            return FinishReason.STOP
        # Counted from the outputs, not token_ids: with overlap scheduling token_ids may already end
        # in the next step's PENDING_TOKEN.
        if len(self.outputs) >= s.max_tokens or self.num_prompt_tokens + len(self.outputs) >= max_model_len:
            return FinishReason.LENGTH
        return None
