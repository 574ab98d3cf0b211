"""Prefill A/B on the GPU: one model, the same prompts, each variant of the prefill path timed in
turn, and a kernel table (torch.profiler, CUDA time) of the default at the longest prompt.

Variants (each switches one thing off against the default):
  default          what the engine runs
  no prefetch      the MoE's expert dequant inline after attention, not on the side stream
  masked attention every key tile pays the causal/window masks (the kernel before its split loop)
Each variant's logits are checked against the default's first: bit for bit for "no prefetch"
(the same arithmetic, launches on another stream), within 1% for "masked attention" (its softmax
rounds the scaled scores once more), else the run fails. Appends rows to bench/results/prefill_ab.md.

    python3 -m bench.prefill_bench --preset 20b --tokens 1024,8192 --commit <sha> --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import pathlib
from typing import Iterator

import torch

from bench import provenance
from bench.gpu_bench import BLOCK_SIZE, RESULTS, fast_random_model, time_ms, uniform_batch
from gptoss_engine.kernels import moe_grouped_mm, paged_attention
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    saved = moe_grouped_mm.prefetch, paged_attention.paged_attention
    if name == "no prefetch":
        moe_grouped_mm.prefetch = lambda w: None
    elif name == "masked attention":
        paged_attention.paged_attention = functools.partial(saved[1], split_loop=False)
    elif name != "default":
        raise ValueError(name)
    try:
        yield
    finally:
        moe_grouped_mm.prefetch, paged_attention.paged_attention = saved


VARIANTS = ("default", "no prefetch", "masked attention")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["20b", "120b"], default="20b")
    p.add_argument("--tokens", default="1024,8192", help="prompt lengths, comma-separated")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_bench needs a CUDA GPU")
        return 2
    commit = args.commit or provenance.commit()
    config = ModelConfig.from_dict(preset(args.preset))
    model = fast_random_model(config)
    lengths = [int(t) for t in args.tokens.split(",")]
    blocks = -(-(max(lengths) + 1) // BLOCK_SIZE)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), blocks, blocks, "cuda")
    rows, failures = [], []
    for tokens in lengths:
        batch = uniform_batch(1, 0, tokens, blocks)
        times, first = {}, None
        for name in VARIANTS:
            with variant(name):
                out = model(batch, kv)
                if first is None:
                    first = out
                elif name == "no prefetch" and not torch.equal(out, first):
                    failures.append(f"{tokens} tokens, {name}: logits differ from the default's")
                elif (rel := ((out - first).norm() / first.norm()).item()) >= 1e-2:
                    failures.append(f"{tokens} tokens, {name}: logits {rel:.2g} from the default's")
                times[name] = time_ms(lambda: model(batch, kv), iters=args.iters)
        base = times["default"]
        print(f"prefill {tokens}: " + "; ".join(f"{n} {ms:.2f} ms ({tokens / ms * 1e3:,.0f} tok/s)"
                                                 for n, ms in times.items()), flush=True)
        rows.append([datetime.date.today().isoformat(), torch.cuda.get_device_name(), commit, args.preset, tokens]
                    + [f"{times[n]:.2f}" for n in VARIANTS] + [f"{tokens / base * 1e3:.0f}"])
    from torch.profiler import ProfilerActivity, profile
    batch = uniform_batch(1, 0, max(lengths), blocks)
    model(batch, kv)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(batch, kv)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_profile_{args.preset}_{max(lengths)}.txt").write_text(table)
    print(table, flush=True)
    provenance.append_rows(
        args.out / "prefill_ab.md", "Prefill A/B, ms per prefill (bench/prefill_bench.py; median of CUDA-event timings)",
        ["date", "GPU", "commit", "preset", "tokens"] + list(VARIANTS) + ["default tok/s"], rows)
    print("parity failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
