"""One generation as the endpoints see it: sampling checks, the token stream from the workers,
the harmony parser over it, user stop strings on the final content, usage and latency metrics.

Model stop tokens are the workers' business (and the parser's: the turn ends at <|return|> or
<|call|>); user `stop` strings are applied here, to content text only, and never become stop
token ids (pitfall: harmony stops in the user's list made ignore_eos stop early).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gptoss_engine.types import InvalidRequest, SamplingParams, TokenOutput

from . import errors
from .detokenize import Detokenizer
from .harmony_parse import Delta, HarmonyParser, HarmonySpecials, Kind
from .metrics import Metrics
from .pipeline import GenerateRequest, TokenSource
from .workers import DECODE


@dataclass
class AppState:
    enc: object
    specials: HarmonySpecials
    source: TokenSource
    metrics: Metrics
    served_model_name: str
    context_length: int


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    def chat(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def check_model(state: AppState, model: str) -> None:
    if model != state.served_model_name:
        raise errors.ApiError(404, f"The model `{model}` does not exist (this server serves "
                                   f"`{state.served_model_name}`)", param="model", code="model_not_found")


def make_sampling(state: AppState, req, prompt_len: int, max_tokens: int | None, logprobs: bool = False,
                  top_logprobs: int = 0) -> SamplingParams:
    # The live workers' own limit when they publish one (a worker may run with --max-model-len
    # below the model's): a prompt they cannot take is the client's 400, not a worker error.
    # Never above the model's (config.json): no worker can go past that either.
    ctx = min(state.context_length, state.source.context_limit(prompt_len) or state.context_length)
    if prompt_len >= ctx:
        raise errors.invalid(f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len}.",
                             param="messages", code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > ctx:
        raise errors.invalid(f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len} "
                             f"and max_tokens asks for {max_tokens} more.", param="max_tokens",
                             code="context_length_exceeded")
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.effective_top_k(), seed=req.seed,
        max_tokens=max_tokens if max_tokens is not None else ctx - prompt_len,
        min_tokens=req.effective_min_tokens(), ignore_eos=req.effective_ignore_eos(),
        logprobs=logprobs, top_logprobs=top_logprobs)
    try:
        params.validate()
    except InvalidRequest as e:
        raise errors.invalid(str(e)) from None
    return params


def require_workers(state: AppState) -> None:
    if not state.source.components().get(DECODE):
        raise errors.unavailable("no decode/aggregated worker is registered")


class StopStrings:
    """Cut content at the first user stop string; holds back a possible partial match."""

    def __init__(self, stops: list[str]):
        self._stops = stops
        self._keep = max((len(s) for s in stops), default=1) - 1
        self._held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self._stops:
            return text
        self._held += text
        cuts = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if cuts:
            out, self._held, self.hit = self._held[:min(cuts)], "", True
            return out
        n = max(0, len(self._held) - self._keep)
        out, self._held = self._held[:n], self._held[n:]
        return out

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


@dataclass
class Step:
    deltas: list[Delta]
    tokens: list[TokenOutput] = field(default_factory=list)


class Generation:
    """Iterate `steps()`; afterwards `finish_reason` and `usage` are set."""

    def __init__(self, state: AppState, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                 tool_names=(), stop: list[str] | None = None, parse: bool = True, forced_header=()):
        self.state = state
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.parser = HarmonyParser(state.enc, state.specials, tool_names, forced_header) if parse else None
        self._text = Detokenizer(state.enc)   # the raw (parse=False) path's text
        self._stops = StopStrings(stop or [])
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.finish_reason: str | None = None

    def _filter(self, deltas: list[Delta]) -> list[Delta]:
        out = []
        for d in deltas:
            if self._stops.hit:
                break
            if d.kind is Kind.CONTENT:
                d = Delta(Kind.CONTENT, self._stops.push(d.text))
                if not d.text:
                    continue
            out.append(d)
        return out

    async def steps(self) -> AsyncIterator[Step]:
        m = self.state.metrics
        req = GenerateRequest(self.request_id, self.prompt_ids, self.sampling, self.state.served_model_name)
        t_start = last = time.monotonic()
        worker_finish = None
        m.queued.inc()
        queued = True
        stream = self.state.source.generate(req)
        try:
            async for chunk in stream:
                now = time.monotonic()
                if queued and chunk.tokens:
                    m.queued.dec()
                    queued = False
                    m.ttft.observe(now - t_start)
                elif chunk.tokens:
                    m.itl.observe(now - last)
                last = now
                self.usage.completion_tokens += len(chunk.tokens)
                self.usage.cached_tokens = chunk.num_cached_tokens
                m.output_tokens.inc(len(chunk.tokens))
                ids = [t.token_id for t in chunk.tokens]
                if self.parser is not None:
                    deltas = self._filter(self.parser.feed_many(ids))
                else:
                    deltas = self._filter([Delta(Kind.CONTENT, self._text.push(ids))])
                yield Step(deltas, chunk.tokens)
                worker_finish = chunk.finish_reason
                if worker_finish is not None or self._stops.hit or self._turn_over():
                    break
        finally:
            if queued:
                m.queued.dec()
            await stream.aclose()   # cancels the worker calls when we stopped early
        tail = self._filter(self.parser.flush() if self.parser is not None
                            else [Delta(Kind.CONTENT, self._text.flush())])
        if not self._stops.hit:
            rest = self._stops.flush()
            if rest:
                tail.append(Delta(Kind.CONTENT, rest))
        if tail:
            yield Step(tail)
        self.finish_reason = self._finish(worker_finish)

    def _turn_over(self) -> bool:
        """Stop reading once the harmony turn is over, unless the client asked to run on."""
        return (self.parser is not None and self.parser.finished and not self.sampling.ignore_eos
                and self.usage.completion_tokens >= self.sampling.min_tokens)

    def _finish(self, worker_finish: str | None) -> str:
        # Cut by max_tokens before the turn ended (or run on to it under ignore_eos): "length",
        # also in the middle of a tool call, whose arguments are then incomplete.
        cut = worker_finish == "length" and not (self.parser is not None and self.parser.finished
                                                 and not self.sampling.ignore_eos)
        if self.parser is not None and self.parser.has_tool_calls and not cut:
            return "tool_calls"
        if self._stops.hit:
            return "stop"
        return "length" if cut else "stop"
