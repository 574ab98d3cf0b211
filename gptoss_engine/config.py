"""`EngineConfig`: what an engine is asked to be, fixed at construction.

Measured values (the KV pool sizes actually allocated, the model's context limit) are results
held by the model runner, never written back here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    device: str = "cpu"                    # "cpu" | "cuda" (or "cuda:N")
    dtype: str | None = None               # weights/activations; None: float32 on CPU, bfloat16 on CUDA
    kv_cache_dtype: str = "auto"           # "auto" = dtype
    block_size: int = 16
    max_num_tokens: int = 8192             # tokens computed per step, over all sequences
    max_batch_size: int = 64               # sequences per step
    max_model_len: int | None = None       # None: the model's max_position_embeddings
    num_kv_blocks: int | None = None       # full-attention pool; None: derived from the memory budget
    num_swa_blocks: int | None = None      # sliding-window pool; None: derived
    cpu_kv_cache_bytes: int = 512 << 20    # budget for both pools on CPU
    free_gpu_memory_fraction: float = 0.9  # of the GPU memory free after loading the weights
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Read by a CUDA-graph forward_fn plugged into ModelRunner.forward_fn (decode batches only).
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    cuda_graph_max_batch_size: int | None = None
    cuda_graph_padding: bool = True
    # Launch step N+1 before reading back step N's tokens (engine.py); None: on for CUDA, off on CPU.
    overlap_scheduler: bool | None = None
    # What the prefill MoE's grouped GEMMs read: "mxfp4" dequantizes each layer's packed experts into
    # a scratch buffer every prefill step; "bf16" keeps a dequantized copy of every expert beside the
    # packed ones (decode still reads those) and skips that pass: faster prefill for the memory
    # (20b: +38 GB, fits an 80 GB GPU with room for a prefill worker's KV; 120b: does not fit).
    moe_prefill_weights: str = "mxfp4"

    def __post_init__(self) -> None:
        if not str(self.model_path):
            raise ValueError("model_path is empty")
        if self.device != "cpu" and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("block_size", "max_num_tokens", "max_batch_size", "cpu_kv_cache_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_model_len", "num_kv_blocks", "num_swa_blocks", "cuda_graph_max_batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if not 0.0 < self.free_gpu_memory_fraction <= 1.0:
            raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}")
        if self.moe_prefill_weights not in ("mxfp4", "bf16"):
            raise ValueError(f"moe_prefill_weights must be 'mxfp4' or 'bf16', got {self.moe_prefill_weights!r}")
        if self.moe_prefill_weights == "bf16" and self.device == "cpu":
            raise ValueError("moe_prefill_weights='bf16' is for the GPU's grouped GEMMs; the CPU path "
                             "dequantizes one expert at a time")
        if self.cuda_graph_batch_sizes is not None and any(b < 1 for b in self.cuda_graph_batch_sizes):
            raise ValueError(f"cuda_graph_batch_sizes must be positive, got {self.cuda_graph_batch_sizes}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.float32 if self.device == "cpu" else torch.bfloat16

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return self.torch_dtype if self.kv_cache_dtype == "auto" else DTYPES[self.kv_cache_dtype]
