"""Build the engine a worker serves from: flags + engine YAML -> EngineConfig -> AsyncEngine.

Flags override the YAML (an operator's command line is the last word); what neither sets keeps
the engine's defaults. The daemons then call the AsyncEngine directly (prefill / reserve_kv /
generate_from_kv / stats, see docs/DESIGN.md).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from svc_common.args import ConfigError, WorkerConfig
from svc_common.engine_yaml import EngineYaml

if TYPE_CHECKING:
    from gptoss_engine.async_engine import AsyncEngine


def engine_overrides(cfg: WorkerConfig, y: EngineYaml) -> dict[str, Any]:
    """EngineConfig keyword arguments set by the YAML and then the flags (None = not set)."""
    merged = {
        "max_num_tokens": cfg.max_num_tokens or y.max_num_tokens,
        "max_batch_size": cfg.max_batch_size or y.max_batch_size,
        "max_model_len": cfg.max_model_len or y.max_model_len,
        "free_gpu_memory_fraction": cfg.free_gpu_memory_fraction or y.free_gpu_memory_fraction,
        "enable_chunked_prefill": y.enable_chunked_prefill,
        "enable_prefix_caching": y.enable_prefix_caching,
        "kv_cache_dtype": y.kv_cache_dtype,
        "cuda_graph_batch_sizes": y.cuda_graph_batch_sizes,
        "cuda_graph_max_batch_size": y.cuda_graph_max_batch_size,
        "cuda_graph_padding": y.cuda_graph_padding,
        "overlap_scheduler": y.overlap_scheduler,
        "moe_prefill_weights": y.moe_prefill_weights,
    }
    if merged["overlap_scheduler"] is None and cfg.disaggregation_mode == "prefill":
        # A prefill worker's requests end at their first token: overlap would hold each one back a
        # step behind the next prompt's forward (TensorRT-LLM's prefill configs disable it too).
        merged["overlap_scheduler"] = False
    return {k: v for k, v in merged.items() if v is not None}


def _device(flag: str) -> str:
    """--device auto: the GPU when torch sees one, else the CPU."""
    if flag != "auto":
        return flag
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _engine_config(cfg: WorkerConfig, y: EngineYaml) -> Any:
    from gptoss_engine.config import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    overrides = engine_overrides(cfg, y)
    unsupported = sorted(set(overrides) - known)
    if unsupported:
        raise ConfigError(f"the engine has no setting for {', '.join(unsupported)} (set by flags or engine YAML)")
    try:
        return EngineConfig(model_path=cfg.model_path, device=_device(cfg.device), **overrides)
    except ValueError as e:
        raise ConfigError(f"engine settings: {e}") from None


def build_engine(cfg: WorkerConfig, engine_yaml: EngineYaml) -> AsyncEngine:
    """Blocking (loads weights): run it in a thread."""
    from gptoss_engine.async_engine import AsyncEngine
    from gptoss_engine.gc_policy import settle_for_serving

    engine = AsyncEngine.from_config(_engine_config(cfg, engine_yaml))
    settle_for_serving()   # the daemon holds this engine for its whole life
    return engine
