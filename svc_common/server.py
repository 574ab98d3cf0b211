"""gRPC bootstrap shared by the daemons: a grpc.aio server with the standard health service and
reflection (so `grpcurl` can list and call it), optional (mutual) TLS, and the signal handling that
starts a graceful shutdown.

The shutdown *sequence* (who goes first) lives in worker.py, which knows the registry and the KV
transfer endpoint; this module only provides the steps that concern gRPC.
"""
from __future__ import annotations

import asyncio
import pathlib
import signal
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from svc_common.args import ConfigError

# Unary and streaming responses can carry a whole prompt's token ids.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServiceSpec:
    """One servicer to mount: `add(servicer, server)` is the generated add_*Servicer_to_server."""
    name: str                                # full name, e.g. "gptoss_pb.v1.Prefill"
    servicer: Any
    add: Callable[[Any, grpc.aio.Server], None]


def server_credentials(cert: str | None, key: str | None, client_ca: str | None) -> grpc.ServerCredentials | None:
    if not cert:
        return None
    try:
        pair = (pathlib.Path(key).read_bytes(), pathlib.Path(cert).read_bytes())
        ca = pathlib.Path(client_ca).read_bytes() if client_ca else None
    except OSError as e:
        raise ConfigError(f"TLS file {e.filename}: {e.strerror}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


class GrpcServer:
    def __init__(self, services: list[ServiceSpec], host: str, port: int,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self._server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for spec in services:
            spec.add(spec.servicer, self._server)
        self._names = [s.name for s in services]
        reflection.enable_server_reflection([*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        address = f"{host}:{port}"
        bound = (self._server.add_secure_port(address, credentials) if credentials
                 else self._server.add_insecure_port(address))
        if bound == 0:
            raise ConfigError(f"cannot bind gRPC on {address}")
        self.port = bound

    async def start(self) -> None:
        await self._server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._names]:
            await self._health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs at once; in-flight ones get up to grace_s, then are cancelled."""
        await self._server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def install_shutdown_signals() -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event (the first one starts the drain; later ones are ignored)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
