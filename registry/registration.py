"""Registration: a worker's InstanceRecord kept in etcd under the worker's own lease.

The key lives exactly as long as the lease: refreshed every ttl/3 by a background task, revoked on
close() (the key vanishes at once), and expired by etcd `ttl` seconds after the worker dies.
An etcd outage never raises into the worker: the task logs once, retries with backoff, and
re-registers (a new lease if the old one expired, same key) when etcd returns.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import aetcd

from registry.backoff import Backoff
from registry.etcd_settings import EtcdSettings
from registry.record import InstanceRecord

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """etcd answered a keep-alive with TTL 0: the lease (and our key) is gone."""


class Registration:
    def __init__(self, settings: EtcdSettings, record: InstanceRecord, ttl: int = 10):
        if ttl < 2:
            raise ValueError(f"ttl must be >= 2 s (keep-alive runs every ttl/3), got {ttl}")
        self.settings = settings
        self.ttl = ttl
        self._record = record
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None
        self._endpoint_index = 0
        self._task: asyncio.Task | None = None
        self._registered = asyncio.Event()
        self._closed = False

    @property
    def key(self) -> str:
        return self._record.key

    @property
    def record(self) -> InstanceRecord:
        return self._record

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def wait_registered(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._registered.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def start(self, timeout_s: float = 5.0) -> bool:
        """Start the keep-alive task and wait up to timeout_s for the first put.
        Returns whether the key is in etcd now; if not, the task keeps trying (never raises)."""
        if self._task is not None:
            raise RuntimeError("Registration already started")
        self._task = asyncio.create_task(self._run(), name=f"registration {self.key}")
        return await self.wait_registered(timeout_s)

    async def update(self, record: InstanceRecord) -> None:
        """Publish a new record (e.g. load) under the same key and lease. Never raises for etcd
        trouble: if the put fails, the background task re-puts the latest record on reconnect."""
        if record.key != self._record.key:
            raise ValueError(f"update must keep the key: {record.key} != {self._record.key}")
        self._record = record
        if self._client is None or self._lease_id is None:
            return
        try:
            await self._client.put(self.key.encode(), record.to_json().encode(), lease=self._lease_id)
        except (aetcd.ClientError, asyncio.TimeoutError, OSError) as e:
            log.debug("registry update of %s deferred: %s", self.key, e)

    async def close(self, timeout_s: float = 3.0) -> None:
        """Stop keep-alive and revoke the lease so the key disappears now (bounded: if etcd is
        down, the lease simply expires within ttl)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None and self._lease_id is not None:
            try:
                await asyncio.wait_for(self._client.revoke_lease(self._lease_id), timeout_s)
                log.info("registry: deregistered %s", self.key)
            except (aetcd.ClientError, asyncio.TimeoutError, OSError) as e:
                log.warning("registry: could not revoke lease of %s (%s); it expires within %ss",
                            self.key, e, self.ttl)
        await self._drop_client()
        self._registered.clear()

    async def _run(self) -> None:
        backoff = Backoff(max_s=max(0.5, self.ttl / 4))
        healthy = True
        while True:
            try:
                await self._register()
                if not healthy:
                    log.warning("registry: etcd reachable again, re-registered %s", self.key)
                else:
                    log.info("registry: registered %s (lease %x, ttl %ss)", self.key, self._lease_id, self.ttl)
                healthy = True
                backoff.reset()
                await self._keep_alive()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any etcd/gRPC failure means: retry, never crash the worker
                self._registered.clear()
                if healthy:
                    log.warning("registry: lost etcd registration of %s (%s: %s); retrying",
                                self.key, type(e).__name__, e)
                healthy = False
                await self._drop_client()
                self._endpoint_index += 1
                await asyncio.sleep(backoff.next_delay())

    async def _register(self) -> None:
        if self._client is None:
            self._client = self.settings.client(self._endpoint_index)
            await self._client.connect()
        lease = await self._client.lease(self.ttl)
        self._lease_id = lease.id
        await self._client.put(self.key.encode(), self._record.to_json().encode(), lease=lease.id)
        self._registered.set()

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            reply = await asyncio.wait_for(self._client.refresh_lease(self._lease_id), self.ttl / 3)
            if reply is None or reply.TTL <= 0:
                raise LeaseLost(f"lease {self._lease_id:x} expired")

    async def _drop_client(self) -> None:
        client, self._client, self._lease_id = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2.0)
