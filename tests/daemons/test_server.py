"""The shared gRPC bootstrap, for real: health service, reflection (what grpcurl uses), drain."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gptoss_pb.v1 import prefill_pb2, prefill_pb2_grpc
from svc_common.server import GrpcServer, ServiceSpec


class SlowStats(prefill_pb2_grpc.PrefillServicer):
    """Isolates the bootstrap from the engine: Stats takes a while, so a drain has something in flight."""

    async def Stats(self, request, context):
        await asyncio.sleep(0.5)
        return prefill_pb2.StatsResponse(num_total_blocks=7)


async def test_health_reflection_and_drain():
    server = GrpcServer([ServiceSpec("gptoss_pb.v1.Prefill", SlowStats(), prefill_pb2_grpc.add_PrefillServicer_to_server)],
                        "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            await server.set_serving(True)
            r = await health.Check(health_pb2.HealthCheckRequest(service="gptoss_pb.v1.Prefill"), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name async for resp in call for s in resp.list_services_response.service}
            assert {"gptoss_pb.v1.Prefill", "grpc.health.v1.Health"} <= names

            in_flight = asyncio.ensure_future(prefill_pb2_grpc.PrefillStub(ch).Stats(prefill_pb2.StatsRequest(), timeout=5))
            await asyncio.sleep(0.1)
            await server.set_serving(False)
            r = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await server.stop(grace_s=5)
            assert (await in_flight).num_total_blocks == 7   # the in-flight call finished during the drain
    finally:
        await server.stop(0)
