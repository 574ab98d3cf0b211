"""Channel options for every gRPC client we open: etcd clients (registry.etcd_settings) and the
frontend's channels to workers (frontend_svc.workers).

Why: grpc shares one subchannel per target across a process's channels, and its reconnect backoff
grows to 120 s while the peer is away. bench/reconnect_bench.py (results in
bench/results/reconnect.md): after a 10 s etcd outage, workers held new leases only 1.5-7.0 s after
etcd was back, and since etcd restores old leases with one fresh TTL, keys went missing in 2 of 3
cycles; a worker restarted on its port (systemd) after 20 s down stayed unreachable for 5.3-6.3 s.
With a channel-local subchannel and a 1 s backoff cap: 0.3-0.7 s with no key missing, and 0.4-0.9 s.
"""
from __future__ import annotations

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
