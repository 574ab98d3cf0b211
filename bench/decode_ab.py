"""Whole-model decode A/B in one process: CUDA-graph replays of one decode step at 1k context, the
forms of an experiment alternated over rounds (so clock drift and the neighbour's load hit every
form alike), the median of each form's rounds reported. Run from the repository root:

    python -m bench.decode_ab rotary --out bench/results/decode_v17/rotary.json
    python -m bench.decode_ab splits --out ...

Experiments (each a dict of forms, a form a function that sets the engine's switches):
  rotary  the q|k|v GEMV with rotary + KV store as its epilogue (gemv.ROTARY_EPILOGUE) against the
          GEMV then rotary_store_kv: 20b and 120b at batch 1 and 2 (the GEMV's token counts)
  splits  decode attention split over the keys from 512 (sequence, KV head) programs too: 20b at
          batch 64 and 256, unsplit (the default) against 2 splits on full layers, and on all layers
  fewsplits  fewer key splits below 512 programs (half, a quarter of the default: fewer partials for
          the combine, more key tiles a split): 20b at batch 1 and 8
  mmatiles, staged  the mma GEMV's warp arrangements; the token-grouped kernels' staged loop
  pairstaged, pairstaged4  the per-pair mma GEMV on the register loop against the staged loop (and,
          at batch 1-2, the token-grouped kernels): PAIR_STAGED_MIN_PAIRS' measurements
  attntiles  the decode attention kernels' tiles (paged_attention.DECODE_TILES, SPLIT_TILES)
  tokens64  the token-grouped kernels against the grouped kernel at 20b batch 64
  words   the experts' packed words in checkpoint order against the permuted order (mxfp4.WORD_BITS,
          the 9-instruction PTX dequant), converted in place between forms
  groupedwarps  the grouped MoE kernels (20b batch 64, 256) at 8 warps a program, and gate_up at
          half the rows: on permuted words a 4-warp program holds 154-167 registers, an 8-warp one 84-88
  wordpairs  the grouped kernels' weights left in the dequant's register pairs, the activations
          permuted to match (moe_mxfp4.WORD_PAIRS), against the re-pairing into k order: 20b batch 64, 256
  groupedstages  the grouped MoE kernels' pipeline depth (3 stages, the default, against 4 and 5: one
          and two more trips of weights in flight a program, in more shared memory): 20b batch 64, 256
  slidingsplits  the key splits of the sliding-window layers below 512 programs (4, the default,
          against 2 and 1: 1 drops their combine launch): 20b batch 1 and 8
  routereb  router experts a program (routing.ROUTER_EB: 4, the default, against 2 and 8): 20b
          batch 1 and 64
  splitk  o (up to 32 tokens) and lm_head at 3-64 tokens through kernels/splitk_gemm against cuBLAS
          (splitk_gemm.ENABLED): 20b batch 4, 8 and 64, 120b batch 8 and 64
  inputs  the step's inputs into the graph's buffers by torch copies and fills against one launch
          (cuda_graphs.FUSED_LOAD), then also the lm_head's GEMV / split-K kernel storing fp32 logits
          itself against bf16 logits widened by a pass after: 20b batch 1, 8, 64, 120b batch 1
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import statistics
import time
from typing import Callable

import torch
import triton

from bench.gpu_bench import BLOCK_SIZE, back_to_back_ms, fast_random_model, time_ms, uniform_batch
from bench.provenance import commit
from gptoss_engine import mxfp4
from gptoss_engine import model as model_module
from gptoss_engine.kernels import cuda_graphs, gemv, moe_gemv_mma, moe_mxfp4, paged_attention, routing, splitk_gemm
from gptoss_engine.kernels.cuda_graphs import CudaGraphForward
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset

CONTEXT = 1024
_DEFAULT_SPLITS = paged_attention.decode_splits
_DECODE_TILES, _SPLIT_TILES = paged_attention.DECODE_TILES, paged_attention.SPLIT_TILES
_MMA_MAX_PAIRS = moe_mxfp4.GEMV_MMA_MAX_PAIRS
_PAIR_STAGED_FROM = moe_gemv_mma.PAIR_STAGED_MIN_PAIRS
_NEVER = 1 << 30
_TOKENS_MAX_ROWS = moe_mxfp4.TOKENS_GEMV_MAX_ROWS
_GROUPED_TILES = moe_mxfp4._tiles
_WORD_PAIRS = moe_mxfp4.WORD_PAIRS
_ROUTER_EB = routing.ROUTER_EB


def _splits_from_512(full: int, sliding: int) -> Callable[..., int]:
    def decode_splits(num_seqs: int, num_kv_heads: int, window: int | None = None) -> int:
        if num_seqs * num_kv_heads >= 512:
            return sliding if window else full
        return _DEFAULT_SPLITS(num_seqs, num_kv_heads, window)
    return decode_splits


def _splits_scaled(factor: float) -> Callable[..., int]:
    """The default split counts below 512 programs times `factor` (at least 1)."""
    def decode_splits(num_seqs: int, num_kv_heads: int, window: int | None = None) -> int:
        return max(1, int(_DEFAULT_SPLITS(num_seqs, num_kv_heads, window) * factor))
    return decode_splits


def _sliding_splits(sliding: int) -> Callable[..., int]:
    """The default split counts, but `sliding` on the sliding-window layers below 512 programs."""
    def decode_splits(num_seqs: int, num_kv_heads: int, window: int | None = None) -> int:
        full = _DEFAULT_SPLITS(num_seqs, num_kv_heads, window)
        return min(full, sliding) if window else full
    return decode_splits


def _grouped(gate_up: dict[str, int], down: dict[str, int]) -> Callable[..., moe_mxfp4.Tiles]:
    """moe_mxfp4._tiles with fields of the gate_up and the down kernel's tiles replaced."""
    def tiles(num_pairs: int, num_experts: int, sm90: bool) -> moe_mxfp4.Tiles:
        t = _GROUPED_TILES(num_pairs, num_experts, sm90)
        d = dataclasses.replace(t.down or t, **down)
        return dataclasses.replace(t, down=d, **gate_up)
    return tiles


_LINEAR = model_module._linear
_FUSED_LOAD = cuda_graphs.FUSED_LOAD


def _widened_after(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """model._linear as before its out_dtype: the product in x's dtype, widened by a pass of its own."""
    y = _LINEAR(x, w, b)
    return y if out_dtype is None else y.to(out_dtype)


def _set(**switches: object) -> Callable[[], None]:
    """A form: module switches set by its call; `words` ("checkpoint" or, by default, the layout
    finalize_model gives) is applied to the model by run()."""
    def apply() -> None:
        gemv.ROTARY_EPILOGUE = bool(switches.get("rotary", True))
        paged_attention.decode_splits = switches.get("splits", _DEFAULT_SPLITS)  # type: ignore[assignment]
        paged_attention.DECODE_TILES = switches.get("decode_tiles", _DECODE_TILES)  # type: ignore[assignment]
        paged_attention.SPLIT_TILES = switches.get("split_tiles", _SPLIT_TILES)  # type: ignore[assignment]
        moe_gemv_mma.STAGED = bool(switches.get("staged", True))
        moe_gemv_mma._TILES_OVERRIDE = switches.get("mma_tiles")  # type: ignore[assignment]
        ints = {k: v for k, v in switches.items() if isinstance(v, int)}
        moe_gemv_mma.PAIR_STAGED_MIN_PAIRS = ints.get("pair_staged_from", _PAIR_STAGED_FROM)
        moe_mxfp4.GEMV_MMA_MAX_PAIRS = ints.get("mma_max_pairs", _MMA_MAX_PAIRS)
        moe_mxfp4.TOKENS_GEMV_MAX_ROWS = ints.get("tokens_max_rows", _TOKENS_MAX_ROWS)
        moe_mxfp4._tiles = switches.get("grouped_tiles", _GROUPED_TILES)  # type: ignore[assignment]
        moe_mxfp4.WORD_PAIRS = bool(switches.get("word_pairs", _WORD_PAIRS))
        routing.ROUTER_EB = ints.get("router_eb", _ROUTER_EB)
        splitk_gemm.ENABLED = bool(switches.get("splitk", True))
        cuda_graphs.FUSED_LOAD = bool(switches.get("fused_load", _FUSED_LOAD))
        model_module._linear = _LINEAR if switches.get("wide_logits", True) else _widened_after
    apply.words = switches.get("words")  # type: ignore[attr-defined]
    return apply


def _use_words(model: torch.nn.Module, checkpoint_order: bool) -> None:
    """Every layer's packed experts in checkpoint word order, or permuted as finalize_model lays them
    out on sm_90, converted in place a layer at a time (the old blocks are freed as each is replaced)."""
    for layer in model.model.layers:  # type: ignore[union-attr]
        ex = layer.mlp.experts
        if ex.permuted == checkpoint_order:
            convert = mxfp4.unpermute_words if checkpoint_order else mxfp4.permute_words
            ex.gate_up_proj_blocks = convert(ex.gate_up_proj_blocks)
            ex.down_proj_blocks = convert(ex.down_proj_blocks)
            ex.permuted = not checkpoint_order


EXPERIMENTS: dict[str, tuple[list[tuple[str, tuple[int, ...]]], dict[str, Callable[[], None]]]] = {
    "rotary": ([("20b", (1, 2)), ("120b", (1, 2))],
               {"gemv+rotary": _set(rotary=False), "fused": _set(rotary=True)}),
    "splits": ([("20b", (64, 256))],
               {"unsplit": _set(), "full x2": _set(splits=_splits_from_512(2, 1)),
                "all x2": _set(splits=_splits_from_512(2, 2))}),
    "fewsplits": ([("20b", (1, 8))],
                  {"default": _set(), "half": _set(splits=_splits_scaled(0.5)),
                   "quarter": _set(splits=_splits_scaled(0.25))}),
    "mmatiles": ([("20b", (1, 2)), ("120b", (1,))],
                 {"(1,4,1) both": _set(),
                  "gate_up (1,2,1)": _set(mma_tiles=((1, 2, 1, True), (1, 4, 1, True))),
                  "gate_up (2,2,1)": _set(mma_tiles=((2, 2, 1, True), (1, 4, 1, True))),
                  "down (1,2,1)": _set(mma_tiles=((1, 4, 1, True), (1, 2, 1, True))),
                  "down (2,2,1)": _set(mma_tiles=((1, 4, 1, True), (2, 2, 1, True))),
                  "both (1,4,2)": _set(mma_tiles=((1, 4, 2, True), (1, 4, 2, True))),
                  "both (1,8,1)": _set(mma_tiles=((1, 8, 1, True), (1, 8, 1, True)))}),
    "staged": ([("20b", (16, 32)), ("120b", (16, 64))],
               {"registers": _set(staged=False), "staged": _set(staged=True)}),
    "pairstaged": ([("20b", (1, 2)), ("120b", (1,))],
                   {"registers": _set(pair_staged_from=_NEVER), "staged": _set(pair_staged_from=0),
                    "token-grouped": _set(mma_max_pairs=0)}),
    "pairstaged4": ([("20b", (3, 4)), ("120b", (2, 4))],
                    {"registers": _set(pair_staged_from=_NEVER), "staged": _set(pair_staged_from=0)}),
    "attntiles": ([("20b", (1, 8, 64, 256))],
                  {"default": _set(), "unsplit (16,64,4,3)": _set(decode_tiles=(16, 64, 4, 3)),
                   "unsplit (16,128,4,2)": _set(decode_tiles=(16, 128, 4, 2)),
                   "unsplit (16,32,4,3)": _set(decode_tiles=(16, 32, 4, 3)),
                   "split (64,4,2)": _set(split_tiles=(64, 4, 2)), "split (32,4,3)": _set(split_tiles=(32, 4, 3))}),
    "tokens64": ([("20b", (64,))],
                 {"grouped": _set(), "token-grouped": _set(tokens_max_rows=8)}),
    "words": ([("20b", (1, 2, 4, 8, 64)), ("120b", (1,))],
              {"checkpoint words": _set(words="checkpoint"), "permuted words": _set()}),
    "groupedwarps": ([("20b", (64, 256))],
                     {"default": _set(), "gate_up 8 warps": _set(grouped_tiles=_grouped(dict(warps=8), {})),
                      "down 8 warps": _set(grouped_tiles=_grouped({}, dict(warps=8))),
                      "both 8 warps": _set(grouped_tiles=_grouped(dict(warps=8), dict(warps=8))),
                      "gate_up bn 32": _set(grouped_tiles=_grouped(dict(bn=32), {}))}),
    "wordpairs": ([("20b", (64, 256))],
                  {"k-order pairs": _set(word_pairs=False), "dequant's pairs": _set(word_pairs=True)}),
    "groupedstages": ([("20b", (64, 256))],
                      {"3 stages": _set(), "4 stages": _set(grouped_tiles=_grouped(dict(stages=4), dict(stages=4))),
                       "5 stages": _set(grouped_tiles=_grouped(dict(stages=5), dict(stages=5))),
                       "gate_up 4 stages": _set(grouped_tiles=_grouped(dict(stages=4), {}))}),
    "slidingsplits": ([("20b", (1, 8))],
                      {"sliding 4": _set(), "sliding 2": _set(splits=_sliding_splits(2)),
                       "sliding 1": _set(splits=_sliding_splits(1))}),
    "routereb": ([("20b", (1, 64))],
                 {"eb 4": _set(), "eb 2": _set(router_eb=2), "eb 8": _set(router_eb=8)}),
    "splitk": ([("20b", (4, 8, 64)), ("120b", (8, 64))],
               {"cublas": _set(splitk=False), "splitk o + lm_head": _set()}),
    "inputs": ([("20b", (1, 8, 64)), ("120b", (1,))],
               {"copies, logits widened after": _set(fused_load=False, wide_logits=False),
                "one-launch load": _set(fused_load=True, wide_logits=False),
                "one-launch load + fp32 logits stored": _set(fused_load=True)}),
}


def run(name: str, batches: tuple[int, ...], forms: dict[str, Callable[[], None]], rounds: int,
        out: dict[str, object]) -> None:
    config = ModelConfig.from_dict(preset(name))
    model = fast_random_model(config)
    max_blocks = -(-(CONTEXT + 16) // BLOCK_SIZE)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), max(batches) * max_blocks,
                          max(batches) * max_blocks, "cuda")
    for bs in batches:
        b = uniform_batch(bs, CONTEXT, 1, max_blocks)
        times: dict[str, list[float]] = {f: [] for f in forms}
        steady: dict[str, list[float]] = {f: [] for f in forms}
        for _ in range(rounds):
            for f, apply in forms.items():
                apply()
                _use_words(model, apply.words == "checkpoint")  # type: ignore[attr-defined]
                graph = CudaGraphForward(model, kv, bs, max_blocks, buckets=[bs])
                times[f].append(time_ms(lambda: graph(b, kv), warmup=3, iters=30))
                steady[f].append(back_to_back_ms(lambda: graph(b, kv)))   # gpu_bench's decode_{bs}_steady
                del graph
        for f, ts in times.items():
            ms, back = statistics.median(ts), statistics.median(steady[f])
            out[f"{name} b{bs} {f}"] = {"ms": ms, "tok_s": bs / ms * 1e3, "all": ts, "steady_ms": back,
                                        "steady_all": steady[f]}
            print(f"{name} b{bs} {f}: {ms:.3f} ms, {bs / ms * 1e3:,.0f} tok/s  rounds {[round(t, 3) for t in ts]}; "
                  f"back to back {back:.3f} ms {[round(t, 3) for t in steady[f]]}", flush=True)
    _set()()
    del model, kv
    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--presets", default=None, help="comma-separated subset of the experiment's presets")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--commit", default=None, help="commit id to record (default: git rev-parse HEAD)")
    args = p.parse_args(argv)
    models, forms = EXPERIMENTS[args.experiment]
    keep = set(args.presets.split(",")) if args.presets else None
    out: dict[str, object] = {"experiment": args.experiment, "context": CONTEXT, "date": time.strftime("%Y-%m-%d"),
                              "gpu": torch.cuda.get_device_name(), "commit": args.commit or commit(),
                              "torch": torch.__version__, "triton": triton.__version__}
    for name, batches in models:
        if keep is None or name in keep:
            run(name, batches, forms, args.rounds, out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
