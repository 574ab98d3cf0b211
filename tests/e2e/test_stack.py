"""The whole stack as processes (etcd, prefill, decode, frontend; tiny model, CPU) driven by the
official openai SDK. The tiny model's weights are random, so its tokens are arbitrary (harmony
specials anywhere, text that is no harmony at all): assert shapes, counts and well-formed JSON/SSE,
not text. Fault injection lives in tests/faults/."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL, ROOT, needs_engine
from tests.e2e.stack import Frontend, cpu_seconds, iter_sse, metric, wait_until
from tests.fixtures.procs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HEALTH_TOOL = {"type": "function", "function": {
    "name": "get_system_health",
    "description": "Returns the current health status of the LLM runtime—use before critical operations.",
    "parameters": {"type": "object", "properties": {}}}}
FINISH = ("stop", "length", "tool_calls")


@pytest.fixture(scope="module")
def fe(stack):
    return stack.frontends[0]


def test_chat_stream_usage_responses_completions_health(fe):
    c = fe.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert r.choices[0].finish_reason in FINISH and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 8
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in FINISH
    resp = c.responses.create(model=MODEL, input="Explain disaggregated serving in 3 sentences.", max_output_tokens=8)
    assert resp.status in ("completed", "incomplete") and 0 < resp.usage.output_tokens <= 8
    events = [e.type for e in c.responses.create(model=MODEL, input="hi", max_output_tokens=8, stream=True)]
    assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")
    comp = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    assert 0 < comp.usage.completion_tokens <= 5
    comp = c.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=5)
    assert comp.choices[0].finish_reason in ("stop", "length")
    h = httpx.get(fe.url + "/health").json()
    assert h["status"] == "healthy" and {i["component"] for i in h["instances"]} == {"prefill", "backend"}
    assert all("grpc_tcp" in i["transport"] and isinstance(i["instance_id"], int) for i in h["instances"])
    assert sorted(h["endpoints"]) == ["dyn://test.backend.generate", "dyn://test.prefill.generate"]
    assert [m.id for m in c.models.list().data] == [MODEL]



def test_idle_workers_do_not_busy_wait_on_their_kv_endpoints(stack, fe):
    """After a hand-off the decode worker stays connected to the prefill worker's KV endpoint, with
    a receive posted on it. ucxx's default request wait spins the event loop (a whole core, and the
    GIL taken from the engine thread: kv_transfer/ucx_runtime.py); the daemons must not."""
    r = fe.client().completions.create(model=MODEL, prompt="warm the KV endpoints up", max_tokens=2)
    assert r.usage.completion_tokens <= 2
    time.sleep(0.5)
    workers = stack.live_workers("prefill_svc") + stack.live_workers("decode_svc")
    assert len(workers) == 2
    before = {w.proc.pid: cpu_seconds(w.proc.pid) for w in workers}
    t0 = time.monotonic()
    time.sleep(3)
    wall = time.monotonic() - t0
    used = {pid: cpu_seconds(pid) - cpu for pid, cpu in before.items()}
    # Idle work is a keep-alive and a load update now and then: a few percent of one core.
    assert all(u < 0.3 * wall for u in used.values()), f"CPU seconds over {wall:.1f} s idle: {used}"

def test_seed_tool_flow_round_trips(fe):
    c = fe.client()
    messages = [{"role": "user", "content": "Hey, quick check: is everything up and running?"}]
    first = c.chat.completions.create(model=MODEL, messages=messages, tools=[HEALTH_TOOL], max_tokens=30,
                                      extra_body={"chat_template_args": {"reasoning_effort": "low"}},
                                      response_format={"type": "text"})
    assert first.choices[0].finish_reason in FINISH
    messages += [{"role": "assistant", "tool_calls": [{"id": "call-1", "type": "function",
                                                       "function": {"name": "get_system_health", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "call-1", "content": '{"status":"ok","uptime_seconds":372045}'}]
    second = c.chat.completions.create(model=MODEL, messages=messages, tools=[HEALTH_TOOL], max_tokens=30,
                                       extra_body={"chat_template_args": {"reasoning_effort": "low"}})
    assert second.choices[0].finish_reason in FINISH and second.usage.prompt_tokens > first.usage.prompt_tokens
    # A named tool_choice: whatever the random weights write next are that call's arguments.
    forced = c.chat.completions.create(model=MODEL, messages=messages[:1], tools=[HEALTH_TOOL], max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "get_system_health"}})
    assert forced.choices[0].finish_reason in ("tool_calls", "length")
    assert [t.function.name for t in forced.choices[0].message.tool_calls] == ["get_system_health"]


def test_concurrent_streams_ignore_eos_min_tokens(fe):
    c = fe.client()
    bodies = [{"ignore_eos": True, "min_tokens": 16}, {"nvext": {"ignore_eos": True, "min_tokens": 16}}]

    def one(i):
        stream = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=16, stream=True,
            stream_options={"include_usage": True}, extra_body=bodies[i % 2])
        chunks = list(stream)
        return chunks[-1].usage.completion_tokens, [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert results == [(16, "length")] * 10


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 48,
                              "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 48, "stream_options": {"include_usage": True}}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 48}),
])
def test_any_tokens_give_well_formed_sse_and_json(fe, path, body):
    """ignore_eos runs the random model through whatever it samples (ends of turns included)."""
    body = {**body, "model": MODEL, "ignore_eos": True, "temperature": 1.0, "seed": 7}
    with httpx.stream("POST", fe.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(iter_sse(r))
    objs = [e for e in events if isinstance(e, dict)]
    assert objs and not any("error" in e for e in objs)
    if path == "/v1/responses":
        assert objs[-1]["type"] in ("response.completed", "response.incomplete")
        assert objs[-1]["response"]["usage"]["output_tokens"] == 48
    else:
        assert events[-1] == "[DONE]" and objs[-1]["usage"]["completion_tokens"] == 48
    r = httpx.post(fe.url + path, json=body, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    usage = r.json()["usage"]
    assert usage.get("completion_tokens", usage.get("output_tokens")) == 48


def test_chat_logprobs(fe):
    c = fe.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                  logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob and e.logprob <= e.top_logprobs[0].logprob + 1e-4
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                            logprobs=True, top_logprobs=2, stream=True,
                                            extra_body={"ignore_eos": True}))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert len(streamed) == 6 and all(len(e.top_logprobs) == 2 for e in streamed)
    plain = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert plain.choices[0].logprobs is None


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_http_workers_share_one_port(stack, tmp_path):
    """--http-workers 2: one supervisor (READY=1 / STOPPING=1 to systemd), two frontend processes
    on one port. New connections reach both; /metrics sums both; a killed process is started
    again; SIGTERM to the supervisor alone (systemd's KillMode=mixed) stops all with exit 0."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(60)
        f = Frontend(stack.etcd.endpoint, tmp_path / "multi.log", stack.model_dir, "--http-workers", "2",
                     env={"NOTIFY_SOCKET": path})
        try:
            assert notify.recv(4096).decode().startswith("READY=1")
            workers = _children(f.proc.pid)
            assert len(workers) == 2

            def complete() -> str:   # a fresh connection each time: the kernel picks the process
                r = httpx.post(f.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                               timeout=60)
                assert r.status_code == 200, r.text
                return r.headers["x-gptoss-frontend-process"]

            assert {complete() for _ in range(16)} == {"0", "1"}
            ok = 'gptoss_frontend_requests_total{endpoint="/v1/completions",status="200"}'
            for _ in range(4):   # whichever process answers, it reports both
                assert metric(f.url, ok) == 16 and metric(f.url, "gptoss_frontend_inflight_requests") == 0

            os.kill(workers[0], signal.SIGKILL)
            wait_until(lambda: len(_children(f.proc.pid)) == 2 and workers[0] not in _children(f.proc.pid), 30,
                       "the killed frontend process started again")
            assert {complete() for _ in range(16)} == {"0", "1"}

            workers = _children(f.proc.pid)
            os.kill(f.proc.pid, signal.SIGTERM)
            assert notify.recv(4096).decode().startswith("STOPPING=1")
            assert f.proc.wait(30) == 0
            assert not any(_alive(pid) for pid in workers)
        finally:
            f.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(_alive(int(p)) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_gptoss_up_serves_and_stops_cleanly(tmp_path):
    needs_engine()
    port = free_port()
    env = {**os.environ, "GPTOSS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_cli", "up", "--http-port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving" in line and f"127.0.0.1:{port}/v1" in line:
                break
        assert any(f"127.0.0.1:{port}/v1" in ln for ln in lines), "".join(lines)
        out = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                            timeout=60).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert 0 < out.usage.completion_tokens <= 4
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(children) >= 4   # etcd, prefill, decode, frontend
        # the workers and the frontend run in their own process groups (etcd shares ours)
        groups = {_pgid(p) for p in children} - {None, os.getpgrp()}
        assert len(groups) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        wait_until(lambda: not any(_alive(p) for p in children) and not any(_group_alive(g) for g in groups),
                   10, "every child of gptoss up (and its process group) gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
