"""The frontend as a real process with a real etcd and no workers: it starts, answers /live,
/v1/models, and says unhealthy / 503 (with Retry-After) while no worker is registered; bad
input is a 4xx JSON error even then."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL


@pytest.mark.timeout(60)
def test_no_workers_unhealthy_and_503(start_frontend):
    f = start_frontend()
    h = httpx.get(f.url + "/health", timeout=5)
    assert h.status_code == 503 and h.json() == {"status": "unhealthy", "endpoints": [], "instances": []}
    models = httpx.get(f.url + "/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    client = openai.OpenAI(base_url=f.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"
    r = httpx.post(f.url + "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "gptoss_frontend_requests_total" in httpx.get(f.url + "/metrics").text
