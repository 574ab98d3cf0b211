"""Loading HF-format gpt-oss checkpoints (safetensors shards + index), MXFP4 or dense experts.

`tensor_specs` is the one statement of what a checkpoint holds (names, shapes, dtypes); both the
loader and `make-model` use it. Loading streams one shard at a time and one tensor at a time into a
model built on the meta device, so peak memory stays near the model's own size.
MXFP4 experts stay packed (uint8 buffers, checkpoint layout) on CUDA, where the Triton MoE kernel
reads them; elsewhere they are dequantized into the dense HF layout at load.
"""
from __future__ import annotations

import json
import math
import pathlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from gptoss_engine import mxfp4
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.model_config import ConfigError, ModelConfig
from gptoss_engine.rope import RotaryEmbedding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def tensor_specs(config: ModelConfig, packed: bool) -> list[TensorSpec]:
    """Every checkpoint tensor, in checkpoint order."""
    c, bf16 = config, torch.bfloat16
    h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
    qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (c.vocab_size, h), bf16)]
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}"
        specs += [TensorSpec(f"{p}.input_layernorm.weight", (h,), bf16),
                  TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), bf16)]
        for proj, out_f, in_f in (("q", qd, h), ("k", kvd, h), ("v", kvd, h), ("o", h, qd)):
            specs += [TensorSpec(f"{p}.self_attn.{proj}_proj.weight", (out_f, in_f), bf16),
                      TensorSpec(f"{p}.self_attn.{proj}_proj.bias", (out_f,), bf16)]
        specs += [TensorSpec(f"{p}.self_attn.sinks", (c.num_attention_heads,), bf16),
                  TensorSpec(f"{p}.mlp.router.weight", (e, h), bf16),
                  TensorSpec(f"{p}.mlp.router.bias", (e,), bf16)]
        x = f"{p}.mlp.experts"
        if packed:
            (gb, gs), (db, ds) = mxfp4.packed_shapes(e, 2 * i, h), mxfp4.packed_shapes(e, h, i)
            specs += [TensorSpec(f"{x}.gate_up_proj_blocks", gb, torch.uint8),
                      TensorSpec(f"{x}.gate_up_proj_scales", gs, torch.uint8),
                      TensorSpec(f"{x}.down_proj_blocks", db, torch.uint8),
                      TensorSpec(f"{x}.down_proj_scales", ds, torch.uint8)]
        else:
            specs += [TensorSpec(f"{x}.gate_up_proj", (e, h, 2 * i), bf16),
                      TensorSpec(f"{x}.down_proj", (e, i, h), bf16)]
        specs += [TensorSpec(f"{x}.gate_up_proj_bias", (e, 2 * i), bf16),
                  TensorSpec(f"{x}.down_proj_bias", (e, h), bf16)]
    specs += [TensorSpec("model.norm.weight", (h,), bf16), TensorSpec("lm_head.weight", (c.vocab_size, h), bf16)]
    return specs


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU (exact reference math), bfloat16 on accelerators (the checkpoint's precision)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def place_tensor(model: nn.Module, name: str, value: torch.Tensor, device: torch.device | str,
                 dtype: torch.dtype) -> None:
    """Put `value` at parameter/buffer `name` (replacing a meta placeholder). uint8 stays uint8 and
    norm weights stay float32 (the norm runs in float32); other floats become `dtype`."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if value.dtype != torch.uint8:
        value = value.to(torch.float32 if "norm" in module_name else dtype)
    value = value.to(device)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(f"model has no parameter or buffer {name!r}")


def finalize_model(model: GptOssForCausalLM, device: torch.device | str) -> GptOssForCausalLM:
    """After every checkpoint tensor is placed: rebuild what is computed (RoPE), check nothing is left on meta."""
    model.model.rotary_emb = RotaryEmbedding(model.config).to(device)
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise CheckpointError(f"tensors never loaded: {left[:5]}{' ...' if len(left) > 5 else ''}")
    if torch.device(device).type == "cuda":
        model.model.rotary_emb.cache(model.config.max_position_embeddings, model.model.embed_tokens.weight.dtype)
        for layer in model.model.layers:
            layer.self_attn.fuse_qkv()
            layer.mlp.experts.to_kernel_layout()
    return model.eval()


def weight_map_of(path: pathlib.Path) -> tuple[dict[str, str], pathlib.Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object")
        return {str(k): str(v) for k, v in weight_map.items()}, index
    single = path / SINGLE_FILE
    if single.is_file():
        with open_shard(single) as f:
            return {k: SINGLE_FILE for k in f.keys()}, single
    raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def open_shard(file: pathlib.Path):  # noqa: ANN202 - safetensors' handle type is private
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise CheckpointError(f"{file}: cannot open safetensors file (truncated or corrupt?): {e}") from None


def _check(file: pathlib.Path, spec: TensorSpec, t: torch.Tensor) -> None:
    if tuple(t.shape) != spec.shape:
        raise CheckpointError(f"{file}: tensor {spec.name} has shape {tuple(t.shape)}, expected {spec.shape}")
    ok = t.dtype == torch.uint8 if spec.dtype == torch.uint8 else t.dtype.is_floating_point
    if not ok:
        want = "uint8" if spec.dtype == torch.uint8 else "a float dtype"
        raise CheckpointError(f"{file}: tensor {spec.name} has dtype {t.dtype}, expected {want}")


@dataclass(frozen=True)
class CheckpointSource:
    """What a loader learns from a checkpoint folder before reading any tensor."""
    config: ModelConfig
    weight_map: dict[str, str]   # tensor name -> shard file name
    source: pathlib.Path         # the index (or the single shard) for error messages
    stored_packed: bool          # experts stored as MXFP4 blocks/scales
    keep_packed: bool            # ... and kept packed on this device (CUDA: the MoE kernel reads them)


def open_checkpoint(path: pathlib.Path, device: torch.device) -> CheckpointSource:
    try:
        config = ModelConfig.from_pretrained(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    weight_map, source = weight_map_of(path)
    stored_packed = any(k.endswith("_blocks") for k in weight_map)
    return CheckpointSource(config, weight_map, source, stored_packed, stored_packed and device.type == "cuda")


def load_model(path: str | pathlib.Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               progress: bool = True) -> GptOssForCausalLM:
    """Load a checkpoint folder (config.json + safetensors) onto `device`; raises CheckpointError."""
    from tqdm import tqdm

    path, device = pathlib.Path(path), torch.device(device)
    dtype = dtype or default_dtype(device)
    ck = open_checkpoint(path, device)
    config, weight_map, source = ck.config, ck.weight_map, ck.source
    stored_packed, keep_packed = ck.stored_packed, ck.keep_packed
    specs = {s.name: s for s in tensor_specs(config, stored_packed)}
    for name in weight_map:
        if name not in specs:
            raise CheckpointError(f"{source}: unexpected tensor {name} (in {weight_map[name]})")
    for name in specs:
        if name not in weight_map:
            raise CheckpointError(f"{source}: tensor {name} is missing")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, fname in weight_map.items():
        by_file[fname].append(name)

    with torch.device("meta"):
        model = GptOssForCausalLM(config, packed_experts=keep_packed)
    # An expert weight stored packed but wanted dense is complete only once both its blocks and its
    # scales are read (they may sit in different shards): the first one waits here.
    halves: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(specs), unit="tensor", disable=not progress, desc=f"loading {path.name}")
    for fname, names in by_file.items():
        file = path / fname
        if not file.is_file():
            raise CheckpointError(f"{source} names {fname} (holding {names[0]}), but {file} does not exist")
        with open_shard(file) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{file}: tensor {name} is listed in {source.name} but not in the file")
                try:
                    t = f.get_tensor(name)
                except Exception as e:  # noqa: BLE001 - truncated data surfaces here
                    raise CheckpointError(f"{file}: tensor {name} cannot be read (truncated?): {e}") from None
                _check(file, specs[name], t)
                if stored_packed and not keep_packed and name.endswith(("_blocks", "_scales")):
                    base = name.removesuffix("_blocks").removesuffix("_scales")
                    partner = f"{base}_scales" if name.endswith("_blocks") else f"{base}_blocks"
                    if partner not in halves:
                        halves[name] = t
                        bar.update(1)
                        continue
                    blocks, scales = (t, halves.pop(partner)) if name.endswith("_blocks") else (halves.pop(partner), t)
                    t, name = mxfp4.packed_to_dense(blocks.to(device), scales.to(device), dtype), base
                place_tensor(model, name, t, device, dtype)
                bar.update(1)
    bar.close()
    return finalize_model(model, device)
