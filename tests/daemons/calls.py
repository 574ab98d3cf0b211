"""gRPC calls the daemon tests make against real worker processes (bounded by deadlines)."""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import grpc

from gptoss_pb.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SEEDED = common_pb2.SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=8, ignore_eos=True)


async def stats(address: str) -> prefill_pb2.StatsResponse:
    """Stats of a worker of either kind (each mounts only its own service: Prefill, else Decode)."""
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            return await prefill_pb2_grpc.PrefillStub(ch).Stats(prefill_pb2.StatsRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return await decode_pb2_grpc.DecodeStub(ch).Stats(prefill_pb2.StatsRequest(), timeout=5)


async def wait_stats(address: str, want: Callable[[prefill_pb2.StatsResponse], bool],
                     timeout_s: float = 10.0) -> prefill_pb2.StatsResponse:
    """Stats lag the engine thread by one iteration: poll (bounded) until `want` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = await stats(address)
        if want(s) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.05)


async def prefill(address: str, prompt: list[int], sampling=GREEDY, request_id: str = "",
                  metadata: tuple = (), timeout: float = 60) -> prefill_pb2.PrefillResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await prefill_pb2_grpc.PrefillStub(ch).Prefill(
            prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling, model="tiny"),
            timeout=timeout, metadata=metadata)


async def release(address: str, transfer_id: str) -> bool:
    async with grpc.aio.insecure_channel(address) as ch:
        r = await prefill_pb2_grpc.PrefillStub(ch).Release(prefill_pb2.ReleaseRequest(transfer_id=transfer_id), timeout=5)
    return r.released


async def decode(address: str, prompt: list[int], sampling=GREEDY, p: prefill_pb2.PrefillResponse | None = None,
                 request_id: str = "", metadata: tuple = (), timeout: float = 60) -> tuple[list[int], decode_pb2.DecodeResponse]:
    """All tokens of a Decode stream (continuing from `p` when given) and its last message."""
    req = decode_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling, model="tiny")
    if p is not None:
        req.first.CopyFrom(p.first)
        req.kv.CopyFrom(p.kv)
    tokens, last = [], None
    async with grpc.aio.insecure_channel(address) as ch:
        async for msg in decode_pb2_grpc.DecodeStub(ch).Generate(req, timeout=timeout, metadata=metadata):
            tokens += [t.token_id for t in msg.tokens]
            last = msg
    return tokens, last


async def disagg(prefill_addr: str, decode_addr: str, prompt: list[int], sampling=GREEDY,
                 metadata: tuple = ()) -> list[int]:
    p = await prefill(prefill_addr, prompt, sampling, metadata=metadata)
    assert p.kv.transfer_id and p.kv.checksum != 0 and p.kv.num_tokens == len(prompt)
    rest, last = await decode(decode_addr, prompt, sampling, p, metadata=metadata)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == sampling.max_tokens == len(rest) + 1
    return [p.first.token_id, *rest]
