"""make-model output (format, determinism), random_model, ModelConfig and presets."""
from __future__ import annotations

import hashlib
import json
import pathlib

import pytest
import torch

from gptoss_cli.__main__ import main as gptoss_main
from gptoss_engine.checkpoint import load_model, tensor_specs
from gptoss_engine.make_model import random_model
from gptoss_engine.model_config import ConfigError, ModelConfig
from gptoss_engine.presets import PRESETS, preset
from gptoss_engine.vocab import harmony_encoding


def _digests(d: pathlib.Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_cli_is_deterministic_per_seed(tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert gptoss_main(["make-model", "--preset", "tiny", "--out", str(a), "--seed", "0", "--quiet",
                        "--shard-size-mb", "16"]) == 0
    assert gptoss_main(["make-model", "--preset", "tiny", "--out", str(b), "--seed", "1", "--quiet",
                        "--shard-size-mb", "16"]) == 0
    assert _digests(a) == _digests(tiny_model_dir)  # the fixture is seed 0, same shard size
    da, db = _digests(a), _digests(b)
    assert da["config.json"] == db["config.json"]
    shards = [n for n in da if n.endswith(".safetensors")]
    assert len(shards) == 3 and all(da[n] != db[n] for n in shards)


def test_mxfp4_checkpoint_layout(tiny_model_dir: pathlib.Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert "lm_head" in cfg["quantization_config"]["modules_to_not_convert"]
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    enc = harmony_encoding()
    assert set(gen["eos_token_id"]) == set(enc.stop_tokens_for_assistant_actions())
    config = ModelConfig.from_pretrained(tiny_model_dir)
    assert set(config.eos_token_ids) == set(gen["eos_token_id"]) and config.quant_method == "mxfp4"
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert names == {s.name for s in tensor_specs(config, packed=True)}
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    assert set(index["weight_map"].values()) == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}


def test_dense_checkpoint_has_no_quantization(tiny_dense_model_dir: pathlib.Path) -> None:
    cfg = json.loads((tiny_dense_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    index = json.loads((tiny_dense_model_dir / "model.safetensors.index.json").read_text())
    assert "model.layers.3.mlp.experts.down_proj" in index["weight_map"]


def test_random_model_equals_dense_checkpoint_of_same_seed(tiny_config: ModelConfig,
                                                          tiny_dense_model_dir: pathlib.Path) -> None:
    built = random_model(tiny_config, "cpu", seed=0)
    loaded = load_model(tiny_dense_model_dir, progress=False)
    sd = loaded.state_dict()
    assert set(built.state_dict()) == set(sd)
    for name, t in built.state_dict().items():
        assert torch.equal(t, sd[name]), name


def test_presets_match_published_shapes() -> None:
    for name, layers, experts in (("20b", 24, 32), ("120b", 36, 128)):
        c = ModelConfig.from_dict(PRESETS[name])
        assert (c.num_hidden_layers, c.num_local_experts, c.hidden_size, c.num_attention_heads) == (layers, experts,
                                                                                                   2880, 64)
        assert c.layer_types[0] == "sliding_attention" and c.layer_types[1] == "full_attention"
        assert c.rope_scaling is not None and c.rope_scaling.factor == 32 and not c.rope_scaling.truncate
    specs = tensor_specs(ModelConfig.from_dict(PRESETS["120b"]), packed=True)
    blocks = next(s for s in specs if s.name == "model.layers.0.mlp.experts.gate_up_proj_blocks")
    assert blocks.shape == (128, 5760, 90, 16)
    # 120b checkpoint is about 60.8 GiB as published
    assert 60 < sum(s.nbytes for s in specs) / 2**30 < 62


def test_model_config_roundtrip_pools_and_fingerprint(tiny_config: ModelConfig) -> None:
    again = ModelConfig.from_dict(tiny_config.to_hf_dict())
    assert again == tiny_config
    assert [tiny_config.pool_index(i) for i in range(4)] == [("swa", 0), ("full", 0), ("swa", 1), ("full", 1)]
    layout = tiny_config.kv_layout(16, torch.bfloat16)
    assert (layout.num_full_layers, layout.num_swa_layers, layout.sliding_window) == (2, 2, 128)
    assert tiny_config.fingerprint == ModelConfig.from_dict(preset("tiny")).fingerprint  # eos/quant not arch
    assert tiny_config.fingerprint != ModelConfig.from_dict(preset("tiny", sliding_window=64)).fingerprint
    # transformers >= 5 style rope_parameters parse to the same config
    d = tiny_config.to_hf_dict()
    d["rope_parameters"] = {**d.pop("rope_scaling"), "rope_theta": d.pop("rope_theta")}
    assert ModelConfig.from_dict(d) == tiny_config


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "missing field 'hidden_size'|hidden_size must be"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"layer_types": ["full_attention"]}, "layer_types must be a list"),
    ({"sliding_window": 0}, "sliding_window must be a positive int"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2}}, "rope type 'longrope'"),
    ({"model_type": "llama"}, "expected 'gpt_oss'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "not supported"),
])
def test_bad_config_is_a_clear_error(change: dict, message: str) -> None:
    d = {**preset("tiny"), **change}
    if change.get("hidden_size", 1) is None:
        del d["hidden_size"]
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_missing_config_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
