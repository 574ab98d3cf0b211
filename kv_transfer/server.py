"""KVTransferServer (prefill side): stages a request's blocks for one reader and serves them.

Ownership: the engine pins the blocks before stage() and frees them only when on_release fires.
on_release(transfer_id, reason) fires exactly once per staged transfer, with reason
  "read"     - a reader received the bytes and acked (sizes and checksum verified);
  "released" - release() was called (e.g. Prefill.Release, or close() with the transfer unread);
  "expired"  - the lease ran out before a successful read.
A lease that runs out *while* a read is in flight does not free the blocks under the reader
(pitfall 21): the outcome is decided when the read ends ("read" on ack, else "expired").
stage()/release()/checksum() must be called on the event loop thread that runs the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import ucxx

from gptoss_engine.kv_layout import KVCache
from kv_transfer.blocks import check_block_ids, kv_checksum, layout_dict, plan_pool, runs
from kv_transfer.direct import TAG_BITS, DataEndpoints, same_host
from kv_transfer.wire import recv_msg, send_msg

log = logging.getLogger(__name__)

OnRelease = Callable[[str, str], "Awaitable[None] | None"]


@dataclass
class _Staged:
    transfer_id: str
    full_block_ids: list[int]
    swa_block_ids: list[int]
    expires_at: float                     # time.monotonic()
    on_release: OnRelease | None
    timer: asyncio.TimerHandle | None = None
    reading: bool = False
    expired: bool = False
    created: float = field(default_factory=time.monotonic)


class KVTransferServer:
    def __init__(self, kv: KVCache, host: str = "127.0.0.1", port: int = 0, ack_timeout_s: float = 30.0):
        self.kv = kv
        self.host = host          # the address advertised to readers (the listener binds all interfaces)
        self.port = port
        self.ack_timeout_s = ack_timeout_s
        self._staged: dict[str, _Staged] = {}
        self._listener = None
        self._handlers: set[asyncio.Task] = set()
        self._callbacks: set[asyncio.Task] = set()
        self._reads_idle = asyncio.Event()
        self._reads_idle.set()
        self._num_reading = 0
        self._data_eps = DataEndpoints()   # same-host fast path (kv_transfer/direct.py)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def num_staged(self) -> int:
        return len(self._staged)

    async def start(self) -> str:
        self._listener = ucxx.create_listener(self._on_connect, self.port or None)
        self.port = self._listener.port
        log.info("kv_transfer: listening on %s", self.address)
        return self.address

    def stage(self, transfer_id: str, full_block_ids: Sequence[int], swa_block_ids: Sequence[int],
              lease_s: float, on_release: OnRelease | None = None) -> None:
        """Offer these blocks to one reader for lease_s seconds (the caller keeps them pinned
        until on_release fires)."""
        if not transfer_id:
            raise ValueError("transfer_id must be non-empty")
        if transfer_id in self._staged:
            raise ValueError(f"transfer id {transfer_id!r} is already staged")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        check_block_ids(self.kv.full, full_block_ids, "full")
        check_block_ids(self.kv.swa, swa_block_ids, "swa")
        entry = _Staged(transfer_id, list(full_block_ids), list(swa_block_ids),
                        time.monotonic() + lease_s, on_release)
        entry.timer = asyncio.get_running_loop().call_later(lease_s, self._on_lease_end, transfer_id)
        self._staged[transfer_id] = entry

    def release(self, transfer_id: str) -> bool:
        """Drop a staged transfer nobody will read. False if unknown (already read, released or
        expired). A release during an in-flight read waits for the read's end."""
        entry = self._staged.get(transfer_id)
        if entry is None:
            return False
        if entry.reading:
            entry.expired = True   # freed when the read ends, as "expired" unless it succeeds
            return True
        self._finish(entry, "released")
        return True

    def checksum(self, transfer_id: str) -> int:
        entry = self._staged.get(transfer_id)
        if entry is None:
            raise KeyError(f"transfer id {transfer_id!r} is not staged")
        return kv_checksum(self.kv, entry.full_block_ids, entry.swa_block_ids)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop listening, wait (bounded) for in-flight reads, release what is left ("released")."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._reads_idle.wait(), timeout_s)
        for entry in list(self._staged.values()):
            self._finish(entry, "released")
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, *self._callbacks, return_exceptions=True)
        self._data_eps.close()

    def _on_lease_end(self, transfer_id: str) -> None:
        entry = self._staged.get(transfer_id)
        if entry is None:
            return
        if entry.reading:
            entry.expired = True
        else:
            self._finish(entry, "expired")

    def _finish(self, entry: _Staged, reason: str) -> None:
        if self._staged.pop(entry.transfer_id, None) is None:
            return   # exactly once
        if entry.timer is not None:
            entry.timer.cancel()
        log.debug("kv_transfer: %s %s", entry.transfer_id, reason)
        if entry.on_release is None:
            return
        try:
            result = entry.on_release(entry.transfer_id, reason)
        except Exception:  # noqa: BLE001 - a caller's bug must not break the server
            log.exception("kv_transfer: on_release(%s, %s) failed", entry.transfer_id, reason)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _on_connect(self, ep) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                try:
                    msg = await recv_msg(ep)
                except Exception:  # noqa: BLE001 - peer closed or broke the connection
                    return
                if msg.get("op") == "ping":
                    await send_msg(ep, {"status": "ok"})
                elif msg.get("op") == "fetch":
                    if not await self._serve_fetch(ep, msg):
                        return
                else:
                    await send_msg(ep, {"status": "error", "message": f"unknown op {msg.get('op')!r}"})
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                await ep.close()

    async def _serve_fetch(self, ep, msg: dict) -> bool:
        """Serve one fetch; returns whether the endpoint is still usable."""
        transfer_id = str(msg.get("transfer_id", ""))
        entry = self._staged.get(transfer_id)
        error = self._refusal(entry, transfer_id, msg)
        if error is not None:
            await send_msg(ep, {"status": error[0], "message": error[1]})
            return True
        entry.reading = True
        self._num_reading += 1
        self._reads_idle.clear()
        acked = False
        direct: str | None = None
        sends: list[asyncio.Future] = []
        try:
            direct = await self._direct_address(msg)
            full = plan_pool(self.kv.full, entry.full_block_ids, msg["full_runs"], sending=True)
            swa = plan_pool(self.kv.swa, entry.swa_block_ids, msg["swa_runs"], sending=True)
            buffers = full.buffers + swa.buffers
            await send_msg(ep, {"status": "ok", "message": "", "nbytes": sum(b.nbytes for b in buffers),
                                "full_runs": [n for _, n in runs(entry.full_block_ids)],
                                "swa_runs": [n for _, n in runs(entry.swa_block_ids)],
                                "direct": direct is not None})
            if direct is not None:
                # All sends in flight at once; the reader acks only after every receive completed,
                # so by the ack they are done. They must not outlive a failed read (the blocks are
                # freed after it): the except below cancels them and aborts the data endpoint.
                data_ep = await self._data_eps.get(direct)
                sends = [asyncio.ensure_future(data_ep.send(buf, tag=msg["tag_base"] + i, force_tag=True))
                         for i, buf in enumerate(buffers)]
            else:
                for buf in buffers:
                    await ep.send(buf)
            ack = await asyncio.wait_for(recv_msg(ep), self.ack_timeout_s)
            if sends:
                await asyncio.wait_for(asyncio.gather(*sends), self.ack_timeout_s)
            acked = bool(ack.get("ok"))
            if not acked:
                log.warning("kv_transfer: reader refused %s: %s", transfer_id, ack.get("reason"))
            return True
        except Exception as e:  # noqa: BLE001 - peer gone or timed out mid-read
            log.warning("kv_transfer: read of %s failed: %s: %s", transfer_id, type(e).__name__, e)
            for task in sends:
                task.cancel()
            if direct is not None:
                self._data_eps.drop(direct)
            return False
        finally:
            entry.reading = False
            self._num_reading -= 1
            if self._num_reading == 0:
                self._reads_idle.set()
            if acked:
                self._finish(entry, "read")
            elif entry.expired or time.monotonic() >= entry.expires_at:
                self._finish(entry, "expired")
            # else: stays staged for a retry until its lease ends

    async def _direct_address(self, msg: dict) -> str | None:
        """The reader's worker address when it runs on this host and asked for the fast path."""
        address, tag_base = msg.get("worker_address"), msg.get("tag_base")
        if not (isinstance(address, str) and isinstance(tag_base, int) and 0 <= tag_base < 1 << TAG_BITS
                and same_host(msg.get("host_id"))):
            return None
        try:
            await self._data_eps.get(address)
        except Exception as e:  # noqa: BLE001 - a malformed address: serve over the control endpoint
            log.warning("kv_transfer: no data endpoint to the reader (%s: %s); using the control endpoint",
                        type(e).__name__, e)
            return None
        return address

    def _refusal(self, entry: _Staged | None, transfer_id: str, msg: dict) -> tuple[str, str] | None:
        if entry is None:
            return "not_found", f"transfer {transfer_id!r} is not staged here (unknown, read, released or expired)"
        if entry.reading:
            return "busy", f"transfer {transfer_id!r} is being read by another reader"
        if entry.expired or time.monotonic() >= entry.expires_at:
            return "expired", f"transfer {transfer_id!r}: lease expired"
        mine = layout_dict(self.kv.layout)
        if msg.get("layout") != mine:
            return "layout_mismatch", f"KV layout differs: reader {msg.get('layout')} vs prefill {mine}"
        full_runs, swa_runs = msg.get("full_runs"), msg.get("swa_runs")
        if not (isinstance(full_runs, list) and isinstance(swa_runs, list)):
            return "error", "fetch needs full_runs and swa_runs"
        if sum(full_runs) != len(entry.full_block_ids) or sum(swa_runs) != len(entry.swa_block_ids):
            return "layout_mismatch", (f"block counts differ: reader {sum(full_runs)} full + {sum(swa_runs)} swa, "
                                       f"staged {len(entry.full_block_ids)} + {len(entry.swa_block_ids)}")
        return None
