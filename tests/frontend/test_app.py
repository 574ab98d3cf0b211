"""The HTTP layer over a scripted token source (isolates the app from workers): shapes of chat,
responses, completions (JSON and SSE), errors as OpenAI JSON, auth, in-flight limit, health."""
from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import pytest

from frontend_svc.app import create_app
from frontend_svc.config import FrontendConfig
from frontend_svc.pipeline import TokenChunk
from gptoss_engine.types import TokenOutput

MODEL = "openai/gpt-oss-120b"
HEALTH_TOOL = {"type": "function", "function": {"name": "get_system_health", "description": "health",
                                                "parameters": {"type": "object", "properties": {}}}}


@dataclass
class Rec:
    instance_id: int
    grpc_address: str
    role: str = "aggregated"


class Scripted:
    """Answers every request with the same harmony text, a few tokens per chunk."""

    def __init__(self, enc, text: str, finish: str = "stop", workers: bool = True, per_chunk: int = 3):
        self.ids = enc.encode(text, allowed_special="all")
        self.per_chunk = per_chunk
        self.finish = finish
        self.workers = workers
        self.requests = []

    def components(self):
        return {"backend": [Rec(7, "127.0.0.1:1")] if self.workers else [], "prefill": []}

    def context_limit(self, num_prompt_tokens):
        return None   # the workers publish no limit: the frontend's config.json one applies

    async def generate(self, req):
        self.requests.append(req)
        ids = self.ids[:req.sampling.max_tokens]
        n = self.per_chunk
        for i in range(0, len(ids), n):
            last = i + n >= len(ids)
            yield TokenChunk([TokenOutput(t) for t in ids[i:i + n]],
                             (self.finish if len(ids) == len(self.ids) else "length") if last else None)


def client(enc, text="<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hello there.<|return|>",
           **cfg):
    src = Scripted(enc, text, workers=cfg.pop("workers", True), per_chunk=cfg.pop("per_chunk", 3))
    app = create_app(FrontendConfig(**cfg), src)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t"), src


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, **kw}


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


async def test_chat_non_stream(enc):
    c, src = client(enc)
    r = await c.post("/v1/chat/completions", json=chat_body(reasoning_effort="high", seed=3, top_k=5,
                                                            nvext={"ignore_eos": True}, min_tokens=2))
    assert r.status_code == 200, r.text
    b = r.json()
    msg = b["choices"][0]["message"]
    assert msg["content"] == "Hello there." and msg["reasoning_content"] == "Think."
    assert b["choices"][0]["finish_reason"] == "stop"
    assert b["usage"]["completion_tokens"] == len(src.ids)
    s = src.requests[0].sampling
    assert (s.seed, s.top_k, s.ignore_eos, s.min_tokens, s.max_tokens) == (3, 5, True, 2, 100)
    assert s.stop_token_ids == ()   # model stops never join the user's list


async def test_chat_stream_with_usage(enc):
    c, _ = client(enc)
    r = await c.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    ev = sse_events(r.text)
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in ev if e["choices"])
    reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content") or "" for e in ev if e["choices"])
    assert (content, reasoning) == ("Hello there.", "Think.")
    assert [e["choices"][0]["finish_reason"] for e in ev if e["choices"]][-1] == "stop"
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["total_tokens"] > 0


async def test_chat_tool_call_and_stop_string(enc):
    text = ("<|channel|>analysis<|message|>Use tool.<|end|><|start|>assistant to=functions.get_system_health"
            "<|channel|>commentary <|constrain|>json<|message|>{}<|call|>")
    c, _ = client(enc, text)
    b = (await c.post("/v1/chat/completions", json=chat_body(tools=[HEALTH_TOOL]))).json()
    ch = b["choices"][0]
    assert ch["finish_reason"] == "tool_calls"
    assert ch["message"]["tool_calls"][0]["function"] == {"name": "get_system_health", "arguments": "{}"}
    r = await c.post("/v1/chat/completions", json=chat_body(tools=[HEALTH_TOOL], stream=True))
    ev = sse_events(r.text)
    calls = [tc for e in ev for tc in e["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_system_health" and calls[0]["id"].startswith("call_")
    assert ev[-1]["choices"][0]["finish_reason"] == "tool_calls"
    c2, _ = client(enc)
    b = (await c2.post("/v1/chat/completions", json=chat_body(stop=[" there"]))).json()
    assert b["choices"][0]["message"]["content"] == "Hello" and b["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
async def test_forced_tool_call(enc, endpoint):
    """tool_choice names a function: the prompt ends in that call's header, so the model writes
    only the arguments; the answer is a tool call of that name."""
    c, src = client(enc, '{"city": "Paris"}<|call|>')
    forced = " to=functions.get_system_health<|channel|>commentary <|constrain|>json<|message|>"
    if endpoint == "chat":
        named = {"type": "function", "function": {"name": "get_system_health"}}
        body = chat_body(tools=[HEALTH_TOOL], tool_choice=named)
        ch = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert ch["finish_reason"] == "tool_calls"
        assert ch["message"]["tool_calls"][0]["function"] == {"name": "get_system_health",
                                                              "arguments": '{"city": "Paris"}'}
        ev = sse_events((await c.post("/v1/chat/completions", json={**body, "stream": True})).text)
        calls = [tc for e in ev for tc in e["choices"][0]["delta"].get("tool_calls") or []]
        assert calls[0]["function"]["name"] == "get_system_health"
        assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
        # cut by max_tokens inside the arguments: an incomplete call is "length", not "tool_calls"
        ch = (await c.post("/v1/chat/completions", json={**body, "max_tokens": 2})).json()["choices"][0]
        cut = ch["message"]["tool_calls"][0]["function"]["arguments"]
        assert ch["finish_reason"] == "length"
        assert cut and '{"city": "Paris"}'.startswith(cut) and cut != '{"city": "Paris"}'
    else:
        tool = {"type": "function", **HEALTH_TOOL["function"]}
        choice = {"type": "function", "name": "get_system_health"}
        b = (await c.post("/v1/responses", json={"model": MODEL, "input": "up?", "tools": [tool],
                                                 "tool_choice": choice})).json()
        assert [(o["type"], o.get("name"), o.get("arguments")) for o in b["output"]] == [
            ("function_call", "get_system_health", '{"city": "Paris"}')]
        assert b["tool_choice"] == choice
    assert enc.decode(src.requests[-1].prompt_ids).endswith("<|start|>assistant" + forced)


async def test_tool_choice_errors(enc):
    c, _ = client(enc)
    for choice in ({"type": "function", "function": {"name": "other"}}, "sometimes"):
        r = await c.post("/v1/chat/completions", json=chat_body(tools=[HEALTH_TOOL], tool_choice=choice))
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.json()
    r = await c.post("/v1/responses", json={"model": MODEL, "input": "x", "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


async def test_responses_non_stream_and_stream(enc):
    c, _ = client(enc)
    body = {"model": MODEL, "input": "Explain disaggregated serving in 3 sentences.", "max_output_tokens": 200,
            "stream": False}
    b = (await c.post("/v1/responses", json=body)).json()
    assert b["object"] == "response" and b["status"] == "completed"
    assert [o["type"] for o in b["output"]] == ["reasoning", "message"]
    assert b["output"][1]["content"][0]["text"] == "Hello there."
    r = await c.post("/v1/responses", json={**body, "stream": True})
    types = [e["type"] for e in sse_events(r.text)]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types and "response.reasoning_text.delta" in types


async def test_completions_text_and_ids(enc):
    c, src = client(enc, "plain words here")
    b = (await c.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 50})).json()
    assert b["choices"][0]["text"] == "plain words here"
    b = (await c.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2})).json()
    assert b["choices"][0]["finish_reason"] == "length" and src.requests[-1].prompt_ids == [1, 2, 3]


async def test_completions_echo(enc):
    c, _ = client(enc, " and on.")
    body = {"model": MODEL, "prompt": "Once upon 🎉", "max_tokens": 50, "echo": True}
    assert (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"] == "Once upon 🎉 and on."
    ids = {**body, "prompt": enc.encode("Once upon")}
    assert (await c.post("/v1/completions", json=ids)).json()["choices"][0]["text"] == "Once upon and on."
    events = sse_events((await c.post("/v1/completions", json={**body, "stream": True})).text)
    assert events[0]["choices"][0]["text"] == "Once upon 🎉"
    assert "".join(e["choices"][0]["text"] for e in events) == "Once upon 🎉 and on."
    r = await c.post("/v1/completions", json={**body, "logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


async def test_completions_keep_characters_split_across_chunks(enc):
    """' 🎉' is two tokens; streamed one token a chunk, neither half may go out as U+FFFD."""
    text = "Party 🎉 time, 日本語のテキスト, café 👍🏽!"
    assert any("\ufffd" in enc.decode([t]) for t in enc.encode(text))   # the premise: split characters
    c, _ = client(enc, text, per_chunk=1)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 100}
    assert (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"] == text
    events = sse_events((await c.post("/v1/completions", json={**body, "stream": True})).text)
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
])
async def test_bad_requests_are_400_with_param(enc, body, param):
    c, _ = client(enc)
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


async def test_malformed_json_unknown_model_context_length(enc):
    c, _ = client(enc, context_length=64)
    r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = await c.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await c.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "word " * 200}]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_context_limit_of_the_workers_wins(enc):
    c, src = client(enc)   # config.json's limit is 131072
    src.context_limit = lambda n: 120   # the live workers run with --max-model-len 120
    r = await c.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "word " * 200}]))
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "120 tokens" in err["message"]
    body = chat_body()
    del body["max_tokens"]
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    s = src.requests[-1]
    assert s.sampling.max_tokens == 120 - len(s.prompt_ids)   # the remaining context


async def test_no_workers_503_and_health(enc):
    c, _ = client(enc, workers=False)
    r = await c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["message"]
    h = await c.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "unhealthy"
    c, _ = client(enc, namespace="dynamo")
    h = (await c.get("/health")).json()
    assert h["status"] == "healthy" and h["endpoints"] == ["dyn://dynamo.backend.generate"]
    assert h["instances"][0] == {"component": "backend", "endpoint": "generate", "namespace": "dynamo",
                                 "instance_id": 7, "transport": {"grpc_tcp": "127.0.0.1:1"}}
    m = (await c.get("/v1/models")).json()
    assert m["data"][0]["id"] == MODEL and (await c.get("/live")).status_code == 200


async def test_api_key_and_metrics(enc):
    c, _ = client(enc, api_key="s3cret")
    assert (await c.post("/v1/chat/completions", json=chat_body())).status_code == 401
    r = await c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    text = (await c.get("/metrics")).text
    assert 'gptoss_frontend_requests_total{endpoint="/v1/chat/completions",status="401"} 1.0' in text
    assert "gptoss_frontend_time_to_first_token_seconds_count 1.0" in text
