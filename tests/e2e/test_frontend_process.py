"""The frontend as a real process with a real etcd and no workers: it starts, answers /live,
/v1/models, and says unhealthy / 503 (with Retry-After) while no worker is registered; bad
input is a 4xx JSON error even then; systemd readiness (sd_notify) at the right moments."""
from __future__ import annotations

import os
import signal
import socket

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.stack import Frontend


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


@pytest.mark.timeout(60)
def test_sd_notify_ready_once_serving_and_stopping_on_sigterm(etcd, tmp_path):
    """systemd runs the frontend as Type=notify: READY=1 must come only when HTTP answers."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        f = Frontend(etcd.endpoint, tmp_path / "frontend.log", None, env={"NOTIFY_SOCKET": path})
        try:
            ready = sock.recv(4096).decode()
            assert ready.startswith("READY=1") and f"127.0.0.1:{f.port}" in ready
            assert httpx.get(f.url + "/live", timeout=5).status_code == 200   # already serving at READY=1
            os.killpg(f.proc.pid, signal.SIGTERM)
            assert sock.recv(4096).decode().startswith("STOPPING=1")
            assert f.proc.wait(15) == 0
        finally:
            f.stop()
