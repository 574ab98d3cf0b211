"""Where etcd is and how to log in: parsed once from flags/env, builds aetcd clients."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aetcd

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: list[str] = field(default_factory=lambda: [DEFAULT_ENDPOINTS])
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs
    timeout_s: float = 5.0   # per etcd call, so an outage surfaces as an error instead of a hang

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        for url in self.endpoints:
            _host_port(url)
        if (self.username is None) != (self.password is None):
            raise ValueError("etcd: username and password must be given together")
        if self.cert_file is not None and self.key_file is None:
            raise ValueError("etcd: cert_file needs key_file")
        # aetcd 1.0 opens plaintext channels only (no TLS options in aetcd.Client), so refuse
        # rather than silently talk plaintext to a server the operator meant to reach over TLS.
        if self.ca_file or self.cert_file or any(u.startswith("https://") for u in self.endpoints):
            raise ValueError("etcd: TLS is not supported by the aetcd client in use; "
                             "use http:// endpoints (e.g. over a trusted network or a local TLS proxy)")

    @classmethod
    def parse(cls, endpoints: str, **kwargs) -> "EtcdSettings":
        """From "http://127.0.0.1:2379,http://10.0.0.2:2379" (scheme optional)."""
        return cls([e.strip() for e in endpoints.split(",") if e.strip()], **kwargs)

    def client(self, index: int = 0) -> aetcd.Client:
        """A new (unconnected) client for endpoint `index` (modulo the count): callers rotate
        through endpoints on failure."""
        host, port = _host_port(self.endpoints[index % len(self.endpoints)])
        return aetcd.Client(host=host, port=port, username=self.username, password=self.password,
                            timeout=self.timeout_s)

    def describe(self) -> str:
        """For logs: endpoints and user, never the password."""
        user = f" as {self.username}" if self.username else ""
        return ",".join(self.endpoints) + user


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint must look like http://host:port, got {url!r}")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"etcd endpoint has a bad port: {url!r}") from None
    return parts.hostname, port
