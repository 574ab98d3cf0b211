"""POST /v1/chat/completions: render, generate, parse; JSON or SSE (chat.completion.chunk)."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from . import errors
from .generation import AppState, Generation, check_model, make_sampling, require_workers
from .harmony_parse import Kind, ParsedCompletion
from .harmony_render import RenderError, ToolChoice, render_chat
from .logprobs import chat_logprobs
from .openai_models import ChatCompletionRequest


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def prepare(state: AppState, req: ChatCompletionRequest, request_id: str) -> Generation:
    check_model(state, req.model)
    try:
        stops = req.stop_list()
    except ValueError as e:
        raise errors.invalid(str(e), param="stop") from None
    tools = [t.function for t in req.tools or []]
    try:
        prompt = render_chat(state.enc, req.messages, tools, req.effort(), ToolChoice.of(req.tool_choice))
    except RenderError as e:
        raise errors.invalid(str(e), param=e.param) from None
    sampling = make_sampling(state, req, len(prompt.token_ids), req.requested_max_tokens(),
                             logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)
    require_workers(state)
    return Generation(state, request_id, prompt.token_ids, sampling, prompt.tool_names, stops,
                      forced_header=prompt.forced_header)


def _tool_call_json(c) -> dict:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _logprobs(gen: Generation, tokens) -> dict | None:
    s = gen.sampling
    return chat_logprobs(gen.state.enc, tokens, s.top_logprobs) if s.logprobs else None


async def complete(gen: Generation, model: str) -> dict:
    r = ParsedCompletion()   # from the deltas, which user stop strings have already cut
    tokens = []
    async for step in gen.steps():
        tokens += step.tokens
        for d in step.deltas:
            r.apply(d)
    message: dict = {"role": "assistant", "content": r.content or None}
    if r.reasoning:
        message["reasoning_content"] = r.reasoning
    if r.tool_calls:
        message["tool_calls"] = [_tool_call_json(c) for c in r.tool_calls]
    return {"id": gen.request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": gen.finish_reason,
                         "logprobs": _logprobs(gen, tokens)}],
            "usage": gen.usage.chat()}


async def stream(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": gen.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    yield sse(chunk({"role": "assistant", "content": ""}))
    try:
        async for step in gen.steps():
            # A step's logprobs ride on an empty delta of their own: a step may carry tokens
            # (harmony headers) and no text, or text for several deltas.
            if step.tokens and gen.sampling.logprobs:
                yield sse(chunk({}, logprobs=_logprobs(gen, step.tokens)))
            for d in step.deltas:
                if d.kind is Kind.CONTENT:
                    yield sse(chunk({"content": d.text}))
                elif d.kind is Kind.REASONING:
                    yield sse(chunk({"reasoning_content": d.text}))
                elif d.call_id is not None:
                    yield sse(chunk({"tool_calls": [{"index": d.tool_index, "id": d.call_id, "type": "function",
                                                     "function": {"name": d.name, "arguments": ""}}]}))
                else:
                    yield sse(chunk({"tool_calls": [{"index": d.tool_index, "function": {"arguments": d.text}}]}))
    except errors.ApiError as e:   # headers are gone: the error becomes an event
        yield sse(e.body())
        yield "data: [DONE]\n\n"
        return
    yield sse(chunk({}, gen.finish_reason))
    if include_usage:
        yield sse({"id": gen.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": gen.usage.chat()})
    yield "data: [DONE]\n\n"

