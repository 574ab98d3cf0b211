"""The same-host fast path: data over an endpoint made from the reader's UCX worker address.

Why a second endpoint: ucxx's sockaddr endpoints (listener/create_endpoint) always use UCX's peer
error handling, and with it UCX 1.21 leaves out the shared-memory transports, so two processes on
one host move KV over tcp/lo (~0.3-0.7 GB/s on the 2-core VM). An endpoint created from the
reader's worker address *without* error handling picks cma (zero-copy process_vm_readv) for the
rendezvous, several GB/s (bench/results/kv_transfer.md). Losing UCX error handling on that one
endpoint is safe here because the control messages (request, header, ack) stay on the sockaddr
endpoint, which keeps it: measured, a reader whose sender dies mid-transfer gets an I/O error on its
receive; a sender whose reader dies sees its send hang, so the server bounds the sends by the ack
wait and aborts the data endpoint when the control endpoint fails.

The reader posts its receives through its sockaddr endpoint with explicit tags (UCX matches tags
per worker, not per endpoint), so aborting that endpoint still cancels them.
Only used between processes of one boot (same boot_id); elsewhere the control endpoint carries data.

Opt-in (KV_TRANSFER_SAME_HOST=1, or KVTransferClient(same_host=True)): when the sender process was
killed while its data was in flight, the reader (the decode daemon) crashed in ucxx (segfault in a
pending worker receive, 2 of 3 runs; with the receives on an endpoint without error handling UCX
aborted instead), where the control-endpoint path fails cleanly with KVPeerGone.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import ucxx

MAX_DATA_ENDPOINTS = 8            # cached sender-side endpoints, one per reader process
TAG_BITS = 48                     # random per-fetch tag base; buffer i is sent with tag base + i


def enabled_by_env() -> bool:
    return os.environ.get("KV_TRANSFER_SAME_HOST", "0") == "1"


@functools.cache
def host_id() -> str:
    """Same value in every process of one boot of one machine (containers may share it; UCX then
    still checks that cma/shm can reach the peer and falls back to tcp if not)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""   # unknown: never take the fast path


def same_host(peer_host_id: object) -> bool:
    return bool(host_id()) and peer_host_id == host_id()


def worker_address_hex() -> str:
    return ucxx.get_worker_address().tobytes().hex()


def new_tag_base() -> int:
    return int.from_bytes(os.urandom(TAG_BITS // 8), "little")


class DataEndpoints:
    """Sender side: cached endpoints to readers' workers, keyed by their worker address."""

    def __init__(self) -> None:
        self._eps: dict[str, Any] = {}

    async def get(self, worker_address: str) -> Any:
        ep = self._eps.pop(worker_address, None)
        if ep is None or ep.closed:
            address = ucxx.get_ucx_address_from_buffer(bytes.fromhex(worker_address))
            ep = await ucxx.create_endpoint_from_worker_address(address, endpoint_error_handling=False)
        self._eps[worker_address] = ep          # most recently used last
        while len(self._eps) > MAX_DATA_ENDPOINTS:
            _abort(self._eps.pop(next(iter(self._eps))))
        return ep

    def drop(self, worker_address: str) -> None:
        """After a failed read: cancel whatever the endpoint still has in flight."""
        ep = self._eps.pop(worker_address, None)
        if ep is not None:
            _abort(ep)

    def close(self) -> None:
        for ep in self._eps.values():
            _abort(ep)
        self._eps.clear()


def _abort(ep: Any) -> None:
    with contextlib.suppress(Exception):
        ep.abort()
