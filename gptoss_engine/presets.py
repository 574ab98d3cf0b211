"""HF-style config.json dicts for the published gpt-oss shapes, plus a tiny one for CPU tests.

`tiny` keeps the real vocabulary (so the real harmony tokenizer applies), the real RoPE/YaRN and
the real layer pattern, and shrinks everything else so a CPU forward takes milliseconds.
"""
from __future__ import annotations

import copy
from typing import Any

_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
         "original_max_position_embeddings": 4096, "truncate": False}


def _preset(num_layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
            experts: int) -> dict[str, Any]:
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "vocab_size": 201088, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "num_local_experts": experts, "num_experts_per_tok": 4, "experts_per_token": 4,
        "sliding_window": 128,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        "rope_theta": 150000.0, "rope_scaling": dict(_YARN), "initial_context_length": 4096,
        "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "max_position_embeddings": 131072,
        "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "tie_word_embeddings": False, "use_cache": True, "output_router_logits": False,
        "router_aux_loss_coef": 0.9,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _preset(num_layers=4, hidden=64, intermediate=64, heads=4, kv_heads=2, head_dim=16, experts=8),
    "20b": _preset(num_layers=24, hidden=2880, intermediate=2880, heads=64, kv_heads=8, head_dim=64, experts=32),
    "120b": _preset(num_layers=36, hidden=2880, intermediate=2880, heads=64, kv_heads=8, head_dim=64, experts=128),
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A fresh copy of a preset's config dict, with top-level fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    d = copy.deepcopy(PRESETS[name])
    d.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        n = d["num_hidden_layers"]
        d["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return d
