"""Workers dying or leaving under load, against real processes (etcd, 2 prefill, 2 decode, a
frontend with --migration-limit 3). The tests run in file order on one stack and use it up:
prefill kill -> decode drain (+ a replacement) -> decode kill with migration -> last decode killed."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import openai
import pytest

from tests.e2e.stack import MODEL, iter_sse, metric, stats, wait_until
from tests.fixtures.procs import TEST_TTL_S

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = list(range(1000, 1040))   # token ids: /v1/completions takes them as they are


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack("prefill", "prefill", "decode", "decode", frontend_args=("--migration-limit", "3"))


@pytest.fixture(scope="module")
def fe(stack):
    return stack.frontends[0]


def instance_id(fe, worker) -> int | None:
    return next((i["instance_id"] for i in fe.health()["instances"]
                 if i["transport"]["grpc_tcp"] == worker.address), None)


def greedy_stream(fe, max_tokens: int, after_events=None, n_events: int = 5) -> tuple[list[str], list[dict]]:
    """A greedy ignore_eos completions stream; calls `after_events()` once n_events have arrived.
    Returns (the tokens, from logprobs; every event)."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    tokens: list[str] = []
    events: list[dict] = []
    with httpx.stream("POST", fe.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for ev in iter_sse(r):
            if ev == "[DONE]":
                continue
            events.append(ev)
            for ch in ev.get("choices", []):
                tokens += (ch.get("logprobs") or {}).get("tokens", [])
            if after_events is not None and len(events) == n_events:
                after_events()
    return tokens, events


def serving_decode(stack):
    """The live decode worker that has a request running now."""
    return wait_until(lambda: next((w for w in stack.live_workers("decode_svc") if stats(w).num_running), None),
                      10, "a decode worker running the request", 0.02)


def test_prefill_killed_mid_prefill_retries_and_deregisters(stack, fe):
    victim = stack.live_workers("prefill_svc")[0]
    victim_id = instance_id(fe, victim)
    assert victim_id is not None
    migrations = metric(fe.url, "gptoss_frontend_migrations_total")
    os.kill(victim.proc.pid, signal.SIGSTOP)   # frozen: the request routed there stays mid-prefill
    c = fe.client(timeout=60)

    def one(i):
        return c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # round-robin over the two prefill workers: one of these two requests waits on the victim
        futures = [pool.submit(one, i) for i in range(2)]
        done, pending = concurrent.futures.wait(futures, timeout=30, return_when=concurrent.futures.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 1, "expected exactly one request stuck on the frozen prefill"
        killed_at = time.monotonic()
        victim.kill()
        retried = pending.pop().result(timeout=30)
        elapsed = time.monotonic() - killed_at
    assert retried.usage.completion_tokens == 8 and elapsed < 5, elapsed
    assert metric(fe.url, "gptoss_frontend_migrations_total") == migrations + 1
    wait_until(lambda: victim_id not in fe.instance_ids("prefill"), TEST_TTL_S + 3,
               "the killed prefill worker's record expires with its lease")


def test_sigterm_decode_drains_stream_and_gets_no_new_traffic(stack, fe):
    decodes = stack.live_workers("decode_svc")
    assert len(decodes) == 2
    box = {}

    def on_events():
        box["victim"] = victim = serving_decode(stack)
        box["victim_id"] = instance_id(fe, victim)
        victim.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: box["victim_id"] not in fe.instance_ids("backend"), 5,
                   "the draining decode worker leaves the registry at once")
        c = fe.client(timeout=60)
        for i in range(3):
            r = c.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                                       extra_headers={"x-request-id": f"after-drain-{i}"})
            assert r.http_response.status_code == 200

    tokens, events = greedy_stream(fe, 80, on_events, n_events=3)
    victim = box["victim"]
    assert len(tokens) == 80 and events[-1]["usage"]["completion_tokens"] == 80
    assert not any("error" in e for e in events)
    assert victim.proc.wait(15) == 0
    other = next(w for w in decodes if w is not victim)
    assert "after-drain-" not in victim.log_text() and "after-drain-2" in other.log_text()
    stack.start_workers("decode")   # the next tests want two decode workers again
    wait_until(lambda: len(fe.instance_ids("backend")) == 2, 10, "the frontend sees the new decode worker")


def test_decode_killed_mid_stream_migrates_with_identical_output(stack, fe):
    reference, _ = greedy_stream(fe, 120)
    assert len(reference) == 120
    base = stack.baseline()
    migrations = metric(fe.url, "gptoss_frontend_migrations_total")
    killed = []

    def kill_serving_decode():
        victim = serving_decode(stack)
        victim.kill()
        killed.append(victim)

    tokens, events = greedy_stream(fe, 120, kill_serving_decode, n_events=5)
    assert killed and not any("error" in e for e in events)
    assert metric(fe.url, "gptoss_frontend_migrations_total") == migrations + 1
    assert tokens == reference   # greedy: prompt + tokens sent, re-run elsewhere, continue identically
    assert events[-1]["usage"]["completion_tokens"] == 120
    assert killed[0].proc.poll() is not None and len(stack.live_workers("decode_svc")) == 1
    stack.wait_baseline(base)   # the survivors (the decode that took over, the prefill) hold nothing


def test_last_decode_killed_ends_stream_with_error_event_then_503(stack, fe):
    assert len(stack.live_workers("decode_svc")) == 1
    t0 = time.monotonic()
    _, events = greedy_stream(fe, 400, lambda: serving_decode(stack).kill(), n_events=3)
    assert time.monotonic() - t0 < 30
    err = events[-1].get("error")
    assert err is not None and err["type"] == "service_unavailable" and err["message"], events[-1]
    with pytest.raises(openai.APIStatusError) as e:
        fe.client(timeout=30).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 503 and e.value.response.headers.get("retry-after")
    wait_until(lambda: httpx.get(fe.url + "/health").status_code == 503, TEST_TTL_S + 3,
               "health turns 503 once no decode worker is registered")
