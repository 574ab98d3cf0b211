"""What turns a model built from a shard config into one rank of the parallel model, without
editing model.py: an expert-sharded MLP module, and all-reduce forward hooks on the modules whose
outputs are partial sums (attention: o_proj over this rank's heads; MoE: this rank's experts).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gptoss_engine.model import MLP, GptOssForCausalLM, Router
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.moe import PairOutputs, moe_experts, route, summed


class ExpertShardMLP(MLP):
    """The MoE of one EP rank: the router is whole (every rank routes every token the same way),
    the experts are only `owned` (local index e - owned.start).

    Top-k slots routed to another rank get weight 0 and point at local expert 0, because
    moe_experts has no "skip this slot" id yet: exact, but local expert 0 computes rows it throws
    away (see docs/MULTI_GPU.md for the one-line change that removes the waste)."""

    def __init__(self, config: ModelConfig, packed: bool, owned: range) -> None:
        super().__init__(dataclasses.replace(config, num_local_experts=len(owned)), packed)
        self.router = Router(config)
        self.first_expert, self.num_owned = owned.start, len(owned)

    def forward(self, x: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        topk_ids, topk_weights = routing or route(x, self.router.weight, self.router.bias, self.top_k)
        local = topk_ids - self.first_expert
        owned = (local >= 0) & (local < self.num_owned)
        return moe_experts(x, torch.where(owned, local, 0), torch.where(owned, topk_weights, 0),
                           self.experts.weights(), self.limit, self.alpha)


def use_expert_shards(model: GptOssForCausalLM, owned: range) -> None:
    """Swap every layer's MLP for an ExpertShardMLP (call on the meta model, before loading)."""
    for layer in model.model.layers:
        layer.mlp = ExpertShardMLP(model.config, model.packed_experts, owned)


def _all_reduce_hook(group: dist.ProcessGroup | None):  # noqa: ANN202 - torch's hook signature
    def hook(module: nn.Module, args: Any, output: torch.Tensor | PairOutputs) -> torch.Tensor:
        output = summed(output)   # an MLP's delta may come unsummed (moe.PairOutputs)
        dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
        return output
    return hook


def attach_all_reduces(model: GptOssForCausalLM, attention_group: dist.ProcessGroup | None,
                       moe_group: dist.ProcessGroup | None) -> list[torch.utils.hooks.RemovableHandle]:
    """Sum attention outputs over `attention_group` and MoE outputs over `moe_group` (None: that
    part is not split, nothing to sum). The residual adds happen after, on whole tensors."""
    handles = []
    for layer in model.model.layers:
        if attention_group is not None:
            handles.append(layer.self_attn.register_forward_hook(_all_reduce_hook(attention_group)))
        if moe_group is not None:
            handles.append(layer.mlp.register_forward_hook(_all_reduce_hook(moe_group)))
    return handles
