"""kernels/gemv.dense_gemv (the projections' decode GEMV) against an fp32 reference and F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture
def cuda(device: str, interpreted: bool) -> str:
    if interpreted:
        pytest.skip("Gluon cp.async ring: GPU only")
    return device


@pytest.mark.parametrize("n,k", [(5120, 2880), (2880, 4096), (37, 272), (3, 16)])
@pytest.mark.parametrize("t", [1, 2])
def test_dense_gemv_matches_fp32_reference(cuda: str, n: int, k: int, t: int) -> None:
    """Row counts that leave a partial program, K that leaves a partial trip (272 = 256 + 16) or is
    shorter than one (16), one and two tokens, with and without bias, every ring config."""
    from gptoss_engine.kernels import gemv
    gen = torch.Generator(device=cuda).manual_seed(n * 31 + k + t)
    x = torch.randn(t, k, generator=gen, device=cuda).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device=cuda) * 0.05).to(torch.bfloat16)
    b = torch.randn(n, generator=gen, device=cuda).to(torch.bfloat16)
    # float64 on the CPU: no TF32 or split-K in the reference.
    ref = (x.double().cpu() @ w.double().cpu().T + b.double().cpu()).float().to(cuda)
    for cfg in ((1, 3), (2, 4), (4, 8)):
        gemv._CONFIG_OVERRIDE = cfg
        try:
            y = gemv.dense_gemv(x, w, b)
            y_nb = gemv.dense_gemv(x, w)
        finally:
            gemv._CONFIG_OVERRIDE = None
        assert y.shape == (t, n) and y.dtype == torch.bfloat16
        # One bf16 rounding of an fp32 sum: within 2 ulp of the reference's rounding.
        tol = ref.abs() * 2 ** -7 + 1e-3
        assert ((y.float() - ref).abs() <= tol).all(), (cfg, (y.float() - ref).abs().max().item())
        ref_nb = ref - b.float()
        assert ((y_nb.float() - ref_nb).abs() <= ref_nb.abs() * 2 ** -7 + 1e-3).all(), cfg
        lin = F.linear(x, w, b).float()
        assert ((y.float() - lin).abs() <= 2 * tol).all(), cfg


def test_dense_gemv_fp32_output_is_the_bf16_result_widened(cuda: str) -> None:
    """out_dtype=fp32 (the lm_head's logits): exactly the bf16 result as fp32, in one launch."""
    from gptoss_engine.kernels.gemv import dense_gemv
    gen = torch.Generator(device=cuda).manual_seed(11)
    for t in (1, 2):
        x = torch.randn(t, 2880, generator=gen, device=cuda).to(torch.bfloat16)
        w = (torch.randn(3000, 2880, generator=gen, device=cuda) * 0.05).to(torch.bfloat16)
        y = dense_gemv(x, w, None, torch.float32)
        assert y.dtype == torch.float32 and y.shape == (t, 3000)
        assert torch.equal(y, dense_gemv(x, w).float())


def test_dense_gemv_strided_x_rows(cuda: str) -> None:
    """x may be a row slice of a wider tensor (the attention output view), rows 16-byte aligned."""
    from gptoss_engine.kernels.gemv import dense_gemv, gemv_takes
    gen = torch.Generator(device=cuda).manual_seed(3)
    wide = torch.randn(2, 4096 + 64, generator=gen, device=cuda).to(torch.bfloat16)
    x = wide[:, :4096]
    w = (torch.randn(64, 4096, generator=gen, device=cuda) * 0.05).to(torch.bfloat16)
    assert gemv_takes(x, w)
    ref = x.float() @ w.float().T
    assert ((dense_gemv(x, w).float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3).all()


def test_dense_gemv_refuses_what_it_cannot_read(cuda: str) -> None:
    from gptoss_engine.kernels.gemv import MAX_TOKENS, dense_gemv, gemv_takes
    w = torch.zeros(16, 64, device=cuda, dtype=torch.bfloat16)
    bad = {"fp32 x": torch.zeros(1, 64, device=cuda),
           "too many tokens": torch.zeros(MAX_TOKENS + 1, 64, device=cuda, dtype=torch.bfloat16),
           "misaligned rows": torch.zeros(2, 65, device=cuda, dtype=torch.bfloat16)[:, 1:],
           "row stride 72": torch.zeros(2, 72, device=cuda, dtype=torch.bfloat16)[:, :64],
           "K mismatch": torch.zeros(1, 72, device=cuda, dtype=torch.bfloat16)}
    for why, x in bad.items():
        if why != "K mismatch":
            assert not gemv_takes(x, w), why
        with pytest.raises(ValueError, match="dense_gemv"):
            dense_gemv(x, w)


@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("hq,hkv,d,k", [(64, 8, 64, 2880), (4, 2, 32, 272)])
def test_qkv_gemv_rotary_matches_gemv_then_rotary_store_kv(cuda: str, t: int, hq: int, hkv: int, d: int,
                                                           k: int) -> None:
    """The fused q|k|v GEMV + rotary + cache store against the two launches it replaces (dense_gemv,
    then rotary_store_kv): q rotated, k/v of qkv as projected, the rotated k and the v in the token's
    slot, a padding slot (-1) and the other layer untouched. The fused form rounds once (the fp32 sums
    are rotated), the two launches twice: 2 bf16 ulp apart at most."""
    from gptoss_engine.kernels.gemv import dense_gemv, qkv_gemv_rotary
    from gptoss_engine.kernels.rotary import rotary_store_kv
    gen = torch.Generator(device=cuda).manual_seed(t * 7 + hq)
    n = (hq + 2 * hkv) * d
    x = torch.randn(t, k, generator=gen, device=cuda).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device=cuda) * 0.05).to(torch.bfloat16)
    b = torch.randn(n, generator=gen, device=cuda).to(torch.bfloat16)
    angle = torch.rand(t, d // 2, generator=gen, device=cuda) * 6.3
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    pool = torch.randn(6, 2, 2, 16, hkv, d, generator=gen, device=cuda).to(torch.bfloat16)
    slots = torch.tensor([37, -1][:t], device=cuda)
    want_pool = pool.clone()
    want = dense_gemv(x, w, b)
    rotary_store_kv(want, hq, hkv, d, cos, sin, want_pool, 1, slots)
    got = qkv_gemv_rotary(x, w, b, hq, hkv, d, cos, sin, pool, 1, slots)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a.float() - b.float()).abs() <= b.float().abs() * 2 ** -6 + 2e-2).all())

    assert got.shape == (t, n) and close(got[:, :hq * d], want[:, :hq * d])
    assert close(got[:, hq * d:], want[:, hq * d:])           # k and v as projected
    assert close(pool, want_pool)                            # rotated k, v in slot 37
    assert torch.equal(pool[:, 0], want_pool[:, 0])          # the other layer untouched
    k_cache = pool[:, 1].reshape(6, 2, 16, hkv, d).permute(1, 0, 2, 3, 4).reshape(2, 96, hkv, d)
    assert not torch.equal(k_cache[:, 37], torch.zeros_like(k_cache[:, 37]))
    untouched = torch.ones(96, dtype=torch.bool)
    untouched[37] = False
    ref_cache = want_pool[:, 1].reshape(6, 2, 16, hkv, d).permute(1, 0, 2, 3, 4).reshape(2, 96, hkv, d)
    assert torch.equal(k_cache[:, untouched.to(cuda)], ref_cache[:, untouched.to(cuda)])
    with pytest.raises(ValueError, match="qkv_gemv_rotary"):
        qkv_gemv_rotary(x, w[:-1], b, hq, hkv, d, cos, sin, pool, 1, slots)


def test_qkv_gemv_rotary_is_exact_when_the_halves_differ_in_scale(cuda: str) -> None:
    """A quarter turn (cos 0, sin 1) maps (x1, x2) to (-x2, x1): with x1 ~1e5 times x2 the fused
    rotation must still give x2 to the last bit (taking a row's partner as the pair's sum minus
    itself loses it), i.e. exactly dense_gemv's rounding of the same sums."""
    from gptoss_engine.kernels.gemv import dense_gemv, qkv_gemv_rotary
    gen = torch.Generator(device=cuda).manual_seed(11)
    hq, hkv, d, k = 4, 2, 32, 272
    n = (hq + 2 * hkv) * d
    x = torch.randn(1, k, generator=gen, device=cuda).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen, device=cuda) * 0.05
    w[:d // 2] *= 1e5                                        # head 0's first half
    w = w.to(torch.bfloat16)
    cos = torch.zeros(1, d // 2, device=cuda, dtype=torch.bfloat16)
    sin = torch.ones(1, d // 2, device=cuda, dtype=torch.bfloat16)
    pool = torch.zeros(2, 1, 2, 16, hkv, d, device=cuda, dtype=torch.bfloat16)
    got = qkv_gemv_rotary(x, w, None, hq, hkv, d, cos, sin, pool, 0, torch.tensor([3], device=cuda))
    plain = dense_gemv(x, w)
    assert torch.equal(got[0, :d // 2], -plain[0, d // 2:d])
    assert torch.equal(got[0, d // 2:d], plain[0, :d // 2])
