"""`gptoss up`: the whole stack on this machine, as child processes: an embedded etcd (unless
--etcd-endpoints), prefill + decode workers (or aggregated ones with --mode agg) and the frontend.

Prints where it listens once /health is healthy. Ctrl-C / SIGTERM stops everything: each child
runs in its own process group, gets SIGTERM (frontend first, then workers, then etcd) and is
killed with its group if it has not exited in time, so no process is left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

STOP_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 600.0


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GPTOSS_CACHE", pathlib.Path.home() / ".cache" / "gptoss"))


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: pathlib.Path

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gptoss up", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="checkpoint folder, or 'tiny' (made on first use, random weights)")
    p.add_argument("--served-model-name", default=None, help="default: 'tiny' for the tiny model, else the folder name")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--mode", choices=("disagg", "agg"), default="disagg",
                   help="agg: decode workers in aggregated mode only, no prefill workers")
    p.add_argument("--etcd-endpoints", default=None, help="use this etcd instead of starting one")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--namespace", default="dynamo")
    p.add_argument("--router-mode", default="round-robin", choices=("round-robin", "random", "least-loaded"))
    a = p.parse_args(argv)
    if a.decode_workers < 1 or a.prefill_workers < 0 or (a.mode == "disagg" and a.prefill_workers < 1):
        p.error("need >= 1 decode worker (and >= 1 prefill worker with --mode disagg)")
    return a


def ensure_model(model: str) -> pathlib.Path:
    if model != "tiny":
        path = pathlib.Path(model)
        if not (path / "config.json").exists():
            raise SystemExit(f"gptoss up: {path} has no config.json (expected an HF-format gpt-oss checkpoint)")
        return path
    path = cache_dir() / "models" / "tiny"
    if not (path / "model.safetensors.index.json").exists():
        print(f"gptoss up: making the tiny model (random weights) in {path}", flush=True)
        subprocess.run([sys.executable, "-m", "gptoss_cli", "make-model", "--preset", "tiny", "--out", str(path),
                        "--quiet"], check=True)
    return path


class Stack:
    def __init__(self, log_dir: pathlib.Path):
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.etcd = None

    def spawn(self, name: str, args: list[str]) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            # Own session = own process group: a terminal's Ctrl-C reaches only us, and we can
            # signal a child's whole group (its helpers included) when stopping.
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self) -> None:
        # Reverse start order: the frontend stops taking requests before the workers drain.
        for child in reversed(self.children):
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in reversed(self.children):
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(child.proc, signal.SIGKILL)   # leftovers of the group, or the child itself
            child.proc.wait()
        if self.etcd is not None:
            self.etcd.cleanup()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def on_signal(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="gptoss-up-"))
    stack = Stack(log_dir)
    try:
        model = ensure_model(a.model)
        name = a.served_model_name or ("tiny" if a.model == "tiny" else model.name)
        endpoints = a.etcd_endpoints
        if endpoints is None:
            from registry.embedded_etcd import EmbeddedEtcd

            stack.etcd = EmbeddedEtcd(data_dir=log_dir / "etcd").start()
            endpoints = stack.etcd.endpoint
        common = ["--model-path", str(model), "--served-model-name", name, "--etcd-endpoints", endpoints,
                  "--namespace", a.namespace, "--device", a.device]
        if a.mode == "disagg":
            for i in range(a.prefill_workers):
                stack.spawn(f"prefill-{i}", ["prefill_svc", *common, "--disaggregation-mode", "prefill"])
        decode_mode = "decode" if a.mode == "disagg" else "aggregated"
        for i in range(a.decode_workers):
            stack.spawn(f"decode-{i}", ["decode_svc", *common, "--disaggregation-mode", decode_mode])
        stack.spawn("frontend", ["frontend_svc", "--http-host", a.http_host, "--http-port", str(a.http_port),
                                 "--etcd-endpoints", endpoints, "--namespace", a.namespace,
                                 "--served-model-name", name, "--model-path", str(model),
                                 "--router-mode", a.router_mode])
        want = {f"dyn://{a.namespace}.backend.generate"}
        if a.mode == "disagg":
            want.add(f"dyn://{a.namespace}.prefill.generate")
        url = f"http://{a.http_host}:{a.http_port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            h = health(url + "/health")
            if h and h.get("status") == "healthy" and want <= set(h.get("endpoints", [])):
                break
            dead = stack.dead_child()
            if dead is not None:
                print(f"gptoss up: {dead.name} exited with {dead.proc.returncode}:\n{dead.tail()}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"gptoss up: not healthy after {READY_TIMEOUT_S:.0f}s (logs in {log_dir})", file=sys.stderr)
                return 1
            time.sleep(0.25)
        print(f"gptoss up: serving {name!r} at {url}/v1 (OpenAI API; health at {url}/health; logs in {log_dir}). "
              "Ctrl-C to stop.", flush=True)
        while True:
            dead = stack.dead_child()
            if dead is not None:
                print(f"gptoss up: {dead.name} exited with {dead.proc.returncode}; stopping:\n{dead.tail()}",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
    except _Stop as s:
        print(f"gptoss up: {s}, stopping", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
