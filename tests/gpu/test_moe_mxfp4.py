"""Parity of the Triton MXFP4 MoE kernel with the PyTorch reference (fp32, dequantized weights)."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.moe import ExpertWeights, moe_experts_reference, route

pytestmark = pytest.mark.gpu


def random_packed_experts(num_experts: int, hidden: int, inter: int, device: str,
                          gen: torch.Generator) -> ExpertWeights:
    """Random codes and scales near 2^0 (checkpoint-like magnitudes), bf16 biases."""
    def blocks(out: int, inp: int) -> torch.Tensor:
        return torch.randint(0, 256, (num_experts, out, inp // 32, 16), generator=gen, dtype=torch.uint8).to(device)

    def scales(out: int, inp: int) -> torch.Tensor:
        return torch.randint(118, 124, (num_experts, out, inp // 32), generator=gen, dtype=torch.uint8).to(device)

    return ExpertWeights(
        gate_up_bias=torch.randn(num_experts, 2 * inter, generator=gen).to(device, torch.bfloat16),
        down_bias=torch.randn(num_experts, hidden, generator=gen).to(device, torch.bfloat16),
        gate_up_blocks=blocks(2 * inter, hidden), gate_up_scales=scales(2 * inter, hidden),
        down_blocks=blocks(hidden, inter), down_scales=scales(hidden, inter))


def fp32_reference(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, w: ExpertWeights,
                   limit: float) -> torch.Tensor:
    w32 = ExpertWeights(w.gate_up_bias.float(), w.down_bias.float(), gate_up_blocks=w.gate_up_blocks,
                        gate_up_scales=w.gate_up_scales, down_blocks=w.down_blocks, down_scales=w.down_scales)
    return moe_experts_reference(x.float(), ids, wts.float(), w32, limit)


# (tokens, experts, top_k, hidden, intermediate): decode batch 1 and a few, then prefill-sized tiles.
SHAPES = [(1, 8, 4, 64, 96), (3, 8, 2, 64, 64), (40, 8, 4, 96, 64), (300, 16, 4, 128, 160)]


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", SHAPES)
def test_matches_reference(device: str, interpreted: bool, tokens: int, experts: int, top_k: int,
                           hidden: int, inter: int) -> None:
    from gptoss_engine.kernels.moe_mxfp4 import moe_experts
    if interpreted and tokens > 64:
        pytest.skip("too slow under the interpreter")
    gen = torch.Generator().manual_seed(tokens * 1000 + experts)
    w = random_packed_experts(experts, hidden, inter, device, gen)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    router_w = torch.randn(experts, hidden, generator=gen).to(device, torch.bfloat16)
    ids, wts = route(x, router_w, torch.zeros(experts, device=device, dtype=torch.bfloat16), top_k)
    ref = fp32_reference(x, ids, wts, w, 7.0)
    # (dot_scaled, gemv): the grouped GEMM both ways, and the small-batch GEMV at every size.
    modes = [(False, False), (False, True)] if interpreted else [(True, False), (False, False), (True, True)]
    for dot_scaled, gemv in modes:
        out = moe_experts(x, ids, wts, w, 7.0, dot_scaled=dot_scaled, gemv=gemv)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < 2e-2, (dot_scaled, gemv, rel)


def test_untouched_experts_do_not_matter(device: str, interpreted: bool) -> None:
    """Garbage (NaN-producing) weights in experts no token picked must not leak into the output."""
    from gptoss_engine.kernels.moe_mxfp4 import moe_experts
    gen = torch.Generator().manual_seed(7)
    w = random_packed_experts(8, 64, 64, device, gen)
    w.gate_up_scales[5:] = 255  # e8m0 255 = NaN
    w.down_scales[5:] = 255
    x = torch.randn(4, 64, generator=gen).to(device, torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]], device=device)
    wts = torch.full((4, 2), 0.5, device=device)
    ref = fp32_reference(x, ids, wts, w, 7.0)
    for gemv in (False, True):
        out = moe_experts(x, ids, wts, w, 7.0, dot_scaled=not interpreted, gemv=gemv)
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2, gemv
