"""Discovery: a live, read-only view of the registered instances (initial get + watch).

While etcd is unreachable the last known view is kept (workers keep serving; their leases are
etcd's business) and a full resync replaces it when etcd returns. The watch is also restarted
every `resync_s` with a fresh get, so a silently stalled stream cannot leave the view stale forever.
Malformed values are skipped with a warning.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Awaitable, Callable

import aetcd

from registry import keys
from registry.backoff import Backoff
from registry.etcd_settings import EtcdSettings
from registry.record import InstanceRecord, MalformedRecord

log = logging.getLogger(__name__)

ChangeCallback = Callable[[], "Awaitable[None] | None"]


class Discovery:
    def __init__(self, settings: EtcdSettings, namespace: str | None = None, resync_s: float = 30.0):
        self.settings = settings
        self.namespace = namespace
        self.prefix = keys.namespace_prefix(namespace) if namespace else keys.all_instances_prefix()
        self.resync_s = resync_s
        self._view: dict[str, InstanceRecord] = {}
        self._callbacks: list[ChangeCallback] = []
        self.changed = asyncio.Event()   # set on every change of the view; consumers clear() it
        self._synced = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client: aetcd.Client | None = None
        self._endpoint_index = 0

    @property
    def synced(self) -> bool:
        """Whether the view has been loaded from etcd at least once."""
        return self._synced.is_set()

    def instances(self, component: str | None = None) -> list[InstanceRecord]:
        """Known instances (optionally of one component), ordered by key."""
        return [r for k, r in sorted(self._view.items()) if component is None or r.component == component]

    def on_change(self, callback: ChangeCallback) -> None:
        """callback() (sync or async) runs after every change of the view."""
        self._callbacks.append(callback)

    async def start(self, timeout_s: float = 5.0) -> bool:
        """Start watching; wait up to timeout_s for the first sync. Returns whether it happened
        (if not, the view is empty and fills in when etcd is reachable)."""
        if self._task is not None:
            raise RuntimeError("Discovery already started")
        self._task = asyncio.create_task(self._run(), name=f"discovery {self.prefix}")
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def wait_for(self, predicate: Callable[["Discovery"], bool], timeout_s: float) -> bool:
        """Wait until predicate(self) holds (checked after every change); False on timeout."""
        async def until() -> None:
            while not predicate(self):
                self.changed.clear()
                if predicate(self):
                    return
                await self.changed.wait()
        try:
            await asyncio.wait_for(until(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop_client()

    async def _run(self) -> None:
        backoff = Backoff()
        healthy = True
        while True:
            try:
                if self._client is None:
                    self._client = self.settings.client(self._endpoint_index)
                    await self._client.connect()
                revision = await self._resync()
                if not healthy:
                    log.warning("discovery: etcd reachable again, resynced %s (%d instances)",
                                self.prefix, len(self._view))
                healthy = True
                backoff.reset()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._watch(revision + 1), self.resync_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any etcd failure: keep the last view, retry
                if healthy:
                    log.warning("discovery: lost etcd (%s: %s); keeping the last view of %d instances",
                                type(e).__name__, e, len(self._view))
                healthy = False
                await self._drop_client()
                self._endpoint_index += 1
                await asyncio.sleep(backoff.next_delay())

    async def _resync(self) -> int:
        result = await self._client.get_prefix(self.prefix.encode())
        view = {}
        for kv in result:
            record = _parse(kv.key, kv.value)
            if record is not None:
                view[kv.key.decode()] = record
        if view != self._view:
            self._view = view
            await self._notify()
        self._synced.set()
        return result.header.revision

    async def _watch(self, start_revision: int) -> None:
        watch = await self._client.watch_prefix(self.prefix.encode(), start_revision=start_revision)
        try:
            async for event in watch:
                key = event.kv.key.decode()
                if event.kind == aetcd.EventKind.PUT:
                    record = _parse(event.kv.key, event.kv.value)
                    if record is None:
                        self._view.pop(key, None)  # a replaced, now malformed value is not an instance
                    else:
                        self._view[key] = record
                else:
                    self._view.pop(key, None)
                await self._notify()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), 1.0)

    async def _notify(self) -> None:
        self.changed.set()
        for callback in self._callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop discovery
                log.exception("discovery: on_change callback failed")

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2.0)


def _parse(key: bytes, value: bytes) -> InstanceRecord | None:
    try:
        keys.parse_instance_key(key)
        record = InstanceRecord.from_json(value)
    except (ValueError, MalformedRecord) as e:
        log.warning("discovery: skipping malformed registry entry %r: %s", key[:200], e)
        return None
    if record.key != key.decode():
        log.warning("discovery: skipping %s: record names a different key %s", key.decode(), record.key)
        return None
    return record
