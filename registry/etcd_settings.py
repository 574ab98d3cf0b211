"""Where etcd is and how to log in: parsed once from flags/env, builds aetcd clients.

TLS: https:// endpoints (or a CA file with scheme-less endpoints) give TLS clients
(registry.tls_client), verifying the server against ca_file (else the system's roots); a client
certificate + key make it mutual TLS. User/password work with or without TLS.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aetcd
import grpc

from registry.tls_client import TlsClient
from svc_common.grpc_reconnect import CHANNEL_OPTIONS

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
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("etcd: the client certificate and its key go together (--etcd-cert, --etcd-key)")
        schemes = {_scheme(u) for u in self.endpoints}
        if {"http", "https"} <= schemes:
            raise ValueError(f"etcd: endpoints mix http:// and https://: {','.join(self.endpoints)}")
        if "http" in schemes and (self.ca_file or self.cert_file):
            # Never talk plaintext to a server the operator meant to reach over TLS.
            raise ValueError("etcd: TLS files are given (--etcd-ca/--etcd-cert) but the endpoints are "
                             "http://; use https:// endpoints")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None:
                _read(path)   # a missing file is a start-up error, not an endless reconnect loop

    @property
    def tls(self) -> bool:
        return any(_scheme(u) == "https" for u in self.endpoints) or self.ca_file is not None or self.cert_file is not None

    @classmethod
    def parse(cls, endpoints: str, **kwargs) -> "EtcdSettings":
        """From "http://127.0.0.1:2379,http://10.0.0.2:2379" (scheme optional)."""
        return cls([e.strip() for e in endpoints.split(",") if e.strip()], **kwargs)

    def client(self, index: int = 0) -> aetcd.Client:
        """A new (unconnected) client for endpoint `index` (modulo the count): callers rotate
        through endpoints on failure."""
        host, port = _host_port(self.endpoints[index % len(self.endpoints)])
        kwargs = dict(host=host, port=port, username=self.username, password=self.password, timeout=self.timeout_s,
                      options=dict(CHANNEL_OPTIONS))   # reconnect at once after an outage
        if not self.tls:
            return aetcd.Client(**kwargs)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file) if self.ca_file else None,
            private_key=_read(self.key_file) if self.key_file else None,
            certificate_chain=_read(self.cert_file) if self.cert_file else None)
        return TlsClient(credentials=credentials, **kwargs)

    def describe(self) -> str:
        """For logs: endpoints and user, never the password."""
        user = f" as {self.username}" if self.username else ""
        tls = (" (mutual TLS)" if self.cert_file else " (TLS)") if self.tls else ""
        return ",".join(self.endpoints) + user + tls


def _scheme(url: str) -> str | None:
    """http / https, or None when the endpoint names no scheme (TLS then follows ca_file)."""
    return urlsplit(url).scheme if "://" in url else None


def _read(path: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"etcd: cannot read TLS file {path}: {e.strerror}") from None


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint must look like http://host:port, got {url!r}")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"etcd endpoint has a bad port: {url!r}") from None
    return parts.hostname, port
