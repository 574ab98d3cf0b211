"""KVTransferClient (decode side): fetches staged blocks straight into reserved destination blocks.

The destination blocks belong to the caller's reservation the whole time: on any exception the
caller frees the reservation (its contents are undefined), and only a normal return means every
byte arrived and was verified. Endpoints are cached per address (warmed up once, pitfall 27);
an endpoint carries one fetch at a time, so concurrent fetches to one address open more endpoints.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Sequence

import ucxx

from gptoss_engine.kv_layout import KVCache
from kv_transfer.blocks import check_block_ids, kv_checksum, layout_dict, plan_pool, runs
from kv_transfer.direct import enabled_by_env, host_id, new_tag_base, worker_address_hex
from kv_transfer.errors import (KVChecksumMismatch, KVLayoutMismatch, KVPeerGone, KVTransferError,
                                KVTransferTimeout, from_status)
from kv_transfer.wire import recv_msg, send_msg

log = logging.getLogger(__name__)

PEER_CHECK_S = 0.1   # how often a same-host transfer checks that the sender is still there
DRAIN_S = 5.0        # how long a failed same-host fetch waits for its receives in flight


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"UCX address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class KVTransferClient:
    def __init__(self, connect_timeout_s: float = 5.0, max_idle_endpoints: int = 4, same_host: bool | None = None):
        self.connect_timeout_s = connect_timeout_s
        # Ask same-host servers for the fast data path (kv_transfer/direct.py: why it is opt-in).
        self.same_host = enabled_by_env() if same_host is None else same_host
        self.max_idle_endpoints = max_idle_endpoints
        self._idle: dict[str, list[Any]] = {}

    async def connect(self, address: str) -> None:
        """Open and warm up an endpoint to `address` ahead of the first fetch (optional)."""
        ep = await self._checkout(address)
        self._checkin(address, ep)

    async def fetch(self, address: str, transfer_id: str, kv: KVCache, full_block_ids: Sequence[int],
                    swa_block_ids: Sequence[int], expected_checksum: int | None = None,
                    timeout_s: float = 30.0) -> int:
        """Receive transfer `transfer_id` from the server at `address` into these blocks of `kv`
        (ids in the same logical order as the sender's). Returns the bytes received. Raises a
        KVTransferError subclass on any failure; the server releases its blocks on our ack."""
        check_block_ids(kv.full, full_block_ids, "full")
        check_block_ids(kv.swa, swa_block_ids, "swa")
        try:
            return await asyncio.wait_for(
                self._fetch(address, transfer_id, kv, full_block_ids, swa_block_ids, expected_checksum),
                timeout_s)
        except asyncio.TimeoutError:
            raise KVTransferTimeout(f"fetch of {transfer_id!r} from {address} took over {timeout_s}s") from None

    async def close(self) -> None:
        for eps in self._idle.values():
            for ep in eps:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ep.close(), 1.0)
        self._idle.clear()

    async def _fetch(self, address: str, transfer_id: str, kv: KVCache, full_ids: Sequence[int],
                     swa_ids: Sequence[int], expected_checksum: int | None) -> int:
        ep = await self._checkout(address)
        reusable = False
        receiving: list[asyncio.Future] = []   # same-host path: receives posted on our worker
        try:
            tag_base = new_tag_base()
            request = {"op": "fetch", "transfer_id": transfer_id, "layout": layout_dict(kv.layout),
                       "full_runs": [n for _, n in runs(full_ids)], "swa_runs": [n for _, n in runs(swa_ids)]}
            if self.same_host:   # the server decides (same boot_id)
                request.update(host_id=host_id(), worker_address=worker_address_hex(), tag_base=tag_base)
            await send_msg(ep, request)
            header = await recv_msg(ep)
            if header.get("status") != "ok":
                reusable = True   # a refusal leaves the endpoint in a clean state
                raise from_status(str(header.get("status")), str(header.get("message", "")))
            full = plan_pool(kv.full, full_ids, header["full_runs"], sending=False)
            swa = plan_pool(kv.swa, swa_ids, header["swa_runs"], sending=False)
            buffers = full.buffers + swa.buffers
            nbytes = sum(b.nbytes for b in buffers)
            if nbytes != header.get("nbytes"):
                # Both sides derived buffers from the same run lengths and an equal layout, so
                # this means a bug; the stream is out of sync, drop the endpoint.
                raise KVLayoutMismatch(f"size mismatch: expecting {nbytes} bytes, sender sends {header.get('nbytes')}")
            if header.get("direct"):
                # Posted on our worker, not on an endpoint: the server sends from its endpoint to
                # our worker address. Tried and dropped (both crashed this process when the sender
                # died mid-transfer): receives on the error-handled control endpoint (ucxx cancels
                # them under UCX's in-progress cma read: segfault) and on an endpoint of ours
                # without error handling (UCX aborts). On the worker, UCX fails them with an I/O error.
                receiving = [asyncio.ensure_future(ucxx.recv(buf, tag_base + i)) for i, buf in enumerate(buffers)]
                await self._unless_gone(ep, receiving)
            else:
                for buf in buffers:
                    await ep.recv(buf)
            full.finish_receive()
            swa.finish_receive()
            if expected_checksum:
                got = kv_checksum(kv, full_ids, swa_ids)
                if got != expected_checksum:
                    await send_msg(ep, {"ok": False, "reason": "checksum mismatch"})
                    reusable = True
                    raise KVChecksumMismatch(f"transfer {transfer_id!r}: checksum {got:#x} != expected {expected_checksum:#x}")
            await send_msg(ep, {"ok": True})
            reusable = True
            log.debug("kv_transfer: fetched %s (%d bytes) from %s over %s", transfer_id, nbytes, address,
                      "the same-host data endpoint" if header.get("direct") else "the control endpoint")
            return nbytes
        except KVTransferError:
            raise
        except (asyncio.CancelledError, asyncio.TimeoutError):
            raise
        except Exception as e:  # noqa: BLE001 - ucxx raises several types for a dead/reset peer
            raise KVPeerGone(f"fetch of {transfer_id!r} from {address} failed: {type(e).__name__}: {e}") from e
        finally:
            sender_gone = ep.closed
            if reusable:
                self._checkin(address, ep)
            else:
                with contextlib.suppress(Exception):
                    ep.abort()   # first: the server cancels its sends when it sees this
            if not sender_gone and any(not r.done() for r in receiving):
                await self._drain(receiving)

    async def _unless_gone(self, ep: Any, receiving: list[asyncio.Future]) -> None:
        """Await the receives, but fail soon after the control endpoint `ep` sees its peer gone (a
        sender that dies before its data starts would leave them waiting until the fetch's timeout).
        Polled rather than through ucxx's close callback, which runs on ucxx's thread."""
        everything = asyncio.gather(*receiving)
        while not (await asyncio.wait({everything}, timeout=PEER_CHECK_S))[0]:
            if ep.closed:
                raise ConnectionError("the control endpoint closed during the transfer")
        everything.result()

    @staticmethod
    async def _drain(receiving: list[asyncio.Future]) -> None:
        """A failed same-host fetch with a live sender: ucxx cannot cancel a worker receive, so wait
        (bounded) until the posted ones end before the caller frees the destination blocks. A matched receive ends
        within one copy (its sender is alive, or UCX fails it); an unmatched one never matches
        later, as the server cancels its sends when our control endpoint goes away (its tag is
        random and used once), so stopping to wait for it is safe."""
        pending = [r for r in receiving if not r.done()]
        with contextlib.suppress(BaseException):
            await asyncio.shield(asyncio.wait(pending, timeout=DRAIN_S))
        for r in receiving:   # retrieve errors; the still-pending ones stay posted (harmless)
            if r.done() and not r.cancelled():
                r.exception()

    async def _checkout(self, address: str) -> Any:
        idle = self._idle.get(address)
        while idle:
            ep = idle.pop()
            if not ep.closed:
                return ep
        host, port = parse_address(address)
        ep = None
        try:
            ep = await asyncio.wait_for(ucxx.create_endpoint(host, port, connect_timeout=self.connect_timeout_s),
                                        self.connect_timeout_s + 1)
            # Warm-up round trip: UCX finishes wiring up lanes on first use (pitfall 27).
            await send_msg(ep, {"op": "ping"})
            reply = await asyncio.wait_for(recv_msg(ep), self.connect_timeout_s)
            if reply.get("status") != "ok":
                raise KVPeerGone(f"KV transfer server at {address} refused the warm-up: {reply}")
        except BaseException as e:
            if ep is not None:
                with contextlib.suppress(Exception):
                    ep.abort()
            if isinstance(e, (KVTransferError, asyncio.CancelledError)) or not isinstance(e, Exception):
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise KVPeerGone(f"no KV transfer server answering at {address}") from None
            raise KVPeerGone(f"cannot connect to KV transfer server at {address}: {type(e).__name__}: {e}") from e
        log.debug("kv_transfer: connected to %s", address)
        return ep

    def _checkin(self, address: str, ep: Any) -> None:
        idle = self._idle.setdefault(address, [])
        if len(idle) < self.max_idle_endpoints and not ep.closed:
            idle.append(ep)
        else:
            with contextlib.suppress(Exception):
                ep.abort()
