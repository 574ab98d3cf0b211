"""The sharding plan: which checkpoint tensor is split how, as one declarative table.

A tensor is split into equal contiguous parts along each listed (dim, axis); the rank keeps part
`topology.index(axis)`. Why these splits keep the math exact:
- q/k/v rows and sinks by head, o_proj columns by head: each rank attends with whole heads, and
  o_proj over its heads gives a partial sum of the output (all-reduced, bias added by one rank).
- experts by expert index: each EP rank computes only its experts' weighted outputs (a partial sum
  over top-k, all-reduced). Inside an expert, gate_up's output columns (gate/up interleaved, so a
  contiguous even-aligned range keeps pairs together) and down's input rows by intermediate index:
  down over a slice of the intermediate is again a partial sum (bias added by one rank).
MXFP4 tensors split on the same axes: blocks/scales [E, out, in/32, (16)] keep whole groups of 32.
Everything not listed (embeddings, norms, router, lm_head) is replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gptoss_engine.parallel.topology import Axis, ParallelConfigError, Topology


@dataclass(frozen=True)
class ShardRule:
    splits: tuple[tuple[int, Axis], ...] = ()
    only_first_of: Axis | None = None   # kept on index 0 of this axis, zeros elsewhere (added biases)


_LAYER = r"model\.layers\.\d+\."
PLAN: tuple[tuple[str, ShardRule], ...] = (
    (r"self_attn\.[qkv]_proj\.(weight|bias)", ShardRule(((0, "attn_tp"),))),
    (r"self_attn\.sinks", ShardRule(((0, "attn_tp"),))),
    (r"self_attn\.o_proj\.weight", ShardRule(((1, "attn_tp"),))),
    (r"self_attn\.o_proj\.bias", ShardRule(only_first_of="attn_tp")),
    (r"mlp\.experts\.gate_up_proj", ShardRule(((0, "ep"), (2, "moe_tp")))),              # [E, H, 2I]
    (r"mlp\.experts\.gate_up_proj_bias", ShardRule(((0, "ep"), (1, "moe_tp")))),         # [E, 2I]
    (r"mlp\.experts\.gate_up_proj_(blocks|scales)", ShardRule(((0, "ep"), (1, "moe_tp")))),  # [E, 2I, H/32..]
    (r"mlp\.experts\.down_proj", ShardRule(((0, "ep"), (1, "moe_tp")))),                 # [E, I, H]
    (r"mlp\.experts\.down_proj_bias", ShardRule(((0, "ep"),), only_first_of="moe_tp")),  # [E, H]
    (r"mlp\.experts\.down_proj_(blocks|scales)", ShardRule(((0, "ep"), (2, "moe_tp")))),   # [E, H, I/32..]
)
_COMPILED = tuple((re.compile(_LAYER + pattern), rule) for pattern, rule in PLAN)
REPLICATED = ShardRule()


def rule_for(name: str) -> ShardRule:
    for pattern, rule in _COMPILED:
        if pattern.fullmatch(name):
            return rule
    return REPLICATED


def shard_index(name: str, shape: tuple[int, ...], topology: Topology) -> tuple[slice, ...]:
    """This rank's part of tensor `name` of full `shape`, as one slice per dimension."""
    index = [slice(None)] * len(shape)
    for dim, axis in rule_for(name).splits:
        parts = topology.size(axis)
        if shape[dim] % parts:
            raise ParallelConfigError(f"{name}: dimension {dim} ({shape[dim]}) is not divisible by {axis} ({parts})")
        n = shape[dim] // parts
        i = topology.index(axis)
        index[dim] = slice(i * n, (i + 1) * n)
    return tuple(index)


def keeps_values(name: str, topology: Topology) -> bool:
    """False where this rank holds zeros instead (a bias another rank adds to the partial sum)."""
    axis = rule_for(name).only_first_of
    return axis is None or topology.index(axis) == 0
