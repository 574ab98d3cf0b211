"""kernels/top_p.py: the top-p threshold by radix select against the sort it replaces.

The threshold's definition, checked in float64 on the host: tau is one of the row's logits (at or
above its top-k threshold), the tokens above tau hold less than p of the mass and those at or above
it at least p. Rounding may move a token that sits within ~1e-6 of the boundary, so the definition
is checked with that slack, and the sort's answer is required exactly where no token's cumulative
mass lies within 1e-5 of it."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.sampling import _thresholds


def _check(x: torch.Tensor, temperature: torch.Tensor, p: torch.Tensor, thr_in: torch.Tensor, got: torch.Tensor,
           rows: torch.Tensor) -> None:
    """Assert the definition for each cutting row, and the sort's answer exactly where no token's
    cumulative mass lies within 1e-5 of the boundary."""
    x64 = x.double().cpu()
    same = 0
    sort_thr = thr_in.clone().cpu()
    for n, r in enumerate(rows.tolist()):
        row = x64[r]
        keep = row >= thr_in[r].item()
        z = torch.where(keep, row / temperature[r].item(), torch.tensor(float("-inf"), dtype=torch.float64))
        w = torch.exp(z - z.max())
        total, pm = w.sum().item(), p[n].item() * w.sum().item()
        tau = got[r].item()
        assert tau >= thr_in[r].item() and bool((row == tau).any()), (n, tau)
        above, at_or_above = w[row > tau].sum().item(), w[row >= tau].sum().item()
        assert above < pm + 1e-6 * total and at_or_above >= pm - 1e-6 * total, (n, tau, above, at_or_above, pm)
        # The sort's answer for this row alone.
        order = torch.sort(z, descending=True).indices
        cum = torch.cumsum(w[order], 0) - w[order]
        kept = max(1, int((cum < pm).sum().item()))
        sort_thr[r] = max(thr_in[r].item(), row[order[kept - 1]].item())
        near = (cum - pm).abs() < 1e-5 * total
        if not bool(near[max(0, kept - 1):kept + 1].any()):
            assert sort_thr[r].item() == tau, (n, tau, sort_thr[r].item())
            same += 1
    assert same > 0


@pytest.mark.parametrize("vocab,rows_n", [(2000, 6), (201088, 3)])
def test_top_p_threshold_is_the_nucleus_boundary(device: str, interpreted: bool, vocab: int, rows_n: int) -> None:
    if interpreted and vocab > 5000:
        pytest.skip("the full vocabulary is too slow for the interpreter")
    from gptoss_engine.kernels.top_p import top_p_thresholds
    g = torch.Generator().manual_seed(vocab + rows_n)
    scales = torch.tensor([1.0, 3.0, 0.3, 8.0, 2.0, 1.0])[:rows_n]
    x = torch.randn(rows_n, vocab, generator=g) * scales[:, None]
    if rows_n > 3:
        x[3, ::7] = float("-inf")                      # masked tokens (min_tokens) weigh nothing
        x[4] = torch.round(x[4] * 2) / 2               # many exact ties
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.5, 2.0])[:rows_n]
    thr_in = torch.full((rows_n,), float("-inf"))
    thr_in[1] = torch.topk(x[1], 300).values[-1]     # a top-k threshold below the nucleus's edge
    if rows_n > 3:
        thr_in[5] = torch.topk(x[5], 40).values[-1]
    p = torch.tensor([0.9, 0.5, 0.999, 0.3, 0.95, 1e-6][:rows_n])
    rows = torch.arange(rows_n)
    thr = thr_in.clone().to(device)
    top_p_thresholds(x.to(device), rows.to(device), temperature.to(device), p.to(device), thr)
    _check(x, temperature, p, thr_in, thr.cpu(), rows)


def test_top_p_threshold_of_a_row_does_not_depend_on_the_rows_beside_it(device: str, interpreted: bool) -> None:
    """A seeded draw must not depend on the batch: a row's threshold alone and among others."""
    from gptoss_engine.kernels.top_p import top_p_thresholds
    vocab = 1500 if interpreted else 201088
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(5, vocab, generator=g) * 2).to(device)
    temperature = torch.ones(5, device=device)
    p = torch.full((5,), 0.9, device=device)
    together = torch.full((5,), float("-inf"), device=device)
    top_p_thresholds(x, torch.arange(5, device=device), temperature, p, together)
    alone = torch.full((1,), float("-inf"), device=device)
    top_p_thresholds(x[3:4].contiguous(), torch.zeros(1, dtype=torch.int64, device=device), temperature[:1], p[:1],
                     alone)
    assert alone.item() == together[3].item()


def test_sampler_cuts_top_p_rows_without_top_k_by_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the sampler on CUDA with the radix select on: rows asking for top-p alone (the OpenAI
    API has no top-k) get the nucleus boundary, and the draws stay inside the nucleus."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from gptoss_engine import sampling
    from gptoss_engine.sampling import SampleRequest, Sampler
    from gptoss_engine.types import SamplingParams
    monkeypatch.setattr(sampling, "TOP_P_RADIX_SELECT", True)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 201088, generator=g) * 4
    cut = torch.arange(4)
    p = torch.tensor([0.5, 0.9, 0.95, 0.2])
    temperature = torch.ones(4)
    thr = _thresholds(x.cuda(), temperature.cuda(), None, (cut.cuda(), p.cuda(), False)).cpu()
    _check(x, temperature, p, torch.full((4,), float("-inf")), thr, cut)
    s = Sampler((), "cuda")
    reqs = [SampleRequest(SamplingParams(temperature=1.0, top_p=float(q), seed=i), 0) for i, q in enumerate(p)]
    for _ in range(5):
        toks = [o.token_id for o in s(x.cuda(), reqs)]
        assert all(x[i, t].item() >= thr[i].item() for i, t in enumerate(toks))
