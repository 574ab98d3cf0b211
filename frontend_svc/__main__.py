"""`python -m frontend_svc` / `gptoss frontend`: wires config, discovery, gRPC pipeline, app, uvicorn."""
from __future__ import annotations

import contextlib
import logging
import sys

import uvicorn

from .app import create_app
from .config import FrontendConfig, parse_args
from .metrics import Metrics
from .pipeline import Pipeline
from .routing import Router
from .workers import Channels, RegistryDirectory


def build_app(cfg: FrontendConfig):
    metrics = Metrics()
    directory = RegistryDirectory(cfg.etcd_endpoints, cfg.namespace)
    channels = Channels()
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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(cfg)
    uvicorn.run(app, host=cfg.http_host, port=cfg.http_port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
