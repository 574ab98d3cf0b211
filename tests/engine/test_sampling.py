"""Sampler units on hand-made logits."""
from __future__ import annotations

import torch

from gptoss_engine.sampling import SampleRequest, Sampler, step_seed
from gptoss_engine.types import SamplingParams

EOS = 7


def logits(rows: int = 1) -> torch.Tensor:
    x = torch.linspace(-2.0, 2.0, 16).repeat(rows, 1)
    x[:, EOS] = 10.0
    return x


def test_greedy_min_tokens_masks_eos_until_reached():
    s = Sampler((EOS,), "cpu")
    p = SamplingParams(min_tokens=2)
    assert s(logits(), [SampleRequest(p, 0)])[0].token_id == 15
    assert s(logits(), [SampleRequest(p, 2)])[0].token_id == EOS
    # ignore_eos leaves model stops alone; a user stop is still masked.
    assert s(logits(), [SampleRequest(SamplingParams(min_tokens=2, ignore_eos=True), 0)])[0].token_id == EOS
    user = SamplingParams(min_tokens=2, stop_token_ids=(15,), ignore_eos=True)
    x = logits()
    x[0, EOS] = -10.0
    assert s(x, [SampleRequest(user, 0)])[0].token_id == 14


def test_seeded_draw_depends_only_on_seed_and_index():
    s1, s2 = Sampler((), "cpu"), Sampler((), "cpu")
    p = SamplingParams(temperature=5.0, seed=3)
    x = torch.zeros(1, 1000)
    draws = [s1(x, [SampleRequest(p, i)])[0].token_id for i in range(6)]
    assert draws == [s2(x, [SampleRequest(p, i)])[0].token_id for i in range(6)]
    assert len(set(draws)) > 1
    assert step_seed(3, 0) != step_seed(3, 1) != step_seed(4, 1)


def test_top_k_top_p_restrict_support():
    s = Sampler((), "cpu")
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    k = SamplingParams(temperature=1.0, top_k=2, seed=0)
    assert {s(x, [SampleRequest(k, i)])[0].token_id for i in range(50)} <= {3, 4}
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)   # p(4) ~ 0.64 covers it alone
    assert {s(x, [SampleRequest(p, i)])[0].token_id for i in range(50)} == {4}


def test_logprobs_are_of_the_raw_distribution():
    s = Sampler((), "cpu")
    x = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    out = s(x, [SampleRequest(SamplingParams(logprobs=True, top_logprobs=2), 0), SampleRequest(SamplingParams(), 0)])
    ref = torch.log_softmax(x[0], -1)
    assert out[0].token_id == 2 and abs(out[0].logprob - float(ref[2])) < 1e-6
    assert [i for i, _ in out[0].top_logprobs] == [2, 1]
    assert out[1].logprob is None and out[1].token_id == 0
