"""Prefill A/B on the GPU: one model, the same prompts, the variants of the prefill path timed in
turn over several rounds (so clock drift over the call falls on all alike), and kernel tables
(torch.profiler, CUDA time) at the longest prompt.

Variants (VARIANTS; each changes one thing against the default): "masked attention" makes every
key tile pay the causal/window masks (the kernel before its split loop); "paged prompt attention" runs
the full-window layers of a fresh prompt on the paged kernel instead of cuDNN's
(prompt_attention.ENABLED); "torch sort" sorts the MoE's pairs by expert with torch's argsort as
before routing.sort_pairs; "bf16 experts" is
EngineConfig.moe_prefill_weights = "bf16" (20b: +38 GB). Those two must give the default's logits
exactly, else the run fails. Appends one row per length and variant to bench/results/prefill_ab.md.

    python3 -m bench.prefill_bench --preset 20b --tokens 1024,8192 --variants "masked attention,bf16 experts" \
        --commit <sha> --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import pathlib
import statistics
from typing import Iterator

import torch

from bench import provenance
from bench.gpu_bench import BLOCK_SIZE, RESULTS, fast_random_model, kernel_timeline, time_ms, uniform_batch
from gptoss_engine import model as model_module
from gptoss_engine.kernels import moe_grouped_mm, moe_mxfp4, paged_attention, prompt_attention
from gptoss_engine.kernels.norm import add_rmsnorm
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.moe import PairOutputs, summed
from gptoss_engine.presets import preset
from gptoss_engine.step_batch import StepBatch


@contextlib.contextmanager
def variant(name: str, model: GptOssForCausalLM, bf16: list[tuple[torch.Tensor, torch.Tensor] | None]) -> Iterator[None]:
    """The engine with one thing changed (see VARIANTS). `bf16`: each layer's bf16 expert copies,
    attached only for the "bf16 experts" variant."""
    pa, gm = paged_attention, moe_grouped_mm
    saved = (pa.paged_attention, gm.sort_pairs, gm._gather_rows, model_module._add_rmsnorm, moe_mxfp4.WORD_PAIRS,
             prompt_attention.ENABLED)
    change = {key: value for part in name.split("+") for key, value in VARIANTS[part].items()}
    if change.get("split_loop") is False:
        pa.paged_attention = functools.partial(saved[0], split_loop=False)
    if change.get("torch_sort"):
        gm.sort_pairs = torch_sort_pairs
    if change.get("torch_gather"):
        gm._gather_rows = lambda x, idx: x.to(torch.bfloat16)[idx]
    if change.get("unfused_sum"):
        model_module._add_rmsnorm = lambda: unfused_add_rmsnorm
    if change.get("k_order_pairs"):
        moe_mxfp4.WORD_PAIRS = False
    if change.get("paged_prompt"):
        prompt_attention.ENABLED = False
    layers = model.model.layers
    for layer, copy in zip(layers, bf16):
        layer.mlp.experts.bf16_copy = copy if change.get("bf16") else None
    try:
        yield
    finally:
        (pa.paged_attention, gm.sort_pairs, gm._gather_rows, model_module._add_rmsnorm, moe_mxfp4.WORD_PAIRS,
         prompt_attention.ENABLED) = saved
        for layer in layers:
            layer.mlp.experts.bf16_copy = None


# name -> what differs from the default; a variant may join several with "+" ("bf16 experts+torch
# gather"). All but INEXACT compute the default's bits: the same sorted rows, the same bf16 weights
# reaching the same GEMMs, the same sums ("k-order pairs", the 1k grouped kernels before
# moe_mxfp4.WORD_PAIRS, sums in another order). (A prefetch of the dequant on a side stream, beside
# the attention, was here at bf97451..b28ce7b and removed: 0.1 to 2.7 ms of 140 at 8k, PERF_NOTES v9.)
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "masked attention": {"split_loop": False},
    "torch sort": {"torch_sort": True},
    "bf16 experts": {"bf16": True},
    "torch gather": {"torch_gather": True},
    "unfused MoE sum": {"unfused_sum": True},
    "k-order pairs": {"k_order_pairs": True},
    "paged prompt attention": {"paged_prompt": True},
}
INEXACT = {"masked attention", "k-order pairs", "paged prompt attention"}


def torch_sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """routing.sort_pairs as the grouped path computed it before (up to 9c5ad8d): torch's stable
    argsort and ~16 launches of bookkeeping around it. The same outputs."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_of_pair = torch.empty_like(order)
    row_of_pair[order] = torch.arange(order.numel(), device=flat.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0).to(torch.int32)
    return order // topk_ids.shape[1], row_of_pair, flat[order].to(torch.int32), ends


def unfused_add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | PairOutputs, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE's k outputs summed in a launch of their own before the add + norm (up to d089162)."""
    return add_rmsnorm(x, summed(delta), weight, eps)


def check(first: torch.Tensor, out: torch.Tensor, exact: bool, what: str, failures: list[str]) -> None:
    if exact and not torch.equal(out, first):
        failures.append(f"{what}: logits differ from the default's")
    elif not exact:
        # Not a check: with random weights one rounding difference can flip a router near-tie and
        # move the last token's logits a lot (tests/gpu checks each kernel against its reference).
        print(f"{what}: logits {((out - first).norm() / first.norm()).item():.2g} (relative) from the default's",
              flush=True)


def profile_table(model: torch.nn.Module, kv: KVCache, batch: StepBatch, path: pathlib.Path) -> None:
    """torch.profiler's kernel table (CUDA time) of one prefill and its idle time between kernels,
    written to `path` and printed."""
    from torch.profiler import ProfilerActivity, profile
    model(batch, kv)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(batch, kv)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    table += "\n" + kernel_timeline(prof)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(table, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["20b", "120b"], default="20b")
    p.add_argument("--tokens", default="1024,8192", help="prompt lengths, comma-separated")
    p.add_argument("--variants", default="default,masked attention,torch sort",
                   help=f"comma-separated, of {list(VARIANTS)} or several joined by '+' (bf16 experts: 20b "
                        "on an 80 GB GPU)")
    p.add_argument("--context", type=int, default=0,
                   help="positions already cached before each prompt (a later chunk of a long prompt)")
    p.add_argument("--rounds", type=int, default=5, help="every variant timed once a round, in turn")
    p.add_argument("--iters", type=int, default=5, help="timed prefills a variant a round (median)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    names = ["default"] + [n for n in args.variants.split(",") if n != "default"]
    if unknown := {part for n in names for part in n.split("+")} - set(VARIANTS):
        p.error(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    if not torch.cuda.is_available():
        print("prefill_bench needs a CUDA GPU")
        return 2
    commit = args.commit or provenance.commit()
    config = ModelConfig.from_dict(preset(args.preset))
    model = fast_random_model(config)
    bf16: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * config.num_hidden_layers
    if "bf16 experts" in names:
        model.keep_bf16_experts()
        bf16 = [layer.mlp.experts.bf16_copy for layer in model.model.layers]
    lengths = [int(t) for t in args.tokens.split(",")]
    blocks = -(-(args.context + max(lengths) + 1) // BLOCK_SIZE)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), blocks, blocks, "cuda")
    torch.manual_seed(0)
    # The same prompt for every variant.
    batches = {tokens: uniform_batch(1, args.context, tokens, blocks) for tokens in lengths}
    rows: list[list[object]] = []
    failures: list[str] = []
    for tokens, batch in batches.items():
        first = None
        for name in names:          # compile, warm up, and check each variant's logits
            with variant(name, model, bf16):
                out = model(batch, kv)
            first = out if first is None else first
            check(first, out, not INEXACT & set(name.split("+")), f"{tokens} tokens, {name}", failures)
        # Rounds, each timing every variant in turn: clock and power drift over the run (a few %
        # between the start and the end of a call) falls on all variants alike.
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                with variant(name, model, bf16):
                    samples[name].append(time_ms(lambda: model(batch, kv), warmup=1, iters=args.iters))
        times = {n: statistics.median(v) for n, v in samples.items()}
        base = times["default"]
        print(f"prefill {tokens} after {args.context}: "
              + "; ".join(f"{n} {ms:.2f} ms ({tokens / ms * 1e3:,.0f} tok/s, rounds "
                          f"{min(samples[n]):.1f}-{max(samples[n]):.1f})" for n, ms in times.items()), flush=True)
        what = f"{tokens} after {args.context}" if args.context else tokens
        rows += [[datetime.date.today().isoformat(), torch.cuda.get_device_name(), commit, args.preset, what, n,
                  f"{ms:.2f}", f"{tokens / ms * 1e3:.0f}", f"{ms - base:+.2f}"] for n, ms in times.items()]
    longest = batches[max(lengths)]
    for name in ("default", "bf16 experts"):
        if name in names:
            with variant(name, model, bf16):
                suffix = "" if name == "default" else "_bf16_experts"
                profile_table(model, kv, longest, args.out / f"prefill_profile_{args.preset}_{max(lengths)}{suffix}.txt")
    provenance.append_rows(
        args.out / "prefill_ab.md", "Prefill A/B, ms per prefill (bench/prefill_bench.py; median over rounds of "
        "CUDA-event timings, variants in turn)",
        ["date", "GPU", "commit", "preset", "tokens", "variant", "ms", "tok/s", "ms vs default"], rows)
    print("parity failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
