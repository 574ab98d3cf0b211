"""KV transfer between two real processes: a child runs the prefill-side server (tests/transfer/peer.py),
this process fetches over real UCX (TCP/shared memory on loopback). One peer process serves every
test of the module (reset between tests); the test that kills its peer starts its own."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import torch

from gptoss_engine.kv_layout import KVCache, KVLayout
import kv_transfer.client
from kv_transfer import (KVChecksumMismatch, KVLayoutMismatch, KVPeerGone, KVTransferClient, KVTransferExpired,
                         KVTransferNotFound, kv_checksum)
from tests.transfer.peer import NUM_BLOCKS, TINY, fill_known

pytestmark = pytest.mark.timeout(60)


class Peer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.transfer.peer"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.address = self._read()["address"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("peer exited")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stage(self, tid, full, swa, lease_s=30.0) -> int:
        return self.call(cmd="stage", transfer_id=tid, full=full, swa=swa, lease_s=lease_s)["checksum"]

    def wait_state(self, want: dict, timeout_s: float = 5.0) -> dict:
        """The server handles our ack asynchronously: poll (bounded) until its state matches."""
        deadline = time.monotonic() + timeout_s
        while (state := self.call(cmd="state")) != want and time.monotonic() < deadline:
            time.sleep(0.02)
        return state

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def shared_peer():
    p = Peer()
    yield p
    p.stop()


@pytest.fixture
def peer(shared_peer):
    yield shared_peer
    assert shared_peer.call(cmd="reset") == {"ok": True}


@pytest.fixture
def own_peer():
    """A peer this test may kill."""
    p = Peer()
    yield p
    p.stop()


@pytest.fixture
async def client():
    c = KVTransferClient(connect_timeout_s=3.0)
    yield c
    await c.close()


def dest_cache() -> KVCache:
    kv = KVCache.allocate(TINY, NUM_BLOCKS, NUM_BLOCKS, "cpu")
    kv.full.fill_(-7.0)
    kv.swa.fill_(-7.0)
    return kv


def source_cache() -> KVCache:
    return fill_known(KVCache.allocate(TINY, NUM_BLOCKS, NUM_BLOCKS, "cpu"))


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "control-endpoint"])
@pytest.mark.parametrize("src_full,src_swa,dst_full,dst_swa", [
    ([0, 1, 2, 3], [4, 5], [8, 9, 10, 11], [0, 1]),          # same runs: direct, one message per run
    ([3, 7, 8, 2], [5, 1], [0, 1, 2, 3], [9, 11]),          # different runs: staged through a buffer
    ([1, 2, 9, 10], [6, 7], [4, 5, 12, 13], [14, 15]),      # equal run lengths, non-contiguous
])
async def test_bytes_arrive_intact(peer, client, caplog, same_host, src_full, src_swa, dst_full, dst_swa):
    client.same_host = same_host
    caplog.set_level(logging.DEBUG, logger="kv_transfer.client")
    expected = peer.stage("t1", src_full, src_swa)
    dst = dest_cache()
    nbytes = await client.fetch(peer.address, "t1", dst, dst_full, dst_swa, expected_checksum=expected, timeout_s=10)
    path = "the same-host data endpoint" if same_host else "the control endpoint"
    assert any(f"fetched t1 ({nbytes} bytes) from {peer.address} over {path}" in m for m in caplog.messages)
    src = source_cache()
    assert nbytes == len(src_full) * TINY.bytes_per_full_block + len(src_swa) * TINY.bytes_per_swa_block
    assert torch.equal(dst.full[dst_full], src.full[src_full])
    assert torch.equal(dst.swa[dst_swa], src.swa[src_swa])
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst_full]
    assert bool((dst.full[untouched] == -7.0).all())
    assert kv_checksum(dst, dst_full, dst_swa) == expected
    # The ack released the staged blocks exactly once, as "read"; a second read finds nothing.
    assert peer.wait_state({"num_staged": 0, "released": [["t1", "read"]]}) == {
        "num_staged": 0, "released": [["t1", "read"]]}
    with pytest.raises(KVTransferNotFound):
        await client.fetch(peer.address, "t1", dst, dst_full, dst_swa, timeout_s=5)


async def test_other_host_gets_the_control_endpoint(peer, client, caplog, monkeypatch):
    """A reader that asks for the fast path from another boot is served over the control endpoint."""
    client.same_host = True
    monkeypatch.setattr(kv_transfer.client, "host_id", lambda: "another-host")
    caplog.set_level(logging.DEBUG, logger="kv_transfer.client")
    expected = peer.stage("t", [0, 1], [2])
    dst = dest_cache()
    await client.fetch(peer.address, "t", dst, [3, 4], [5], expected_checksum=expected, timeout_s=10)
    assert torch.equal(dst.full[[3, 4]], source_cache().full[[0, 1]])
    assert any("over the control endpoint" in m for m in caplog.messages)


async def test_checksum_detects_a_different_source(peer, client):
    checksum_of_other = peer.stage("other", [5], [5])
    peer.stage("t", [0], [0])
    with pytest.raises(KVChecksumMismatch):
        await client.fetch(peer.address, "t", dest_cache(), [0], [0], expected_checksum=checksum_of_other, timeout_s=5)
    # A refused read leaves the transfer staged (the reader may retry until the lease ends).
    assert peer.call(cmd="state")["num_staged"] == 2


async def test_expired_lease_fails_loudly(peer, client):
    peer.stage("t", [0, 1], [2], lease_s=0.2)
    assert peer.wait_state({"num_staged": 0, "released": [["t", "expired"]]}) == {
        "num_staged": 0, "released": [["t", "expired"]]}
    dst = dest_cache()
    with pytest.raises((KVTransferExpired, KVTransferNotFound)):
        await client.fetch(peer.address, "t", dst, [0, 1], [2], timeout_s=5)
    assert bool((dst.full == -7.0).all())


async def test_release_frees_and_later_read_fails(peer, client):
    peer.stage("t", [0], [0])
    assert peer.call(cmd="release", transfer_id="t") == {"ok": True}
    assert peer.call(cmd="release", transfer_id="t") == {"ok": False}
    assert peer.call(cmd="state") == {"num_staged": 0, "released": [["t", "released"]]}
    with pytest.raises(KVTransferNotFound):
        await client.fetch(peer.address, "t", dest_cache(), [0], [0], timeout_s=5)


async def test_unknown_transfer_id(peer, client):
    with pytest.raises(KVTransferNotFound):
        await client.fetch(peer.address, "nope", dest_cache(), [0], [0], timeout_s=5)


async def test_layout_mismatch(peer, client):
    peer.stage("t", [0, 1], [0])
    with pytest.raises(KVLayoutMismatch):   # block counts differ
        await client.fetch(peer.address, "t", dest_cache(), [0], [0], timeout_s=5)
    other = KVLayout(**{**TINY.__dict__, "head_dim": 4})
    with pytest.raises(KVLayoutMismatch):
        await client.fetch(peer.address, "t", KVCache.allocate(other, 4, 4, "cpu"), [0, 1], [0], timeout_s=5)
    assert peer.call(cmd="state")["num_staged"] == 1


async def test_peer_gone_fails_within_timeout(own_peer, client):
    own_peer.stage("t", [0], [0])
    await client.connect(own_peer.address)      # a cached, warmed-up endpoint to a process that then dies
    own_peer.stop()
    start = time.monotonic()
    with pytest.raises(KVPeerGone):
        await client.fetch(own_peer.address, "t", dest_cache(), [0], [0], timeout_s=5)
    assert time.monotonic() - start < 6


async def test_nobody_listening(client):
    from registry.embedded_etcd import free_port
    start = time.monotonic()
    with pytest.raises(KVPeerGone):
        await client.fetch(f"127.0.0.1:{free_port()}", "t", dest_cache(), [0], [0], timeout_s=5)
    assert time.monotonic() - start < 6
