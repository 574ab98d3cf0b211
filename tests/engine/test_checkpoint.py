"""Checkpoint loading (errors name file and tensor), HF interop, and the MXFP4 format itself."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM as HFGptOss
from transformers import Mxfp4Config

from gptoss_engine import mxfp4
from gptoss_engine.checkpoint import INDEX_FILE, CheckpointError, load_model


@pytest.fixture
def ckpt(tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path) -> pathlib.Path:
    """A private copy of the tiny MXFP4 checkpoint that a test may break."""
    return pathlib.Path(shutil.copytree(tiny_model_dir, tmp_path / "ckpt"))


def _index(ckpt: pathlib.Path) -> dict:
    return json.loads((ckpt / INDEX_FILE).read_text())


def _file_of(ckpt: pathlib.Path, tensor: str) -> pathlib.Path:
    return ckpt / _index(ckpt)["weight_map"][tensor]


def _rewrite(file: pathlib.Path, change) -> None:  # noqa: ANN001 - a dict -> None callback
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# ---- MXFP4 format ---------------------------------------------------------------------------------

def test_mxfp4_nibble_order_and_scale() -> None:
    # One group of 32: element 0 = 1.5 (code 3), element 1 = -6 (code 8|7), rest 0, scale 2^1.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x3 | (0xF << 4)
    scales = torch.full((1, 1), 128, dtype=torch.uint8)
    w = mxfp4.dequantize(blocks, scales)
    assert w.shape == (1, 32)
    assert w[0, :2].tolist() == [3.0, -12.0] and not w[0, 2:].any()


def test_mxfp4_roundtrip_exact_on_representable_values() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.tensor(mxfp4.FP4_VALUES)
    codes = torch.randint(0, 8, (3, 6, 64), generator=g)
    signs = torch.where(torch.rand(3, 6, 64, generator=g) < 0.5, -1.0, 1.0)
    exps = torch.randint(-4, 4, (3, 6, 2, 1), generator=g).float()
    w = (table[codes] * signs).reshape(3, 6, 2, 32)
    w[..., 0] = 6.0  # each group reaches the top of the range, so its scale is exactly 2^exp
    w = (w * torch.exp2(exps)).reshape(3, 6, 64)
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (3, 6, 2, 16) and scales.shape == (3, 6, 2) and blocks.dtype == torch.uint8
    assert torch.equal(mxfp4.dequantize(blocks, scales), w)


def test_mxfp4_quantize_error_is_bounded() -> None:
    w = torch.randn(4, 8, 96, generator=torch.Generator().manual_seed(1))
    err = (mxfp4.dequantize(*mxfp4.quantize(w)) - w).abs()
    assert err.max() <= w.abs().amax() * 0.25  # half the widest FP4 step (4 -> 6) relative to the max


def test_mxfp4_layout_conversion_transposes() -> None:
    dense = torch.randn(2, 64, 96)  # [E, in, out] as HF's gate_up_proj
    blocks, scales = mxfp4.dense_to_packed(dense)
    assert blocks.shape == (2, 96, 2, 16) and scales.shape == (2, 96, 2)  # out-major, in/32 groups
    back = mxfp4.packed_to_dense(blocks, scales)
    assert back.shape == dense.shape
    assert torch.equal(back, mxfp4.dequantize(*mxfp4.quantize(dense.transpose(1, 2))).transpose(1, 2))


def test_mxfp4_padded_scales_keep_values_and_say_how_far_to_read() -> None:
    """The GPU layout: scale rows padded to SCALE_ROW_PAD bytes of 2^0, same shape and values."""
    scales = torch.randint(100, 140, (3, 5, 90), dtype=torch.uint8)
    assert mxfp4.readable_groups(scales) == 90                       # contiguous: only its own groups
    p = mxfp4.pad_scales(scales)
    assert p.shape == scales.shape and torch.equal(p, scales) and p.stride() == (5 * 96, 96, 1)
    assert mxfp4.readable_groups(p) == 96
    assert (p.as_strided((3, 5, 96), p.stride())[..., 90:] == 127).all()   # padding reads as x1
    assert mxfp4.pad_scales(p) is p                                   # idempotent
    assert mxfp4.readable_groups(p[:, :, :40]) == 96                  # a narrower view of padded rows
    assert mxfp4.readable_groups(scales[:, :, :40]) == 40             # stride 90: not 16-byte aligned
    # A view whose last row's padding would run past the storage must not claim it.
    tail = torch.zeros(2 * 96 + 90, dtype=torch.uint8).as_strided((3, 90), (96, 1))
    assert mxfp4.readable_groups(tail) == 90


def test_expert_kernel_layout_pads_scales_and_records_the_largest() -> None:
    from gptoss_engine.moe import ExpertWeights
    gu_b, gu_s = mxfp4.quantize(torch.randn(2, 8, 64))
    d_b, d_s = mxfp4.quantize(torch.randn(2, 64, 32) * 40)
    w = ExpertWeights(torch.zeros(2, 8), torch.zeros(2, 64), gate_up_blocks=gu_b, gate_up_scales=gu_s,
                      down_blocks=d_b, down_scales=d_s)
    k = w.kernel_layout()
    assert w.scale_max is None and k.scale_max == int(max(gu_s.max(), d_s.max()))
    assert torch.equal(k.down_scales, d_s) and mxfp4.readable_groups(k.down_scales) == mxfp4.SCALE_ROW_PAD
    assert k.gate_up_blocks is w.gate_up_blocks


def test_permuted_words_hold_the_same_codes() -> None:
    """kernel_layout(permute=True) (what sm_90 gets): every code bit moves where mxfp4.WORD_BITS says,
    the words read back through unpermute_words, and the reference path dequantizes the same experts."""
    from gptoss_engine.moe import ExpertWeights
    for k, bits in enumerate(mxfp4.WORD_BITS):
        for j, dst in zip((3, 2, 1, 0), bits):       # sign, e1, e0, m of code k
            word = torch.tensor([1 << (4 * k + j)], dtype=torch.int64).to(torch.int32)
            blocks = torch.zeros(1, 16, dtype=torch.uint8)
            blocks.view(torch.int32)[0, 0] = word
            moved = int(mxfp4.permute_words(blocks).view(torch.int32)[0, 0]) & 0xFFFFFFFF
            assert moved == 1 << dst, (k, j)
    gu_b, gu_s = mxfp4.quantize(torch.randn(3, 8, 64))
    d_b, d_s = mxfp4.quantize(torch.randn(3, 64, 32))
    w = ExpertWeights(torch.zeros(3, 8), torch.zeros(3, 64), gate_up_blocks=gu_b, gate_up_scales=gu_s,
                      down_blocks=d_b, down_scales=d_s)
    k = w.kernel_layout(permute=True)
    assert k.permuted and not w.permuted and not torch.equal(k.gate_up_blocks, gu_b)
    assert torch.equal(mxfp4.unpermute_words(k.gate_up_blocks), gu_b)
    assert torch.equal(mxfp4.dequantize(k.down_blocks, k.down_scales, permuted=True), mxfp4.dequantize(d_b, d_s))
    for e in range(3):
        assert all(torch.equal(a, b) for a, b in zip(k.expert(e, torch.float32), w.expert(e, torch.float32)))
    assert k.kernel_layout().gate_up_blocks is k.gate_up_blocks      # permuted once


def test_mxfp4_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        mxfp4.quantize(torch.zeros(2, 33))
    with pytest.raises(ValueError, match="uint8"):
        mxfp4.dequantize(torch.zeros(1, 1, 16), torch.zeros(1, 1, dtype=torch.uint8))


# ---- loading ---------------------------------------------------------------------------------------

def test_load_mxfp4_on_cpu_dequantizes(tiny_model_dir: pathlib.Path) -> None:
    m = load_model(tiny_model_dir, progress=False)
    experts = m.model.layers[0].mlp.experts
    assert not m.packed_experts and experts.gate_up_proj.shape == (8, 64, 128)
    ref = load_file(str(_file_of(tiny_model_dir, "model.layers.0.mlp.experts.gate_up_proj_blocks")))
    want = mxfp4.packed_to_dense(ref["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                                 ref["model.layers.0.mlp.experts.gate_up_proj_scales"])
    assert torch.equal(experts.gate_up_proj, want)
    assert m.model.norm.weight.dtype == torch.float32 and m.lm_head.weight.dtype == torch.float32


def test_load_bf16_keeps_norms_float32(tiny_dense_model_dir: pathlib.Path) -> None:
    m = load_model(tiny_dense_model_dir, dtype=torch.bfloat16, progress=False)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.layers[1].input_layernorm.weight.dtype == torch.float32
    names = set(m.state_dict())
    assert names == set(_index(tiny_dense_model_dir)["weight_map"])  # parameter names == checkpoint keys


@pytest.mark.parametrize("which", ["mxfp4", "dense"])
def test_hf_transformers_loads_our_checkpoints(which: str, tiny_model_dir: pathlib.Path,
                                               tiny_dense_model_dir: pathlib.Path) -> None:
    if which == "mxfp4":
        hf = HFGptOss.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                      quantization_config=Mxfp4Config(dequantize=True))
        ours = load_model(tiny_model_dir, progress=False)
    else:
        hf = HFGptOss.from_pretrained(tiny_dense_model_dir, dtype=torch.float32)
        ours = load_model(tiny_dense_model_dir, progress=False)
    hf_sd = hf.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(hf_sd[name].float(), t.float()), name


def test_missing_config(ckpt: pathlib.Path) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(ckpt, progress=False)


def test_missing_shard_named_by_index(ckpt: pathlib.Path) -> None:
    shard = _file_of(ckpt, "lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*does not exist"):
        load_model(ckpt, progress=False)


def test_truncated_shard(ckpt: pathlib.Path) -> None:
    shard = _file_of(ckpt, "model.norm.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        load_model(ckpt, progress=False)


def test_tensor_missing_from_index(ckpt: pathlib.Path) -> None:
    idx = _index(ckpt)
    del idx["weight_map"]["model.layers.2.self_attn.sinks"]
    (ckpt / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.sinks is missing"):
        load_model(ckpt, progress=False)


def test_tensor_listed_but_not_in_file(ckpt: pathlib.Path) -> None:
    name = "model.layers.1.mlp.router.bias"
    shard = _file_of(ckpt, name)
    _rewrite(shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor {name} is listed"):
        load_model(ckpt, progress=False)


def test_wrong_shape(ckpt: pathlib.Path) -> None:
    name = "model.layers.3.self_attn.q_proj.weight"
    shard = _file_of(ckpt, name)
    _rewrite(shard, lambda t: t.update({name: torch.zeros(3, 3, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {name} has shape \(3, 3\), expected \(64, 64\)"):
        load_model(ckpt, progress=False)


def test_wrong_dtype(ckpt: pathlib.Path) -> None:
    name = "model.layers.0.mlp.experts.down_proj_scales"
    shard = _file_of(ckpt, name)
    _rewrite(shard, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor {name} has dtype torch.float32, expected uint8"):
        load_model(ckpt, progress=False)


def test_unexpected_tensor(ckpt: pathlib.Path) -> None:
    idx = _index(ckpt)
    idx["weight_map"]["model.layers.9.self_attn.sinks"] = "model-00001-of-00003.safetensors"
    (ckpt / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.9\.self_attn\.sinks"):
        load_model(ckpt, progress=False)


def test_single_file_checkpoint_without_index(tmp_path: pathlib.Path, tiny_dense_model_dir: pathlib.Path) -> None:
    out = tmp_path / "single"
    out.mkdir()
    shutil.copy(tiny_dense_model_dir / "config.json", out)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(tiny_dense_model_dir.glob("model-*.safetensors")):
        tensors.update(load_file(str(f)))
    save_file(tensors, str(out / "model.safetensors"))
    m = load_model(out, progress=False)
    assert torch.equal(m.lm_head.weight, tensors["lm_head.weight"].float())
