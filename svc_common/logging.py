"""structlog set-up for the daemons: JSON lines by default (journald / log shippers), console for humans.

A request id travels from the caller's gRPC metadata `x-request-id` into a contextvar that every
log line of that RPC carries (asyncio copies contextvars into each task, so concurrent RPCs do not
mix). Secrets never reach a log line: configs are logged through their repr, which hides them.
"""
from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

import structlog

REQUEST_ID_HEADER = "x-request-id"
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def _add_request_id(_logger: Any, _method: str, event: dict) -> dict:
    rid = request_id_var.get()
    if rid is not None and "request_id" not in event:
        event["request_id"] = rid
    return event


def configure_logging(log_format: str = "json", level: str = "info", component: str | None = None) -> None:
    """Call once at start-up (in main); logs go to stderr (journald picks them up under systemd)."""
    lvl = getattr(logging, level.upper())
    renderer = structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer(colors=False)
    # The component is added by a processor, not a contextvar: callbacks of ucxx and of the engine
    # thread run in contexts that never saw a bind made in main.
    fixed = {"component": component} if component else {}

    def add_fixed(_logger: Any, _method: str, event: dict) -> dict:
        for key, value in fixed.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_fixed,
            _add_request_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (grpc, aetcd, ucxx) log through stdlib logging: keep their warnings, same stream.
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def bind_request_id(metadata: Any, fallback: str | None = None) -> str | None:
    """Set the current RPC's request id from its invocation metadata (else `fallback`)."""
    rid = fallback
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            rid = value.decode() if isinstance(value, bytes) else str(value)
            break
    request_id_var.set(rid or None)
    return rid


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
