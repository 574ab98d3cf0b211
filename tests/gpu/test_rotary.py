"""The in-place q/k rotary kernel against rope.apply_rotary (the torch form the CPU path runs)."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.rope import apply_rotary

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hq,hkv,d", [(1, 64, 8, 64), (37, 8, 2, 64), (5, 4, 4, 32)])
def test_matches_apply_rotary(device: str, dtype: torch.dtype, tokens: int, hq: int, hkv: int, d: int) -> None:
    from gptoss_engine.kernels.rotary import rotary_qk_
    gen = torch.Generator().manual_seed(tokens * hq)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(device, dtype)
    cos, sin = (torch.randn(tokens, d // 2, generator=gen).to(device, dtype) for _ in range(2))
    ref_q = apply_rotary(qkv[:, :hq * d].float().view(tokens, hq, d), cos.float(), sin.float())
    ref_k = apply_rotary(qkv[:, hq * d:(hq + hkv) * d].float().view(tokens, hkv, d), cos.float(), sin.float())
    v_before = qkv[:, (hq + hkv) * d:].clone()
    rotary_qk_(qkv, hq + hkv, d, cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(qkv[:, :hq * d].float().view(tokens, hq, d), ref_q, atol=tol, rtol=tol)
    assert torch.allclose(qkv[:, hq * d:(hq + hkv) * d].float().view(tokens, hkv, d), ref_k, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)   # v untouched


def test_fused_qkv_is_views_of_one_weight() -> None:
    """fuse_qkv (CPU is enough): the three projections alias the fused weight, outputs unchanged."""
    from gptoss_engine.make_model import random_model
    from gptoss_engine.model_config import ModelConfig
    from gptoss_engine.presets import preset
    model = random_model(ModelConfig.from_dict(preset("tiny")), "cpu")
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, model.config.hidden_size)
    before = [p(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    attn.fuse_qkv()
    assert attn.qkv_weight is not None
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    fused = torch.nn.functional.linear(x, attn.qkv_weight, attn.qkv_bias)
    assert torch.allclose(torch.cat(before, dim=1), fused, atol=1e-6)
    assert set(model.state_dict()) >= {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.bias"}
