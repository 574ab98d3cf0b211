"""The whole stack as processes (etcd, prefill, decode, frontend; tiny model, CPU) driven by the
official openai SDK. The tiny model's weights are random: assert shapes and counts, not text."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest

from gptoss_pb.v1 import decode_pb2_grpc, prefill_pb2
from tests.e2e.conftest import MODEL, ROOT, needs_engine
from tests.fixtures.procs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HEALTH_TOOL = {"type": "function", "function": {
    "name": "get_system_health",
    "description": "Returns the current health status of the LLM runtime—use before critical operations.",
    "parameters": {"type": "object", "properties": {}}}}


def client(f) -> openai.OpenAI:
    return openai.OpenAI(base_url=f.url + "/v1", api_key="NOT USED", max_retries=0, timeout=120)


def test_chat_stream_usage_responses_completions_health(stack):
    c = client(stack)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls") and 0 < r.usage.completion_tokens <= 8
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] is not None
    resp = c.responses.create(model=MODEL, input="Explain disaggregated serving in 3 sentences.", max_output_tokens=8)
    assert resp.status in ("completed", "incomplete") and resp.usage.output_tokens <= 8
    events = [e.type for e in c.responses.create(model=MODEL, input="hi", max_output_tokens=8, stream=True)]
    assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")
    comp = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    assert comp.usage.completion_tokens <= 5
    comp = c.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=5)
    assert comp.choices[0].finish_reason in ("stop", "length")
    h = httpx.get(stack.url + "/health").json()
    assert h["status"] == "healthy" and {i["component"] for i in h["instances"]} == {"prefill", "backend"}
    assert all("grpc_tcp" in i["transport"] and isinstance(i["instance_id"], int) for i in h["instances"])


def test_seed_tool_flow_round_trips(stack):
    c = client(stack)
    messages = [{"role": "user", "content": "Hey, quick check: is everything up and running?"}]
    first = c.chat.completions.create(model=MODEL, messages=messages, tools=[HEALTH_TOOL], max_tokens=30,
                                      extra_body={"chat_template_args": {"reasoning_effort": "low"}},
                                      response_format={"type": "text"})
    assert first.choices[0].finish_reason in ("stop", "length", "tool_calls")
    messages += [{"role": "assistant", "tool_calls": [{"id": "call-1", "type": "function",
                                                       "function": {"name": "get_system_health", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "call-1", "content": '{"status":"ok","uptime_seconds":372045}'}]
    second = c.chat.completions.create(model=MODEL, messages=messages, tools=[HEALTH_TOOL], max_tokens=30,
                                       extra_body={"chat_template_args": {"reasoning_effort": "low"}})
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_concurrent_streams_and_ignore_eos(stack):
    c = client(stack)

    def one(i):
        stream = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=16, stream=True,
            stream_options={"include_usage": True},
            extra_body={"min_tokens": 16, "ignore_eos": True, "nvext": {"ignore_eos": True}})
        return [ch for ch in stream][-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        counts = list(pool.map(one, range(10)))
    assert counts == [16] * 10


def _stats(address):
    with grpc.insecure_channel(address) as ch:
        return decode_pb2_grpc.DecodeStub(ch).Stats(prefill_pb2.StatsRequest(), timeout=5)


def test_client_disconnect_frees_blocks(stack):
    base = _stats(stack.decode.address)
    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000, "stream": True,
            "ignore_eos": True}) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 5:
                break   # leave mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = _stats(stack.decode.address)
        if s.num_free_blocks == base.num_free_blocks and s.num_running == 0:
            break
        time.sleep(0.2)
    assert (s.num_free_blocks, s.num_running) == (base.num_free_blocks, 0)


def test_worker_gone_is_503(stack):
    stack.decode.terminate(timeout_s=15)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and httpx.get(stack.url + "/health").status_code != 503:
        time.sleep(0.2)
    with pytest.raises(openai.APIStatusError) as e:
        client(stack).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.status_code == 503


def test_gptoss_up_serves_and_stops_cleanly(tmp_path):
    needs_engine()
    port = free_port()
    env = {**os.environ, "GPTOSS_CACHE": str(tmp_path / "cache"),
           "TIKTOKEN_ENCODINGS_BASE": os.environ.get("TIKTOKEN_ENCODINGS_BASE", "")}
    if not env["TIKTOKEN_ENCODINGS_BASE"]:
        del env["TIKTOKEN_ENCODINGS_BASE"]
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_cli", "up", "--http-port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving" in line and f":{port}/v1" in line:
                break
        assert any(f":{port}/v1" in ln for ln in lines), "".join(lines)
        out = client(type("F", (), {"url": f"http://127.0.0.1:{port}"})).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert out.usage.completion_tokens <= 4
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
