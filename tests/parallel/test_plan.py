"""The sharding plan and topology without processes: coverage of every tensor, refusals, loading."""
from __future__ import annotations

import pathlib

import pytest
import torch

from gptoss_engine.checkpoint import load_model, tensor_specs
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.parallel.layers import ExpertShardMLP
from gptoss_engine.parallel.loader import load_shard
from gptoss_engine.parallel.plan import keeps_values, rule_for, shard_index
from gptoss_engine.parallel.topology import ParallelConfigError, Topology
from gptoss_engine.presets import preset


@pytest.mark.parametrize(("world", "attn_tp", "ep"), [(2, 2, 1), (2, 1, 2), (4, 4, 2), (8, 8, 8), (8, 2, 4)])
@pytest.mark.parametrize("packed", [True, False])
def test_ranks_cover_every_120b_tensor_exactly_once(world: int, attn_tp: int, ep: int, packed: bool) -> None:
    # 120b's heads, KV heads and experts; narrow hidden/intermediate (still 8 MXFP4 groups) to stay small.
    config = ModelConfig.from_dict(preset("120b", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                vocab_size=256))
    for spec in tensor_specs(config, packed):
        count = torch.zeros(spec.shape, dtype=torch.int32)
        for rank in range(world):
            topo = Topology(world, rank, attn_tp, ep)
            if keeps_values(spec.name, topo):
                count[shard_index(spec.name, spec.shape, topo)] += 1
        # Split tensors: each element on exactly one rank per replica; replicated: on every rank.
        replicas = world if not rule_for(spec.name).splits and rule_for(spec.name).only_first_of is None else \
            world // _split_ranks(spec.name, Topology(world, 0, attn_tp, ep))
        assert bool((count == replicas).all()), spec.name


def _split_ranks(name: str, topo: Topology) -> int:
    rule = rule_for(name)
    n = 1
    for _, axis in rule.splits:
        n *= topo.size(axis)
    return n * (topo.size(rule.only_first_of) if rule.only_first_of else 1)


def test_plan_names_what_it_splits() -> None:
    assert rule_for("model.layers.3.self_attn.q_proj.weight").splits == ((0, "attn_tp"),)
    assert rule_for("model.layers.3.self_attn.o_proj.bias").only_first_of == "attn_tp"
    assert rule_for("model.layers.3.mlp.experts.down_proj_scales").splits == ((0, "ep"), (2, "moe_tp"))
    for replicated in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.router.weight",
                       "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert rule_for(replicated).splits == () and rule_for(replicated).only_first_of is None


@pytest.mark.parametrize(("topo", "packed", "message"), [
    (Topology(16, 0, 16, 1), False, "num_key_value_heads \\(8\\) is not divisible by attention_tp_size \\(16\\)"),
    (Topology(8, 0, 8, 1), True, "intermediate_size / 32 \\(90\\) is not divisible by moe_tp_size \\(8\\)"),
    (Topology(6, 0, 1, 3), False, "num_local_experts \\(128\\) is not divisible by moe_ep_size \\(3\\)"),
])
def test_layouts_that_do_not_divide_are_refused(topo: Topology, packed: bool, message: str) -> None:
    with pytest.raises(ParallelConfigError, match=message):
        topo.check(ModelConfig.from_dict(preset("120b")), packed)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"world_size": 4, "rank": 0, "attention_tp_size": 3, "moe_ep_size": 1}, "attention_tp_size \\(3\\) must divide"),
    ({"world_size": 2, "rank": 2, "attention_tp_size": 2, "moe_ep_size": 1}, "rank must be in"),
    ({"world_size": 0, "rank": 0, "attention_tp_size": 1, "moe_ep_size": 1}, "world_size must be a positive"),
])
def test_bad_topologies_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ParallelConfigError, match=message):
        Topology(**kwargs)


def test_engine_keys_map_to_topology() -> None:
    t = Topology.from_engine_keys(rank=5, tensor_parallel_size=8, moe_expert_parallel_size=4)
    assert (t.attention_tp_size, t.moe_ep_size, t.moe_tp_size, t.index("ep"), t.index("moe_tp")) == (8, 4, 2, 2, 1)
    assert Topology.from_engine_keys(rank=0, tensor_parallel_size=4, enable_attention_dp=True).attention_tp_size == 1


def test_single_rank_shard_is_the_whole_model(tiny_model_dir: pathlib.Path) -> None:
    whole = load_model(tiny_model_dir, progress=False).state_dict()
    shard = load_shard(tiny_model_dir, Topology(1, 0, 1, 1)).state_dict()
    assert whole.keys() == shard.keys()
    assert all(torch.equal(whole[k], shard[k]) for k in whole)


def test_rank_loads_only_its_slices(tiny_model_dir: pathlib.Path) -> None:
    whole = load_model(tiny_model_dir, progress=False)
    model = load_shard(tiny_model_dir, Topology(2, 1, 2, 2))  # attention rank 1, experts 4-7
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    ref_attn, ref_mlp = whole.model.layers[1].self_attn, whole.model.layers[1].mlp
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert torch.equal(attn.q_proj.weight, ref_attn.q_proj.weight[32:64])
    assert torch.equal(attn.o_proj.weight, ref_attn.o_proj.weight[:, 32:64])
    assert torch.equal(attn.sinks, ref_attn.sinks[2:4])
    assert not attn.o_proj.bias.any()                        # rank 0 of the group adds it
    assert isinstance(mlp, ExpertShardMLP) and mlp.first_expert == 4
    assert torch.equal(mlp.router.weight, ref_mlp.router.weight)
    assert torch.equal(mlp.experts.gate_up_proj, ref_mlp.experts.gate_up_proj[4:8])
    assert torch.equal(mlp.experts.down_proj_bias, ref_mlp.experts.down_proj_bias[4:8])
