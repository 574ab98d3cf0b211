"""The frontend's view of the workers: who is live (from the registry) and gRPC stubs to them.

`WorkerDirectory` is the seam the pipeline talks to; `RegistryDirectory` fills it from etcd
through registry.discovery (a worker whose key is gone from etcd is gone from `instances()` and
gets no new traffic). Channels are cached per address and closed when the address disappears.
"""
from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

import grpc

from gptoss_pb.v1 import decode_pb2_grpc, prefill_pb2_grpc
from registry.keys import DECODE, PREFILL  # noqa: F401 - re-exported: the components we route to


class WorkerDirectory(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def instances(self, component: str) -> Sequence: ...


class RegistryDirectory:
    """Live instances of one namespace, from etcd (registry.discovery.Discovery)."""

    def __init__(self, etcd_endpoints: str, namespace: str):
        from registry.etcd_settings import EtcdSettings

        self._settings = EtcdSettings.parse(etcd_endpoints)
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


class Channels:
    """One aio channel per worker address, shared by all requests."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
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
