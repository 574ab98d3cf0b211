"""Real frontend process + real etcd + a stand-in decode worker (a real gRPC server in this test
process, registered in etcd with registry.Registration): the frontend discovers it, streams
through it with the openai SDK, and answers 503 once its registration is gone."""
from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
import pytest

from gptoss_pb.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from registry.etcd_settings import EtcdSettings
from registry.record import InstanceRecord, KVLayoutInfo
from registry.registration import Registration
from tests.e2e.conftest import MODEL, NAMESPACE


class StandIn(decode_pb2_grpc.DecodeServicer):
    """Emits a fixed harmony answer, whatever the prompt (this is the isolating double)."""

    def __init__(self, ids):
        self.ids = ids
        self.request_ids = []

    async def Generate(self, request, context):
        self.request_ids.append(dict(context.invocation_metadata()).get("x-request-id"))
        ids = self.ids[:request.sampling.max_tokens]
        for i, t in enumerate(ids):
            last = i == len(ids) - 1
            yield decode_pb2.DecodeResponse(tokens=[common_pb2.TokenOutput(token_id=t)],
                                            finish_reason=common_pb2.FINISH_REASON_STOP if last else 0)


def record(port: int) -> InstanceRecord:
    return InstanceRecord(namespace=NAMESPACE, component="backend", endpoint="generate", instance_id=0xABC,
                          role="aggregated", grpc_address=f"127.0.0.1:{port}", ucx_address="", model_name=MODEL,
                          model_fingerprint="x", kv_layout=KVLayoutInfo(16, "float32", 1, 1, 1, 16, 128))


@pytest.mark.timeout(90)
async def test_discovered_worker_serves_then_gone_is_503(start_frontend, etcd, enc):
    ids = enc.encode("<|channel|>analysis<|message|>ok<|end|><|start|>assistant<|channel|>final<|message|>"
                     "All systems are green.<|return|>", allowed_special="all")
    worker = StandIn(ids)
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reg = Registration(EtcdSettings.parse(etcd.endpoint), record(port), ttl=3)
    f = start_frontend()
    try:
        assert await reg.start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, f.wait_health, {"backend"})
        client = openai.AsyncOpenAI(base_url=f.url + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "up?"}], max_tokens=100, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-request-id": "req-42"})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "All systems are green."
        assert chunks[-1].usage.completion_tokens == len(ids)
        assert worker.request_ids == ["req-42"]
        await reg.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if (await loop.run_in_executor(None, lambda: httpx.get(f.url + "/health"))).status_code == 503:
                break
            await asyncio.sleep(0.2)
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "up?"}],
                                                 max_tokens=5)
        assert e.value.status_code == 503
    finally:
        await reg.close()
        await server.stop(0)
