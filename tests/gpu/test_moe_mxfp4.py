"""Parity of the Triton MXFP4 MoE kernel with the PyTorch reference (fp32, dequantized weights)."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine import mxfp4
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
                        gate_up_scales=w.gate_up_scales, down_blocks=w.down_blocks, down_scales=w.down_scales,
                        permuted=w.permuted)
    return moe_experts_reference(x.float(), ids, wts.float(), w32, limit)


# (tokens, experts, top_k, hidden, intermediate): decode batch 1 and a few, then prefill-sized tiles.
SHAPES = [(1, 8, 4, 64, 96), (3, 8, 2, 64, 64), (40, 8, 4, 96, 64), (300, 16, 4, 128, 160)]


def _variants(interpreted: bool, tokens: int, permuted: bool = False) -> list[tuple[str, dict]]:
    """(name, moe_experts kwargs): every kernel path the dispatcher can take, at this size (permuted
    words: every path but the grouped kernel's dot_scaled mode, which refuses them)."""
    from gptoss_engine.kernels.moe_mxfp4 import Tiles
    if interpreted:
        return [("fp32", dict(interpret=True, gemv=False)),
                ("fp32 swap", dict(interpret=True, tiles=Tiles(16, 32, 64, 4, 1, swap=True))),
                ("gemv", dict(gemv=True))]
    out = [("default", {}), ("gemv", dict(gemv=True)), ("gemv fma", dict(gemv=True, gemv_mma=False)),
           ("gemv no asm", dict(gemv=True, gemv_asm=False))]
    out.append(("gemv tokens", dict(gemv_tokens=True)))
    for mode in ((3,) if permuted else (0, 3)):
        for swap in (False, True):
            out.append((f"mode{mode} swap{swap}", dict(tiles=Tiles(16, 64, 128, 4, 3, mode, swap))))
            # The down kernel on tiles of its own (as _tiles picks at decode sizes), even the other swap.
            split = Tiles(16, 64, 128, 4, 3, mode, swap, down=Tiles(0, 32, 64, 8, 2, mode, not swap))
            out.append((f"mode{mode} swap{swap} split", dict(tiles=split)))
            if tokens > 64:
                out.append((f"mode{mode} swap{swap} big", dict(tiles=Tiles(64, 128, 64, 4, 3, mode, swap))))
            if mode == 3:
                # 8 warps a program, both kernels (decode_ab groupedwarps).
                eight = Tiles(16, 64, 128, 8, 3, mode, swap, down=Tiles(0, 128, 128, 8, 3, mode, swap))
                out.append((f"mode{mode} swap{swap} 8 warps", dict(tiles=eight)))
    return out


def padded(w: ExpertWeights) -> ExpertWeights:
    """The same experts as finalize_model lays them out on the GPU (padded scale rows, scale_max and,
    on sm_90, permuted words)."""
    k = w.kernel_layout()
    assert mxfp4.readable_groups(k.gate_up_scales) % mxfp4.SCALE_ROW_PAD == 0
    assert torch.equal(k.gate_up_scales, w.gate_up_scales) and k.scale_max == int(w.gate_up_scales.max())
    assert k.permuted == (w.gate_up_blocks.is_cuda and torch.cuda.get_device_capability() >= (9, 0))
    return k


@pytest.mark.parametrize("pad", [False, True], ids=["plain", "padded-scales"])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", SHAPES)
def test_matches_reference(device: str, interpreted: bool, tokens: int, experts: int, top_k: int,
                           hidden: int, inter: int, pad: bool) -> None:
    from gptoss_engine.kernels.moe_mxfp4 import moe_experts
    if interpreted and tokens > 64:
        pytest.skip("too slow under the interpreter")
    gen = torch.Generator().manual_seed(tokens * 1000 + experts)
    w = random_packed_experts(experts, hidden, inter, device, gen)
    if pad:
        w = padded(w)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    router_w = torch.randn(experts, hidden, generator=gen).to(device, torch.bfloat16)
    ids, wts = route(x, router_w, torch.zeros(experts, device=device, dtype=torch.bfloat16), top_k)
    ref = fp32_reference(x, ids, wts, w, 7.0)
    for name, kwargs in _variants(interpreted, tokens, w.permuted):
        out = moe_experts(x, ids, wts, w, 7.0, **kwargs)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all(), name
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < 2e-2, (name, rel)
    if w.permuted:
        from gptoss_engine.kernels.moe_mxfp4 import Tiles
        with pytest.raises(ValueError, match="permuted"):
            moe_experts(x, ids, wts, w, 7.0, tiles=Tiles(16, 64, 128, 4, 3, 0, True))


def test_permuted_words_change_no_bits(device: str, interpreted: bool) -> None:
    """The same experts in checkpoint and in permuted words (mxfp4.WORD_BITS) give the same bits
    through every path that reads both: each dequant yields the very same bf16 weights. Under the
    interpreter the FMA GEMV's plain-Triton unpermute is what runs."""
    from gptoss_engine.kernels import moe_grouped_mm as gm
    from gptoss_engine.kernels.moe_mxfp4 import Tiles, moe_experts
    gen = torch.Generator().manual_seed(41)
    raw = random_packed_experts(8, 160, 96, device, gen)
    plain, perm = raw.kernel_layout(permute=False), raw.kernel_layout(permute=True)
    assert perm.permuted and not plain.permuted and not torch.equal(perm.gate_up_blocks, plain.gate_up_blocks)
    assert torch.equal(mxfp4.unpermute_words(perm.down_blocks), raw.down_blocks)
    # On CUDA both directions ran kernels/word_permute.py: the same words as the CPU's torch form.
    assert torch.equal(perm.gate_up_blocks.cpu(), mxfp4.permute_words(raw.gate_up_blocks.cpu()))
    assert torch.equal(mxfp4.unpermute_words(perm.down_blocks).cpu(), mxfp4.unpermute_words(perm.down_blocks.cpu()))
    x = torch.randn(20, 160, generator=gen).to(device, torch.bfloat16)
    ids = torch.randint(0, 8, (20, 2), generator=gen).to(device)
    wts = torch.rand(20, 2, generator=gen).to(device)
    if interpreted:
        paths = [dict(gemv=True)]
    else:
        paths = [dict(gemv=True), dict(gemv=True, gemv_mma=False), dict(gemv=True, gemv_asm=False),
                 dict(gemv_tokens=True), dict(tiles=Tiles(16, 64, 128, 4, 3, 3, True)),
                 dict(tiles=Tiles(16, 64, 128, 4, 3, 3, False)), dict(grouped_mm=True)]
    for kw in paths:
        a = moe_experts(x, ids, wts, plain, 7.0, **kw)
        b = moe_experts(x, ids, wts, perm, 7.0, **kw)
        assert torch.equal(a, b), kw
    if not interpreted:
        for one, two in zip(gm.dequantized_copy(plain), gm.dequantized_copy(perm)):
            assert torch.equal(one, two)
    # The one-multiply scales (every scale <= 128) too, where the PTX runs.
    assert plain.scale_max is not None and plain.scale_max <= 128


def test_large_scales_take_the_two_multiply_dequant(device: str, interpreted: bool) -> None:
    """Scales above 128 (2^(s-1) overflows bf16) must keep the exact two-multiply dequant."""
    from gptoss_engine.kernels.moe_mxfp4 import moe_experts
    gen = torch.Generator().manual_seed(5)
    w = random_packed_experts(8, 64, 96, device, gen)
    w.gate_up_scales[2] = 131                       # weights up to 6 * 2^4
    k = w.kernel_layout()
    assert k.scale_max == 131
    x = torch.randn(6, 64, generator=gen).to(device, torch.bfloat16) * 0.01
    ids = torch.tensor([[2, 0], [2, 1], [3, 2], [2, 4], [5, 2], [2, 7]], device=device)
    wts = torch.full((6, 2), 0.5, device=device)
    ref = fp32_reference(x, ids, wts, w, 7.0)
    for gemv in (False, True):
        out = moe_experts(x, ids, wts, k, 7.0, interpret=interpreted, gemv=gemv)
        assert torch.isfinite(out).all(), gemv
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2, gemv


def test_grouped_mm_path_matches_reference(device: str, interpreted: bool) -> None:
    """Prefill path: experts dequantized to bf16 scratch + torch's grouped GEMM."""
    from gptoss_engine.kernels.moe_grouped_mm import moe_experts_grouped_mm
    if interpreted:
        pytest.skip("grouped_mm's CPU fallback is checked on CUDA only")
    gen = torch.Generator().manual_seed(11)
    w = random_packed_experts(16, 128, 160, device, gen)
    x = torch.randn(300, 128, generator=gen).to(device, torch.bfloat16)
    router_w = torch.randn(16, 128, generator=gen).to(device, torch.bfloat16)
    ids, wts = route(x, router_w, torch.zeros(16, device=device, dtype=torch.bfloat16), 4)
    ids[:5] = 3   # one expert gets most rows, and (below) one expert none
    ids[ids == 9] = 8
    ref = fp32_reference(x, ids, wts, w, 7.0)
    out = moe_experts_grouped_mm(x, ids, wts, w, 7.0).total()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_bf16_expert_copies(device: str, interpreted: bool) -> None:
    """With bf16 copies kept (moe_prefill_weights = "bf16"): the copies are the packed weights exactly,
    and a prefill-sized batch gives the very bits of the dequantize-per-step path (the same bf16
    weights reach the same grouped GEMMs)."""
    import dataclasses

    from gptoss_engine.kernels import moe_grouped_mm as gm
    from gptoss_engine.kernels import moe_mxfp4
    if interpreted:
        pytest.skip("the grouped GEMM path runs on CUDA only")
    gen = torch.Generator().manual_seed(19)
    w = random_packed_experts(16, 128, 160, device, gen).kernel_layout()
    gu, d = gm.dequantized_copy(w)
    assert torch.equal(gu.float(), mxfp4.dequantize(w.gate_up_blocks, w.gate_up_scales, torch.float32, w.permuted))
    assert torch.equal(d.float(), mxfp4.dequantize(w.down_blocks, w.down_scales, torch.float32, w.permuted))
    dense = dataclasses.replace(w, gate_up_bf16=gu, down_bf16=d)
    router_w = torch.randn(16, 128, generator=gen).to(device, torch.bfloat16)
    x = torch.randn(1100, 128, generator=gen).to(device, torch.bfloat16)     # 4400 pairs >= 256 x 16
    ids, wts = route(x, router_w, torch.zeros(16, device=device, dtype=torch.bfloat16), 4)
    out = moe_mxfp4.moe_experts(x, ids, wts, dense, 7.0)
    assert torch.equal(out, moe_mxfp4.moe_experts(x, ids, wts, w, 7.0))
    ref = fp32_reference(x, ids, wts, w, 7.0)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_word_pairs_tiles_match(device: str, interpreted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """moe_mxfp4.WORD_PAIRS: the grouped kernels' weights in the dequant's own register pairs and the
    activations permuted to match. The same products summed in another k order: within rounding of
    the k-order form and of the fp32 reference, at every tile the dispatcher uses on sm_90 (16-, 32-
    and 64-row blocks, the down kernel on its own tiles) and a hidden size that ends inside a trip."""
    if interpreted:
        pytest.skip("inline PTX: GPU only")
    from gptoss_engine.kernels import moe_mxfp4
    from gptoss_engine.kernels.moe_mxfp4 import Tiles, moe_experts
    down = Tiles(0, 128, 128, 4, 3, 3, True)
    for hidden, tokens in ((160, 24), (2880, 40), (2880, 300)):
        gen = torch.Generator().manual_seed(43 + tokens)
        w = random_packed_experts(8, hidden, 96, device, gen).kernel_layout(permute=True)
        x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
        ids = torch.randint(0, 8, (tokens, 4), generator=gen).to(device)
        wts = torch.rand(tokens, 4, generator=gen).to(device)
        ref = fp32_reference(x, ids, wts, w, 7.0)
        for bm in (16, 32, 64):
            tiles = Tiles(bm, 64, 128, 4, 3, 3, True, down=down)
            monkeypatch.setattr(moe_mxfp4, "WORD_PAIRS", False)
            k_order = moe_experts(x, ids, wts, w, 7.0, tiles=tiles).float()
            monkeypatch.setattr(moe_mxfp4, "WORD_PAIRS", True)
            pairs = moe_experts(x, ids, wts, w, 7.0, tiles=tiles).float()
            case = (hidden, tokens, bm)
            assert ((pairs - ref).norm() / ref.norm()).item() < 2e-2, case
            assert ((pairs - k_order).norm() / k_order.norm()).item() < 5e-3, case


@pytest.mark.parametrize("tokens", [1, 3])
def test_gemv_prefetch_changes_no_bits(device: str, interpreted: bool, tokens: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The GEMV with the next trip's loads issued early does the same arithmetic in the same order:
    bit-equal to the plain loop, over several trips and a partial last one (hidden 2880 = 5.6 trips)."""
    from gptoss_engine.kernels import moe_gemv
    from gptoss_engine.kernels.moe_mxfp4 import moe_experts
    gen = torch.Generator().manual_seed(29 + tokens)
    w = padded(random_packed_experts(4, 2880, 64, device, gen))
    x = torch.randn(tokens, 2880, generator=gen).to(device, torch.bfloat16)
    ids = torch.randint(0, 4, (tokens, 2), generator=gen).to(device)
    wts = torch.full((tokens, 2), 0.5, device=device)
    outs = []
    for prefetch in (True, False):
        monkeypatch.setattr(moe_gemv, "_TILES_OVERRIDE", (16, 16, 512, 512, 4, prefetch))
        outs.append(moe_experts(x, ids, wts, w, 7.0, gemv=True, gemv_mma=False, interpret=interpreted))
    assert torch.equal(outs[0], outs[1])
    ref = fp32_reference(x, ids, wts, w, 7.0)
    assert ((outs[0].float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("form,tokens", [("per-pair", 1), ("per-pair", 5), ("tokens", 3), ("tokens", 37)])
def test_mma_gemv_tiles(device: str, interpreted: bool, form: str, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mma GEMV (moe_gemv_mma), per pair and token-grouped, at every warp arrangement, with rows
    that end inside a program (hidden 160: 2.5 down programs of 64 rows) and k that ends inside a trip
    (hidden 2880 is 5.6 trips of 512): against the fp32 reference, the prefetch form and the staged
    one (every trip's weights in shared memory first, where they fit) bit-equal to the plain loop.
    Token-grouped with 37 tokens over 4 experts (top-2: ~18 an expert), an expert spans several row
    blocks, its last partly padding; it stays within rounding of the per-pair form."""
    if interpreted:
        pytest.skip("inline PTX mma: GPU only")
    from gptoss_engine.kernels import moe_gemv_mma
    from gptoss_engine.kernels.moe_mxfp4 import moe_experts
    per_pair_kw = dict(gemv=True, gemv_mma=True)
    if form == "per-pair":
        override, kw = "_TILES_OVERRIDE", per_pair_kw
        arrangements = ((1, 4, 1), (2, 2, 1), (4, 1, 1), (1, 8, 1), (1, 1, 1), (1, 4, 2))
    else:
        override, kw = "_TOK_TILES_OVERRIDE", dict(gemv_tokens=True)
        arrangements = ((1, 4, 1), (2, 2, 1), (1, 1, 1), (1, 4, 2))
    for hidden, inter in ((160, 64), (2880, 64)):
        gen = torch.Generator().manual_seed(31 + tokens + hidden)
        w = padded(random_packed_experts(4, hidden, inter, device, gen))
        x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
        ids = torch.randint(0, 4, (tokens, 2), generator=gen).to(device)
        wts = torch.rand(tokens, 2, generator=gen).to(device)
        ref = fp32_reference(x, ids, wts, w, 7.0)
        per_pair = moe_experts(x, ids, wts, w, 7.0, **per_pair_kw).float()
        for wn, wk, u in arrangements:
            outs = []
            for staged in (True, False):
                if form == "per-pair":
                    monkeypatch.setattr(moe_gemv_mma, "PAIR_STAGED_MIN_PAIRS", 0 if staged else 1 << 30)
                else:
                    monkeypatch.setattr(moe_gemv_mma, "STAGED", staged)
                for prefetch in (True, False):
                    tile = (wn, wk, u, prefetch)
                    monkeypatch.setattr(moe_gemv_mma, override, (tile, tile))
                    outs.append(moe_experts(x, ids, wts, w, 7.0, **kw))
            case = (hidden, wn, wk, u)
            assert all(torch.equal(outs[0], out) for out in outs[1:]), case
            assert ((outs[0].float() - ref).norm() / ref.norm()).item() < 2e-2, case
            assert ((outs[0].float() - per_pair).norm() / per_pair.norm()).item() < 5e-3, case


def test_mma_gemv_refuses_what_it_cannot_read(device: str, interpreted: bool) -> None:
    """fp32 or misaligned x goes to the FMA GEMV by default; forced onto the mma GEMV it is refused."""
    if interpreted:
        pytest.skip("inline PTX mma: GPU only")
    from gptoss_engine.kernels.moe_gemv_mma import mma_gemv_takes
    from gptoss_engine.kernels.moe_mxfp4 import moe_experts
    gen = torch.Generator().manual_seed(37)
    w = padded(random_packed_experts(4, 64, 64, device, gen))
    x = torch.randn(2, 65, generator=gen).to(device, torch.bfloat16)[:, 1:]      # rows 2-byte aligned
    assert not mma_gemv_takes(x) and not mma_gemv_takes(x.float().contiguous())
    ids = torch.tensor([[0, 1], [2, 3]], device=device)
    wts = torch.full((2, 2), 0.5, device=device)
    ref = fp32_reference(x, ids, wts, w, 7.0)
    out = moe_experts(x, ids, wts, w, 7.0, gemv=True)         # contiguous() inside: aligned again
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
    out32 = moe_experts(x.float(), ids, wts, w, 7.0, gemv=True)
    assert ((out32.float() - ref).norm() / ref.norm()).item() < 2e-2
    with pytest.raises(ValueError, match="bf16"):
        moe_experts(x.float(), ids, wts, w, 7.0, gemv=True, gemv_mma=True)


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
    paths = [dict(gemv=False), dict(gemv=True)] + ([] if interpreted else [dict(gemv_tokens=True)])
    for kw in paths:
        out = moe_experts(x, ids, wts, w, 7.0, interpret=interpreted, **kw)
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2, kw


@pytest.mark.parametrize("rows,hidden,dtype", [(9, 2880, torch.bfloat16), (1, 100, torch.float32), (0, 64, torch.bfloat16)])
def test_gather_rows_is_torch_index(device: str, rows: int, hidden: int, dtype: torch.dtype) -> None:
    """The grouped_mm path's row gather: x[idx] as bf16, rows repeated, ragged tiles masked."""
    from gptoss_engine.kernels.moe_grouped_mm import _gather_rows
    gen = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(5, hidden, generator=gen).to(device, dtype)
    idx = torch.randint(0, 5, (rows,), generator=gen).to(device)
    got = _gather_rows(x, idx)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, hidden)
    assert torch.equal(got, x.to(torch.bfloat16)[idx])
