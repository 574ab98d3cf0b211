"""The daemons' gRPC server TLS and mutual TLS, for real: worker processes started with
--tls-cert/--tls-key (and --tls-client-ca), registered in an etcd that itself requires mutual TLS
(--etcd-endpoints https://... --etcd-ca/--etcd-cert/--etcd-key), probed with real gRPC clients."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry import keys
from registry.discovery import Discovery
from registry.embedded_etcd import EmbeddedEtcd
from registry.etcd_settings import EtcdSettings
from tests.e2e.stack import MODEL, Frontend
from tests.fixtures.procs import DaemonGroup, worker_args

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]   # two worker processes start: > 20 s on 2 cores


@pytest.fixture(scope="module")
def tls_workers(test_pki, tiny_model_dir, tmp_path_factory, request):
    """A prefill worker with server TLS and a decode worker with mutual TLS, both on a mutual-TLS etcd."""
    etcd = EmbeddedEtcd(tmp_path_factory.mktemp("etcd-tls") / "data", cert_file=test_pki.server_cert,
                        key_file=test_pki.server_key, trusted_ca_file=test_pki.ca, client_cert_auth=True)
    etcd.start()
    group = DaemonGroup(tmp_path_factory.mktemp("tls-daemons"))
    failed_before = request.session.testsfailed
    try:
        etcd_tls = ["--etcd-ca", str(test_pki.ca), "--etcd-cert", str(test_pki.client_cert),
                    "--etcd-key", str(test_pki.client_key)]
        server_tls = ["--tls-cert", str(test_pki.server_cert), "--tls-key", str(test_pki.server_key)]
        prefill = group.start("prefill_svc", worker_args(tiny_model_dir, etcd.endpoint, "prefill", *etcd_tls,
                                                         *server_tls), wait=False)
        decode = group.start("decode_svc", worker_args(tiny_model_dir, etcd.endpoint, "decode", *etcd_tls,
                                                       *server_tls, "--tls-client-ca", str(test_pki.ca)), wait=False)
        prefill.wait_ready()
        decode.wait_ready()
        yield etcd, prefill, decode
    finally:
        group.stop_all(show_logs=request.session.testsfailed > failed_before)
        etcd.cleanup()


async def health_status(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = (grpc.aio.secure_channel(address, credentials) if credentials is not None
               else grpc.aio.insecure_channel(address))
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_status(address, credentials)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value


async def test_workers_registered_over_mutual_tls_etcd(tls_workers, test_pki):
    etcd, prefill, decode = tls_workers
    settings = EtcdSettings.parse(etcd.endpoint, ca_file=str(test_pki.ca), cert_file=str(test_pki.client_cert),
                                  key_file=str(test_pki.client_key), timeout_s=2.0)
    disc = Discovery(settings, namespace="test")
    try:
        assert await disc.start(timeout_s=10)
        addresses = {r.grpc_address for r in disc.instances(keys.PREFILL) + disc.instances(keys.DECODE)}
        assert addresses == {prefill.address, decode.address}
    finally:
        await disc.close()


async def test_server_tls(tls_workers, test_pki):
    _, prefill, _ = tls_workers
    trusted = grpc.ssl_channel_credentials(root_certificates=test_pki.read("ca"))
    assert await health_status(prefill.address, trusted) == health_pb2.HealthCheckResponse.SERVING
    await refused(prefill.address, None)                               # plaintext client
    await refused(prefill.address, grpc.ssl_channel_credentials())     # does not trust the test CA


async def test_mutual_tls(tls_workers, test_pki):
    _, _, decode = tls_workers
    with_cert = grpc.ssl_channel_credentials(root_certificates=test_pki.read("ca"),
                                             private_key=test_pki.read("client_key"),
                                             certificate_chain=test_pki.read("client_cert"))
    assert await health_status(decode.address, with_cert) == health_pb2.HealthCheckResponse.SERVING
    without_cert = grpc.ssl_channel_credentials(root_certificates=test_pki.read("ca"))
    await refused(decode.address, without_cert)
    await refused(decode.address, None)


def test_frontend_reaches_tls_workers_through_tls_etcd(tls_workers, test_pki, tiny_model_dir, tmp_path):
    """The whole chain: frontend -> etcd (mutual TLS) to find the workers -> their gRPC over TLS
    (the decode worker demands a client certificate), checked with the official openai client."""
    etcd, _, _ = tls_workers
    client_tls = []
    for prefix in ("etcd", "worker-tls"):
        client_tls += [f"--{prefix}-ca", str(test_pki.ca), f"--{prefix}-cert", str(test_pki.client_cert),
                       f"--{prefix}-key", str(test_pki.client_key)]
    frontend = Frontend(etcd.endpoint, tmp_path / "frontend.log", tiny_model_dir, *client_tls)
    try:
        frontend.wait_live()
        frontend.wait_health({"prefill", "backend"})
        reply = frontend.client().completions.create(model=MODEL, prompt="hello " * 40, max_tokens=4,
                                                     temperature=0)
        assert reply.usage.completion_tokens == 4, reply
    except Exception:
        print(frontend.tail())
        raise
    finally:
        frontend.stop()
