"""The real stack as processes for e2e and fault tests: etcd, prefill/decode daemons
(tests/fixtures/procs.DaemonProcess), one or more frontends (`python -m frontend_svc`), and helpers
to drive them with the official `openai` SDK and to read the workers' block counts over gRPC.

A `Stack` is meant to be module-scoped (one start-up of about 10 s on 2 cores shared by a module's
tests); `Stack.close()` stops every process it started, frontends first, then workers, then etcd."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import json
from collections.abc import Iterator

import grpc
import httpx
import openai

from gptoss_pb.v1 import decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from registry.embedded_etcd import EmbeddedEtcd
from tests.fixtures.procs import DaemonProcess, free_port, worker_args

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = "test"      # as tests/fixtures/procs.worker_args registers the workers
MODEL = "tiny"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far, all its threads (/proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s}s: {what}")
        time.sleep(interval_s)


def iter_sse(response: httpx.Response) -> Iterator[dict | str]:
    """Events of an SSE response, checked as they come: every `data:` line is JSON or the final
    [DONE], and nothing follows [DONE]."""
    done = False
    for line in response.iter_lines():
        if not line or line.startswith(":") or line.startswith("event:"):
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not done, f"data after [DONE]: {line!r}"
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            yield data
        else:
            yield json.loads(data)


def metric(fe_url: str, name: str) -> float:
    """Sum of a Prometheus counter/gauge's samples on a frontend's /metrics."""
    total = 0.0
    for line in httpx.get(fe_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Frontend:
    def __init__(self, etcd_endpoint: str, log_path: pathlib.Path, model_dir: pathlib.Path | None = None,
                 *extra: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        args = ["--http-port", str(self.port), "--etcd-endpoints", etcd_endpoint, "--namespace", NAMESPACE,
                "--served-model-name", MODEL, *extra]
        if model_dir is not None and "--model-path" not in extra:
            args += ["--model-path", str(model_dir)]
        self.proc = subprocess.Popen([sys.executable, "-m", "frontend_svc", *args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "NOT USED", timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def wait_live(self, timeout_s: float = 30) -> None:
        def live():
            if self.proc.poll() is not None:
                raise RuntimeError(f"frontend exited {self.proc.returncode}:\n{self.tail()}")
            try:
                return httpx.get(self.url + "/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(live, timeout_s, f"frontend live at {self.url}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def instance_ids(self, component: str) -> set[int]:
        return {i["instance_id"] for i in self.health()["instances"] if i["component"] == component}

    def wait_health(self, components: set[str], timeout_s: float = 30) -> dict:
        want = {f"dyn://{NAMESPACE}.{c}.generate" for c in components}

        def ok():
            body = self.health()
            return body if body["status"] == "healthy" and want <= set(body["endpoints"]) else None
        return wait_until(ok, timeout_s, f"frontend sees {want}", 0.2)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def stats(worker: DaemonProcess) -> prefill_pb2.StatsResponse:
    """Block counts of a prefill or decode worker (both serve Stats with the same messages)."""
    with grpc.insecure_channel(worker.address) as ch:
        stub = (prefill_pb2_grpc.PrefillStub if worker.module == "prefill_svc" else decode_pb2_grpc.DecodeStub)(ch)
        return stub.Stats(prefill_pb2.StatsRequest(), timeout=5)


def idle_counts(s: prefill_pb2.StatsResponse) -> tuple:
    return (s.num_free_blocks, s.num_free_swa_blocks, s.num_staged_transfers, s.num_running, s.num_waiting)


class Stack:
    """etcd + daemons + frontends; everything binds to 127.0.0.1."""

    def __init__(self, tmp: pathlib.Path, model_dir: pathlib.Path):
        self.tmp = tmp
        self.model_dir = model_dir
        self.etcd = EmbeddedEtcd(data_dir=tmp / "etcd").start()
        self.workers: list[DaemonProcess] = []
        self.frontends: list[Frontend] = []

    def start_workers(self, *modes: str, extra: tuple[str, ...] = ()) -> list[DaemonProcess]:
        """Start daemons for `modes` ("prefill" | "decode" | "aggregated") at once, then wait for all."""
        started = []
        for mode in modes:
            module = "prefill_svc" if mode == "prefill" else "decode_svc"
            d = DaemonProcess(module, worker_args(self.model_dir, self.etcd.endpoint, mode, *extra),
                              self.tmp / f"{mode}-{len(self.workers)}.log")
            self.workers.append(d)
            started.append(d)
        for d in started:
            d.wait_ready()
        return started

    def live_workers(self, module: str) -> list[DaemonProcess]:
        return [w for w in self.workers if w.module == module and w.proc.poll() is None]

    def start_frontend(self, *extra: str, env: dict[str, str] | None = None) -> Frontend:
        f = Frontend(self.etcd.endpoint, self.tmp / f"frontend-{len(self.frontends)}.log", self.model_dir, *extra,
                     env=env)
        self.frontends.append(f)
        f.wait_live()
        return f

    def baseline(self) -> dict[int, tuple]:
        return {w.grpc_port: idle_counts(stats(w)) for w in self.workers if w.proc.poll() is None}

    def wait_baseline(self, base: dict[int, tuple], timeout_s: float = 20) -> None:
        """Every live worker's block counts back to `base` (nothing running, staged or leaked)."""
        def back():
            now = self.baseline()
            return all(now[p] == base[p] for p in now if p in base)
        try:
            wait_until(back, timeout_s, "worker block counts back to baseline", 0.2)
        except TimeoutError:
            raise AssertionError(f"blocks not back to baseline: before {base}, now {self.baseline()}") from None

    def logs(self) -> str:
        parts = [f"----- {w.module} :{w.grpc_port} -----\n{w.tail(30)}" for w in self.workers]
        parts += [f"----- frontend :{f.port} -----\n{f.tail(30)}" for f in self.frontends]
        return "\n".join(parts)

    def close(self) -> None:
        for f in self.frontends:
            f.stop()
        for w in self.workers:
            w.terminate(timeout_s=15)
        self.etcd.cleanup()
