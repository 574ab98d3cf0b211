"""Prometheus metrics of the frontend (GET /metrics). One registry per app, so tests can run
several apps in one process. Under a supervisor (--http-workers > 1, PROMETHEUS_MULTIPROC_DIR
set) every process writes its values to that directory, and /metrics sums all processes."""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gptoss_frontend_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("gptoss_frontend_time_to_first_token_seconds", "time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gptoss_frontend_inter_token_latency_seconds", "time between output chunks",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("gptoss_frontend_inflight_requests", "requests being served", registry=r,
                              multiprocess_mode="livesum")
        self.queued = Gauge("gptoss_frontend_queued_requests", "requests waiting for their first token",
                            registry=r, multiprocess_mode="livesum")
        self.kv_handoff = Histogram("gptoss_frontend_kv_handoff_seconds",
                                    "Decode call start to its first response when KV is handed off",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_handoff_failures = Counter(
            "gptoss_frontend_kv_handoff_failures",
            "Decode calls that could not take the prefill's KV (by gRPC code); the request re-ran without it",
            ["code"], registry=r)
        self.sse_keepalives = Counter("gptoss_frontend_sse_keepalives", "SSE keep-alive comments sent while "
                                      "a stream had nothing to say", registry=r)
        self.migrations = Counter("gptoss_frontend_migrations", "requests moved to another worker mid-way",
                                  registry=r)
        self.output_tokens = Counter("gptoss_frontend_output_tokens", "generated tokens", registry=r)

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_process)
        return generate_latest(every_process)
