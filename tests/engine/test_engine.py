"""LLMEngine on the real tiny checkpoint: batching, preemption, prefix caching, chunked prefill,
seeded sampling and request validation, each against a reference run."""
from __future__ import annotations

import pathlib

import pytest

from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.types import FinishReason, InvalidRequest, SamplingParams
from tests.fixtures.models import greedy_generate

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
PROMPTS = [list(range(100, 141)), list(range(500, 513)), list(range(900, 905)), list(range(1000, 1033))]


_MODE = {"overlap": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "overlap"])
def overlap(request, monkeypatch) -> bool:
    """Every test runs with and without the overlap scheduler (CUDA's default, off on CPU): the
    outputs must not change."""
    monkeypatch.setitem(_MODE, "overlap", request.param)
    return request.param


def make_engine(model: GptOssForCausalLM, path: pathlib.Path, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("num_swa_blocks", 32)
    kw.setdefault("overlap_scheduler", _MODE["overlap"])
    return LLMEngine(EngineConfig(str(path), **kw), model=model)


@pytest.fixture(scope="module")
def reference(model: GptOssForCausalLM) -> list[list[int]]:
    out, _ = greedy_generate(model, PROMPTS, GREEDY.max_tokens)
    return out


def assert_baseline(engine: LLMEngine) -> None:
    s = engine.stats()
    assert (s.num_free_blocks, s.num_free_swa_blocks) == (s.num_total_blocks, s.num_total_swa_blocks)
    assert (s.num_running, s.num_waiting, s.num_staged, s.num_reserved) == (0, 0, 0, 0)


def test_batch_equals_one_at_a_time_and_reference(model, swa_model_dir, reference):
    engine = make_engine(model, swa_model_dir, enable_prefix_caching=False)
    batched = engine.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in batched] == reference
    assert all(r.finish_reason is FinishReason.LENGTH for r in batched)
    single = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert single == reference
    assert_baseline(engine)


def test_preemption_under_tiny_block_budget(model, swa_model_dir, reference):
    # 8 full blocks: the 4 prompts (+10 tokens) need 4+2+1+3 = 10 blocks at once, so some get preempted.
    engine = make_engine(model, swa_model_dir, num_kv_blocks=8, num_swa_blocks=8, enable_prefix_caching=False)
    preempted = []
    orig = engine.scheduler.schedule

    def spy():
        out = orig()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = spy
    results = engine.generate(PROMPTS, GREEDY)
    assert preempted, "the budget was meant to force preemption"
    assert [r.token_ids for r in results] == reference
    assert_baseline(engine)


def test_prefix_cache_hits_keep_outputs(model, swa_model_dir, reference):
    engine = make_engine(model, swa_model_dir)
    first = engine.generate([PROMPTS[0]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    again = engine.generate([PROMPTS[0]], GREEDY)[0]
    assert again.num_cached_tokens == 32   # 2 full blocks of the 41-token prompt
    assert again.token_ids == reference[0]
    # Overlapping prompt: shares the first block only.
    overlap = PROMPTS[0][:16] + list(range(7000, 7020))
    ref_overlap, _ = greedy_generate(model, [overlap], GREEDY.max_tokens)
    got = engine.generate([overlap], GREEDY)[0]
    assert got.num_cached_tokens == 16 and got.token_ids == ref_overlap[0]
    assert_baseline(engine)


def test_prefix_hit_needs_window_blocks(model, swa_model_dir):
    engine = make_engine(model, swa_model_dir)
    engine.generate([PROMPTS[0]], GREEDY)
    # Drop the sliding blocks from the cache (hand them out again): the full-block hit must shrink to 0.
    bm = engine.block_manager
    grabbed = [bm.swa.allocate() for _ in range(len(bm.swa.free))]
    assert not bm.swa.by_hash
    for b in grabbed:
        bm.swa.release(b)
    assert engine.generate([PROMPTS[0]], GREEDY)[0].num_cached_tokens == 0


def test_chunked_prefill_unchanged(model, swa_model_dir, reference):
    engine = make_engine(model, swa_model_dir, max_num_tokens=7, enable_prefix_caching=False)
    assert [r.token_ids for r in engine.generate(PROMPTS, GREEDY)] == reference
    assert_baseline(engine)


def test_seeded_sampling_reproducible_and_seed_dependent(model, swa_model_dir):
    engine = make_engine(model, swa_model_dir)
    s1 = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1, max_tokens=12, ignore_eos=True)
    a = engine.generate([PROMPTS[1]], s1)[0].token_ids
    b = engine.generate([PROMPTS[1], PROMPTS[0]], [s1, GREEDY])[0].token_ids
    c = engine.generate([PROMPTS[1]], SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True))[0]
    assert a == b
    assert a != c.token_ids


def test_logprobs_and_stop_tokens(model, swa_model_dir, reference):
    engine = make_engine(model, swa_model_dir)
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=3))[0]
    for t in r.tokens:
        assert t.logprob is not None and t.logprob <= 0.0
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0][0] == t.token_id  # greedy = top-1
    stop_at = reference[0][3]
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert r.finish_reason is FinishReason.STOP and r.token_ids == reference[0][:reference[0].index(stop_at) + 1]
    # min_tokens masks the stop token until reached.
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, min_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert stop_at not in r.token_ids and len(r.token_ids) == 10


@pytest.mark.parametrize("prompt, sampling, message", [
    ([], GREEDY, "empty"),
    ([1, 2, -3], GREEDY, "[0, 201088)"),
    ([1, 2, 201088], GREEDY, "[0, 201088)"),
    (list(range(64)), GREEDY, "limit is 63"),
    ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(max_tokens=2, min_tokens=3), "min_tokens"),
    ([1, 2], SamplingParams(top_logprobs=21), "top_logprobs"),
])
def test_bad_requests_raise_invalid_request(model, swa_model_dir, prompt, sampling, message):
    engine = make_engine(model, swa_model_dir, max_model_len=64)
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace(")", r"\)")):
        engine.add_request("r", prompt, sampling)
    assert_baseline(engine)


def test_request_that_can_never_fit_is_refused(model, swa_model_dir):
    engine = make_engine(model, swa_model_dir, num_kv_blocks=4)
    with pytest.raises(InvalidRequest, match="KV blocks"):
        engine.add_request("r", list(range(60)), SamplingParams(max_tokens=20))


def test_on_launched_runs_between_the_forward_and_sampling_once_per_scheduled_step(model, swa_model_dir):
    engine = make_engine(model, swa_model_dir)
    events: list[str] = []
    forward, sampler = engine.runner.forward_fn, engine.runner.sampler

    def logged_forward(batch, kv):
        events.append("forward")
        return forward(batch, kv)

    def logged_launch(logits, requests):
        events.append("sample")
        return launch(logits, requests)
    launch = sampler.launch
    engine.runner.forward_fn, sampler.launch = logged_forward, logged_launch
    assert engine.step(on_launched=lambda: events.append("launched")) == [] and events == []   # nothing scheduled
    engine.add_request("r", list(range(300, 310)), SamplingParams(max_tokens=2, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step(on_launched=lambda: events.append("launched"))
        steps += 1
    # Prefill, one decode; with overlap one more step only reads the last tokens back.
    launches = steps - engine.overlap
    assert launches == 2 and events == ["forward", "launched", "sample"] * launches
    assert_baseline(engine)


def test_context_limit_ends_at_the_same_token(model, swa_model_dir, reference):
    engine = make_engine(model, swa_model_dir, max_model_len=48)
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert r.finish_reason is FinishReason.LENGTH and r.token_ids == reference[0][:48 - len(PROMPTS[0])]
    assert_baseline(engine)


def test_overlap_launches_the_next_step_before_reading_tokens_back(model, swa_model_dir, reference, overlap):
    """With overlap, step N+1 is queued before step N's draws are waited for, and its decode inputs
    are the pending placeholders, filled on the device from step N's draws."""
    engine = make_engine(model, swa_model_dir)
    events: list[str] = []
    pending_inputs = []
    launch, build = engine.runner.launch, engine.runner.build_batch

    def logged_launch(scheduled, *args, **kwargs):
        step = launch(scheduled, *args, **kwargs)
        n = events.count("launch")
        events.append("launch")
        resolve = step.resolve
        step.resolve = lambda: events.append(f"resolve {n}") or resolve()
        return step

    def logged_build(scheduled, tables, prev=None):
        pending_inputs.append(sum(s.seq.token_ids[-1] == -1 for s in scheduled))
        return build(scheduled, tables, prev)
    engine.runner.launch, engine.runner.build_batch = logged_launch, logged_build
    assert [r.token_ids for r in engine.generate(PROMPTS[:2], GREEDY)] == reference[:2]
    if overlap:
        assert events[:3] == ["launch", "launch", "resolve 0"]
        assert pending_inputs[1:] == [2] * (len(pending_inputs) - 1)   # every decode input came from the device
    else:
        assert events[:3] == ["launch", "resolve 0", "launch"] and not any(pending_inputs)
    assert_baseline(engine)


def test_abort_while_a_step_is_in_flight(model, swa_model_dir, reference):
    engine = make_engine(model, swa_model_dir)
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    got: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(3):
        for out in engine.step():
            got[out.request_id] += [t.token_id for t in out.tokens]
    assert engine.abort_request("a").finish_reason is FinishReason.ABORT
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += [t.token_id for t in out.tokens]
    assert got["b"] == reference[1]
    assert got["a"] == reference[0][:len(got["a"])] and len(got["a"]) < GREEDY.max_tokens
    assert_baseline(engine)
