"""The frontend's view of the workers: who is live (from the registry) and gRPC stubs to them.

`WorkerDirectory` is the seam the pipeline talks to; `RegistryDirectory` fills it from etcd
through registry.discovery (a worker whose key is gone from etcd is gone from `instances()` and
gets no new traffic). Channels are cached per address and closed when the address disappears.
"""
from __future__ import annotations

import asyncio
import pathlib
from typing import Protocol, Sequence

import grpc

from gptoss_pb.v1 import decode_pb2_grpc, prefill_pb2_grpc
from registry.keys import DECODE, PREFILL  # noqa: F401 - re-exported: the components we route to
from svc_common.grpc_reconnect import CHANNEL_OPTIONS


class WorkerDirectory(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def instances(self, component: str) -> Sequence: ...


class RegistryDirectory:
    """Live instances of one namespace, from etcd (registry.discovery.Discovery)."""

    def __init__(self, etcd_endpoints: str, namespace: str, **etcd_options) -> None:
        """etcd_options: EtcdSettings fields (ca_file, cert_file, key_file, username, password)."""
        from registry.etcd_settings import EtcdSettings

        self._settings = EtcdSettings.parse(etcd_endpoints, **etcd_options)
        self._namespace = namespace
        self._discovery = None

    async def start(self) -> None:
        from registry.discovery import Discovery

        self._discovery = Discovery(self._settings, namespace=self._namespace)
        await self._discovery.start()

    async def close(self) -> None:
        if self._discovery is not None:
            await self._discovery.close()

    def instances(self, component: str) -> Sequence:
        if self._discovery is None:
            return []
        return list(self._discovery.instances(component))


def worker_credentials(ca_file: str | None, cert_file: str | None = None,
                       key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials for the workers' gRPC servers (None = plaintext): their CA, plus our client
    certificate and key when they require mutual TLS."""
    if not ca_file:
        return None

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return pathlib.Path(path).read_bytes()
        except OSError as e:
            raise SystemExit(f"frontend: cannot read {path}: {e}") from None

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file), private_key=read(key_file),
                                        certificate_chain=read(cert_file))


class Channels:
    """One aio channel per worker address, shared by all requests; TLS when given credentials
    (grpc.ssl_channel_credentials: the workers' CA, plus a client cert/key for mutual TLS)."""

    # A restarted worker comes back on the same address (systemd, fixed ports): reconnect at once.
    _OPTIONS = [("grpc.max_receive_message_length", 64 << 20), *CHANNEL_OPTIONS]

    def __init__(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._credentials = credentials

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = (grpc.aio.secure_channel(address, self._credentials, options=self._OPTIONS)
                  if self._credentials is not None else
                  grpc.aio.insecure_channel(address, options=self._OPTIONS))
            self._channels[address] = ch
        return ch

    def prefill(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        return prefill_pb2_grpc.PrefillStub(self._channel(address))

    def decode(self, address: str) -> decode_pb2_grpc.DecodeStub:
        return decode_pb2_grpc.DecodeStub(self._channel(address))

    async def prune(self, live_addresses: set[str]) -> None:
        for addr in [a for a in self._channels if a not in live_addresses]:
            await self._channels.pop(addr).close()

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)
