"""POST /v1/responses: the Responses API over the same render -> generate -> parse path.

Output items: `reasoning` (analysis + preambles), `message` (final content), `function_call`.
Streaming emits OpenAI's event sequence: response.created, response.in_progress, then per item
output_item.added / (content_part.added) / *.delta / *.done / output_item.done, and
response.completed (or response.incomplete when max_output_tokens cut it; response.failed on a
worker error after the stream began).
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from . import errors
from .generation import AppState, Generation, check_model, make_sampling, require_workers
from .harmony_parse import Delta, Kind
from .harmony_render import RenderError, ToolChoice, render_chat
from .openai_models import ChatMessage, ResponsesRequest, ToolCallFunction, ToolCallIn


def to_chat_messages(req: ResponsesRequest) -> list[ChatMessage]:
    msgs: list[ChatMessage] = []
    if req.instructions:
        msgs.append(ChatMessage(role="developer", content=req.instructions))
    if isinstance(req.input, str):
        msgs.append(ChatMessage(role="user", content=req.input))
        return msgs
    for i, item in enumerate(req.input):
        if item.type == "message":
            if item.role is None:
                raise errors.invalid("message items need a role", param=f"input[{i}].role")
            msgs.append(ChatMessage(role=item.role, content=item.content))
        elif item.type == "function_call":
            call = ToolCallIn(id=item.call_id, function=ToolCallFunction(name=item.name or "", arguments=item.arguments or ""))
            if msgs and msgs[-1].role == "assistant" and not msgs[-1].text():
                msgs[-1].tool_calls = (msgs[-1].tool_calls or []) + [call]
            else:
                msgs.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif item.type == "function_call_output":
            msgs.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=item.output or ""))
        else:
            raise errors.invalid(f"unsupported input item type {item.type!r}", param=f"input[{i}].type")
    return msgs


def prepare(state: AppState, req: ResponsesRequest, request_id: str) -> Generation:
    check_model(state, req.model)
    try:
        stops = req.stop_list()
    except ValueError as e:
        raise errors.invalid(str(e), param="stop") from None
    tools = [t.as_function() for t in req.tools or []]
    effort = req.reasoning.effort if req.reasoning else None
    try:
        prompt = render_chat(state.enc, to_chat_messages(req), tools, effort, ToolChoice.of(req.tool_choice))
    except RenderError as e:
        raise errors.invalid(str(e).replace("messages", "input"), param=e.param.replace("messages", "input")) from None
    sampling = make_sampling(state, req, len(prompt.token_ids), req.max_output_tokens)
    require_workers(state)
    return Generation(state, request_id, prompt.token_ids, sampling, prompt.tool_names, stops,
                      forced_header=prompt.forced_header)


def _usage(gen: Generation) -> dict:
    u = gen.usage
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _envelope(gen: Generation, req: ResponsesRequest, created: int, status: str, output: list) -> dict:
    incomplete = status == "incomplete"
    return {"id": gen.request_id, "object": "response", "created_at": created, "status": status,
            "model": req.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": False,
            "tool_choice": (req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel)
                            else req.tool_choice or "auto"),
            "tools": [t.model_dump() for t in req.tools or []],
            "temperature": req.temperature, "top_p": req.top_p,
            "usage": _usage(gen) if status != "in_progress" else None}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _status(gen: Generation) -> str:
    return "incomplete" if gen.finish_reason == "length" else "completed"


class _Item:
    """One output item being built (streaming and not)."""

    def __init__(self, kind: Kind, delta: Delta):
        self.kind = kind
        self.text = ""
        self.call_id = delta.call_id
        self.name = delta.name
        self.id = _new_id({Kind.REASONING: "rs", Kind.CONTENT: "msg", Kind.TOOL_CALL: "fc"}[kind])

    def json(self, status: str) -> dict:
        if self.kind is Kind.REASONING:
            return {"type": "reasoning", "id": self.id, "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": self.text}]}
        if self.kind is Kind.CONTENT:
            return {"type": "message", "id": self.id, "status": status, "role": "assistant",
                    "content": [self.part()] if status == "completed" else []}
        return {"type": "function_call", "id": self.id, "call_id": self.call_id, "name": self.name,
                "arguments": self.text, "status": status}

    def part(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": []}


def _starts_new_item(cur: _Item | None, d: Delta) -> bool:
    return cur is None or cur.kind is not d.kind or (d.kind is Kind.TOOL_CALL and d.call_id is not None)


async def complete(gen: Generation, req: ResponsesRequest) -> dict:
    created = int(time.time())
    items: list[_Item] = []
    async for step in gen.steps():
        for d in step.deltas:
            if _starts_new_item(items[-1] if items else None, d):
                items.append(_Item(d.kind, d))
            items[-1].text += d.text
    return _envelope(gen, req, created, _status(gen), [i.json("completed") for i in items])


async def stream(gen: Generation, req: ResponsesRequest) -> AsyncIterator[str]:
    created = int(time.time())
    seq = 0
    items: list[_Item] = []

    def ev(type_: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return f"event: {type_}\ndata: {json.dumps({'type': type_, 'sequence_number': seq - 1, **fields}, ensure_ascii=False)}\n\n"

    def close(item: _Item, idx: int) -> list[str]:
        out = []
        if item.kind is Kind.CONTENT:
            out.append(ev("response.output_text.done", item_id=item.id, output_index=idx, content_index=0, text=item.text))
            out.append(ev("response.content_part.done", item_id=item.id, output_index=idx, content_index=0, part=item.part()))
        elif item.kind is Kind.REASONING:
            out.append(ev("response.reasoning_text.done", item_id=item.id, output_index=idx, content_index=0, text=item.text))
        else:
            out.append(ev("response.function_call_arguments.done", item_id=item.id, output_index=idx, arguments=item.text))
        out.append(ev("response.output_item.done", output_index=idx, item=item.json("completed")))
        return out

    yield ev("response.created", response=_envelope(gen, req, created, "in_progress", []))
    yield ev("response.in_progress", response=_envelope(gen, req, created, "in_progress", []))
    try:
        async for step in gen.steps():
            for d in step.deltas:
                if _starts_new_item(items[-1] if items else None, d):
                    if items:
                        for e in close(items[-1], len(items) - 1):
                            yield e
                    items.append(_Item(d.kind, d))
                    idx = len(items) - 1
                    yield ev("response.output_item.added", output_index=idx, item=items[-1].json("in_progress"))
                    if d.kind is Kind.CONTENT:
                        yield ev("response.content_part.added", item_id=items[-1].id, output_index=idx,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                item, idx = items[-1], len(items) - 1
                if not d.text:
                    continue
                item.text += d.text
                if d.kind is Kind.CONTENT:
                    yield ev("response.output_text.delta", item_id=item.id, output_index=idx, content_index=0, delta=d.text)
                elif d.kind is Kind.REASONING:
                    yield ev("response.reasoning_text.delta", item_id=item.id, output_index=idx, content_index=0, delta=d.text)
                else:
                    yield ev("response.function_call_arguments.delta", item_id=item.id, output_index=idx, delta=d.text)
    except errors.ApiError as e:
        failed = _envelope(gen, req, created, "failed", [i.json("incomplete") for i in items])
        failed["error"] = {"code": e.code or "server_error", "message": e.message}
        yield ev("response.failed", response=failed)
        return
    if items:
        for e in close(items[-1], len(items) - 1):
            yield e
    status = _status(gen)
    yield ev("response.completed" if status == "completed" else "response.incomplete",
             response=_envelope(gen, req, created, status, [i.json("completed") for i in items]))
