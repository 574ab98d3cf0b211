"""The rotary + KV-store kernel against rope.apply_rotary and write_kv_reference (the torch path the CPU runs)."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.attention import write_kv_reference
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
from gptoss_engine.rope import apply_rotary

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hq,hkv,d", [(1, 64, 8, 64), (37, 8, 2, 64), (5, 4, 4, 32), (3, 6, 3, 16)])
def test_rotary_store_kv_matches_apply_rotary_and_write_kv(device: str, dtype: torch.dtype, tokens: int, hq: int,
                                                            hkv: int, d: int) -> None:
    """q rotated in place, the rotated k and the v in the cache slots (the torch path: apply_rotary +
    write_kv_reference, bit-equal in the cache), padding slots (-1) untouched, k/v of qkv unchanged."""
    from gptoss_engine.kernels.rotary import rotary_store_kv
    gen = torch.Generator().manual_seed(tokens * hq + d)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(device, dtype)
    cos, sin = (torch.randn(tokens, d // 2, generator=gen).to(device, dtype) for _ in range(2))
    blocks = tokens // 4 + 3
    pool = torch.randn(blocks, 2, 2, 4, hkv, d, generator=gen).to(device, dtype)  # [blocks, layers, k|v, bs, heads, d]
    slots = torch.randperm(blocks * 4, generator=gen)[:tokens].to(device)
    slots[::3] = -1
    ref_q = apply_rotary(qkv[:, :hq * d].view(tokens, hq, d), cos, sin)
    ref_k = apply_rotary(qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d), cos, sin)
    want_pool = pool.clone()
    write_kv_reference(want_pool, 1, slots, ref_k, qkv[:, (hq + hkv) * d:].reshape(tokens, hkv, d))
    kv_before = qkv[:, hq * d:].clone()
    rotary_store_kv(qkv, hq, hkv, d, cos, sin, pool, 1, slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(qkv[:, :hq * d].float().view(tokens, hq, d), ref_q.float(), atol=tol, rtol=tol)
    assert torch.equal(qkv[:, hq * d:], kv_before)
    assert torch.equal(pool[:, 0], want_pool[:, 0])          # the other layer untouched
    k_cache, v_cache = pool[:, 1, 0].reshape(-1, hkv, d), pool[:, 1, 1].reshape(-1, hkv, d)
    want_k, want_v = want_pool[:, 1, 0].reshape(-1, hkv, d), want_pool[:, 1, 1].reshape(-1, hkv, d)
    assert torch.equal(v_cache, want_v)
    assert torch.allclose(k_cache.float(), want_k.float(), atol=tol, rtol=tol)


def test_rotary_store_kv_k_in_place(device: str) -> None:
    """k_in_place=True: k rotated in qkv too (as apply_rotary, the same bits as the cache's k); q, v and
    the cache as without it."""
    from gptoss_engine.kernels.rotary import rotary_store_kv
    tokens, hq, hkv, d = 37, 8, 2, 64
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(device, torch.bfloat16)
    cos, sin = (torch.randn(tokens, d // 2, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    pool = torch.zeros(tokens // 4 + 1, 1, 2, 4, hkv, d, device=device, dtype=torch.bfloat16)
    slots = torch.arange(tokens, device=device)
    plain, plain_pool = qkv.clone(), pool.clone()
    rotary_store_kv(plain, hq, hkv, d, cos, sin, plain_pool, 0, slots)
    rotary_store_kv(qkv, hq, hkv, d, cos, sin, pool, 0, slots, k_in_place=True)
    assert torch.equal(pool, plain_pool)
    assert torch.equal(qkv[:, :hq * d], plain[:, :hq * d])
    assert torch.equal(qkv[:, (hq + hkv) * d:], plain[:, (hq + hkv) * d:])
    k_rot = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    assert not torch.equal(k_rot, plain[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d))
    assert torch.equal(k_rot, pool[:, 0, 0].reshape(-1, hkv, d)[:tokens])


def test_rotary_store_kv_rejects_bad_shapes(device: str) -> None:
    from gptoss_engine.kernels.rotary import rotary_store_kv
    qkv = torch.randn(2, (4 + 2 * 2) * 16, device=device)
    cos = sin = torch.randn(2, 8, device=device)
    pool = torch.zeros(2, 1, 2, 4, 2, 16, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        rotary_store_kv(qkv, 4, 2, 16, cos, sin, pool[..., :1, :], 0, torch.tensor([0, 1], device=device))
    with pytest.raises(ValueError, match="twice a power of two"):
        rotary_store_kv(torch.randn(2, (4 + 2 * 2) * 12, device=device), 4, 2, 12, cos[:, :6], sin[:, :6],
                        torch.zeros(2, 1, 2, 4, 2, 12, device=device), 0, torch.tensor([0, 1], device=device))


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


def test_rope_table_gives_the_computed_bits(device: str) -> None:
    """RotaryEmbedding.cache (finalize_model on CUDA): gathered rows equal the per-step computation,
    bit for bit on CUDA (the same element-wise ops on the same values)."""
    from gptoss_engine.rope import RotaryEmbedding
    config = ModelConfig.from_dict(preset("20b"))
    rope = RotaryEmbedding(config).to(device)
    positions = torch.tensor([0, 1, 4095, 4096, 70000, 131071, 17], device=device)
    want = rope(positions, torch.bfloat16)
    rope.cache(config.max_position_embeddings, torch.bfloat16)
    assert rope.table is not None and rope.table.shape == (config.max_position_embeddings, 2, config.head_dim // 2)
    got = rope(positions, torch.bfloat16)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride(1) == 1
        if device == "cuda":
            assert torch.equal(g, w)
        else:
            assert torch.allclose(g.float(), w.float(), atol=1e-2)
    # Another dtype than the table's: computed, not gathered.
    f32 = rope(positions, torch.float32)
    assert f32[0].dtype == torch.float32
