"""Channel options for every gRPC client we open: etcd clients (registry.etcd_settings) and the
frontend's channels to workers (frontend_svc.workers).

Why: grpc shares one subchannel per target across a process's channels, and its reconnect backoff
grows to 120 s while the peer is away. Measured on this VM: after a 10 s etcd outage a new etcd
client still got "connection refused" for 3.6-5.9 s (etcd restores leases with one fresh TTL, so
workers dropped out of the registry); after a worker was down for 20 s, a frontend channel to its
restarted process (systemd reuses the port) failed for 5-8 s. With a channel-local subchannel and
a 1 s backoff cap, both reconnect within 0.1-0.8 s.
"""
from __future__ import annotations

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
