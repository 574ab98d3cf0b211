"""Prefill A/B on the GPU: one model, the same prompts, each variant of the prefill path timed in
turn, and a kernel table (torch.profiler, CUDA time) of the default at the longest prompt.

Variants (VARIANTS: each changes one thing against the default): the MoE's expert dequant inline
after attention instead of prefetched on the side stream; every attention key tile paying the
causal/window masks (the kernel before its split loop).
Variants that compute the same bits (all but the masked attention, whose softmax rounds the scaled
scores once more) must give the default's logits exactly, else the run fails. --bf16-experts then
keeps bf16 copies of the experts (EngineConfig.moe_prefill_weights = "bf16") and times every length
again; bit-equal to the default where the default took the grouped GEMM too. Appends rows to bench/results/prefill_ab.md.

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
from gptoss_engine.kernels import moe_grouped_mm, moe_mxfp4, paged_attention
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The engine with one thing changed (see VARIANTS)."""
    gm, pa = moe_grouped_mm, paged_attention
    saved = gm.prefetch, pa.paged_attention
    change = VARIANTS[name]
    if change.get("prefetch") is False:
        gm.prefetch = lambda w: None
    if change.get("split_loop") is False:
        pa.paged_attention = functools.partial(saved[1], split_loop=False)
    try:
        yield
    finally:
        gm.prefetch, pa.paged_attention = saved


# name -> what differs from the default. "no prefetch" computes the same bits as the default (the
# dequant only runs elsewhere and earlier). (A smaller persistent grid for the prefetched dequant
# and a higher-priority side stream were tried at c4c6655 and removed: slower, PERF_NOTES v9.)
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no prefetch": {"prefetch": False},
    "masked attention": {"split_loop": False},
}
EXACT = set(VARIANTS) - {"masked attention"}


def check(first: torch.Tensor, out: torch.Tensor, exact: bool, what: str, failures: list[str]) -> None:
    if exact and not torch.equal(out, first):
        failures.append(f"{what}: logits differ from the default's")
    elif not exact:
        # Not a check: with random weights one rounding difference can flip a router near-tie and
        # move the last token's logits a lot (tests/gpu checks each kernel against its reference).
        print(f"{what}: logits {((out - first).norm() / first.norm()).item():.2g} (relative) from the default's",
              flush=True)


def report(tokens: int, times: dict[str, float]) -> None:
    print(f"prefill {tokens}: " + "; ".join(f"{n} {ms:.2f} ms ({tokens / ms * 1e3:,.0f} tok/s)"
                                             for n, ms in times.items()), flush=True)


def result_rows(commit: str, preset_name: str, tokens: int, times: dict[str, float], base: float) -> list[list[object]]:
    return [[datetime.date.today().isoformat(), torch.cuda.get_device_name(), commit, preset_name, tokens, n,
             f"{ms:.2f}", f"{tokens / ms * 1e3:.0f}", f"{ms - base:+.2f}"] for n, ms in times.items()]


def profile_table(model: torch.nn.Module, kv: KVCache, batch: object, path: pathlib.Path) -> None:
    """torch.profiler's kernel table (CUDA time) of one prefill, written to `path` and printed."""
    from torch.profiler import ProfilerActivity, profile
    model(batch, kv)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(batch, kv)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(table, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["20b", "120b"], default="20b")
    p.add_argument("--tokens", default="1024,8192", help="prompt lengths, comma-separated")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    p.add_argument("--variants", default=None, help="comma-separated subset of VARIANTS (default: all)")
    p.add_argument("--bf16-experts", action="store_true",
                   help="then keep bf16 expert copies (moe_prefill_weights bf16) and time each length again")
    args = p.parse_args(argv)
    if args.variants and (unknown := set(args.variants.split(",")) - set(VARIANTS)):
        p.error(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    if not torch.cuda.is_available():
        print("prefill_bench needs a CUDA GPU")
        return 2
    commit = args.commit or provenance.commit()
    config = ModelConfig.from_dict(preset(args.preset))
    model = fast_random_model(config)
    lengths = [int(t) for t in args.tokens.split(",")]
    blocks = -(-(max(lengths) + 1) // BLOCK_SIZE)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), blocks, blocks, "cuda")
    rows, failures, firsts, base = [], [], {}, {}
    only = args.variants.split(",") if args.variants else list(VARIANTS)
    for tokens in lengths:
        batch = uniform_batch(1, 0, tokens, blocks)
        times = {}
        for name in ["default"] + [n for n in only if n != "default"]:
            with variant(name):
                out = model(batch, kv)
                check(firsts.setdefault(tokens, out), out, name in EXACT, f"{tokens} tokens, {name}", failures)
                times[name] = time_ms(lambda: model(batch, kv), iters=args.iters)
        base[tokens] = times["default"]
        report(tokens, times)
        rows += result_rows(commit, args.preset, tokens, times, base[tokens])
    profile_table(model, kv, uniform_batch(1, 0, max(lengths), blocks), args.out / f"prefill_profile_{args.preset}_{max(lengths)}.txt")
    if args.bf16_experts:
        # Last: the copies stay with the model. Bit-equal to the default wherever the default took
        # the grouped GEMM too (the same bf16 weights reach the same GEMMs).
        model.keep_bf16_experts()
        for tokens in lengths:
            batch = uniform_batch(1, 0, tokens, blocks)
            out = model(batch, kv)
            grouped = tokens * config.num_experts_per_tok >= moe_mxfp4.GROUPED_MM_MIN_ROWS * config.num_local_experts
            check(firsts[tokens], out, grouped, f"{tokens} tokens, bf16 experts", failures)
            times = {"bf16 experts": time_ms(lambda: model(batch, kv), iters=args.iters)}
            report(tokens, times)
            rows += result_rows(commit, args.preset, tokens, times, base[tokens])
        profile_table(model, kv, uniform_batch(1, 0, max(lengths), blocks),
                      args.out / f"prefill_profile_{args.preset}_{max(lengths)}_bf16_experts.txt")
    provenance.append_rows(
        args.out / "prefill_ab.md", "Prefill A/B, ms per prefill (bench/prefill_bench.py; median of CUDA-event timings)",
        ["date", "GPU", "commit", "preset", "tokens", "variant", "ms", "tok/s", "ms vs default"], rows)
    print("parity failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
