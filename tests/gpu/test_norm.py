"""Parity of the fused residual add + RMSNorm kernel with model.RMSNorm's torch path."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.model import RMSNorm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows,hidden,dtype", [(1, 2880, torch.bfloat16), (37, 2880, torch.bfloat16),
                                               (5, 96, torch.float32), (300, 64, torch.bfloat16)])
def test_add_rmsnorm_matches_torch(device: str, rows: int, hidden: int, dtype: torch.dtype) -> None:
    from gptoss_engine.kernels.norm import add_rmsnorm
    gen = torch.Generator().manual_seed(rows * 7 + hidden)
    norm = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    delta = torch.randn(rows, hidden, generator=gen).to(dtype)
    want_sum = (x.double() + delta.double())
    want_h = norm(want_sum.to(dtype)).double()   # the torch path (fp32 arithmetic)
    norm = norm.to(device)
    total, h = add_rmsnorm(x.to(device), delta.to(device), norm.weight, norm.eps)
    assert total.dtype == dtype and h.dtype == dtype and total.shape == h.shape == (rows, hidden)
    assert torch.isfinite(h).all() and torch.isfinite(total).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want in ((total, want_sum), (h, want_h)):
        rel = ((got.double().cpu() - want).norm() / want.norm()).item()
        assert rel < tol, rel
    # The model's entry point dispatches to the kernel on CUDA and agrees with its unfused torch path.
    xs, hs = norm.add_forward(x.to(device), delta.to(device))
    ref_x = x.to(device) + delta.to(device)
    assert torch.equal(xs, ref_x)
    assert ((hs.float() - norm(ref_x).float()).norm() / norm(ref_x).float().norm()).item() < tol


def test_add_rmsnorm_rejects_bad_shapes(device: str) -> None:
    from gptoss_engine.kernels.norm import add_rmsnorm
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="add_rmsnorm"):
        add_rmsnorm(x, torch.randn(2, 32, device=device), torch.ones(64, device=device), 1e-5)


def _pair_outputs(form: str, tokens: int, k: int, hidden: int, device: str, gen: torch.Generator):
    """PairOutputs in each MoE path's form: GEMV (fp32, weighted), grouped (bf16, weighted), grouped_mm
    (bf16 rows in expert order, routing weight and bias still to apply)."""
    from gptoss_engine.moe import PairOutputs
    n = tokens * k
    if form == "gemv":
        return PairOutputs(torch.randn(n, hidden, generator=gen).to(device), k, torch.bfloat16)
    if form == "grouped":
        return PairOutputs(torch.randn(n, hidden, generator=gen).to(device, torch.bfloat16), k, torch.bfloat16)
    ids = torch.randint(0, 5, (n,), generator=gen)
    order = torch.argsort(ids, stable=True)
    row_of_pair = torch.empty(n, dtype=torch.int32)
    row_of_pair[order] = torch.arange(n, dtype=torch.int32)
    return PairOutputs(torch.randn(n, hidden, generator=gen).to(device, torch.bfloat16), k, torch.bfloat16,
                       row_of_pair=row_of_pair.to(device), weights=torch.rand(n, generator=gen).to(device),
                       ids=ids.to(device), bias=torch.randn(5, hidden, generator=gen).to(device, torch.bfloat16))


def _pairs_reference(p) -> torch.Tensor:
    """The PairOutputs contract in torch, fp32 in pair order."""
    y = p.y.float() if p.row_of_pair is None else p.y.float()[p.row_of_pair.long()]
    if p.weights is not None:
        y = p.weights.float()[:, None] * (y + p.bias.float()[p.ids.long()])
    out = torch.zeros(p.num_tokens, y.shape[1], device=y.device)
    for j in range(p.k):
        out += y[j::p.k]
    return out.to(p.dtype)


@pytest.mark.parametrize("form", ["gemv", "grouped", "grouped_mm"])
@pytest.mark.parametrize("tokens,hidden", [(1, 2880), (9, 2880), (3, 100)])
def test_add_rmsnorm_sums_pair_outputs(device: str, form: str, tokens: int, hidden: int) -> None:
    """The MoE's unsummed outputs: sum_pairs follows the contract; add_rmsnorm over them gives the same
    bits as over their sum (the two launches it replaces)."""
    from gptoss_engine.kernels.norm import add_rmsnorm, sum_pairs
    gen = torch.Generator().manual_seed(tokens + hidden)
    p = _pair_outputs(form, tokens, 4, hidden, device, gen)
    delta = sum_pairs(p)
    assert delta.dtype == torch.bfloat16 and delta.shape == (tokens, hidden)
    assert torch.allclose(delta.float(), _pairs_reference(p).float(), atol=1e-2, rtol=1e-2)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(device)
    fused = add_rmsnorm(x, p, weight, 1e-5)
    apart = add_rmsnorm(x, delta, weight, 1e-5)
    assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])
    assert not torch.equal(fused[0], x)


def test_add_rmsnorm_rejects_pairs_of_other_tokens(device: str) -> None:
    from gptoss_engine.kernels.norm import add_rmsnorm
    p = _pair_outputs("gemv", 3, 4, 64, device, torch.Generator().manual_seed(0))
    x = torch.randn(2, 64, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="add_rmsnorm"):
        add_rmsnorm(x, p, torch.ones(64, device=device), 1e-5)


@pytest.mark.parametrize("rows,hidden", [(1, 2880), (9, 96)])
def test_rmsnorm_matches_torch(device: str, rows: int, hidden: int) -> None:
    """The first layer's input norm (no delta) against model.RMSNorm's torch path on the CPU; on
    CUDA, RMSNorm itself dispatches to the kernel."""
    from gptoss_engine.kernels.norm import rmsnorm
    gen = torch.Generator().manual_seed(rows + hidden)
    norm = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(torch.bfloat16)
    want = norm(x).double()
    norm = norm.to(device)
    h = rmsnorm(x.to(device), norm.weight, norm.eps)
    assert h.dtype == torch.bfloat16 and h.shape == (rows, hidden)
    assert ((h.double().cpu() - want).norm() / want.norm()).item() < 1e-2
    if device == "cuda":
        assert torch.equal(norm(x.to(device)), h)
    with pytest.raises(ValueError, match="rmsnorm"):
        rmsnorm(x.to(device), norm.weight[1:], norm.eps)
