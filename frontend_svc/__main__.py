"""`python -m frontend_svc` / `gptoss frontend`: wires config, discovery, gRPC pipeline, app, uvicorn.

systemd runs this as Type=notify: READY=1 goes out only once uvicorn has bound its socket and
serves (so `systemctl start` returns when requests can be made), STOPPING=1 as soon as a stop
signal arrives. With --http-workers N > 1 this process is the supervisor of N such frontends
(supervisor.py), and they report to it instead."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys

import uvicorn

from svc_common import sd_notify

from .app import create_app
from .config import FrontendConfig, parse_args
from .metrics import Metrics
from .pipeline import Pipeline
from .routing import Router
from .workers import Channels, RegistryDirectory, worker_credentials

log = logging.getLogger(__name__)


def build_app(cfg: FrontendConfig):
    metrics = Metrics()
    try:
        directory = RegistryDirectory(cfg.etcd_endpoints, cfg.namespace, ca_file=cfg.etcd_ca,
                                      cert_file=cfg.etcd_cert, key_file=cfg.etcd_key, username=cfg.etcd_user,
                                      password=os.environ.get("GPTOSS_ETCD_PASSWORD") or None)
    except ValueError as e:   # bad etcd settings (e.g. a CA with http:// endpoints)
        raise SystemExit(f"frontend: {e}") from None
    channels = Channels(worker_credentials(cfg.worker_tls_ca, cfg.worker_tls_cert, cfg.worker_tls_key))
    pipeline = Pipeline(directory, channels, Router(cfg.router_mode), metrics,
                        disagg_threshold=cfg.disagg_threshold, migration_limit=cfg.migration_limit,
                        timeout_s=cfg.request_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await directory.start()
        try:
            yield
        finally:
            await directory.close()
            await channels.close()

    return create_app(cfg, pipeline, metrics, lifespan=lifespan)


class _NotifyingServer(uvicorn.Server):
    """uvicorn.Server with systemd notifications at its real start and stop points. ready_fd: a
    supervisor's process reports its start there instead (one byte), and systemd hears from the
    supervisor only."""

    def __init__(self, config: uvicorn.Config, ready_fd: int | None = None):
        super().__init__(config)
        self._ready_fd = ready_fd

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:   # False when binding failed: uvicorn exits, systemd sees the failure
            cfg = self.config
            if self._ready_fd is not None:
                os.write(self._ready_fd, b"1")
                os.close(self._ready_fd)
                return
            log.info("serving on http://%s:%d", cfg.host, cfg.port)
            sd_notify.ready(f"serving on {cfg.host}:{cfg.port}")

    def handle_exit(self, sig, frame) -> None:
        sd_notify.stopping("shutting down: finishing in-flight requests")
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """Like uvicorn's, minus re-raising the signal after the graceful stop: a stop we asked
        for ends with exit 0, as the workers' drain does."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.http_workers > 1:
        from .supervisor import run
        return run(cfg, argv)
    app = build_app(cfg)
    server = _NotifyingServer(uvicorn.Config(app, host=cfg.http_host, port=cfg.http_port, log_level="warning",
                                             timeout_graceful_shutdown=5), cfg.ready_fd)
    # A supervisor's process serves the listening socket it inherited (supervisor.py).
    server.run(sockets=None if cfg.listen_fd is None else [socket.socket(fileno=cfg.listen_fd)])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
