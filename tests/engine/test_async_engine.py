"""AsyncEngine on the real tiny checkpoint: streaming, cancellation, and the disaggregation hooks
(prefill -> stage -> copy blocks into another engine's reservation -> generate_from_kv)."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from gptoss_engine.async_engine import AsyncEngine, NoKVCapacity
from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.types import FinishReason, InvalidRequest, SamplingParams

PROMPT = list(range(300, 337))  # 37 tokens: 3 blocks, the last one partial


@pytest.fixture(params=[(False, False), (False, True), (True, None)],
                ids=["publish-at-step-end", "publish-at-launch", "overlap-scheduler"])
async def engines(model, swa_model_dir, request):
    """The ways of handing results to the loop: at the end of each step (CPU's default), at the next
    step's launch (forced here, where the forward runs inside the launch), and with the engine's
    overlap scheduler (CUDA's default: step() returns a step's results after the next launch)."""
    overlap, publish_at_launch = request.param
    made = [AsyncEngine(LLMEngine(EngineConfig(str(swa_model_dir), num_kv_blocks=32, num_swa_blocks=16,
                                               overlap_scheduler=overlap), model=model),
                        publish_at_launch=publish_at_launch)
            for _ in range(2)]
    for e in made:
        await e.start()
    yield made
    for e in made:
        await e.shutdown()


async def at_baseline(engine: AsyncEngine, timeout: float = 5.0) -> None:
    async def check() -> None:
        while True:
            s = engine.stats()
            if ((s.num_free_blocks, s.num_free_swa_blocks, s.num_running, s.num_waiting, s.num_staged, s.num_reserved)
                    == (s.num_total_blocks, s.num_total_swa_blocks, 0, 0, 0, 0)):
                return
            await asyncio.sleep(0.01)
    await asyncio.wait_for(check(), timeout)


async def collect(stream) -> tuple[list[int], FinishReason | None]:
    tokens, reason = [], None
    async with contextlib.aclosing(stream):
        async for out in stream:
            tokens += [t.token_id for t in out.tokens]
            reason = out.finish_reason
    return tokens, reason


async def test_stream_matches_sync_generate(engines, model, swa_model_dir):
    engine = engines[0]
    s = SamplingParams(max_tokens=6, ignore_eos=True)
    got, reason = await collect(engine.generate("a", PROMPT, s))
    ref = LLMEngine(EngineConfig(str(swa_model_dir), num_kv_blocks=32, num_swa_blocks=16), model=model)
    assert got == ref.generate([PROMPT], s)[0].token_ids
    assert reason is FinishReason.LENGTH
    await at_baseline(engine)


async def test_cancel_and_close_free_blocks(engines):
    engine = engines[0]
    stream = engine.generate("long", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    first = await asyncio.wait_for(stream.__anext__(), 10)
    assert len(first.tokens) == 1
    assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
    await stream.aclose()
    await at_baseline(engine)

    async def consume() -> None:
        await collect(engine.generate("cancelled", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True)))

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await at_baseline(engine)


async def test_invalid_request_raises_at_call(engines):
    with pytest.raises(InvalidRequest, match="empty"):
        engines[0].generate("x", [], SamplingParams())
    with pytest.raises(InvalidRequest, match="top_k"):
        await engines[0].prefill("x", [1, 2], SamplingParams(top_k=-1))


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_tokens=8, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=8, ignore_eos=True, min_tokens=3),
], ids=["greedy", "seeded"])
async def test_prefill_handoff_equals_aggregated(engines, sampling):
    prefill_engine, decode_engine = engines
    expected, _ = await collect(decode_engine.generate("agg", PROMPT, sampling))
    await at_baseline(decode_engine)

    result = await prefill_engine.prefill("p", PROMPT, sampling)
    assert result.finish_reason is None and result.first.token_id == expected[0]
    staged = result.staged
    assert staged is not None and staged.num_tokens == len(PROMPT)
    assert prefill_engine.stats().num_staged == 1

    reservation = await decode_engine.reserve_kv(len(PROMPT))
    assert (len(reservation.full_block_ids), len(reservation.swa_block_ids), reservation.swa_first_logical_block) \
        == (len(staged.full_block_ids), len(staged.swa_block_ids), staged.swa_first_logical_block)
    src, dst = prefill_engine.kv_cache, decode_engine.kv_cache
    dst.full[reservation.full_block_ids] = src.full[staged.full_block_ids]
    dst.swa[reservation.swa_block_ids] = src.swa[staged.swa_block_ids]
    assert await prefill_engine.release_staged(staged.handle)
    assert not await prefill_engine.release_staged(staged.handle)
    await at_baseline(prefill_engine)

    rest, reason = await collect(decode_engine.generate_from_kv("d", PROMPT, result.first, reservation, sampling))
    assert [result.first.token_id] + rest == expected
    assert reason is FinishReason.LENGTH
    await at_baseline(decode_engine)


async def test_prefill_that_finishes_at_first_token_stages_nothing(engines):
    result = await engines[0].prefill("p1", PROMPT, SamplingParams(max_tokens=1))
    assert result.finish_reason is FinishReason.LENGTH and result.staged is None
    await at_baseline(engines[0])


async def test_reservation_errors_and_free(engines):
    engine = engines[1]
    with pytest.raises(NoKVCapacity, match="free"):
        await engine.reserve_kv(33 * 16)
    r = await engine.reserve_kv(20)
    assert engine.stats().num_reserved == 1
    assert await engine.free_reservation(r)
    await at_baseline(engine)
    # A mismatched prompt is refused before adoption: the reservation is still the caller's.
    r = await engine.reserve_kv(20)
    first = (await engines[0].prefill("p2", PROMPT, SamplingParams(max_tokens=1))).first
    with pytest.raises(InvalidRequest, match="reservation holds 20"):
        engine.generate_from_kv("d", PROMPT, first, r, SamplingParams())
    assert await engine.free_reservation(r)
    await at_baseline(engine)


async def test_cancelled_prefill_leaves_nothing_staged(engines):
    engine = engines[0]
    task = asyncio.create_task(engine.prefill("pc", PROMPT * 3, SamplingParams(max_tokens=4)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await at_baseline(engine)


async def test_shutdown_ends_streams(model, swa_model_dir):
    engine = AsyncEngine(LLMEngine(EngineConfig(str(swa_model_dir), num_kv_blocks=32, num_swa_blocks=16), model=model))
    await engine.start()
    stream = engine.generate("s", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    await asyncio.wait_for(stream.__anext__(), 10)
    await engine.shutdown()
    tokens, reason = await asyncio.wait_for(collect(stream), 5)
    assert reason is FinishReason.ABORT


async def test_merge_ready_joins_what_a_slow_reader_left_queued(engines, model, swa_model_dir):
    engine = engines[0]
    s = SamplingParams(max_tokens=12, ignore_eos=True)
    stream = engine.generate("m", PROMPT, s)
    first = await stream.__anext__()
    await at_baseline(engine)          # the request ran to the end while nobody read
    merged = stream.merge_ready(first)
    ref = LLMEngine(EngineConfig(str(swa_model_dir), num_kv_blocks=32, num_swa_blocks=16), model=model)
    assert [t.token_id for t in merged.tokens] == ref.generate([PROMPT], s)[0].token_ids
    assert merged.finish_reason is FinishReason.LENGTH and merged.num_prompt_tokens == len(PROMPT)
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    # Nothing queued behind it: the output comes back as it was.
    stream = engine.generate("m2", PROMPT, SamplingParams(max_tokens=1))
    out = await stream.__anext__()
    assert stream.merge_ready(out) is out and out.finish_reason is FinishReason.LENGTH


async def test_merge_ready_stops_before_an_error(engines):
    stream = engines[0].generate("e", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    first = await stream.__anext__()
    stream._push(RuntimeError("engine failed"))   # as the engine thread reports a failed step
    merged = stream.merge_ready(first)
    assert merged.finish_reason is None
    with pytest.raises(RuntimeError, match="engine failed"):
        await stream.__anext__()
    await stream.aclose()
