"""gpt-oss mixture of experts: top-k router and the clamped-SwiGLU expert MLPs.

Router: linear with bias; softmax over the top-k logits only. Expert: gate_up (columns interleaved,
gate = even, up = odd), gate clamped to max=limit, up to [-limit, limit],
act = gate * sigmoid(alpha * gate) * (up + 1), then down with bias; outputs weighted by the router.

On CUDA, when the Triton kernels import, `moe_experts` dispatches to
`gptoss_engine.kernels.moe_mxfp4.moe_experts` (same signature); the reference below is the baseline.
There, `moe_expert_pairs` leaves the weighted sum over each token's k experts undone and hands it on
as PairOutputs, so the next residual add + RMSNorm does it in its own launch (kernels/norm.py).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gptoss_engine import mxfp4


@dataclass
class ExpertWeights:
    """One layer's experts, either dense (HF layout) or packed MXFP4 (checkpoint layout)."""
    gate_up_bias: torch.Tensor                   # [E, 2I]
    down_bias: torch.Tensor                      # [E, H]
    gate_up: torch.Tensor | None = None          # [E, H, 2I]
    down: torch.Tensor | None = None             # [E, I, H]
    gate_up_blocks: torch.Tensor | None = None   # [E, 2I, H/32, 16] u8
    gate_up_scales: torch.Tensor | None = None   # [E, 2I, H/32] u8
    down_blocks: torch.Tensor | None = None      # [E, H, I/32, 16] u8
    down_scales: torch.Tensor | None = None      # [E, H, I/32] u8
    # Largest e8m0 scale of the packed experts when known (kernel_layout records it): the GPU dequant
    # applies scales <= 128 with one multiply instead of two (kernels/e2m1.py). None = not known.
    scale_max: int | None = None
    # Dequantized copies of the packed experts, kept only when the engine trades memory for prefill
    # speed (EngineConfig.moe_prefill_weights = "bf16"): the prefill path's grouped GEMMs read these
    # instead of dequantizing into scratch; decode keeps reading the packed tensors.
    gate_up_bf16: torch.Tensor | None = None     # [E, 2I, H]
    down_bf16: torch.Tensor | None = None        # [E, H, I]
    # True when the blocks' 32-bit words hold their codes' bits in mxfp4.WORD_BITS order, the layout
    # the sm_90 PTX dequant reads in 9 integer instructions a word instead of 14 (kernel_layout makes
    # it on sm_90). Same shapes and byte offsets; every reader takes the layout from here.
    permuted: bool = False

    def __post_init__(self) -> None:
        dense = self.gate_up is not None and self.down is not None
        packed = all(t is not None for t in (self.gate_up_blocks, self.gate_up_scales,
                                              self.down_blocks, self.down_scales))
        if dense == packed:
            raise ValueError("ExpertWeights needs exactly one of: dense (gate_up, down) or packed (blocks + scales)")

    @property
    def packed(self) -> bool:
        return self.gate_up is None

    @property
    def one_mul(self) -> bool:
        """Every scale is known to be <= 128, so the PTX dequant may apply them with one bf16x2
        multiply instead of two (kernels/e2m1.py)."""
        return self.scale_max is not None and self.scale_max <= 128

    def kernel_layout(self, permute: bool | None = None) -> ExpertWeights:
        """Packed experts as the GPU kernels read them fastest: scale rows padded
        (mxfp4.pad_scales; same shapes and values), scale_max recorded (one device sync), and, where
        `permute` (default: on sm_90, where the PTX dequant runs), the blocks as new tensors of
        permuted words (mxfp4.permute_words); the caller drops the old ones."""
        if not self.packed:
            return self
        gu_b, d_b = self.gate_up_blocks, self.down_blocks
        assert gu_b is not None and d_b is not None   # packed
        if permute is None:
            permute = gu_b.is_cuda and torch.cuda.get_device_capability(gu_b.device) >= (9, 0)
        if permute and not self.permuted:
            gu_b, d_b = mxfp4.permute_words(gu_b), mxfp4.permute_words(d_b)
        gu_s, d_s = mxfp4.pad_scales(self.gate_up_scales), mxfp4.pad_scales(self.down_scales)  # type: ignore[arg-type]
        return dataclasses.replace(self, gate_up_blocks=gu_b, down_blocks=d_b, gate_up_scales=gu_s, down_scales=d_s,
                                   scale_max=int(max(gu_s.max().item(), d_s.max().item())),
                                   permuted=self.permuted or bool(permute))

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (gate_up [H, 2I], down [I, H]) of expert e, dequantizing if packed."""
        if self.gate_up is not None and self.down is not None:
            return self.gate_up[e], self.down[e]
        # Packed (checked in __post_init__): dequantize only the one expert the step needs.
        gu_b, gu_s, d_b, d_s = self.gate_up_blocks, self.gate_up_scales, self.down_blocks, self.down_scales
        return (mxfp4.packed_to_dense(gu_b[e:e + 1], gu_s[e:e + 1], dtype, self.permuted)[0],  # type: ignore[index]
                mxfp4.packed_to_dense(d_b[e:e + 1], d_s[e:e + 1], dtype, self.permuted)[0])  # type: ignore[index]


@dataclass(frozen=True)
class PairOutputs:
    """The MoE's per-(token, expert) outputs before their weighted sum; token t's delta is
        sum over j < k of  w[p] * (y[row[p]] + bias[ids[p]]),   p = t*k + j, summed in fp32 in j order
    and rounded to `dtype` (the activations' dtype). row = row_of_pair, or p itself when None;
    weights/ids/bias None: y rows already carry the routing weight and the expert's bias.
    Who reads it: the next fused add + RMSNorm (kernels.norm.add_rmsnorm), or `total()`. y belongs to
    this step's MoE call, which allocated it; once its one reader has run it is dead, and the caching
    allocator (or, in a CUDA graph, the graph's pool) hands its memory to the next layer."""
    y: torch.Tensor                            # [T*k, H]: one row a pair; fp32 or the activations' dtype
    k: int
    dtype: torch.dtype
    row_of_pair: torch.Tensor | None = None    # [T*k] int32
    weights: torch.Tensor | None = None        # [T*k] routing weights
    ids: torch.Tensor | None = None            # [T*k] expert of each pair
    bias: torch.Tensor | None = None           # [E, H] down-projection bias

    @property
    def num_tokens(self) -> int:
        return self.y.shape[0] // self.k

    def total(self) -> torch.Tensor:
        """The summed delta [T, H] (one launch)."""
        from gptoss_engine.kernels.norm import sum_pairs
        return sum_pairs(self)


def summed(delta: torch.Tensor | PairOutputs) -> torch.Tensor:
    """An MoE delta as a [T, H] tensor: PairOutputs summed, a tensor as it is."""
    return delta.total() if isinstance(delta, PairOutputs) else delta


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (topk_ids [T, k], topk_weights [T, k]): softmax over the k largest router logits.
    On CUDA the router GEMM (at decode sizes), top-k and softmax are one Triton launch (fp32 weights)."""
    if x.is_cuda and (kernels := _kernels()) is not None:
        return kernels[1](x, weight, bias, top_k)
    logits = F.linear(x, weight, bias)
    top_values, topk_ids = torch.topk(logits, top_k, dim=-1)
    return topk_ids, torch.softmax(top_values, dim=-1)


@functools.cache
def _kernels() -> tuple[Callable[..., torch.Tensor], Callable[..., tuple[torch.Tensor, torch.Tensor]]] | None:
    try:
        from gptoss_engine.kernels.moe_mxfp4 import moe_expert_pairs as kernel
        from gptoss_engine.kernels.routing import route as fused_route
    except ImportError:
        return None
    return kernel, fused_route


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w: ExpertWeights,
                swiglu_limit: float, alpha: float = 1.702) -> torch.Tensor:
    """x [T, H] -> [T, H]: sum over k of topk_weights * expert_{topk_ids}(x)."""
    return summed(moe_expert_pairs(x, topk_ids, topk_weights, w, swiglu_limit, alpha))


def moe_expert_pairs(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w: ExpertWeights,
                     swiglu_limit: float, alpha: float = 1.702) -> torch.Tensor | PairOutputs:
    """moe_experts with the sum over k left undone where the CUDA kernels run (PairOutputs, for the
    next fused add + RMSNorm); elsewhere the summed [T, H]."""
    if x.is_cuda and (kernels := _kernels()) is not None:
        return kernels[0](x, topk_ids, topk_weights, w, swiglu_limit, alpha)
    return moe_experts_reference(x, topk_ids, topk_weights, w, swiglu_limit, alpha)


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def moe_experts_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          w: ExpertWeights, swiglu_limit: float, alpha: float = 1.702) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        token_idx, slot = torch.where(topk_ids == e)
        gate_up, down = w.expert(e, x.dtype)
        h = swiglu(x[token_idx] @ gate_up + w.gate_up_bias[e], swiglu_limit, alpha)
        y = h @ down + w.down_bias[e]
        out.index_add_(0, token_idx, (y * topk_weights[token_idx, slot, None]).to(x.dtype))
    return out
