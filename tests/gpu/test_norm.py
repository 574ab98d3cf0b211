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
