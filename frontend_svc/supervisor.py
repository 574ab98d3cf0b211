"""`--http-workers N`: N frontend processes behind one HTTP port.

Why: one frontend process spends ~180 us of CPU a streamed token (bench/frontend_cpu_bench.py:
~5.5k tokens/s a core), less than one GPU decodes at max throughput (20b 1000/1000: ~15k output
tokens/s). The frontend keeps no state between requests, so more processes scale it.

How: this process, the one systemd starts (READY=1 and STOPPING=1 come from it: NotifyAccess=main),
opens N listening sockets on the port with SO_REUSEPORT, one a child, and starts child I as
`python -m frontend_svc ARGS --http-workers 1 --listen-fd FD --ready-fd FD --worker-slot I`. The
kernel spreads new connections over the sockets by their addresses. Each child is a whole frontend
(its own etcd watch and gRPC channels). The sockets stay open here: a child that died is started
again on its socket, and the connections that arrived meanwhile wait in its queue.
- Metrics: prometheus_client's multiprocess mode over a private directory, so /metrics on any child
  sums all of them (the in-flight and queued gauges over the live ones).
- --max-inflight M is split: each child admits ceil(M / N).
- A child that exits unasked is started again; more than RESTART_BURST exits within
  RESTART_WINDOW_S stop everything with exit 1, and systemd's Restart= takes over.
- SIGTERM / SIGINT: forwarded to every child, which finishes its in-flight requests; then exit 0.
"""
from __future__ import annotations

import collections
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from svc_common import sd_notify

from .config import FrontendConfig

log = logging.getLogger(__name__)

RESTART_BURST = 5
RESTART_WINDOW_S = 60.0
READY_TIMEOUT_S = 300.0   # a first start may provision the vocabulary
STOP_TIMEOUT_S = 60.0     # each child's graceful stop is bounded by uvicorn's own timeout
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")   # systemd talks to this process only


def listen_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """n listening sockets on one address (SO_REUSEPORT); port 0 picks one free port for all."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(addr)
            addr = s.getsockname()   # the port the first one got, for the others
            s.listen(2048)
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


class _Child:
    def __init__(self, slot: int, sock: socket.socket):
        self.slot = slot
        self.sock = sock
        self.proc: subprocess.Popen | None = None
        self.ready_r: int | None = None   # read end of the pipe the child writes one byte to once it serves

    def start(self, args: list[str], env: dict[str, str]) -> None:
        self.close_pipe()
        r, w = os.pipe()
        fd = self.sock.fileno()
        cmd = [sys.executable, "-m", "frontend_svc", *args, "--listen-fd", str(fd), "--ready-fd", str(w),
               "--worker-slot", str(self.slot)]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(fd, w), env=env)
        finally:
            os.close(w)
        self.ready_r = r

    def close_pipe(self) -> None:
        if self.ready_r is not None:
            os.close(self.ready_r)
            self.ready_r = None


def _wait_ready(children: list[_Child], stopping) -> bool:
    """Until every child has written its byte (True); False when one exits first, the time runs
    out, or a stop is asked for."""
    waiting = {c.ready_r: c for c in children}
    deadline = time.monotonic() + READY_TIMEOUT_S
    with selectors.DefaultSelector() as sel:
        for fd in waiting:
            sel.register(fd, selectors.EVENT_READ)
        while waiting:
            if stopping() or time.monotonic() > deadline:
                return False
            for key, _ in sel.select(timeout=0.2):
                c = waiting.pop(key.fd)
                sel.unregister(key.fd)
                if os.read(key.fd, 1) != b"1":   # the pipe closed: the child exited before serving
                    log.error("frontend process %d exited with %s before serving", c.slot, c.proc.wait())
                    return False
    return True


def _stop_all(children: list[_Child]) -> None:
    live = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("frontend process pid %d did not stop in %.0f s: killed", p.pid, STOP_TIMEOUT_S)
            p.kill()
            p.wait()
    for c in children:
        c.close_pipe()


def run(cfg: FrontendConfig, argv: list[str]) -> int:
    """Serve with cfg.http_workers child processes until SIGTERM/SIGINT; the exit status."""
    from prometheus_client import multiprocess

    n = cfg.http_workers
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        sockets = listen_sockets(cfg.http_host, cfg.http_port, n)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", cfg.http_host, cfg.http_port, e)
        return 1
    port = sockets[0].getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="gptoss-frontend-metrics-")
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    per_child = -(-cfg.max_inflight // n) if cfg.max_inflight else 0
    # Flags given later win: each child is one process with its share of the in-flight limit.
    args = [*argv, "--http-workers", "1", "--max-inflight", str(per_child)]
    children = [_Child(slot, s) for slot, s in enumerate(sockets)]
    exits: collections.deque[float] = collections.deque()
    try:
        for c in children:
            c.start(args, env)
        if not _wait_ready(children, lambda: bool(stop)):
            return 0 if stop else 1
        log.info("serving on http://%s:%d with %d frontend processes", cfg.http_host, port, n)
        sd_notify.ready(f"serving on {cfg.http_host}:{port} with {n} processes")
        while not stop:
            time.sleep(0.2)
            for c in children:
                code = c.proc.poll()
                if code is None or stop:
                    continue
                multiprocess.mark_process_dead(c.proc.pid, metrics_dir)
                now = time.monotonic()
                exits.append(now)
                while now - exits[0] > RESTART_WINDOW_S:
                    exits.popleft()
                if len(exits) > RESTART_BURST:
                    log.error("frontend processes exited %d times within %.0f s: stopping", len(exits),
                              RESTART_WINDOW_S)
                    return 1
                log.warning("frontend process %d (pid %d) exited with %s: starting it again", c.slot, c.proc.pid,
                            code)
                c.start(args, env)
        sd_notify.stopping("shutting down: finishing in-flight requests")
        return 0
    finally:
        _stop_all(children)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for s in sockets:
            s.close()
