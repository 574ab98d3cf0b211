"""Build the engine a worker serves from: flags + engine YAML -> EngineConfig -> AsyncEngine.

Flags override the YAML (an operator's command line is the last word); what neither sets keeps
the engine's defaults. EngineHandle is the one place that knows the AsyncEngine's shape, so the
servicers read as the design's contracts (prefill / reserve_kv / generate_from_kv / stats).
"""
from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator

from gptoss_engine.kv_layout import KVCache, KVLayout
from svc_common.args import ConfigError, WorkerConfig
from svc_common.engine_yaml import EngineYaml


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
    }
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


class EngineHandle:
    """The AsyncEngine plus what the daemon reads off it (layout, fingerprint, KV tensors)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    @property
    def layout(self) -> KVLayout:
        return self._engine.kv_cache.layout

    @property
    def kv_cache(self) -> KVCache:
        return self._engine.kv_cache

    @property
    def fingerprint(self) -> str:
        return self._engine.model_config.fingerprint

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._engine.model_config.vocab_size

    async def start(self) -> None:
        await self._engine.start()

    async def shutdown(self) -> None:
        await self._engine.shutdown()

    async def prefill(self, request_id: str, prompt_ids: list[int], sampling: Any) -> Any:
        return await self._engine.prefill(request_id, prompt_ids, sampling)

    async def release_staged(self, handle: Any) -> None:
        await self._engine.release_staged(handle)

    def release_staged_nowait(self, handle: Any) -> None:
        """From any thread or callback: queue the release on the engine thread."""
        self._engine.release_staged_nowait(handle)

    async def reserve_kv(self, num_tokens: int) -> Any:
        return await self._engine.reserve_kv(num_tokens)

    async def free_reservation(self, reservation: Any) -> None:
        await self._engine.free_reservation(reservation)

    def generate(self, request_id: str, prompt_ids: list[int], sampling: Any) -> AsyncIterator[Any]:
        return self._engine.generate(request_id, prompt_ids, sampling)

    def generate_from_kv(self, request_id: str, prompt_ids: list[int], first: Any, reservation: Any,
                         sampling: Any) -> AsyncIterator[Any]:
        return self._engine.generate_from_kv(request_id, prompt_ids, first, reservation, sampling)

    def stats(self) -> Any:
        return self._engine.stats()


def build_engine(cfg: WorkerConfig, engine_yaml: EngineYaml) -> EngineHandle:
    """Blocking (loads weights): run it in a thread."""
    from gptoss_engine.async_engine import AsyncEngine

    return EngineHandle(AsyncEngine.from_config(_engine_config(cfg, engine_yaml)))
