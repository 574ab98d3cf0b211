"""`gptoss make-model`: a real-format gpt-oss checkpoint with random weights (and `random_model` on a device).

Output is what the published checkpoints look like: config.json (+ quantization_config for MXFP4),
generation_config.json, model-0000N-of-0000M.safetensors and model.safetensors.index.json; experts
as MXFP4 blocks/scales (default) or dense `gate_up_proj`/`down_proj`, everything else bf16.
Each tensor is drawn from its own generator seeded from (seed, tensor name), so output is
deterministic and a 120b never has to be in memory at once: tensors are made shard by shard.
A dense checkpoint holds the dequantized MXFP4 values of the same seed, so both give equal logits.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import sys
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from gptoss_engine import mxfp4
from gptoss_engine.checkpoint import TensorSpec, default_dtype, finalize_model, place_tensor, tensor_specs
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import PRESETS

def _generator(seed: int, name: str, device: torch.device | str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator, device: torch.device | str) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std


def init_tensor(config: ModelConfig, name: str, shape: tuple[int, ...], seed: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 initial value of one non-expert tensor (experts: _expert_values). Scales keep
    activations O(1) through the residual stream and make logits spread over a few units (so greedy decoding has clear winners)."""
    g = _generator(seed, name, device)
    h = config.hidden_size
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0 + _normal(shape, 0.1, g, device)
    if name == "model.embed_tokens.weight":
        return _normal(shape, 1.0, g, device)
    if name == "lm_head.weight":
        return _normal(shape, 4.0 / math.sqrt(h), g, device)
    if leaf == "sinks":
        return _normal(shape, 1.0, g, device)
    if leaf == "bias" or leaf.endswith("_bias"):
        return _normal(shape, 0.1 if ".router." in name else 0.02, g, device)
    return _normal(shape, 1.0 / math.sqrt(shape[-1]), g, device)  # linear weights [out, in]


def _expert_values(name: str, shape: tuple[int, ...], seed: int,
                   device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """MXFP4 (blocks, scales) of each expert of `name` (dense shape [E, in, out]), one expert at a time
    so that a 120b layer is never drawn in float32 at once."""
    g = _generator(seed, name, device)
    for _ in range(shape[0]):
        w = _normal(shape[1:], 1.0 / math.sqrt(shape[1]), g, device)
        blocks, scales = mxfp4.dense_to_packed(w[None])
        yield blocks[0], scales[0]


def _tensors_for(config: ModelConfig, specs: list[TensorSpec], seed: int,
                 device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors of `specs`, in the specs' dtype. Packed experts yield blocks then scales."""
    c = config
    h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
    dense_shape = {"gate_up_proj": (e, h, 2 * i), "down_proj": (e, i, h)}
    pending: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name in pending:
            yield spec.name, pending.pop(spec.name)
            continue
        base, _, leaf = spec.name.rpartition(".")
        kind = leaf.removesuffix("_blocks").removesuffix("_scales")
        if kind in dense_shape:
            # Expert weights: drawn dense, MXFP4-rounded per expert; the dense form is the dequantized
            # value, so an MXFP4 and a dense checkpoint of one seed hold the same numbers.
            parts = list(_expert_values(f"{base}.{kind}", dense_shape[kind], seed, device))
            blocks = torch.stack([b for b, _ in parts])
            scales = torch.stack([s for _, s in parts])
            if leaf == kind:
                yield spec.name, mxfp4.packed_to_dense(blocks, scales, spec.dtype)
            else:
                other = f"{base}.{kind}_scales" if leaf.endswith("_blocks") else f"{base}.{kind}_blocks"
                pending[other] = scales if leaf.endswith("_blocks") else blocks
                yield spec.name, blocks if leaf.endswith("_blocks") else scales
            continue
        yield spec.name, init_tensor(c, spec.name, spec.shape, seed, device).to(spec.dtype)


def _shard_plan(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _eos_and_pad() -> tuple[list[int], int | None]:
    """EOS ids (the assistant's stop tokens) and pad id (<|endoftext|>) from the harmony encoding."""
    from gptoss_engine.vocab import harmony_encoding

    enc = harmony_encoding()
    eos = sorted(int(t) for t in enc.stop_tokens_for_assistant_actions())
    try:
        pad: int | None = int(enc.encode("<|endoftext|>", allowed_special="all")[0])
    except Exception:  # noqa: BLE001 - an encoding without that special just has no pad id
        pad = None
    return eos, pad


def write_checkpoint(out: str | pathlib.Path, config_dict: dict[str, Any], seed: int = 0, packed: bool = True,
                     shard_bytes: int = 4 << 30, progress: bool = False) -> pathlib.Path:
    """Write a random checkpoint of this HF config dict into `out`; returns the folder."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eos, pad = _eos_and_pad()
    config = dataclasses.replace(ModelConfig.from_dict(config_dict), eos_token_ids=tuple(eos), pad_token_id=pad,
                                 quant_method="mxfp4" if packed else None)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    gen = {"eos_token_id": eos, "do_sample": True, "transformers_version": "4.55.0"}
    if pad is not None:
        gen["pad_token_id"] = pad
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    specs = tensor_specs(config, packed)
    shards = _shard_plan(specs, shard_bytes)
    weight_map: dict[str, str] = {}
    from tqdm import tqdm

    bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, disable=not progress,
               desc="make-model")
    for n, shard in enumerate(shards, start=1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, t in _tensors_for(config, shard, seed):
            tensors[name] = t.contiguous()
            weight_map[name] = fname
            bar.update(t.numel() * t.element_size())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


@torch.no_grad()
def random_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0) -> GptOssForCausalLM:
    """A random model built directly on `device` (no files): experts packed MXFP4 on CUDA, dense elsewhere."""

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    packed = device.type == "cuda"
    with torch.device("meta"):
        model = GptOssForCausalLM(config, packed_experts=packed)
    for name, t in _tensors_for(config, tensor_specs(config, packed), seed, device):
        place_tensor(model, name, t, device, dtype)
    return finalize_model(model, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptoss make-model", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--mxfp4", dest="packed", action="store_true", default=True, help="experts in MXFP4 (default)")
    fmt.add_argument("--dense", dest="packed", action="store_false", help="experts as dense bf16")
    p.add_argument("--shard-size-mb", type=int, default=4096, help="target size of one safetensors shard")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.shard_size_mb < 1:
        p.error("--shard-size-mb must be >= 1")
    out = write_checkpoint(args.out, PRESETS[args.preset], seed=args.seed, packed=args.packed,
                           shard_bytes=args.shard_size_mb << 20, progress=not args.quiet)
    if not args.quiet:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
