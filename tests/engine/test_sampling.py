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


def test_batched_draws_follow_each_rows_distribution():
    """One step, rows with different temperature / top-k / top-p: each row's draws have its own
    distribution (p = [.1, .2, .3, .4]; temperature 0.5 squares it; top_p 0.5 keeps {3, 2}, 4:3)."""
    n = 20000
    x = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    configs = {
        "t1": (SamplingParams(temperature=1.0), [0.1, 0.2, 0.3, 0.4]),
        "t0.5": (SamplingParams(temperature=0.5), [1 / 30, 4 / 30, 9 / 30, 16 / 30]),
        "top_p": (SamplingParams(temperature=1.0, top_p=0.5), [0, 0, 3 / 7, 4 / 7]),
        "top_k": (SamplingParams(temperature=1.0, top_k=2), [0, 0, 3 / 7, 4 / 7]),
        "greedy": (SamplingParams(), [0, 0, 0, 1]),
    }
    reqs = [SampleRequest(p, i) for p, _ in configs.values() for i in range(n)]
    out = Sampler((), "cpu")(x.repeat(len(reqs), 1), reqs)
    for c, (name, (_, want)) in enumerate(configs.items()):
        ids = torch.tensor([t.token_id for t in out[c * n:(c + 1) * n]])
        freq = torch.bincount(ids, minlength=4).float() / n
        assert torch.allclose(freq, torch.tensor(want, dtype=torch.float32), atol=0.02), (name, freq.tolist(), want)


def test_a_seeded_draw_does_not_depend_on_the_rest_of_the_batch():
    """What a prefill process (token 0) and a decode process (tokens 1..) rely on: a seeded row
    draws the same token alone and beside any other rows, whatever their parameters."""
    seeded = [SampleRequest(SamplingParams(temperature=1.0, seed=11, top_p=0.9), i) for i in range(4)] + \
             [SampleRequest(SamplingParams(temperature=0.7, seed=5, top_k=40), 2)]
    others = [SampleRequest(SamplingParams(temperature=1.3), 0), SampleRequest(SamplingParams(), 0),
              SampleRequest(SamplingParams(temperature=1.0, top_k=3, top_p=0.5, seed=9), 1)]
    x = torch.randn(len(seeded) + len(others), 5000) * 3
    alone = [Sampler((), "cpu")(x[i:i + 1], [r])[0].token_id for i, r in enumerate(seeded)]
    mixed = Sampler((), "cpu")(torch.cat([x[len(seeded):], x[:len(seeded)]]), others + seeded)
    assert [t.token_id for t in mixed[len(others):]] == alone


def test_top_p_threshold_inside_top_k_equals_the_full_sort():
    """Rows that cut with both top-k and top-p take their nucleus from topk's sorted values instead
    of sorting the vocabulary: the same thresholds, for varied k, p and temperatures."""
    from gptoss_engine.sampling import _thresholds
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1000, generator=gen) * 3
    t = torch.tensor([1.0, 0.7, 1.3, 1.0, 2.0, 0.5])
    k_index = torch.tensor([50, 5, 200, 1, 999, 30]) - 1
    no_k = torch.zeros(6, dtype=torch.bool)
    cut = (torch.tensor([0, 1, 2, 4, 5]), torch.tensor([0.9, 0.5, 0.95, 0.99, 0.3]))
    inside = _thresholds(x, t, (999, k_index, no_k), (*cut, True))
    sorted_full = _thresholds(x, t, (999, k_index, no_k), (*cut, False))
    assert inside is not None and torch.equal(inside, sorted_full)
    assert inside[3] == torch.topk(x[3], 1).values[-1]          # top-k alone: its k-th largest
    assert (inside >= torch.topk(x, 999).values.gather(1, k_index[:, None])[:, 0]).all()
