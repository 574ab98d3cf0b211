"""`ModelConfig`: the architecture of a gpt-oss checkpoint, parsed once from HF `config.json`.

Field names follow transformers' GptOssConfig. `config.json` as published spells RoPE the legacy
way (`rope_theta` + `rope_scaling`); transformers >= 5 may write `rope_parameters` instead: both
are accepted. EOS ids come from `generation_config.json` when present (that is where the published
checkpoints list <|return|> and <|call|>), else from config.json's `eos_token_id`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from gptoss_engine.kv_layout import KVLayout

LAYER_TYPES = ("sliding_attention", "full_attention")
# What stays bf16 in an MXFP4 checkpoint (as in the published config.json): only experts are packed.
MXFP4_NOT_CONVERTED = ("model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head")


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes something this engine cannot run."""


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    beta_fast: float
    beta_slow: float
    original_max_position_embeddings: int
    truncate: bool


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope_theta: float
    rope_scaling: YarnScaling | None
    rms_norm_eps: float
    swiglu_limit: float
    max_position_embeddings: int
    swiglu_alpha: float = 1.702
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    quant_method: str | None = None  # "mxfp4" when the experts are stored packed; not architecture

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | pathlib.Path) -> "ModelConfig":
        directory = pathlib.Path(directory)
        path = directory / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (is {directory} a gpt-oss checkpoint folder?)")
        data = _read_json(path)
        gen_path = directory / "generation_config.json"
        if gen_path.is_file():
            gen = _read_json(gen_path)
            if gen.get("eos_token_id") is not None:
                data = {**data, "eos_token_id": gen["eos_token_id"]}
            if gen.get("pad_token_id") is not None and data.get("pad_token_id") is None:
                data = {**data, "pad_token_id": gen["pad_token_id"]}
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        mt = d.get("model_type", "gpt_oss")
        if mt != "gpt_oss":
            raise ConfigError(f"model_type is {mt!r}, expected 'gpt_oss'")
        num_layers = _int(d, "num_hidden_layers")
        hidden = _int(d, "hidden_size")
        heads = _int(d, "num_attention_heads")
        head_dim = _int(d, "head_dim") if d.get("head_dim") is not None else hidden // heads
        kv_heads = _int(d, "num_key_value_heads")
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        if head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {head_dim}")
        layer_types = d.get("layer_types")
        if layer_types is None:  # GptOssConfig's default: sliding on even layers
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(f"layer_types must be a list of num_hidden_layers ({num_layers}) entries")
        bad = [t for t in layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"layer_types has unknown entries {sorted(set(map(str, bad)))}; allowed {LAYER_TYPES}")
        sliding_window = d.get("sliding_window")
        if "sliding_attention" in layer_types and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive int when sliding layers exist, got {sliding_window!r}")
        experts = _int(d, "num_local_experts")
        top_k = _int(d, "num_experts_per_tok")
        if top_k > experts:
            raise ConfigError(f"num_experts_per_tok ({top_k}) > num_local_experts ({experts})")
        rope_theta, rope_scaling = _parse_rope(d)
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(x) for x in (eos if isinstance(eos, list) else [eos]))
        quant = (d.get("quantization_config") or {}).get("quant_method")
        if quant not in (None, "mxfp4"):
            raise ConfigError(f"quantization_config.quant_method {quant!r} is not supported (only mxfp4)")
        return cls(
            vocab_size=_int(d, "vocab_size"), hidden_size=hidden, intermediate_size=_int(d, "intermediate_size"),
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, num_local_experts=experts, num_experts_per_tok=top_k,
            sliding_window=sliding_window, layer_types=tuple(layer_types), rope_theta=rope_theta,
            rope_scaling=rope_scaling, rms_norm_eps=_float(d, "rms_norm_eps", 1e-5),
            swiglu_limit=_float(d, "swiglu_limit", 7.0), swiglu_alpha=_float(d, "swiglu_alpha", 1.702),
            max_position_embeddings=_int(d, "max_position_embeddings"), eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"), quant_method=quant,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as the published checkpoints spell it."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "experts_per_token": self.num_experts_per_tok,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit, "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu",
            "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
            "output_router_logits": False, "router_aux_loss_coef": 0.9,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "yarn", **dataclasses.asdict(self.rope_scaling)}
            d["initial_context_length"] = self.rope_scaling.original_max_position_embeddings
        if self.swiglu_alpha != 1.702:
            d["swiglu_alpha"] = self.swiglu_alpha
        if self.eos_token_ids:
            d["eos_token_id"] = list(self.eos_token_ids)
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        if self.quant_method is not None:
            d["quantization_config"] = {"quant_method": self.quant_method,
                                        "modules_to_not_convert": list(MXFP4_NOT_CONVERTED)}
        return d

    # ---- derived ------------------------------------------------------------------------------
    @property
    def num_full_layers(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def num_swa_layers(self) -> int:
        return sum(t == "sliding_attention" for t in self.layer_types)

    def window(self, layer: int) -> int | None:
        """Sliding window of a layer, None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def pool_index(self, layer: int) -> tuple[str, int]:
        """("full"|"swa", index of the layer inside that pool): see kv_layout.py."""
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_hidden_layers})")
        kind = self.layer_types[layer]
        return ("full" if kind == "full_attention" else "swa"), self.layer_types[:layer].count(kind)

    def kv_layout(self, block_size: int, dtype: torch.dtype) -> KVLayout:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return KVLayout(block_size=block_size, num_full_layers=self.num_full_layers,
                        num_swa_layers=self.num_swa_layers, num_kv_heads=self.num_key_value_heads,
                        head_dim=self.head_dim, sliding_window=self.sliding_window or 0, dtype=dtype)

    @property
    def fingerprint(self) -> str:
        """Stable hash of what shapes the KV cache and the math (not eos/pad/quantization)."""
        arch = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("eos_token_ids", "pad_token_id", "quant_method")}
        blob = json.dumps(arch, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read JSON: {e}") from None


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key} must be a positive int, got {v!r}" if key in d else f"missing field {key!r}")
    return v


def _float(d: dict[str, Any], key: str, default: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)


def _parse_rope(d: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    params = d.get("rope_parameters") or d.get("rope_scaling")
    theta = d.get("rope_theta") if d.get("rope_theta") is not None else (params or {}).get("rope_theta", 150000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
    if not params:
        return float(theta), None
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} is not supported (only yarn or default)")
    try:
        scaling = YarnScaling(
            factor=float(params["factor"]), beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            truncate=bool(params.get("truncate", True)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"rope_scaling (yarn) is missing or has a bad field: {e}") from None
    return float(theta), scaling
