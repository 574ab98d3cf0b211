"""Real etcd + real daemon processes + real gRPC + real UCX, tiny model on CPU.

One prefill, one decode and one aggregated worker are shared by the module's tests (they start in
about 10 s together); every test leaves them at their baseline (checked through Stats).
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_pb.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from svc_common.convert import sampling_from_pb
from tests.daemons.calls import GREEDY, SEEDED, decode, disagg, prefill, release, stats, wait_stats
from tests.fixtures.procs import TEST_MAX_MODEL_LEN, worker_args

pytestmark = pytest.mark.slow
# Shorter than one block (16), longer than one block, longer than the sliding window (128).
PROMPTS = {"short": list(range(1, 8)), "blocks": list(range(100, 140)), "window": [(7 * i) % 5000 + 3 for i in range(150)]}


@pytest.fixture(scope="module")
def stack(module_daemons, etcd_module, tiny_model_dir, tmp_path_factory):
    """The decode worker runs the overlap scheduler (the engine's default on CUDA, turned on here by
    the seeds' YAML key); the aggregated and prefill workers run without it (CPU's default)."""
    start = module_daemons.start
    overlap_yaml = tmp_path_factory.mktemp("decode-yaml") / "decode.yaml"
    overlap_yaml.write_text("disable_overlap_scheduler: false\n")
    p = start("prefill_svc", worker_args(tiny_model_dir, etcd_module.endpoint, "prefill"), wait=False)
    d = start("decode_svc", worker_args(tiny_model_dir, etcd_module.endpoint, "decode",
                                        "--extra-engine-args", str(overlap_yaml)), wait=False)
    a = start("decode_svc", worker_args(tiny_model_dir, etcd_module.endpoint, "aggregated"), wait=False)
    for w in (p, d, a):
        w.wait_ready()
    return p, d, a


@pytest.fixture
async def baseline(stack):
    """Stats of the three workers before the test; after it, each must be back there."""
    before = [await stats(w.address) for w in stack]
    yield before
    for w, b in zip(stack, before):
        assert await wait_stats(w.address, lambda s, b=b: s == b) == b, f"{w.module} did not return to baseline"


@pytest.fixture(scope="module")
def engine_alone(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=str(tiny_model_dir), device="cpu", max_model_len=TEST_MAX_MODEL_LEN))


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_disagg_equals_aggregated_and_engine_alone(stack, baseline, engine_alone, sampling):
    p, d, a = stack
    want = [r.token_ids for r in engine_alone.generate(list(PROMPTS.values()), sampling_from_pb(sampling))]
    for (name, prompt), alone in zip(PROMPTS.items(), want):
        got = await disagg(p.address, d.address, prompt, sampling)
        agg, _ = await decode(a.address, prompt, sampling)
        assert got == agg == alone, name
        assert (await decode(d.address, prompt, sampling))[0] == alone, f"{name}: decode worker without kv"
    received = [e for e in d.log_events() if e.get("event") == "kv received"]
    assert received and all(e["checksum_verified"] for e in received)
    ready = {w.module + "/" + e["mode"]: e["overlap_scheduler"]
             for w in (p, d, a) for e in w.log_events() if e.get("event") == "ready"}
    assert ready == {"prefill_svc/prefill": False, "decode_svc/decode": True, "decode_svc/aggregated": False}


async def _refused(p_addr: str, d_addr: str, tamper, code: grpc.StatusCode, words: str) -> None:
    """A tampered hand-off is refused with `code` (never tokens); the prefill's staging is released."""
    prompt = PROMPTS["blocks"]
    resp = await prefill(p_addr, prompt)
    transfer_id = resp.kv.transfer_id
    tamper(resp)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await decode(d_addr, prompt, GREEDY, resp)
    assert e.value.code() == code and words in e.value.details(), e.value.details()
    await release(p_addr, transfer_id)


async def test_tampered_checksum_layout_and_transfer_id_are_refused(stack, baseline):
    p, d, _ = stack

    def checksum(r):
        r.kv.checksum ^= 1

    def layout(r):
        r.kv.layout.block_size += 1

    def transfer_id(r):
        r.kv.transfer_id = "0" * 32

    await _refused(p.address, d.address, checksum, grpc.StatusCode.DATA_LOSS, "checksum")
    await _refused(p.address, d.address, layout, grpc.StatusCode.FAILED_PRECONDITION, "block_size")
    await _refused(p.address, d.address, transfer_id, grpc.StatusCode.NOT_FOUND, "not staged")


async def test_release_unknown_or_read_transfer_is_false(stack, baseline):
    p, d, _ = stack
    assert not await release(p.address, "no-such-transfer")
    resp = await prefill(p.address, PROMPTS["short"])
    await decode(d.address, PROMPTS["short"], GREEDY, resp)
    assert not await release(p.address, resp.kv.transfer_id)   # already read (acked)
    resp = await prefill(p.address, PROMPTS["short"])
    assert await release(p.address, resp.kv.transfer_id)
    assert not await release(p.address, resp.kv.transfer_id)


async def test_cancelled_decode_frees_both_sides(stack, baseline):
    p, d, _ = stack
    long = common_pb2.SamplingParams(max_tokens=3000, ignore_eos=True)
    resp = await prefill(p.address, PROMPTS["window"], long)
    req = decode_pb2.DecodeRequest(prompt_token_ids=PROMPTS["window"], sampling=long, model="tiny",
                                   first=resp.first, kv=resp.kv)
    async with grpc.aio.insecure_channel(d.address) as ch:
        call = decode_pb2_grpc.DecodeStub(ch).Generate(req, timeout=60)
        await call.read()
        running = await stats(d.address)
        assert running.num_running == 1
        call.cancel()
    # The baseline fixture checks both sides are back (decode blocks freed, prefill staged == 0).


async def test_cancelled_prefill_leaves_nothing_staged(stack, baseline):
    """Long prefills queued together, each with a deadline shorter than the batch: the ones cut off
    (cancelled on the worker, mid-prefill or waiting) must leave nothing staged or allocated."""
    p, _, _ = stack
    prompts = [[(13 * i + k) % 9000 + 1 for i in range(TEST_MAX_MODEL_LEN - 100)] for k in range(4)]
    results = await asyncio.gather(*(prefill(p.address, q, timeout=0.3) for q in prompts), return_exceptions=True)
    for r in results:   # one that beat its deadline hands its staging to us: release it
        if not isinstance(r, BaseException):
            assert await release(p.address, r.kv.transfer_id)
    cut = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert cut and all(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for e in cut)
    # baseline: nothing staged, every block back.


async def test_deadline_ends_decode_and_frees(stack, baseline):
    _, d, a = stack
    long = common_pb2.SamplingParams(max_tokens=3000, ignore_eos=True)
    for w in (d, a):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await decode(w.address, PROMPTS["short"], long, timeout=1.0)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


BAD = [
    ([], GREEDY, "tiny", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ([1, 201088], GREEDY, "tiny", grpc.StatusCode.INVALID_ARGUMENT, "201088"),
    ([1], common_pb2.SamplingParams(max_tokens=0), "tiny", grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ([1], common_pb2.SamplingParams(max_tokens=4, top_p=2.0), "tiny", grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ([1] * TEST_MAX_MODEL_LEN, GREEDY, "tiny", grpc.StatusCode.INVALID_ARGUMENT, str(TEST_MAX_MODEL_LEN - 1)),
    ([1], GREEDY, "nope", grpc.StatusCode.NOT_FOUND, "nope"),
]


@pytest.mark.parametrize("prompt, sampling, model, code, words", BAD,
                         ids=["empty", "vocab", "max_tokens", "top_p", "context", "model"])
async def test_bad_requests(stack, prompt, sampling, model, code, words):
    p, d, _ = stack
    async with grpc.aio.insecure_channel(p.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await prefill_pb2_grpc.PrefillStub(ch).Prefill(
                prefill_pb2.PrefillRequest(prompt_token_ids=prompt, sampling=sampling, model=model), timeout=10)
    assert e.value.code() == code and words in e.value.details(), e.value.details()
    async with grpc.aio.insecure_channel(d.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            req = decode_pb2.DecodeRequest(prompt_token_ids=prompt, sampling=sampling, model=model)
            async for _ in decode_pb2_grpc.DecodeStub(ch).Generate(req, timeout=10):
                pass
    assert e.value.code() == code and words in e.value.details(), e.value.details()


async def test_prefill_worker_refuses_decode(stack):
    p, _, _ = stack
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await decode(p.address, PROMPTS["short"])
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_and_reflection(stack):
    for w, service in zip(stack, ["gptoss_pb.v1.Prefill", "gptoss_pb.v1.Decode", "gptoss_pb.v1.Decode"]):
        async with grpc.aio.insecure_channel(w.address) as ch:
            for name in ("", service):
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name async for resp in call for s in resp.list_services_response.service}
            assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_request_id_on_every_log_line_of_the_request(stack, baseline):
    p, d, _ = stack
    rid = "rid-7f3a9c"
    await disagg(p.address, d.address, PROMPTS["blocks"], metadata=(("x-request-id", rid),))
    for w, events in ((p, {"prefill staged", "staged kv freed"}), (d, {"kv received", "decode ended"})):
        logged = {e["event"] for e in w.log_events() if e.get("request_id") == rid}
        assert events <= logged, (w.module, logged)
        assert all(e.get("component") for e in w.log_events())   # JSON (structlog) by default

