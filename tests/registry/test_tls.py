"""etcd over TLS against a real etcd (EmbeddedEtcd with TLS): server-auth TLS, mutual TLS, and
user/password auth over TLS; plus EtcdSettings' TLS validation."""
from __future__ import annotations

import logging
import pathlib
import subprocess
import time

import aetcd
import pytest

from registry import keys
from registry.discovery import Discovery
from registry.embedded_etcd import EmbeddedEtcd, find_etcd_binary
from registry.etcd_settings import EtcdSettings
from registry.registration import Registration
from registry.tls_client import TlsClient
from tests.registry.records import make_record

pytestmark = pytest.mark.timeout(60)

ROOT_PASSWORD = "s3cret-Pa55-root"


@pytest.fixture(scope="module")
def mtls_etcd(test_pki, tmp_path_factory):
    """etcd that requires a client certificate signed by the test CA."""
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd-mtls") / "data", cert_file=test_pki.server_cert,
                          key_file=test_pki.server_key, trusted_ca_file=test_pki.ca, client_cert_auth=True)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def auth_etcd(test_pki, tmp_path_factory):
    """etcd over server-auth TLS (no client certificates) with user/password auth on: user root."""
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd-auth") / "data", cert_file=test_pki.server_cert,
                          key_file=test_pki.server_key)
    server.start()
    etcdctl = pathlib.Path(find_etcd_binary()).with_name("etcdctl")
    if not etcdctl.is_file():
        server.cleanup()
        pytest.skip(f"no etcdctl beside {find_etcd_binary()} to enable etcd auth")
    base = [str(etcdctl), "--endpoints", server.endpoint, "--cacert", str(test_pki.ca), "--dial-timeout", "5s"]
    for args in (["user", "add", f"root:{ROOT_PASSWORD}", "--interactive=false"],
                 ["user", "grant-role", "root", "root"], ["auth", "enable"]):
        done = subprocess.run(base + args, capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, f"etcdctl {args[:2]}: {done.stderr}"
    yield server
    server.cleanup()


def mtls_settings(etcd, pki, **kwargs) -> EtcdSettings:
    return EtcdSettings.parse(etcd.endpoint, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                              key_file=str(pki.client_key), timeout_s=2.0, **kwargs)


async def register_and_discover(settings: EtcdSettings, instance_id: int) -> None:
    """A record registered over `settings` is seen by a Discovery over the same settings."""
    disc = Discovery(settings, namespace="dynamo")
    reg = Registration(settings, make_record(instance_id), ttl=10)
    try:
        assert await disc.start(timeout_s=10)
        assert await reg.start(timeout_s=10)
        assert await disc.wait_for(lambda d: instance_id in [r.instance_id for r in d.instances(keys.PREFILL)], 5)
    finally:
        await reg.close()
        await disc.close()


async def first_put_error(client: aetcd.Client) -> tuple[Exception, float]:
    start = time.monotonic()
    try:
        await client.connect()
        with pytest.raises(aetcd.ClientError) as info:
            await client.put(b"probe", b"x")
        return info.value, time.monotonic() - start
    finally:
        await client.close()


def test_settings_tls_validation(test_pki, tmp_path):
    mutual = EtcdSettings.parse("https://127.0.0.1:2379", ca_file=str(test_pki.ca), cert_file=str(test_pki.client_cert),
                                key_file=str(test_pki.client_key), username="u", password="hunter2")
    assert mutual.tls and isinstance(mutual.client(), TlsClient)
    assert "hunter2" not in repr(mutual) and "hunter2" not in mutual.describe()
    assert "mutual TLS" in mutual.describe()
    assert EtcdSettings.parse("https://127.0.0.1:2379").tls            # system roots
    assert EtcdSettings.parse("127.0.0.1:2379", ca_file=str(test_pki.ca)).tls  # no scheme: the CA decides
    plain = EtcdSettings.parse("http://127.0.0.1:2379")
    assert not plain.tls and type(plain.client()) is aetcd.Client
    with pytest.raises(ValueError, match="use https://"):
        EtcdSettings.parse("http://127.0.0.1:2379", ca_file=str(test_pki.ca))
    with pytest.raises(ValueError, match="mix http:// and https://"):
        EtcdSettings.parse("http://a:2379,https://b:2379")
    with pytest.raises(ValueError, match="go together"):
        EtcdSettings.parse("https://127.0.0.1:2379", cert_file=str(test_pki.client_cert))
    with pytest.raises(ValueError, match="cannot read TLS file .*missing.pem"):
        EtcdSettings.parse("https://127.0.0.1:2379", ca_file=str(tmp_path / "missing.pem"))


async def test_register_and_discover_over_mutual_tls(mtls_etcd, test_pki):
    assert mtls_etcd.endpoint.startswith("https://")
    await register_and_discover(mtls_settings(mtls_etcd, test_pki), 0x51)


async def test_mutual_tls_refuses_clients_without_cert_or_tls(mtls_etcd, test_pki):
    no_cert = EtcdSettings.parse(mtls_etcd.endpoint, ca_file=str(test_pki.ca), timeout_s=2.0)
    error, took = await first_put_error(no_cert.client())
    assert isinstance(error, aetcd.ConnectionFailedError) and "handshake" in str(error).lower(), error
    assert took < 5
    # A plaintext client (http:// to the TLS port) fails fast with a connection error, no hang.
    plaintext = EtcdSettings.parse(mtls_etcd.endpoint.replace("https://", "http://"), timeout_s=2.0)
    error, took = await first_put_error(plaintext.client())
    assert isinstance(error, aetcd.ConnectionFailedError), error
    assert took < 5
    # Nor can a TLS client that does not trust the server's CA (system roots only) get in.
    untrusted = EtcdSettings.parse(mtls_etcd.endpoint, timeout_s=2.0)
    error, _ = await first_put_error(untrusted.client())
    assert isinstance(error, aetcd.ConnectionFailedError), error


async def test_password_auth_over_tls(auth_etcd, test_pki, caplog):
    caplog.set_level(logging.DEBUG)
    good = EtcdSettings.parse(auth_etcd.endpoint, ca_file=str(test_pki.ca), username="root",
                              password=ROOT_PASSWORD, timeout_s=2.0)
    await register_and_discover(good, 0x52)
    # Auth is really on: an anonymous TLS client is refused.
    anonymous = EtcdSettings.parse(auth_etcd.endpoint, ca_file=str(test_pki.ca), timeout_s=2.0)
    error, _ = await first_put_error(anonymous.client())
    assert "user name is empty" in str(error) or "permission denied" in str(error), error

    wrong = EtcdSettings.parse(auth_etcd.endpoint, ca_file=str(test_pki.ca), username="root",
                               password="not-the-Pa55word", timeout_s=2.0)
    client = wrong.client()
    with pytest.raises(aetcd.ClientError, match="authentication failed"):
        await client.connect()
    await client.close()
    reg = Registration(wrong, make_record(0x53), ttl=10)
    try:
        assert not await reg.start(timeout_s=2)   # retried in the background, never registered
    finally:
        await reg.close()
    assert "authentication failed" in caplog.text   # the operator sees why
    for secret in (ROOT_PASSWORD, "not-the-Pa55word"):
        assert secret not in caplog.text
