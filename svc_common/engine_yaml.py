"""The engine YAML of --extra-engine-args (TensorRT-LLM-style keys, as in the seeds' prefill.yaml / decode.yaml).

Each known key is either *applied* (mapped onto our engine's settings), *checked* (only the value
our engine implements is accepted, e.g. cache_transceiver_config.backend: ucx) or *not applicable*
(a TensorRT-LLM knob with no meaning here: accepted so the seeds' files load, and named in ONE
warning). An unknown key is an error that lists the known ones: a typo must not pass silently.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from svc_common.args import ConfigError


@dataclass(frozen=True)
class EngineYaml:
    """What the YAML sets (None: not set). Flags override these; see worker.engine_config."""
    max_num_tokens: int | None = None
    max_batch_size: int | None = None
    max_model_len: int | None = None                 # max_seq_len
    enable_chunked_prefill: bool | None = None
    free_gpu_memory_fraction: float | None = None
    enable_prefix_caching: bool | None = None       # kv_cache_config.enable_block_reuse
    kv_cache_dtype: str | None = None
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    cuda_graph_max_batch_size: int | None = None
    cuda_graph_padding: bool | None = None
    overlap_scheduler: bool | None = None            # not disable_overlap_scheduler
    moe_prefill_weights: str | None = None           # moe_config.prefill_weights (this engine's key)
    ignored_keys: tuple[str, ...] = ()               # known but not applicable (warned about once)


def _pos_int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"engine YAML {key}: expected a positive integer, got {v!r}")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"engine YAML {key}: expected true or false, got {v!r}")
    return v


def _fraction(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ConfigError(f"engine YAML {key}: expected a number in (0, 1], got {v!r}")
    return float(v)


def _dtype(key: str, v: Any) -> str:
    allowed = ("auto", "bfloat16", "float16", "float32")
    if v not in allowed:
        raise ConfigError(f"engine YAML {key}: expected one of {', '.join(allowed)}, got {v!r}")
    return str(v)


def _batch_sizes(key: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"engine YAML {key}: expected a non-empty list of positive integers, got {v!r}")
    return tuple(sorted({_pos_int(key, x) for x in v}))


def _prefill_weights(key: str, v: Any) -> str:
    if v not in ("mxfp4", "bf16"):
        raise ConfigError(f"engine YAML {key}: expected mxfp4 (dequantize per prefill) or bf16 (keep a bf16 copy "
                          f"of the experts), got {v!r}")
    return str(v)


def _single_gpu(key: str, v: Any) -> None:
    if _pos_int(key, v) != 1:
        raise ConfigError(f"engine YAML {key}={v}: multi-GPU (tensor/expert parallel) is not supported yet")


def _ucx_backend(key: str, v: Any) -> None:
    if str(v).lower() not in ("ucx", "default"):
        raise ConfigError(f"engine YAML {key}={v!r}: only 'ucx' KV transfer is implemented")


def _pytorch_backend(key: str, v: Any) -> None:
    if str(v).lower() != "pytorch":
        raise ConfigError(f"engine YAML {key}={v!r}: this engine is PyTorch only ('pytorch')")


# dotted key -> (EngineYaml field or None, converter). Field None: checked only.
_APPLIED: dict[str, tuple[str | None, Callable[[str, Any], Any]]] = {
    "max_num_tokens": ("max_num_tokens", _pos_int),
    "max_batch_size": ("max_batch_size", _pos_int),
    "max_seq_len": ("max_model_len", _pos_int),
    "enable_chunked_prefill": ("enable_chunked_prefill", _bool),
    "kv_cache_config.free_gpu_memory_fraction": ("free_gpu_memory_fraction", _fraction),
    "kv_cache_config.enable_block_reuse": ("enable_prefix_caching", _bool),
    "kv_cache_config.dtype": ("kv_cache_dtype", _dtype),
    "cuda_graph_config.batch_sizes": ("cuda_graph_batch_sizes", _batch_sizes),
    "cuda_graph_config.max_batch_size": ("cuda_graph_max_batch_size", _pos_int),
    "cuda_graph_config.enable_padding": ("cuda_graph_padding", _bool),
    "disable_overlap_scheduler": ("overlap_scheduler", lambda key, v: not _bool(key, v)),
    "moe_config.prefill_weights": ("moe_prefill_weights", _prefill_weights),
    "tensor_parallel_size": (None, _single_gpu),
    "moe_expert_parallel_size": (None, _single_gpu),
    "cache_transceiver_config.backend": (None, _ucx_backend),
    "backend": (None, _pytorch_backend),
}

# TensorRT-LLM knobs that have no meaning for this engine.
_NOT_APPLICABLE = (
    "enable_attention_dp",
    "moe_config.backend",
    "cache_transceiver_config.max_tokens_in_buffer",
    "print_iter_log",
    "stream_interval",
    "trust_remote_code",
    "kv_cache_config.max_tokens",
)
_SECTIONS = ("kv_cache_config", "cuda_graph_config", "cache_transceiver_config", "moe_config")
KNOWN_KEYS = tuple(sorted([*_APPLIED, *_NOT_APPLICABLE]))


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in _SECTIONS:
            out.update(_flatten(value, dotted + "."))
        elif dotted == "cuda_graph_config" and value is None:
            continue  # `cuda_graph_config:` with no body = defaults
        else:
            out[dotted] = value
    return out


def parse_engine_yaml(data: dict) -> EngineYaml:
    if not isinstance(data, dict):
        raise ConfigError(f"engine YAML must be a mapping of keys, got {type(data).__name__}")
    flat = _flatten(data)
    unknown = sorted(k for k in flat if k not in _APPLIED and k not in _NOT_APPLICABLE)
    if unknown:
        raise ConfigError(f"engine YAML: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KNOWN_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key in _APPLIED:
            target, convert = _APPLIED[key]
            converted = convert(key, value)
            if target is not None:
                values[target] = converted
    ignored = tuple(sorted(k for k in flat if k in _NOT_APPLICABLE))
    return EngineYaml(**values, ignored_keys=ignored)


def load_engine_yaml(path: str | pathlib.Path) -> EngineYaml:
    p = pathlib.Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"--extra-engine-args {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--extra-engine-args {p}: not valid YAML: {e}") from None
    return parse_engine_yaml(data or {})

