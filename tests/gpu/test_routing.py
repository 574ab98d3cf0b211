"""Parity of the routing kernels with torch: router + top-k + softmax, the expert sorts."""
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


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(64, 32, 4, 16), (256, 32, 4, 32), (3, 8, 2, 16),
                                                          (1000, 128, 4, 64), (40, 8, 4, 16)])
def test_sort_by_expert_matches_torch_route(device: str, tokens: int, experts: int, top_k: int,
                                            block_m: int) -> None:
    """The one-launch expert sort equals the torch formulation: same padded rows, same order."""
    import triton

    from gptoss_engine.kernels.moe_mxfp4 import route_torch
    from gptoss_engine.kernels.routing import sort_by_expert
    gen = torch.Generator().manual_seed(tokens + experts)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    if tokens >= 40:
        ids[: tokens // 2, 0] = 1            # one crowded expert (several row blocks), others empty
        ids[ids == 3] = 2
    flat = ids.reshape(-1).to(device)
    n = flat.numel()
    cap = triton.cdiv(n + min(experts, n) * (block_m - 1), block_m) * block_m
    got_rows, got_blocks = sort_by_expert(flat, experts, block_m, cap)
    want_rows, want_blocks = route_torch(flat, experts, block_m, cap)
    assert torch.equal(got_rows.cpu(), want_rows.cpu())
    assert torch.equal(got_blocks.cpu(), want_blocks.cpu())
    assert (got_rows < n).sum().item() == n            # every pair placed once


@pytest.mark.parametrize("tokens,experts,hidden", [(1, 32, 2880), (64, 32, 2880), (5, 128, 2880), (300, 32, 256),
                                                    (3, 8, 96), (2, 6, 5000)])
def test_router_matches_linear_and_topk(device: str, tokens: int, experts: int, hidden: int) -> None:
    """route(): the router GEMV + top-k + softmax up to ROUTER_GEMV_MAX_TOKENS tokens (300 tokens take
    the cuBLAS path; 5 experts' blocks leave one partly empty): the same k largest logits (ties may
    order differently) and softmax weights."""
    from gptoss_engine.kernels.routing import route
    gen = torch.Generator().manual_seed(tokens * 7 + experts)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(experts, hidden, generator=gen) * hidden ** -0.5).to(device, torch.bfloat16)
    b = torch.randn(experts, generator=gen).to(device, torch.bfloat16)
    ids, wts = route(x, w, b, 4)
    logits = torch.nn.functional.linear(x, w, b).float()
    ref_vals, _ = torch.topk(logits, 4, dim=-1)
    got_vals = torch.gather(logits, 1, ids)
    # The chosen experts' logits, slot by slot, are the k largest in descending order up to one bf16
    # ulp (the GEMV's sum rounds once like cuBLAS's, but may add in another order).
    torch.testing.assert_close(got_vals, ref_vals, rtol=1e-2, atol=1e-2)
    assert all(len(set(row)) == 4 for row in ids.tolist())       # k distinct experts per token
    torch.testing.assert_close(wts, torch.softmax(ref_vals, -1), rtol=2e-2, atol=2e-2)
    # The one-launch form's arrival counters are all back at zero (a count left behind would make the
    # next launch take its top-k before all logits are in), so a second call gives the same result.
    from gptoss_engine.kernels import arrival, routing
    assert torch.count_nonzero(arrival.counters(routing._COUNTERS, x.device, 1)) == 0
    ids2, wts2 = route(x, w, b, 4)
    assert torch.equal(ids2, ids) and torch.equal(wts2, wts)


@pytest.mark.parametrize("tokens,experts,hidden", [(1, 32, 2880), (64, 32, 2880), (5, 128, 2880), (3, 6, 160),
                                                    (300, 32, 256), (2, 8, 5000)])
def test_add_rmsnorm_route_is_add_rmsnorm_then_route(device: str, tokens: int, experts: int, hidden: int) -> None:
    """The one-launch post-attention add + norm + router gives the bits of add_rmsnorm followed by
    route on its output: the residual sum, the normed rows, the experts and their weights (300
    tokens and hidden 5000 take the two-launch path); its arrival counters end at zero."""
    from gptoss_engine.kernels import arrival, routing
    from gptoss_engine.kernels.norm import add_rmsnorm
    gen = torch.Generator().manual_seed(tokens * 11 + experts + hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    d = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device)       # fp32, as the model keeps norms
    w = (torch.randn(experts, hidden, generator=gen) * hidden ** -0.5).to(device, torch.bfloat16)
    b = torch.randn(experts, generator=gen).to(device, torch.bfloat16)
    total, h, ids, wts = routing.add_rmsnorm_route(x, d, nw, 1e-5, w, b, 4)
    ref_total, ref_h = add_rmsnorm(x, d, nw, 1e-5)
    ref_ids, ref_wts = routing.route(ref_h, w, b, 4)
    assert torch.equal(total, ref_total) and torch.equal(h, ref_h)
    assert torch.equal(ids, ref_ids) and torch.equal(wts, ref_wts)
    assert torch.count_nonzero(arrival.counters(routing._COUNTERS, x.device, 1)) == 0
    with pytest.raises(ValueError, match="top_k"):
        routing.add_rmsnorm_route(x, d, nw, 1e-5, w, b, experts + 1)


@pytest.mark.parametrize("pairs,experts", [(1, 8), (300, 8), (4100, 32), (32768, 32), (9000, 128)])
def test_sort_pairs_matches_torch_argsort(device: str, pairs: int, experts: int) -> None:
    """The grouped-GEMM path's counting sort gives exactly torch's stable argsort and the bookkeeping
    moe_grouped_mm built from it: every chunk size boundary, experts left empty, 120b's 128 experts."""
    from gptoss_engine.kernels.routing import sort_pairs
    gen = torch.Generator().manual_seed(pairs + experts)
    flat = torch.randint(0, experts, (pairs,), generator=gen)
    flat[flat == 3] = 2                                      # expert 3 gets no pair
    k = 4 if pairs % 4 == 0 else 1
    token, row_of_pair, expert, ends = sort_pairs(flat.reshape(-1, k).to(device), experts)
    want = torch.argsort(flat, stable=True)
    assert torch.equal(token.cpu(), want // k)
    inverse = torch.empty_like(want)
    inverse[want] = torch.arange(pairs)
    assert torch.equal(row_of_pair.cpu(), inverse)
    assert torch.equal(expert.cpu(), flat[want].to(torch.int32))
    assert torch.equal(ends.cpu(), torch.bincount(flat, minlength=experts).cumsum(0).to(torch.int32))
