"""A target for Nsight Compute: one eager decode step of a random-weight model, or one MoE layer,
between cudaProfilerStart/Stop, so `ncu --profile-from-start off` reads only those kernels.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \
        python3 -m bench.ncu_probe step --preset 20b --batch 1
    python3 -m bench.ncu_probe moe --tokens 1 --experts 4      # a layer small enough to sit in L2

Warm-up calls (compilation, autotuning) run before the profiled region. ncu replays each kernel with
the caches flushed (its default --cache-control all), as a decode step meets each layer's weights
cold; `--cache-control none` with `moe --repeat 3` leaves a small layer's weights in L2 instead.
"""
from __future__ import annotations

import argparse

import torch

from bench.gpu_bench import BLOCK_SIZE, fast_random_model, uniform_batch
from bench.moe_kernel_bench import random_experts, routing
from gptoss_engine.kernels.moe_mxfp4 import moe_experts
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset


@torch.no_grad()
def step(name: str, batch: int, context: int, layers: int) -> None:
    d = preset(name)
    if layers:
        d = {**d, "num_hidden_layers": layers, "layer_types": d["layer_types"][:layers]}
    config = ModelConfig.from_dict(d)
    model = fast_random_model(config)
    max_blocks = -(-(context + 1) // BLOCK_SIZE)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), batch * max_blocks, batch * max_blocks, "cuda")
    b = uniform_batch(batch, context, 1, max_blocks)
    for _ in range(3):
        model(b, kv)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    model(b, kv)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


@torch.no_grad()
def moe(name: str, tokens: int, experts: int, repeat: int) -> None:
    c = ModelConfig.from_dict(preset(name))
    gen = torch.Generator(device="cuda").manual_seed(0)
    E = experts or c.num_local_experts
    w = random_experts(E, c.hidden_size, c.intermediate_size, gen)
    x = torch.randn(tokens, c.hidden_size, generator=gen, device="cuda").to(torch.bfloat16)
    ids, wts = routing(tokens, E, c.num_experts_per_tok, gen)
    for _ in range(3):
        moe_experts(x, ids, wts, w, 7.0)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(repeat):
        moe_experts(x, ids, wts, w, 7.0)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--preset", default="20b")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--context", type=int, default=1024)
    s.add_argument("--layers", type=int, default=2, help="layers to build (0: the preset's)")
    m = sub.add_parser("moe")
    m.add_argument("--preset", default="20b")
    m.add_argument("--tokens", type=int, default=1)
    m.add_argument("--experts", type=int, default=0, help="experts in the layer (0: the preset's)")
    m.add_argument("--repeat", type=int, default=1)
    a = p.parse_args(argv)
    if a.what == "step":
        step(a.preset, a.batch, a.context, a.layers)
    else:
        moe(a.preset, a.tokens, a.experts, a.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
