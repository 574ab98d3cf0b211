"""Faults and life cycle with real processes: registry records, SIGTERM drain, kill -9 of either side,
KV lease expiry, an incompatible model, an etcd outage. Each test starts its own etcd and daemons."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gptoss_engine.model_config import ModelConfig
from gptoss_pb.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from registry.discovery import Discovery
from tests.daemons.calls import GREEDY, decode, prefill, release, stats, wait_stats
from tests.fixtures.procs import TEST_MAX_MODEL_LEN, TEST_TTL_S, worker_args

pytestmark = pytest.mark.slow
PROMPT = list(range(1, 41))


async def _discovery(etcd_settings) -> Discovery:
    disc = Discovery(etcd_settings, namespace="test")
    assert await disc.start()
    return disc


def _wait_log(worker, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in worker.log_text():
            return True
        time.sleep(0.1)
    return False


async def test_records_fingerprint_drain_and_kill(etcd, start_daemon, tiny_model_dir, make_tiny_checkpoint, etcd_settings):
    other_dir = make_tiny_checkpoint(intermediate_size=32)   # same KV layout, other model
    p = start_daemon("prefill_svc", worker_args(tiny_model_dir, etcd.endpoint, "prefill"), wait=False)
    d = start_daemon("decode_svc", worker_args(tiny_model_dir, etcd.endpoint, "decode"), wait=False)
    x = start_daemon("decode_svc", worker_args(other_dir, etcd.endpoint, "aggregated"), wait=False)
    for w in (p, d, x):
        w.wait_ready()
    disc = await _discovery(etcd_settings)
    try:
        assert await disc.wait_for(lambda dd: len(dd.instances()) == 3, 10)
        by_addr = {r.grpc_address: r for r in disc.instances()}
        rp, rd, rx = by_addr[p.address], by_addr[d.address], by_addr[x.address]
        assert (rp.role, rp.component, rd.role, rd.component, rx.role, rx.component) == (
            "prefill", "prefill", "decode", "backend", "aggregated", "backend")
        assert rp.ucx_address == p.ready_event()["ucx_address"] != "" and rd.ucx_address == ""
        fingerprint = ModelConfig.from_pretrained(tiny_model_dir).fingerprint
        assert rp.model_fingerprint == rd.model_fingerprint == fingerprint != rx.model_fingerprint
        assert rp.kv_layout == rd.kv_layout == rx.kv_layout
        assert (rp.kv_layout.block_size, rp.kv_layout.dtype, rp.kv_layout.num_full_layers, rp.kv_layout.num_swa_layers,
                rp.kv_layout.num_kv_heads, rp.kv_layout.head_dim, rp.kv_layout.sliding_window) == (
            16, "float32", 2, 2, 2, 16, 128)
        assert rp.model_name == rd.model_name == "tiny" and rp.instance_id != rd.instance_id
        # the context limit each engine enforces (--max-model-len), for the frontend's checks
        assert rp.max_model_len == rd.max_model_len == rx.max_model_len == TEST_MAX_MODEL_LEN

        # A hand-off to a worker running another model is refused, naming the mismatch.
        x0 = await stats(x.address)
        resp = await prefill(p.address, PROMPT)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await decode(x.address, PROMPT, GREEDY, resp)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "model_fingerprint" in e.value.details()
        assert await release(p.address, resp.kv.transfer_id)
        assert await wait_stats(x.address, lambda s: s == x0) == x0

        # SIGTERM drain: records vanish at once; the in-flight stream finishes; staged KV is read first.
        staged = await prefill(p.address, PROMPT)
        long = common_pb2.SamplingParams(max_tokens=200, ignore_eos=True)
        async with grpc.aio.insecure_channel(x.address) as ch:
            call = decode_pb2_grpc.DecodeStub(ch).Generate(
                decode_pb2.DecodeRequest(prompt_token_ids=PROMPT, sampling=long, model="tiny"), timeout=60)
            first = await call.read()
            p.proc.terminate()
            x.proc.terminate()
            assert await disc.wait_for(lambda dd: [r.role for r in dd.instances()] == ["decode"], 2)
            tokens = [t.token_id for t in first.tokens]
            while (msg := await call.read()) is not grpc.aio.EOF:
                tokens += [t.token_id for t in msg.tokens]
                last = msg
        assert len(tokens) == 200 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert x.proc.wait(15) == 0
        assert p.proc.poll() is None, "the prefill worker exited with KV still staged"
        rest, _ = await decode(d.address, PROMPT, GREEDY, staged)
        assert len(rest) == GREEDY.max_tokens - 1
        assert p.proc.wait(15) == 0

        # kill -9: no goodbye, the record goes when its lease runs out.
        d.kill()
        assert await disc.wait_for(lambda dd: not dd.instances(), TEST_TTL_S + 3)
    finally:
        await disc.close()


async def test_lease_expiry_and_killed_prefill_give_errors_never_tokens(etcd, start_daemon, tiny_model_dir):
    p = start_daemon("prefill_svc", worker_args(tiny_model_dir, etcd.endpoint, "prefill", "--kv-lease-seconds", "2"),
                     wait=False)
    d = start_daemon("decode_svc", worker_args(tiny_model_dir, etcd.endpoint, "decode"), wait=False)
    p.wait_ready()
    d.wait_ready()
    d0 = await stats(d.address)

    # The lease runs out: the prefill side frees the blocks; a late decode gets an error.
    resp = await prefill(p.address, PROMPT)
    assert (await wait_stats(p.address, lambda s: s.num_staged_transfers == 0, 6)).num_staged_transfers == 0
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await decode(d.address, PROMPT, GREEDY, resp)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in e.value.details()
    resp.kv.lease_expires_unix_ms += 60_000   # a descriptor that hides the expiry: the prefill side still refuses
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await decode(d.address, PROMPT, GREEDY, resp)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert await wait_stats(d.address, lambda s: s == d0) == d0

    # The prefill worker dies after Prefill returned, before Decode reads.
    resp = await prefill(p.address, PROMPT)
    p.kill()
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await decode(d.address, PROMPT, GREEDY, resp)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 8
    assert await wait_stats(d.address, lambda s: s == d0) == d0


async def test_etcd_outage_keeps_serving_and_reregisters(etcd, start_daemon, tiny_model_dir, etcd_settings):
    a = start_daemon("decode_svc", worker_args(tiny_model_dir, etcd.endpoint, "aggregated"))
    etcd.stop()
    assert await asyncio.to_thread(_wait_log, a, "lost etcd registration", 15)
    tokens, last = await decode(a.address, PROMPT)
    assert len(tokens) == GREEDY.max_tokens and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    etcd.start()
    disc = await _discovery(etcd_settings)
    try:
        assert await disc.wait_for(lambda dd: [r.grpc_address for r in dd.instances()] == [a.address], 20)
    finally:
        await disc.close()
    assert (await decode(a.address, PROMPT))[0] == tokens
