"""EmbeddedEtcd's start-up against a real etcd binary: a picked port that another process takes
before etcd binds it costs a retry on fresh ports, never a failed start; a fixed port in use fails
with etcd's own reason in the error; restart() comes back at the same address."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from registry.embedded_etcd import EmbeddedEtcd, EtcdExited, _ephemeral_low, free_ports

pytestmark = pytest.mark.timeout(60)


def occupy(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def healthy(etcd: EmbeddedEtcd) -> bool:
    with urllib.request.urlopen(etcd.endpoint + "/health", timeout=2) as r:
        return b'"health":"true"' in r.read()


def test_free_ports_are_distinct():
    ports = free_ports(16)
    assert len(set(ports)) == 16


def test_free_ports_avoid_the_ephemeral_range():
    """Outgoing connections take their local ports from that range, so a port picked there can be
    gone by the time a daemon binds it."""
    low = _ephemeral_low()
    if low is None:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range here")
    assert all(p < low for p in free_ports(16))


def test_picked_port_taken_before_start_is_repicked(tmp_path):
    etcd = EmbeddedEtcd(tmp_path / "etcd")
    taken = etcd.client_port
    squatter = occupy(taken)
    try:
        etcd.start()
        assert etcd.client_port != taken
        assert healthy(etcd)
        assert "address already in use" in etcd.log_path.read_text()
        # Once started, the address is fixed: restart() comes back on the same ports.
        client, peer = etcd.client_port, etcd.peer_port
        etcd.restart()
        assert (etcd.client_port, etcd.peer_port) == (client, peer)
        assert healthy(etcd)
    finally:
        squatter.close()
        etcd.cleanup()


def test_fixed_port_in_use_fails_with_etcds_reason(tmp_path):
    squatter = occupy(0)
    port = squatter.getsockname()[1]
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_port=port)
    try:
        with pytest.raises(EtcdExited, match="address already in use"):
            etcd.start(attempts=2)
        assert etcd.client_port == port
        assert not etcd.running
    finally:
        squatter.close()
        etcd.cleanup()
