"""Prefill A/B on the GPU: one model, the same prompts, each variant of the prefill path timed in
turn, and a kernel table (torch.profiler, CUDA time) of the default at the longest prompt.

Variants (VARIANTS: each changes one thing against the default): the MoE's expert dequant inline
after attention instead of prefetched on the side stream; the prefetch's grid and stream priority;
every attention key tile paying the causal/window masks (the kernel before its split loop).
Variants that compute the same bits (all but the masked attention, whose softmax rounds the scaled
scores once more) must give the default's logits exactly, else the run fails. Appends rows to bench/results/prefill_ab.md.

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
    """The engine with one thing changed (see VARIANTS)."""
    gm, pa = moe_grouped_mm, paged_attention
    saved = gm.prefetch, gm.PREFETCH_PROGRAMS, gm.PREFETCH_PRIORITY, pa.paged_attention
    change = VARIANTS[name]
    if change.get("prefetch") is False:
        gm.prefetch = lambda w: None
    gm.PREFETCH_PROGRAMS = change.get("programs", gm.PREFETCH_PROGRAMS)
    gm.PREFETCH_PRIORITY = change.get("priority", gm.PREFETCH_PRIORITY)
    if change.get("split_loop") is False:
        pa.paged_attention = functools.partial(saved[3], split_loop=False)
    try:
        yield
    finally:
        gm.prefetch, gm.PREFETCH_PROGRAMS, gm.PREFETCH_PRIORITY, pa.paged_attention = saved


# name -> what differs from the default. Every variant but "masked attention" computes the same
# bits as the default (the prefetch variants differ only in where and when the dequant runs).
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no prefetch": {"prefetch": False},
    "masked attention": {"split_loop": False},
    "prefetch grid 132": {"programs": 132},
    "prefetch grid 264": {"programs": 264},
    "prefetch high priority": {"priority": -1},
    "prefetch grid 132 high priority": {"programs": 132, "priority": -1},
    "prefetch grid 264 high priority": {"programs": 264, "priority": -1},
}
EXACT = set(VARIANTS) - {"masked attention"}


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
                elif name in EXACT and not torch.equal(out, first):
                    failures.append(f"{tokens} tokens, {name}: logits differ from the default's")
                elif name not in EXACT:
                    # Not a check: with random weights one rounding difference can flip a router
                    # near-tie and move the last token's logits a lot (tests/gpu checks the kernel).
                    print(f"{tokens} tokens, {name}: logits {((out - first).norm() / first.norm()).item():.2g} "
                          "(relative) from the default's", flush=True)
                times[name] = time_ms(lambda: model(batch, kv), iters=args.iters)
        base = times["default"]
        print(f"prefill {tokens}: " + "; ".join(f"{n} {ms:.2f} ms ({tokens / ms * 1e3:,.0f} tok/s)"
                                                 for n, ms in times.items()), flush=True)
        rows += [[datetime.date.today().isoformat(), torch.cuda.get_device_name(), commit, args.preset, tokens, n,
                  f"{ms:.2f}", f"{tokens / ms * 1e3:.0f}", f"{ms - base:+.2f}"] for n, ms in times.items()]
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
        ["date", "GPU", "commit", "preset", "tokens", "variant", "ms", "tok/s", "ms vs default"], rows)
    print("parity failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
