"""`Topology`: where one rank sits in a tensor/expert-parallel group, and the model shard it runs.

Semantics follow the engine YAML keys (TensorRT-LLM's): `tensor_parallel_size` is the number of
ranks (one process per GPU); attention is split by heads over groups of `attention_tp_size`
consecutive ranks (= tensor_parallel_size, or 1 with `enable_attention_dp`); the MoE is split over
all ranks: experts over `moe_ep_size` groups, each expert's intermediate dimension over the
`moe_tp_size = world_size / moe_ep_size` ranks inside a group.

    rank r: attention group r // attention_tp_size, attention_tp_rank r % attention_tp_size
            ep_rank r // moe_tp_size (owns experts [ep_rank*E/ep, (ep_rank+1)*E/ep)),
            moe_tp_rank r % moe_tp_size (owns intermediate [moe_tp_rank*I/m, (moe_tp_rank+1)*I/m))

With attention_tp_size < world_size the attention replicas run the same batch (replicated
attention); attention *data* parallelism (different batches per replica) is not implemented.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from gptoss_engine import mxfp4
from gptoss_engine.model_config import ModelConfig

Axis = Literal["attn_tp", "ep", "moe_tp"]


class ParallelConfigError(ValueError):
    """A parallel layout that cannot be built (sizes that do not divide), with the numbers involved."""


def _positive(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ParallelConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    attention_tp_size: int
    moe_ep_size: int

    def __post_init__(self) -> None:
        w = _positive("world_size", self.world_size)
        for name in ("attention_tp_size", "moe_ep_size"):
            if w % _positive(name, getattr(self, name)):
                raise ParallelConfigError(f"{name} ({getattr(self, name)}) must divide world_size ({w})")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < w:
            raise ParallelConfigError(f"rank must be in [0, {w}), got {self.rank!r}")

    @classmethod
    def from_engine_keys(cls, rank: int, tensor_parallel_size: int, moe_expert_parallel_size: int = 1,
                         enable_attention_dp: bool = False) -> "Topology":
        """From the engine YAML keys: world = tensor_parallel_size, attention TP over all of it
        unless attention is data parallel (then each rank holds whole attention)."""
        tp = _positive("tensor_parallel_size", tensor_parallel_size)
        return cls(world_size=tp, rank=rank, attention_tp_size=1 if enable_attention_dp else tp,
                   moe_ep_size=moe_expert_parallel_size)

    # ---- coordinates -----------------------------------------------------------------------------
    @property
    def moe_tp_size(self) -> int:
        return self.world_size // self.moe_ep_size

    def size(self, axis: Axis) -> int:
        return {"attn_tp": self.attention_tp_size, "ep": self.moe_ep_size, "moe_tp": self.moe_tp_size}[axis]

    def index(self, axis: Axis) -> int:
        if axis == "attn_tp":
            return self.rank % self.attention_tp_size
        if axis == "ep":
            return self.rank // self.moe_tp_size
        return self.rank % self.moe_tp_size

    def attention_groups(self) -> list[list[int]]:
        """Every attention TP group's ranks (all ranks must create all groups, in this order)."""
        a = self.attention_tp_size
        return [list(range(g * a, (g + 1) * a)) for g in range(self.world_size // a)]

    # ---- the model shard -------------------------------------------------------------------------
    def check(self, config: ModelConfig, packed: bool) -> None:
        """Raise ParallelConfigError unless this layout splits `config` evenly."""
        a, ep, m = self.attention_tp_size, self.moe_ep_size, self.moe_tp_size
        need = [("num_attention_heads", config.num_attention_heads, a, "attention_tp_size"),
                ("num_key_value_heads", config.num_key_value_heads, a, "attention_tp_size"),
                ("num_local_experts", config.num_local_experts, ep, "moe_ep_size"),
                ("intermediate_size", config.intermediate_size, m, "moe_tp_size")]
        if packed:
            # The down projection's MXFP4 groups of 32 run along the intermediate dimension.
            need.append(("intermediate_size / 32", config.intermediate_size // mxfp4.GROUP, m, "moe_tp_size"))
        for what, n, parts, axis in need:
            if n % parts:
                raise ParallelConfigError(f"{what} ({n}) is not divisible by {axis} ({parts}); "
                                          f"(replicating KV heads or padding experts is not implemented)")

    def shard_config(self, config: ModelConfig) -> ModelConfig:
        """The config this rank's modules are built from. num_local_experts stays the full count
        (the router is replicated); the experts a rank owns are `owned_experts`."""
        return dataclasses.replace(
            config, num_attention_heads=config.num_attention_heads // self.attention_tp_size,
            num_key_value_heads=config.num_key_value_heads // self.attention_tp_size,
            intermediate_size=config.intermediate_size // self.moe_tp_size)

    def owned_experts(self, config: ModelConfig) -> range:
        n = config.num_local_experts // self.moe_ep_size
        return range(self.index("ep") * n, (self.index("ep") + 1) * n)
