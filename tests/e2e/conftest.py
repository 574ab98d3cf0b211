"""The real stack as processes for e2e tests: etcd (fixture `etcd`), workers (tests/fixtures/procs)
and the frontend (`python -m frontend_svc`), with the official `openai` SDK as the client."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.fixtures.procs import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = "test"      # as tests/fixtures/procs.worker_args registers the workers
MODEL = "tiny"


class Frontend:
    def __init__(self, etcd_endpoint: str, log_path: pathlib.Path, model_dir: pathlib.Path | None = None,
                 *extra: str):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        args = ["--http-port", str(self.port), "--etcd-endpoints", etcd_endpoint, "--namespace", NAMESPACE,
                "--served-model-name", MODEL, *extra]
        if model_dir is not None:
            args += ["--model-path", str(model_dir)]
        self.proc = subprocess.Popen([sys.executable, "-m", "frontend_svc", *args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_live(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"frontend exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/live", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"frontend not live:\n{self.tail()}")

    def wait_health(self, components: set[str], timeout_s: float = 30) -> dict:
        want = {f"dyn://{NAMESPACE}.{c}.generate" for c in components}
        deadline = time.monotonic() + timeout_s
        body: dict = {}
        while time.monotonic() < deadline:
            body = httpx.get(self.url + "/health", timeout=2).json()
            if body["status"] == "healthy" and want <= set(body["endpoints"]):
                return body
            time.sleep(0.2)
        raise TimeoutError(f"frontend never saw {want}: {body}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_frontend(tmp_path, etcd):
    started: list[Frontend] = []

    def start(*extra: str, model_dir: pathlib.Path | None = None) -> Frontend:
        f = Frontend(etcd.endpoint, tmp_path / f"frontend-{len(started)}.log", model_dir, *extra)
        started.append(f)
        f.wait_live()
        return f

    yield start
    for f in started:
        f.stop()


@pytest.fixture(scope="session")
def enc():
    from gptoss_engine.vocab import harmony_encoding

    return harmony_encoding()


def needs_engine():
    """The daemons need the engine's AsyncEngine; skip (with the reason) until it exists."""
    pytest.importorskip("gptoss_engine.async_engine", reason="gptoss_engine.async_engine not available yet")


@pytest.fixture
def stack(request, start_frontend, tiny_model_dir):
    """etcd + 1 prefill + 1 decode + frontend, healthy."""
    needs_engine()
    request.getfixturevalue("prefill_worker")
    decode = request.getfixturevalue("decode_worker")
    f = start_frontend(model_dir=tiny_model_dir)
    f.wait_health({"prefill", "backend"})
    f.decode = decode
    return f
