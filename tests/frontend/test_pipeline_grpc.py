"""The gRPC pipeline against in-process fake Prefill/Decode servicers over real gRPC: the disagg
flow, conditional disaggregation, Release when decode never starts, migration mid-stream, and
503 when no worker is left. (The real daemons are exercised in tests/e2e.)"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest

from frontend_svc import errors
from frontend_svc.metrics import Metrics
from frontend_svc.pipeline import GenerateRequest, Pipeline
from frontend_svc.routing import Router
from frontend_svc.workers import Channels
from gptoss_engine.types import SamplingParams
from gptoss_pb.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc


@dataclass
class Load:
    num_running: int = 0
    num_waiting: int = 0


@dataclass
class Rec:
    instance_id: int
    grpc_address: str
    role: str
    load: Load = field(default_factory=Load)
    max_model_len: int = 0


class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    def __init__(self):
        self.released: list[str] = []
        self.calls = 0

    async def Prefill(self, request, context):
        self.calls += 1
        return prefill_pb2.PrefillResponse(first=common_pb2.TokenOutput(token_id=1000),
                                           kv=common_pb2.KVDescriptor(transfer_id=f"t{self.calls}"))

    async def Release(self, request, context):
        self.released.append(request.transfer_id)
        return prefill_pb2.ReleaseResponse(released=True)


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    """Emits max_tokens tokens (ids 1..), or dies (UNAVAILABLE) after `die_after` tokens."""

    def __init__(self, die_after: int | None = None, delay: float = 0.0):
        self.requests: list[decode_pb2.DecodeRequest] = []
        self.die_after = die_after
        self.delay = delay
        self.cancelled = 0

    async def Generate(self, request, context):
        self.requests.append(request)
        n = request.sampling.max_tokens - (1 if request.HasField("kv") else 0)
        try:
            for i in range(n):
                if self.die_after is not None and i >= self.die_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "worker going away")
                await asyncio.sleep(self.delay)
                last = i == n - 1
                yield decode_pb2.DecodeResponse(tokens=[common_pb2.TokenOutput(token_id=2000 + i)],
                                                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class Dir:
    def __init__(self, **comps):
        self.comps = comps

    def instances(self, component):
        return self.comps.get(component, [])


async def serve(servicer, add):
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def workers():
    started = []

    async def start(kind, servicer):
        add = prefill_pb2_grpc.add_PrefillServicer_to_server if kind == "p" else decode_pb2_grpc.add_DecodeServicer_to_server
        server, addr = await serve(servicer, add)
        started.append(server)
        return addr

    yield start
    for s in started:
        await s.stop(0)


def make_pipeline(directory, threshold=0, migration_limit=3, metrics=None):
    return Pipeline(directory, Channels(), Router("round-robin"), metrics or Metrics(), disagg_threshold=threshold,
                    migration_limit=migration_limit, timeout_s=10)


def req(n_prompt=8, max_tokens=5, **sampling):
    return GenerateRequest("rid-1", list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **sampling),
                           "m")


class HandoffFailingDecode(FakeDecode):
    """Refuses every hand-off with `code` before any token (as decode_svc does when the transfer
    fails); without kv it prefills "locally" and samples the prefill's first token (1000) again."""

    def __init__(self, code: grpc.StatusCode, first: int = 1000):
        super().__init__()
        self.code = code
        self.first = first

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.HasField("kv"):
            await context.abort(self.code, "KV transfer failed")
        n = request.sampling.max_tokens
        for i in range(n):
            yield decode_pb2.DecodeResponse(tokens=[common_pb2.TokenOutput(token_id=self.first if i == 0 else 2000 + i)],
                                            finish_reason=common_pb2.FINISH_REASON_LENGTH if i == n - 1 else 0)


def handoff_failures(metrics: Metrics, code: grpc.StatusCode) -> float:
    return metrics.registry.get_sample_value("gptoss_frontend_kv_handoff_failures_total", {"code": code.name}) or 0


async def collect(pipe, r):
    out, finish = [], None
    async for c in pipe.generate(r):
        out += [t.token_id for t in c.tokens]
        finish = c.finish_reason or finish
    return out, finish


async def test_disagg_flow_and_conditional_disagg(workers):
    p, d = FakePrefill(), FakeDecode()
    pa, da = await workers("p", p), await workers("d", d)
    pipe = make_pipeline(Dir(prefill=[Rec(1, pa, "prefill")], backend=[Rec(2, da, "decode")]), threshold=4)
    toks, finish = await collect(pipe, req(8, 5))
    assert toks == [1000, 2000, 2001, 2002, 2003] and finish == "length"
    assert d.requests[0].kv.transfer_id == "t1" and d.requests[0].first.token_id == 1000
    # short prompt: straight to decode, no kv
    toks, _ = await collect(pipe, req(2, 3))
    assert p.calls == 1 and not d.requests[1].HasField("kv") and toks == [2000, 2001, 2002]


async def test_release_when_client_leaves_before_decode(workers):
    p, d = FakePrefill(), FakeDecode(delay=5)
    pa, da = await workers("p", p), await workers("d", d)
    pipe = make_pipeline(Dir(prefill=[Rec(1, pa, "prefill")], backend=[Rec(2, da, "decode")]))
    gen = pipe.generate(req())
    first = await gen.__anext__()
    assert [t.token_id for t in first.tokens] == [1000]
    await gen.aclose()     # the client went away with only the prefill's token
    for _ in range(50):
        if p.released and d.cancelled:
            break
        await asyncio.sleep(0.05)
    assert p.released == ["t1"]


async def test_migration_continues_stream(workers):
    bad, good = FakeDecode(die_after=2), FakeDecode()
    ba, ga = await workers("d", bad), await workers("d", good)
    pipe = make_pipeline(Dir(backend=[Rec(1, ba, "aggregated"), Rec(2, ga, "aggregated")]))
    toks, finish = await collect(pipe, req(4, 6))
    assert toks[:2] == [2000, 2001] and len(toks) == 6 and finish == "length"
    # the healthy worker got prompt + the tokens already sent, and only the remaining budget
    assert list(good.requests[0].prompt_token_ids) == [1, 2, 3, 4, 2000, 2001]
    assert good.requests[0].sampling.max_tokens == 4


async def test_no_healthy_worker_left_is_503(workers):
    bad = FakeDecode(die_after=1)
    ba = await workers("d", bad)
    pipe = make_pipeline(Dir(backend=[Rec(1, ba, "aggregated")]))
    with pytest.raises(errors.ApiError) as e:
        await collect(pipe, req())
    assert e.value.status == 503
    with pytest.raises(errors.ApiError) as e:
        await collect(make_pipeline(Dir(backend=[])), req())
    assert e.value.status == 503


def test_router_policies():
    recs = [Rec(1, "a", "decode", Load(5)), Rec(2, "b", "decode", Load(0)), Rec(3, "c", "decode", Load(1))]
    rr = Router("round-robin")
    assert [rr.pick("backend", recs).instance_id for _ in range(4)] == [1, 2, 3, 1]
    assert rr.pick("backend", recs, exclude={1, 2}).instance_id == 3
    ll = Router("least-loaded")
    assert ll.pick("backend", recs).instance_id == 2
    ll.begin(2), ll.begin(2)
    assert ll.pick("backend", recs).instance_id == 3
    assert Router("random").pick("backend", []) is None


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED,
                                  grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_handoff_failure_falls_back_to_local_prefill(workers, code):
    p, d = FakePrefill(), HandoffFailingDecode(code)
    pa, da = await workers("p", p), await workers("d", d)
    metrics = Metrics()
    pipe = make_pipeline(Dir(prefill=[Rec(1, pa, "prefill")], backend=[Rec(2, da, "decode")]), metrics=metrics)
    toks, finish = await collect(pipe, req(8, 5))
    # the client gets the prefill's first token once, then the local re-run's tokens after it
    assert toks == [1000, 2001, 2002, 2003, 2004] and finish == "length"
    again = d.requests[1]
    assert not again.HasField("kv") and not again.HasField("first")
    # greedy: the unchanged prompt and budget, so the output equals an uninterrupted run
    assert list(again.prompt_token_ids) == list(range(1, 9)) and again.sampling.max_tokens == 5
    assert handoff_failures(metrics, code) == 1
    for _ in range(50):
        if p.released:
            break
        await asyncio.sleep(0.02)
    assert p.released == ["t1"]   # the staged KV is freed now, not at its lease expiry


async def test_handoff_fallback_unseeded_or_diverged_continues_after_the_sent_token(workers):
    p = FakePrefill()
    unseeded, diverging = HandoffFailingDecode(grpc.StatusCode.NOT_FOUND), HandoffFailingDecode(
        grpc.StatusCode.NOT_FOUND, first=999)
    pa, ua, va = await workers("p", p), await workers("d", unseeded), await workers("d", diverging)
    # sampled without a seed: the re-run cannot reproduce token 0, so it continues after it
    pipe = make_pipeline(Dir(prefill=[Rec(1, pa, "prefill")], backend=[Rec(2, ua, "decode")]))
    toks, _ = await collect(pipe, req(4, 5, temperature=0.8))
    assert toks[0] == 1000 and len(toks) == 5
    assert list(unseeded.requests[1].prompt_token_ids) == [1, 2, 3, 4, 1000]
    assert unseeded.requests[1].sampling.max_tokens == 4
    # greedy, but the local re-prefill samples another first token: never sent, re-run after 1000
    pipe = make_pipeline(Dir(prefill=[Rec(1, pa, "prefill")], backend=[Rec(3, va, "decode")]))
    toks, _ = await collect(pipe, req(4, 5))
    # (this fake samples 999 first whatever the prompt: the continuation starts with it)
    assert toks == [1000, 999, 2001, 2002, 2003]
    assert [list(r.prompt_token_ids) for r in diverging.requests[1:]] == [[1, 2, 3, 4], [1, 2, 3, 4, 1000]]


async def test_handoff_invalid_argument_stays_400_and_fallbacks_are_bounded(workers):
    p, bad = FakePrefill(), HandoffFailingDecode(grpc.StatusCode.INVALID_ARGUMENT)
    pa, ba = await workers("p", p), await workers("d", bad)
    pipe = make_pipeline(Dir(prefill=[Rec(1, pa, "prefill")], backend=[Rec(2, ba, "decode")]))
    with pytest.raises(errors.ApiError) as e:
        await collect(pipe, req())
    assert e.value.status == 400 and len(bad.requests) == 1
    refusing = HandoffFailingDecode(grpc.StatusCode.NOT_FOUND, first=999)   # the re-run always diverges
    ra = await workers("d", refusing)
    pipe = make_pipeline(Dir(prefill=[Rec(1, pa, "prefill")], backend=[Rec(3, ra, "decode")]), migration_limit=0)
    with pytest.raises(errors.ApiError) as e:
        await collect(pipe, req())
    assert e.value.status == 503 and len(refusing.requests) == 1


def test_context_limit_is_the_smallest_published_by_workers_that_could_serve():
    d = Dir(prefill=[Rec(1, "a", "prefill", max_model_len=2048)],
            backend=[Rec(2, "b", "decode", max_model_len=4096), Rec(3, "c", "decode", max_model_len=0)])
    pipe = make_pipeline(d, threshold=100)
    assert pipe.context_limit(500) == 2048     # long prompt: the prefill worker takes it too
    assert pipe.context_limit(50) == 4096      # short prompt: straight to a decode worker
    assert make_pipeline(Dir(backend=[Rec(2, "b", "decode")])).context_limit(5) is None   # none published


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_worker_restarted_on_its_address_is_reached_at_once():
    """systemd restarts a crashed worker on the same port. The frontend's channel to that address
    kept retrying while it was down; grpc's default reconnect backoff (growing to 120 s) then kept
    the worker unreachable for 5.3-6.3 s after it was back (bench/results/reconnect.md). Channels uses
    svc_common.grpc_reconnect's options: it must get through within a couple of seconds."""
    channels = Channels()
    server, addr = await serve(FakeDecode(), decode_pb2_grpc.add_DecodeServicer_to_server)
    port = int(addr.rsplit(":", 1)[1])

    async def generate_once(timeout: float) -> int:
        request = decode_pb2.DecodeRequest(request_id="r", prompt_token_ids=[1, 2],
                                           sampling=common_pb2.SamplingParams(max_tokens=2))
        return len([r async for r in channels.decode(addr).Generate(request, timeout=timeout)])

    try:
        assert await generate_once(5) == 2
        await server.stop(0)
        down_until = asyncio.get_running_loop().time() + 20   # backoff by then: ~26 s from the first failure
        while asyncio.get_running_loop().time() < down_until:   # requests keep trying the dead worker
            with pytest.raises(grpc.aio.AioRpcError):
                await generate_once(1)
            await asyncio.sleep(0.5)
        server = grpc.aio.server()
        decode_pb2_grpc.add_DecodeServicer_to_server(FakeDecode(), server)
        assert server.add_insecure_port(addr) == port
        await server.start()
        back = asyncio.get_running_loop().time()
        while True:
            try:
                assert await generate_once(1) == 2
                break
            except grpc.aio.AioRpcError:
                assert asyncio.get_running_loop().time() - back < 2.5, "the restarted worker stayed unreachable"
                await asyncio.sleep(0.05)
    finally:
        await server.stop(0)
        await channels.close()
