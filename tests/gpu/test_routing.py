"""Parity of the fused router top-k + softmax kernel with torch.topk + softmax."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 32, 4), (7, 128, 4), (33, 8, 2), (5, 24, 3)])
def test_matches_torch(device: str, tokens: int, experts: int, top_k: int) -> None:
    from gptoss_engine.kernels.routing import topk_softmax
    gen = torch.Generator().manual_seed(tokens * 131 + experts)
    # Distinct logits (a random permutation, scaled) so the order of the top k is unique.
    logits = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)]).float() * 0.37
    logits = (logits + torch.randn(tokens, experts, generator=gen) * 0.01).to(device)
    ids, wts = topk_softmax(logits, top_k)
    ref_vals, ref_ids = torch.topk(logits, top_k, dim=-1)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(wts.cpu(), torch.softmax(ref_vals, -1).cpu(), rtol=1e-5, atol=1e-6)


def test_bad_top_k_is_refused(device: str) -> None:
    from gptoss_engine.kernels.routing import topk_softmax
    with pytest.raises(ValueError, match="top_k"):
        topk_softmax(torch.zeros(2, 4, device=device), 5)
