"""`LLMEngine`: the synchronous engine: schedule -> run -> postprocess, one step at a time.

Not thread-safe: one thread owns it (AsyncEngine's engine thread, or a plain script via generate()).

Overlap scheduling (EngineConfig.overlap_scheduler, on by default on CUDA): step() schedules and
launches step N+1 *before* it reads back step N's tokens, so the host's scheduling, batch building
and bookkeeping run while the device computes. A sequence that drew a token in step N takes it as
its step-N+1 input straight from the device (a PENDING_TOKEN placeholder in its token_ids until
the read-back overwrites it). The costs: each token reaches the caller one step later, and a
sequence that stops on a stop/EOS token in step N has already been given one more decode row in
step N+1, whose draw is dropped (a length limit is known in advance and costs nothing).
Blocks: a sequence that ends (or is aborted) while step N+1 is in flight frees its blocks at once;
they can only be handed to steps launched later, which the device runs after step N+1 (one
stream), so N+1's KV writes into them never race with their next owner.

Disaggregation hooks: a prefill-only request stops after its first token and *stages* its prompt's
KV (blocks pinned under a handle until release_staged); reserve_kv / add_request_from_kv let a
decode engine receive such KV into reserved blocks and continue from it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable
from typing import Sequence as Seq

from gptoss_engine.block_manager import BlockManager, StagedKV
from gptoss_engine.config import EngineConfig
from gptoss_engine.kv_layout import KVCache, KVLayout
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.model_runner import LaunchedStep, ModelRunner
from gptoss_engine.scheduler import ScheduledSeq, Scheduler
from gptoss_engine.sequence import PENDING_TOKEN, Sequence, SeqStatus
from gptoss_engine.types import FinishReason, InvalidRequest, RequestOutput, SamplingParams, TokenOutput


@dataclass(frozen=True)
class EngineStats:
    num_free_blocks: int
    num_total_blocks: int
    num_free_swa_blocks: int
    num_total_swa_blocks: int
    num_running: int
    num_waiting: int
    num_staged: int
    num_reserved: int


@dataclass
class PrefillResult:
    first: TokenOutput
    finish_reason: FinishReason | None   # set: the first token already ended the request (nothing staged)
    staged: StagedKV | None
    num_cached_tokens: int


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason
    tokens: list[TokenOutput] = field(default_factory=list)  # with logprobs when asked for
    num_cached_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, model: GptOssForCausalLM | None = None) -> None:
        self.config = config
        self.runner = ModelRunner(config, model)
        mc = self.runner.model_config
        if config.max_model_len is not None and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {mc.max_position_embeddings}")
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        kv = self.runner.kv_cache
        self.block_manager = BlockManager(kv.num_full_blocks, kv.num_swa_blocks, config.block_size,
                                          mc.sliding_window if mc.num_swa_layers else None,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_tokens, config.max_batch_size,
                                   config.enable_chunked_prefill)
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._arrival = itertools.count()
        self._prefill_results: dict[str, PrefillResult] = {}
        self.overlap = (self.runner.device.type == "cuda") if config.overlap_scheduler is None else config.overlap_scheduler
        self._inflight: _Inflight | None = None   # overlap: the launched step not read back yet

    # ---- read-only views (safe from any thread: fixed after construction) ------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self.runner.model_config

    @property
    def kv_cache(self) -> KVCache:
        return self.runner.kv_cache

    @property
    def layout(self) -> KVLayout:
        return self.runner.layout

    def validate(self, prompt_token_ids: Seq[int], sampling: SamplingParams) -> None:
        """Raise InvalidRequest for a request this engine can never serve (pure: any thread)."""
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequest(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        sampling.validate()
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("prompt is empty")
        if n > self.max_model_len - 1:
            raise InvalidRequest(f"prompt has {n} tokens; the limit is {self.max_model_len - 1} "
                                 f"(max_model_len {self.max_model_len} minus one generated token)")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        for stop in sampling.stop_token_ids:
            if not 0 <= stop < vocab:
                raise InvalidRequest(f"stop_token_ids must be in [0, {vocab}); got {stop}")
        total = min(n + sampling.max_tokens, self.max_model_len)
        if not self.config.enable_chunked_prefill and total > self.config.max_num_tokens:
            raise InvalidRequest(f"prompt + max_tokens = {total} tokens exceeds max_num_tokens "
                                 f"{self.config.max_num_tokens} and chunked prefill is off")
        bm, bs = self.block_manager, self.config.block_size
        need_full = bm.num_blocks(total)
        need_swa = 0
        if bm.window is not None:
            chunk = min(total, self.config.max_num_tokens)
            if self.config.enable_chunked_prefill:  # the scheduler caps chunks to fit the sliding pool
                chunk = min(chunk, max(1, bm.max_swa_chunk() or 1))
            need_swa = min(need_full, -(-(bm.window - 1 + chunk) // bs) + 1)
        if need_full > bm.full.num_blocks or need_swa > bm.swa.num_blocks:
            raise InvalidRequest(f"request needs up to {need_full} full + {need_swa} sliding KV blocks "
                                 f"({total} tokens); the cache has {bm.full.num_blocks} + {bm.swa.num_blocks}")

    # ---- requests --------------------------------------------------------------------------------
    def _new_seq(self, request_id: str, prompt_token_ids: Seq[int], sampling: SamplingParams | None,
                 prefill_only: bool) -> Sequence:
        sampling = sampling if sampling is not None else SamplingParams()
        self.validate(prompt_token_ids, sampling)
        if request_id in self._seqs:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        seq = Sequence(request_id, list(prompt_token_ids), sampling, next(self._arrival), prefill_only)
        self._seqs[request_id] = seq
        return seq

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], sampling: SamplingParams | None = None,
                    *, prefill_only: bool = False) -> None:
        """Queue a request. prefill_only: compute the prompt and the first token, then stage the KV;
        the result comes from pop_prefill_results(), not from step()."""
        self.scheduler.add_waiting(self._new_seq(request_id, prompt_token_ids, sampling, prefill_only))

    def add_request_from_kv(self, request_id: str, prompt_token_ids: Seq[int], first: TokenOutput,
                            reservation: StagedKV, sampling: SamplingParams | None = None) -> RequestOutput | None:
        """Continue a request whose prompt KV sits in `reservation` and whose output token 0 is `first`.

        On success the blocks belong to the sequence (freed when it ends). Returns the final output
        right away if `first` already ends the request (blocks freed); raises InvalidRequest before
        taking anything (the reservation stays the caller's)."""
        if reservation.num_tokens != len(prompt_token_ids):
            raise InvalidRequest(f"reservation holds {reservation.num_tokens} tokens of KV, "
                                 f"the prompt has {len(prompt_token_ids)}")
        if not 0 <= first.token_id < self.model_config.vocab_size:
            raise InvalidRequest(f"first token id {first.token_id} is outside the vocabulary")
        seq = self._new_seq(request_id, prompt_token_ids, sampling, False)
        self.block_manager.adopt(seq.blocks, reservation.handle)
        seq.num_computed_tokens = reservation.num_tokens
        seq.append_output(first)
        # The received KV is written: hash it so later prompts can reuse it here too.
        self.block_manager.commit(seq.blocks, seq.token_ids, seq.num_computed_tokens)
        reason = seq.check_finish(self.eos_token_ids, self.max_model_len)
        if reason is not None:
            self._finish(seq)
            return RequestOutput(request_id, [], reason, seq.num_prompt_tokens, 0)
        self.scheduler.add_running(seq)
        return None

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq)
        return RequestOutput(request_id, [], FinishReason.ABORT, seq.num_prompt_tokens, seq.num_cached_tokens)

    def request_ids(self) -> list[str]:
        return list(self._seqs)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        del self._seqs[seq.request_id]

    def pop_prefill_results(self) -> dict[str, PrefillResult]:
        """Results of prefill-only requests that finished since the last call (their staged KV is
        the caller's to release)."""
        results, self._prefill_results = self._prefill_results, {}
        return results

    # ---- staging / reservations -----------------------------------------------------------------
    def release_staged(self, handle: int) -> bool:
        return self.block_manager.release_staged(handle)

    def reserve_kv(self, num_tokens: int) -> StagedKV:
        """Raises NoKVCapacity when the blocks are not free now."""
        if not 1 <= num_tokens <= self.max_model_len - 1:
            raise InvalidRequest(f"num_tokens must be in [1, {self.max_model_len - 1}], got {num_tokens}")
        return self.block_manager.reserve(num_tokens)

    def free_reservation(self, reservation: StagedKV) -> bool:
        return self.block_manager.free_reservation(reservation.handle)

    # ---- the loop --------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def step(self, on_launched: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One scheduled forward and the bookkeeping of a step's tokens: this step's, or with
        overlap scheduling the previous step's (read back after this one is launched).
        on_launched: see ModelRunner.launch (not called when nothing was scheduled)."""
        sched = self.scheduler.schedule()
        launched = self._launch(sched.scheduled, on_launched) if sched.scheduled else None
        if not self.overlap:
            return self._complete(launched) if launched is not None else []
        done, self._inflight = self._inflight, launched
        return self._complete(done) if done is not None else []

    def _launch(self, scheduled: list[ScheduledSeq], on_launched: Callable[[], None] | None) -> _Inflight:
        prev = self._inflight.step if self._inflight is not None else None
        step = self.runner.launch(scheduled, self.block_manager.tables, prev, on_launched)
        computed: list[int] = []
        fill_at: dict[Sequence, int] = {}
        for s in scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_tokens
            computed.append(seq.num_computed_tokens)
            if seq not in step.row_of:
                continue
            seq.num_pending += 1
            if self.overlap and self._continues(seq):
                # The next step may compute this token before it is read back (see the module doc).
                fill_at[seq] = len(seq.token_ids)
                seq.token_ids.append(PENDING_TOKEN)
        return _Inflight(step, computed, fill_at)

    def _continues(self, seq: Sequence) -> bool:
        """Whether a sequence with its draws in flight may go on unless one of them is a stop token:
        a prefill-only request ends at its first token, a length limit is known in advance."""
        produced = len(seq.outputs) + seq.num_pending
        return (not seq.prefill_only and produced < seq.sampling.max_tokens
                and seq.num_prompt_tokens + produced < self.max_model_len)

    def _complete(self, inflight: _Inflight) -> list[RequestOutput]:
        """Read a launched step's tokens back and do its bookkeeping."""
        tokens = inflight.step.resolve()
        outputs: list[RequestOutput] = []
        for s, computed, tok in zip(inflight.step.scheduled, inflight.computed, tokens):
            seq = s.seq
            if seq.status is SeqStatus.FINISHED:
                continue   # ended or aborted while this step was in flight: its draw is dropped
            if seq.status is SeqStatus.RUNNING and seq.num_computed_tokens >= computed:  # (not preempted since)
                # The step's KV is written now (its draws were waited for): hash the full blocks.
                self.block_manager.commit(seq.blocks, seq.token_ids, computed)
            if tok is None:
                continue
            seq.num_pending -= 1
            at = inflight.fill_at.get(seq)
            if at is None:
                seq.append_output(tok)
            else:
                seq.outputs.append(tok)
                seq.token_ids[at] = tok.token_id
            reason = seq.check_finish(self.eos_token_ids, self.max_model_len)
            if seq.prefill_only:
                # The prompt's KV (positions < prompt length) moves to a staged entry, pinned until
                # release_staged; nothing is staged when the first token already ends the request.
                staged = None if reason is not None else self.block_manager.stage(seq.blocks, seq.num_prompt_tokens)
                self._prefill_results[seq.request_id] = PrefillResult(tok, reason, staged, seq.num_cached_tokens)
                self._finish(seq)
                continue
            outputs.append(RequestOutput(seq.request_id, [tok], reason, seq.num_prompt_tokens, seq.num_cached_tokens))
            if reason is not None:
                self._finish(seq)
        return outputs

    def stats(self) -> EngineStats:
        c = self.block_manager.counts()
        return EngineStats(c.num_free_full, c.num_total_full, c.num_free_swa, c.num_total_swa,
                           len(self.scheduler.running), len(self.scheduler.waiting), c.num_staged, c.num_reserved)

    def generate(self, prompts: list[list[int]],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationResult]:
        """Run these prompts to completion (batched) and return one result per prompt, in order."""
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest(f"{len(params)} sampling params for {len(prompts)} prompts")
        for p, s in zip(prompts, params):
            self.validate(p, s)
        base = f"generate-{next(self._arrival)}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        collected: dict[str, list[TokenOutput]] = {rid: [] for rid in ids}
        results: dict[str, GenerationResult] = {}
        for rid, p, s in zip(ids, prompts, params):
            self.add_request(rid, p, s)
        try:
            while len(results) < len(ids):
                for out in self.step():
                    if out.request_id not in collected:
                        continue
                    collected[out.request_id] += out.tokens
                    if out.finish_reason is not None:
                        toks = collected[out.request_id]
                        results[out.request_id] = GenerationResult(
                            out.request_id, [t.token_id for t in toks], out.finish_reason, toks, out.num_cached_tokens)
        finally:
            for rid in ids:
                if rid not in results:
                    self.abort_request(rid)
        return [results[rid] for rid in ids]


@dataclass
class _Inflight:
    """A launched step and what its read-back needs: each scheduled sequence's computed-token count
    at the end of the step, and where in token_ids a PENDING_TOKEN awaits the draw."""
    step: LaunchedStep
    computed: list[int]
    fill_at: dict[Sequence, int]
