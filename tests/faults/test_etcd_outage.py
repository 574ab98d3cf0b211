"""etcd stopped for 10 s and restarted, under traffic (real etcd, 1 prefill, 1 decode, frontend):
requests keep flowing to the workers the frontend knows; afterwards the workers are registered
again and the frontend's view follows etcd (a worker killed after the outage drops out)."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.stack import MODEL, wait_until
from tests.fixtures.procs import TEST_TTL_S

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

OUTAGE_S = 10


def test_etcd_outage_keeps_serving_and_view_converges(make_stack):
    stack = make_stack("prefill", "decode")
    fe = stack.frontends[0]
    c = fe.client(timeout=30)
    before = fe.health()["instances"]
    stack.etcd.stop()
    down_until = time.monotonic() + OUTAGE_S
    served = 0
    while time.monotonic() < down_until:
        r = c.completions.create(model=MODEL, prompt="still there?", max_tokens=4, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
        served += 1
    assert served >= 3
    assert fe.health()["instances"] == before   # the last view is kept while etcd is away
    stack.etcd.start()

    def converged():
        h = fe.health()
        comps = sorted(i["component"] for i in h["instances"])
        return h["status"] == "healthy" and comps == ["backend", "prefill"]
    wait_until(converged, 15, "the frontend sees exactly the two workers again", 0.2)
    # etcd restores leases with a fresh TTL on restart: records still there after 2 TTLs prove the
    # workers keep them alive (or re-registered), not that etcd remembered them.
    settle_until = time.monotonic() + 2 * TEST_TTL_S
    while time.monotonic() < settle_until:
        assert converged(), fe.health()
        time.sleep(0.5)
    assert c.completions.create(model=MODEL, prompt="after", max_tokens=4).usage.completion_tokens <= 4
    # The watch works again: a worker that dies now drops out of the view within its lease TTL.
    decode = stack.live_workers("decode_svc")[0]
    decode.kill()
    wait_until(lambda: httpx.get(fe.url + "/health", timeout=5).status_code == 503, TEST_TTL_S + 5,
               "the killed decode worker leaves the frontend's view after the outage")
