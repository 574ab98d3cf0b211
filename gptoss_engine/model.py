"""gpt-oss as a continuous-batching model over the paged KV cache.

The module tree mirrors the HF checkpoint: every parameter/buffer in state_dict() is named exactly
like its checkpoint key, so loading is one loop (checkpoint.py). Experts are either dense
(`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]) or packed MXFP4 buffers in checkpoint layout
(`*_blocks`, `*_scales`) for the GPU kernel; `packed_experts` picks which at construction.
"""
from __future__ import annotations

import functools
import importlib
import types
from typing import Callable

import torch
from torch import nn

from gptoss_engine import mxfp4
from gptoss_engine.attention import paged_attention, write_kv
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.moe import ExpertWeights, PairOutputs, moe_expert_pairs, route, summed
from gptoss_engine.rope import RotaryEmbedding, apply_rotary
from gptoss_engine.step_batch import StepBatch


class RMSNorm(nn.Module):
    """Computed in float32; the weight stays float32 too (as transformers keeps it)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and (norm := _kernels("norm")) is not None:
            return norm.rmsnorm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | PairOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): the residual add and the next norm, one launch on CUDA (which
        also sums the MoE's k outputs per token when delta is PairOutputs)."""
        if x.is_cuda and (fused := _add_rmsnorm()) is not None:
            return fused(x, delta, self.weight, self.eps)
        x = x + summed(delta)
        return x, self(x)


@functools.cache
def _kernels(name: str) -> types.ModuleType | None:
    """gptoss_engine.kernels.<name>, or None where it does not import (no Triton: the CPU path)."""
    try:
        return importlib.import_module(f"gptoss_engine.kernels.{name}")
    except ImportError:
        return None


def _add_rmsnorm() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """kernels/norm's add_rmsnorm, or None (a function of its own: prefill_bench swaps it)."""
    return None if (norm := _kernels("norm")) is None else norm.add_rmsnorm


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, w, b), or F.linear(x, w, b).to(out_dtype); on CUDA at 1-2 tokens (a decode step of
    one or two sequences) kernels/gemv's GEMV, which keeps more bytes in flight than cuBLAS's
    GEMV-shaped GEMMs, and at 3-64 tokens for the shapes where it measured faster (lm_head, o up to 32
    tokens) kernels/splitk_gemm's GEMM split over K, whose grid covers every SM where cuBLAS's left
    ~40% idle. Those two store the widened values themselves (the fp32 logits: no pass after)."""
    if x.is_cuda:
        if (g := _kernels("gemv")) is not None and g.gemv_takes(x, w):
            return g.dense_gemv(x, w, b, out_dtype or x.dtype)
        if (s := _kernels("splitk_gemm")) is not None and s.wins(x, w):
            return s.splitk_linear(x, w, b, out_dtype)
    y = torch.nn.functional.linear(x, w, b)
    return y if out_dtype is None else y.to(out_dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size)
        self.sinks = nn.Parameter(torch.zeros(c.num_attention_heads))
        self.pool, self.layer_in_pool = c.pool_index(layer)
        self.window = c.window(layer)
        self.scale = c.head_dim ** -0.5
        # On CUDA, fuse_qkv() makes q/k/v_proj views of one [q|k|v] weight: one GEMM and one
        # rotary + KV-store launch instead of three GEMMs (each with a split-K reduce at decode),
        # ~12 rotary ops and the KV store.
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Concatenate q/k/v_proj into one weight and re-point the three projections at views of it
        (no extra memory; state_dict keys unchanged)."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        rows = [0, self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            lo, hi = sum(rows[:i + 1]), sum(rows[:i + 2])
            proj.weight = nn.Parameter(w[lo:hi], requires_grad=False)
            proj.bias = nn.Parameter(b[lo:hi], requires_grad=False)
        self.qkv_weight, self.qkv_bias = w, b

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: StepBatch, kv: KVCache) -> torch.Tensor:
        t = x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.pool == "full":
            pool, slots, tables = kv.full, batch.full_slot_mapping, batch.full_block_tables
        else:
            pool, slots, tables = kv.swa, batch.swa_slot_mapping, batch.swa_block_tables
        # K/V of this step go into the cache first, so the attention reads the step's own keys
        # through the same block table as the cached context.
        if self.qkv_weight is not None and x.is_cuda and (rotary := _kernels("rotary")) is not None:
            if (g := _kernels("gemv")) is not None and g.ROTARY_EPILOGUE and g.gemv_takes(x, self.qkv_weight):
                # 1-2 tokens: the rotation and the cache store are the GEMV's epilogue (one launch).
                qkv = g.qkv_gemv_rotary(x, self.qkv_weight, self.qkv_bias, hq, hkv, d, cos, sin, pool,
                                        self.layer_in_pool, slots)
            else:
                qkv = _linear(x, self.qkv_weight, self.qkv_bias)
                # One long prompt chunk's full-window layer: cuDNN reads q, k, v from qkv (k rotated
                # there too) and a cached prefix's k, v copied out of the pool; the cache still gets
                # this chunk's k and v for the steps after it.
                pa = _kernels("prompt_attention")
                whole = pa is not None and pa.takes(qkv, batch, self.window, hq, hkv, d)
                rotary.rotary_store_kv(qkv, hq, hkv, d, cos, sin, pool, self.layer_in_pool, slots,
                                       k_in_place=whole)
                if whole:
                    heads = qkv.view(t, hq + 2 * hkv, d)
                    cached = pa.cached_positions(batch)
                    prefix = pa.prefix_kv(pool, self.layer_in_pool, tables[0], cached) if cached else (None, None)
                    o = pa.prompt_attention(heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:],
                                            self.sinks, self.scale, *prefix)
                    return _linear(o.view(t, hq * d), self.o_proj.weight, self.o_proj.bias)
            q = qkv[:, :hq * d].view(t, hq, d)
        else:
            q = apply_rotary(self.q_proj(x).view(t, hq, d), cos, sin)
            k = apply_rotary(self.k_proj(x).view(t, hkv, d), cos, sin)
            write_kv(pool, self.layer_in_pool, slots, k, self.v_proj(x).view(t, hkv, d))
        o = paged_attention(q, pool, self.layer_in_pool, tables, batch, self.sinks, self.scale, self.window)
        return _linear(o.reshape(t, self.num_heads * self.head_dim), self.o_proj.weight, self.o_proj.bias)


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))


class Experts(nn.Module):
    def __init__(self, config: ModelConfig, packed: bool) -> None:
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.packed = packed
        self.scale_max: int | None = None   # set by to_kernel_layout
        # Set by to_kernel_layout on sm_90: the block buffers then hold permuted words (ExpertWeights.permuted),
        # so this module's state_dict is no longer a checkpoint's bytes.
        self.permuted = False
        # (gate_up [E, 2I, H], down [E, H, I]) bf16, set by keep_bf16_copy; not in the state_dict.
        self.bf16_copy: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        if packed:
            gu_blocks, gu_scales = mxfp4.packed_shapes(e, 2 * i, h)
            d_blocks, d_scales = mxfp4.packed_shapes(e, h, i)
            self.register_buffer("gate_up_proj_blocks", torch.zeros(gu_blocks, dtype=torch.uint8))
            self.register_buffer("gate_up_proj_scales", torch.zeros(gu_scales, dtype=torch.uint8))
            self.register_buffer("down_proj_blocks", torch.zeros(d_blocks, dtype=torch.uint8))
            self.register_buffer("down_proj_scales", torch.zeros(d_scales, dtype=torch.uint8))
        else:
            self.gate_up_proj = nn.Parameter(torch.zeros(e, h, 2 * i))
            self.down_proj = nn.Parameter(torch.zeros(e, i, h))

    def to_kernel_layout(self) -> None:
        """On the GPU: the scale buffers become views into padded rows, the largest scale is recorded
        and, on sm_90, the blocks are replaced by their permuted words (ExpertWeights.kernel_layout;
        the checkpoint's buffers are freed here, one layer at a time); same shapes and state_dict keys."""
        if self.packed:
            w = self.weights().kernel_layout()
            self.gate_up_proj_scales, self.down_proj_scales = w.gate_up_scales, w.down_scales
            self.gate_up_proj_blocks, self.down_proj_blocks = w.gate_up_blocks, w.down_blocks
            self.scale_max, self.permuted = w.scale_max, w.permuted

    def keep_bf16_copy(self) -> None:
        """Hold a dequantized bf16 copy of the packed experts for the prefill GEMMs (see
        EngineConfig.moe_prefill_weights); GPU only."""
        from gptoss_engine.kernels.moe_grouped_mm import dequantized_copy
        self.bf16_copy = dequantized_copy(self.weights())

    def weights(self) -> ExpertWeights:
        if self.packed:
            dense = self.bf16_copy or (None, None)
            return ExpertWeights(self.gate_up_proj_bias, self.down_proj_bias,
                                 gate_up_blocks=self.gate_up_proj_blocks, gate_up_scales=self.gate_up_proj_scales,
                                 down_blocks=self.down_proj_blocks, down_scales=self.down_proj_scales,
                                 scale_max=self.scale_max, gate_up_bf16=dense[0], down_bf16=dense[1],
                                 permuted=self.permuted)
        return ExpertWeights(self.gate_up_proj_bias, self.down_proj_bias, gate_up=self.gate_up_proj,
                             down=self.down_proj)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, packed: bool) -> None:
        super().__init__()
        self.top_k, self.limit, self.alpha = config.num_experts_per_tok, config.swiglu_limit, config.swiglu_alpha
        self.router = Router(config)
        self.experts = Experts(config, packed)

    def forward(self, x: torch.Tensor,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | PairOutputs:
        """The MoE's delta; on CUDA as PairOutputs, summed by the next RMSNorm.add_forward's launch.
        routing: (topk_ids, topk_weights) of x when the caller already routed it."""
        topk_ids, topk_weights = routing or route(x, self.router.weight, self.router.bias, self.top_k)
        return moe_expert_pairs(x, topk_ids, topk_weights, self.experts.weights(), self.limit, self.alpha)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, packed: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, packed)

    def forward(self, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: StepBatch, kv: KVCache, next_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: residual stream, h: input_layernorm(x) (computed by the previous layer's fused add+norm).
        Returns (x + attn + mlp, next_norm of it); with next_norm None (the last layer off CUDA, where
        the final norm runs on the logits rows only) just x + attn + mlp."""
        attn = self.self_attn(h, cos, sin, batch, kv)
        norm, router = self.post_attention_layernorm, self.mlp.router
        if x.is_cuda and (routing := _kernels("routing")) is not None:
            # The residual add, the norm and the router in one launch (kernels/routing.py).
            x, h, ids, wts = routing.add_rmsnorm_route(x, attn, norm.weight, norm.eps, router.weight, router.bias,
                                                       self.mlp.top_k)
            delta = self.mlp(h, (ids, wts))
        else:
            x, h = norm.add_forward(x, attn)
            delta = self.mlp(h)
        if next_norm is None:
            return x + summed(delta), None
        return next_norm.add_forward(x, delta)


class GptOssModel(nn.Module):
    def __init__(self, config: ModelConfig, packed: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, packed) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class GptOssForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, packed_experts: bool = False) -> None:
        super().__init__()
        self.config = config
        self.packed_experts = packed_experts
        self.model = GptOssModel(config, packed_experts)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def bf16_expert_bytes(self) -> int:
        """Bytes a bf16 copy of every layer's experts takes (keep_bf16_experts)."""
        c = self.config
        per_expert = 3 * c.hidden_size * c.intermediate_size   # gate_up 2I x H + down H x I
        return c.num_hidden_layers * c.num_local_experts * per_expert * 2

    @torch.no_grad()
    def keep_bf16_experts(self) -> None:
        """Every layer keeps a bf16 copy of its packed experts for the prefill MoE (EngineConfig.
        moe_prefill_weights = "bf16"). Checked against the GPU's free memory first: a clear error,
        not an out-of-memory halfway through."""
        device = self.lm_head.weight.device
        if not self.packed_experts or device.type != "cuda":
            raise ValueError("bf16 expert copies are for packed MXFP4 experts on CUDA")
        if all(layer.mlp.experts.bf16_copy is not None for layer in self.model.layers):
            return
        need = self.bf16_expert_bytes()
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            raise ValueError(f"moe_prefill_weights='bf16' needs {need / 2**30:.1f} GiB for the bf16 experts; "
                             f"{free / 2**30:.1f} GiB of the GPU is free (use 'mxfp4')")
        for layer in self.model.layers:
            layer.mlp.experts.keep_bf16_copy()

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        """Logits [B, vocab] float32 for the rows batch.logits_indices of the flattened step."""
        x = self.model.embed_tokens(batch.input_ids)
        cos, sin = self.model.rotary_emb(batch.positions, x.dtype)
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        # On CUDA the last layer's fused add + norm applies the final norm to every row (one launch,
        # where the add, the gather and the torch norm took ~9 at decode).
        fused_tail = x.is_cuda and _add_rmsnorm() is not None
        last_norm = self.model.norm if fused_tail else None
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else last_norm
            x, h = layer(x, h, cos, sin, batch, kv, next_norm)
        if fused_tail:
            # Every sequence has at least one token, so as many logits rows as tokens (a decode step)
            # means every row, in order: no gather.
            h = h if batch.logits_indices.shape[0] == h.shape[0] else h[batch.logits_indices]
        else:
            h = self.model.norm(x[batch.logits_indices])
        return _linear(h, self.lm_head.weight, None, torch.float32)
