"""`python -m gptoss_engine.parallel.check`: one parallel layout's greedy tokens and decode speed,
run under torchrun (one process per GPU) to compare layouts on a multi-GPU host:

    torchrun --nproc-per-node 2 -m gptoss_engine.parallel.check --model DIR --attention-tp 2 --moe-ep 2
    torchrun --nproc-per-node 1 -m gptoss_engine.parallel.check --model DIR     # the TP=1 reference

Rank 0 prints one JSON line {layout, tokens, prefill_s, generate_tok_s}; equal "tokens" across
layouts is the correctness check (use --dtype float32 for exact equality; bf16 sums in another
order per layout and may drift after many tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.parallel.loader import load_parallel_model
from gptoss_engine.parallel.process_group import init_parallel, shutdown
from gptoss_engine.types import SamplingParams


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gptoss_engine.parallel.check")
    p.add_argument("--model", required=True)
    p.add_argument("--attention-tp", type=int, default=None, help="default: all ranks (world size)")
    p.add_argument("--moe-ep", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None)
    p.add_argument("--ranks-per-gpu", type=int, default=1, help="> 1 only with --backend gloo (smoke test)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (always so with gloo: not capturable)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    groups = init_parallel(a.attention_tp or world, a.moe_ep, a.device, backend=a.backend,
                           ranks_per_gpu=a.ranks_per_gpu)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[a.dtype]
    model = load_parallel_model(a.model, groups, dtype)
    engine = LLMEngine(EngineConfig(model_path=a.model, device=str(groups.device), dtype=a.dtype,
                                    max_batch_size=a.batch, max_num_tokens=max(8192, a.batch * a.prompt_len),
                                    # A small KV budget: this check needs little, and cuBLAS and NCCL
                                    # allocate after the engine has sized its cache.
                                    free_gpu_memory_fraction=0.5,
                                    cuda_graph_batch_sizes=() if a.eager or a.backend == "gloo" else None),
                       model)
    # Deterministic prompts from the vocabulary's ordinary range (same on every rank and layout).
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    engine.generate([q[:8] for q in prompts], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True))
    generate_s = time.perf_counter() - start  # prompts prefix-cached by the prefill pass: mostly decode
    t = groups.topology
    if t.rank == 0:
        print(json.dumps({"layout": {"world": t.world_size, "attention_tp": t.attention_tp_size,
                                     "moe_ep": t.moe_ep_size, "moe_tp": t.moe_tp_size,
                                     "device": str(groups.device), "dtype": str(model.lm_head.weight.dtype)},
                          "tokens": [r.token_ids for r in results], "prefill_s": round(prefill_s, 4),
                          "generate_tok_s": round(a.batch * a.max_tokens / generate_s, 1)}))
    shutdown()


if __name__ == "__main__":
    main()
