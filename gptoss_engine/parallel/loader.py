"""Loading one rank's shard of a checkpoint: only this rank's slices are read from disk
(safetensors slicing), so a rank's host and device memory hold its shard, not the whole model.

The file handling (index, shard files, specs, placing, finalizing) is checkpoint.py's; this module
adds only the slicing (plan.py) and the module swaps/hooks (layers.py).
"""
from __future__ import annotations

import pathlib
from collections import defaultdict

import torch

from gptoss_engine import mxfp4
from gptoss_engine.checkpoint import (CheckpointError, default_dtype, finalize_model, open_checkpoint, open_shard,
                                      place_tensor, tensor_specs)
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.parallel.layers import attach_all_reduces, use_expert_shards
from gptoss_engine.parallel.plan import keeps_values, shard_index
from gptoss_engine.parallel.process_group import ParallelGroups
from gptoss_engine.parallel.topology import ParallelConfigError, Topology


def load_shard(path: str | pathlib.Path, topology: Topology, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> GptOssForCausalLM:
    """This rank's model (no collectives attached: see load_parallel_model). MXFP4 experts stay
    packed on CUDA and are dequantized elsewhere, as checkpoint.load_model does."""
    path, device = pathlib.Path(path), torch.device(device)
    dtype = dtype or default_dtype(device)
    ck = open_checkpoint(path, device)
    full, weight_map, source = ck.config, ck.weight_map, ck.source
    stored_packed, keep_packed = ck.stored_packed, ck.keep_packed
    topology.check(full, stored_packed)
    specs = {s.name: s for s in tensor_specs(full, stored_packed)}
    if set(specs) != set(weight_map):
        extra, missing = sorted(set(weight_map) - set(specs)), sorted(set(specs) - set(weight_map))
        raise CheckpointError(f"{source}: tensors do not match the config: unexpected {extra[:3]}, missing {missing[:3]}")

    with torch.device("meta"):
        model = GptOssForCausalLM(topology.shard_config(full), packed_experts=keep_packed)
        if topology.moe_ep_size > 1:
            use_expert_shards(model, topology.owned_experts(full))
    wanted = model.state_dict()
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, fname in weight_map.items():
        by_file[fname].append(name)
    halves: dict[str, torch.Tensor] = {}  # packed-to-dense: the first of blocks/scales waits for the other
    for fname, names in by_file.items():
        with open_shard(path / fname) as f:
            for name in names:
                t = _read_slice(f, path / fname, name, specs[name].shape, topology)
                if stored_packed and not keep_packed and name.endswith(("_blocks", "_scales")):
                    base = name.removesuffix("_blocks").removesuffix("_scales")
                    partner = f"{base}_scales" if name.endswith("_blocks") else f"{base}_blocks"
                    if partner not in halves:
                        halves[name] = t
                        continue
                    blocks, scales = (t, halves.pop(partner)) if name.endswith("_blocks") else (halves.pop(partner), t)
                    t, name = mxfp4.packed_to_dense(blocks.to(device), scales.to(device), dtype), base
                if tuple(t.shape) != tuple(wanted[name].shape):
                    raise ParallelConfigError(f"{name}: shard shape {tuple(t.shape)} != module shape "
                                              f"{tuple(wanted[name].shape)} (sharding plan out of step with the model)")
                place_tensor(model, name, t, device, dtype)
    return finalize_model(model, device)


def _read_slice(f, file: pathlib.Path, name: str, shape: tuple[int, ...], topology: Topology) -> torch.Tensor:  # noqa: ANN001
    try:
        sl = f.get_slice(name)
        stored = tuple(sl.get_shape())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for missing/corrupt entries
        raise CheckpointError(f"{file}: tensor {name} cannot be read: {e}") from None
    if stored != shape:
        raise CheckpointError(f"{file}: tensor {name} has shape {stored}, expected {shape}")
    index = shard_index(name, shape, topology)
    try:
        t = sl[index]
    except Exception as e:  # noqa: BLE001 - truncated data surfaces here
        raise CheckpointError(f"{file}: tensor {name} cannot be read (truncated?): {e}") from None
    return t if keeps_values(name, topology) else torch.zeros_like(t)


def load_parallel_model(path: str | pathlib.Path, groups: ParallelGroups,
                        dtype: torch.dtype | None = None) -> GptOssForCausalLM:
    """This rank's shard with its all-reduces attached: call on every rank, then drive every rank
    with the same steps (SPMD); every rank gets the same full logits."""
    model = load_shard(path, groups.topology, groups.device, dtype)
    attach_all_reduces(model, groups.attention, groups.moe)
    return model
