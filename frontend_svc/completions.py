"""POST /v1/completions: a raw prompt (text or token ids), raw text out (no harmony parsing:
the caller wrote the prompt, so the caller owns the format). `echo` puts the prompt's text before
the completion's (with logprobs it would need the prompt's, which the workers do not compute)."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from . import errors
from .detokenize import decode_lossy
from .generation import AppState, Generation, check_model, make_sampling, require_workers
from .logprobs import completion_logprobs
from .openai_models import CompletionRequest


def prepare(state: AppState, req: CompletionRequest, request_id: str) -> Generation:
    check_model(state, req.model)
    try:
        stops = req.stop_list()
    except ValueError as e:
        raise errors.invalid(str(e), param="stop") from None
    if isinstance(req.prompt, str):
        prompt = list(state.enc.encode(req.prompt, allowed_special="all"))
    else:
        prompt = list(req.prompt)
    if not prompt:
        raise errors.invalid("prompt must not be empty", param="prompt")
    if req.echo and req.logprobs is not None:
        raise errors.invalid("echo with logprobs is not supported (no prompt logprobs)", param="echo")
    sampling = make_sampling(state, req, len(prompt), req.max_tokens, logprobs=req.logprobs is not None,
                             top_logprobs=req.logprobs or 0)
    require_workers(state)
    return Generation(state, request_id, prompt, sampling, stop=stops, parse=False)


def _body(gen: Generation, model: str, created: int, text: str, finish: str | None, usage: bool,
          logprobs: dict | None = None) -> dict:
    body = {"id": gen.request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}
    if usage:
        body["usage"] = gen.usage.chat()
    return body


def _logprobs(gen: Generation, tokens, text_offset: int) -> dict | None:
    s = gen.sampling
    return completion_logprobs(gen.state.enc, tokens, s.top_logprobs, text_offset) if s.logprobs else None


def _echo(gen: Generation, req: CompletionRequest) -> str:
    if not req.echo:
        return ""
    return req.prompt if isinstance(req.prompt, str) else decode_lossy(gen.state.enc, gen.prompt_ids)


async def complete(gen: Generation, req: CompletionRequest) -> dict:
    text = _echo(gen, req)
    tokens = []
    async for step in gen.steps():
        tokens += step.tokens
        text += "".join(d.text for d in step.deltas)
    return _body(gen, req.model, int(time.time()), text, gen.finish_reason, usage=True,
                 logprobs=_logprobs(gen, tokens, 0))


async def stream(gen: Generation, req: CompletionRequest) -> AsyncIterator[str]:
    model, include_usage = req.model, bool(req.stream_options and req.stream_options.include_usage)
    created = int(time.time())
    offset = 0
    echo = _echo(gen, req)
    if echo:
        yield f"data: {json.dumps(_body(gen, model, created, echo, None, False))}\n\n"
    try:
        async for step in gen.steps():
            text = "".join(d.text for d in step.deltas)
            logprobs = _logprobs(gen, step.tokens, offset) if step.tokens else None
            if text or logprobs:
                yield f"data: {json.dumps(_body(gen, model, created, text, None, False, logprobs))}\n\n"
            offset += len(text)
    except errors.ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield f"data: {json.dumps(_body(gen, model, created, '', gen.finish_reason, False))}\n\n"
    if include_usage:
        body = _body(gen, model, created, "", None, True)
        body["choices"] = []
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
