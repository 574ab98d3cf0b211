"""Integration fixes against real processes (etcd, 1 prefill + 1 decode, two frontends):
  - a KV hand-off that fails (here: the prefill's KV lease runs out before decode reads it) is
    re-run as a local prefill on the decode worker: the client gets the same answer as an
    uninterrupted run, the failure is counted, the staged KV is freed;
  - the workers' --max-model-len (published in their records) is the frontend's context limit,
    for the 400 and for the default max_tokens;
  - a stream that is silent (decode worker frozen) gets SSE keep-alive comments and stays
    well-formed for the openai SDK.
`fe` hands off KV (threshold 0); `fe_local` sends everything straight to the decode worker, the
uninterrupted reference."""
from __future__ import annotations

import os
import signal

import httpx
import openai
import pytest

from tests.e2e.stack import MODEL, iter_sse, metric, wait_until
from tests.fixtures.procs import TEST_MAX_MODEL_LEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = list(range(1000, 1040))   # token ids: /v1/completions takes them as they are
KEEPALIVE_S = 0.2


@pytest.fixture(scope="module")
def stack(make_stack):
    # 1 ms KV lease: every staged KV expires before a decode worker can read it (deterministic).
    return make_stack("prefill", "decode", worker_args=("--kv-lease-seconds", "0.001"),
                      frontend_args=("--sse-keepalive-interval", str(KEEPALIVE_S)))


@pytest.fixture(scope="module")
def fe(stack):
    return stack.frontends[0]


@pytest.fixture(scope="module")
def fe_local(stack):
    f = stack.start_frontend("--disagg-threshold", "1000000")
    f.wait_health({"prefill", "backend"})
    return f


def completion_tokens(fe, **kw) -> tuple[list[str], str]:
    r = fe.client(timeout=60).completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, logprobs=0,
                                                 extra_body={"ignore_eos": True}, **kw)
    return r.choices[0].logprobs.tokens, r.choices[0].text


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_kv_handoff_failure_reprefills_locally_with_identical_output(stack, fe, fe_local, sampling):
    reference, _ = completion_tokens(fe_local, **sampling)
    assert len(reference) == 12
    base = stack.baseline()
    failures = metric(fe.url, "gptoss_frontend_kv_handoff_failures_total")
    tokens, _ = completion_tokens(fe, **sampling)
    assert tokens == reference   # the prefill's first token + the local re-run's continuation
    assert metric(fe.url, "gptoss_frontend_kv_handoff_failures_total") == failures + 1
    assert 'code="FAILED_PRECONDITION"' in httpx.get(fe.url + "/metrics").text   # lease expired
    stack.wait_baseline(base)   # staged=0 on the prefill worker, nothing held on the decode worker


def test_workers_max_model_len_is_the_context_limit(stack, fe, fe_local):
    c = fe.client(timeout=60)
    too_long = "word " * (TEST_MAX_MODEL_LEN + 100)   # fits config.json's 131072, not the workers' 4096
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": too_long}], max_tokens=4)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and f"{TEST_MAX_MODEL_LEN} tokens" in err["message"], err
    # no max_tokens: capped to the context left (a few tokens), not config.json's 131072 - prompt
    r = fe_local.client(timeout=120).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "word " * (TEST_MAX_MODEL_LEN - 150)}], temperature=0,
        extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == TEST_MAX_MODEL_LEN, r.usage
    assert r.choices[0].finish_reason == "length"


def frozen_decode(stack, fe, before: float):
    """SIGSTOP the decode worker until the frontend sent 2 keep-alives, then SIGCONT (well within
    the worker's registry TTL, so it stays registered)."""
    decode = stack.live_workers("decode_svc")[0]
    os.kill(decode.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: metric(fe.url, "gptoss_frontend_sse_keepalives_total") >= before + 2, 10,
                   "two keep-alive comments while the decode worker is frozen", 0.05)
    finally:
        os.kill(decode.proc.pid, signal.SIGCONT)


def test_sse_keepalive_comments_while_silent(stack, fe, fe_local):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stream": True}
    comments, data = [], []
    before = metric(fe.url, "gptoss_frontend_sse_keepalives_total")
    with httpx.stream("POST", fe.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                frozen_decode(stack, fe, before)
                break
        for line in lines:
            (comments if line.startswith(":") else data).append(line)
    assert comments and set(comments) == {": keep-alive"}
    events = list(iter_sse(httpx.Response(200, content="\n".join(data).encode())))   # JSON, then [DONE]
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"

    # The openai SDK reads such a stream as if the comments were not there.
    reference = fe_local.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                                     extra_body={"ignore_eos": True}).choices[0].text
    before = metric(fe.url, "gptoss_frontend_sse_keepalives_total")
    text, finish = "", None
    stream = fe.client(timeout=60).completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
    for i, chunk in enumerate(stream):
        if i == 0:
            frozen_decode(stack, fe, before)
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert text == reference and finish == "length"
