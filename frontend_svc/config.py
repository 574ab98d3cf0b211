"""Frontend flags -> one frozen FrontendConfig. Every flag can also come from GPTOSS_<FLAG> in the
environment (the systemd units' env files); the command line wins. The API key is also read from
GPTOSS_API_KEY (a flag would show in `ps`)."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
from dataclasses import dataclass

ROUTER_MODES = ("round-robin", "random", "least-loaded")
DEFAULT_CONTEXT_LENGTH = 131072


@dataclass(frozen=True)
class FrontendConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    router_mode: str = "round-robin"
    etcd_endpoints: str = "http://127.0.0.1:2379"
    namespace: str = "dynamo"
    served_model_name: str = "openai/gpt-oss-120b"
    model_path: str | None = None
    context_length: int = DEFAULT_CONTEXT_LENGTH   # from the model's config.json when given
    disagg_threshold: int = 0      # prompts shorter than this skip the prefill worker
    api_key: str | None = None
    migration_limit: int = 3
    max_inflight: int = 0          # 0 = unlimited
    request_timeout_s: float = 600.0
    sse_keepalive_s: float = 10.0  # an SSE comment after this long without an event
    http_workers: int = 1          # > 1: a supervisor runs this many frontend processes (supervisor.py)
    # Set by the supervisor for each of its processes: the listening socket it inherits, the pipe
    # it reports readiness on, and its number (sent back as a response header).
    listen_fd: int | None = None
    ready_fd: int | None = None
    worker_slot: int | None = None
    # etcd: TLS (CA, client cert/key for mutual TLS) and user; the password only from
    # GPTOSS_ETCD_PASSWORD, never a flag.
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    # gRPC to the workers over TLS when a CA is given (+ client cert/key when they demand mutual TLS).
    worker_tls_ca: str | None = None
    worker_tls_cert: str | None = None
    worker_tls_key: str | None = None


def _env(name: str, default):
    return os.environ.get("GPTOSS_" + name.upper().replace("-", "_"), default)


def context_length_of(model_path: str | None) -> int:
    if not model_path:
        return DEFAULT_CONTEXT_LENGTH
    path = pathlib.Path(model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"frontend: cannot read {path}: {e}") from None
    return int(cfg.get("max_position_embeddings", DEFAULT_CONTEXT_LENGTH))


def parse_args(argv: list[str] | None) -> FrontendConfig:
    d = FrontendConfig()
    p = argparse.ArgumentParser(prog="gptoss frontend", description="OpenAI-compatible HTTP frontend")
    p.add_argument("--http-host", default=_env("http-host", d.http_host))
    p.add_argument("--http-port", type=int, default=int(_env("http-port", d.http_port)))
    p.add_argument("--router-mode", choices=ROUTER_MODES, default=_env("router-mode", d.router_mode))
    p.add_argument("--etcd-endpoints", default=_env("etcd-endpoints", d.etcd_endpoints))
    p.add_argument("--namespace", default=_env("namespace", d.namespace))
    p.add_argument("--served-model-name", default=_env("served-model-name", d.served_model_name))
    p.add_argument("--model-path", default=_env("model-path", None),
                   help="checkpoint folder: its config.json gives the context length")
    p.add_argument("--disagg-threshold", type=int, default=int(_env("disagg-threshold", d.disagg_threshold)),
                   help="prompts with fewer tokens go straight to a decode/aggregated worker")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env GPTOSS_API_KEY)")
    p.add_argument("--migration-limit", type=int, default=int(_env("migration-limit", d.migration_limit)))
    p.add_argument("--max-inflight", type=int, default=int(_env("max-inflight", d.max_inflight)))
    p.add_argument("--sse-keepalive-interval", type=float,
                   default=float(_env("sse-keepalive-interval", d.sse_keepalive_s)),
                   help="seconds without an event after which a stream gets a ': keep-alive' comment")
    p.add_argument("--http-workers", type=int, default=int(_env("http-workers", d.http_workers)),
                   help="frontend processes serving the HTTP port (one streams ~5k tokens/s a core)")
    for name in ("listen-fd", "ready-fd", "worker-slot"):   # the supervisor's, for its processes
        p.add_argument(f"--{name}", type=int, default=None, help=argparse.SUPPRESS)
    for name in ("etcd-ca", "etcd-cert", "etcd-key", "etcd-user",
                 "worker-tls-ca", "worker-tls-cert", "worker-tls-key"):
        p.add_argument(f"--{name}", default=_env(name, None))
    a = p.parse_args(argv)
    if bool(a.worker_tls_cert) != bool(a.worker_tls_key):
        p.error("--worker-tls-cert and --worker-tls-key go together")
    if (a.worker_tls_cert or a.worker_tls_key) and not a.worker_tls_ca:
        p.error("--worker-tls-cert/--worker-tls-key need --worker-tls-ca")
    if not a.sse_keepalive_interval > 0:
        p.error("--sse-keepalive-interval must be > 0")
    if a.migration_limit < 0 or a.max_inflight < 0 or a.disagg_threshold < 0:
        p.error("--migration-limit, --max-inflight and --disagg-threshold must be >= 0")
    if a.http_workers < 1:
        p.error("--http-workers must be >= 1")
    return FrontendConfig(
        http_host=a.http_host, http_port=a.http_port, router_mode=a.router_mode,
        etcd_endpoints=a.etcd_endpoints, namespace=a.namespace, served_model_name=a.served_model_name,
        model_path=a.model_path, context_length=context_length_of(a.model_path),
        disagg_threshold=a.disagg_threshold, api_key=a.api_key or os.environ.get("GPTOSS_API_KEY") or None,
        migration_limit=a.migration_limit, max_inflight=a.max_inflight, sse_keepalive_s=a.sse_keepalive_interval,
        http_workers=a.http_workers, listen_fd=a.listen_fd, ready_fd=a.ready_fd, worker_slot=a.worker_slot,
        etcd_ca=a.etcd_ca, etcd_cert=a.etcd_cert, etcd_key=a.etcd_key, etcd_user=a.etcd_user,
        worker_tls_ca=a.worker_tls_ca, worker_tls_cert=a.worker_tls_cert, worker_tls_key=a.worker_tls_key,
    )
