"""Attention sweeps on the GPU. Prefill: the paged kernel over 1k and 8k prompts, full and
sliding-window layers, per (query rows, keys per trip, warps, stages); prints us per layer and
TFLOP/s (causal FLOPs). --decode: one decode step per batch size and context, per key-split count
(flash-decoding; 1 = the unsplit kernel), timed in CUDA graphs; prints us and KV GB/s.
--decode-tiles: the decode kernels' tiles (split kernel at batch 1 and 8, unsplit at 64 and 256).
Each config is checked against the current default's output first.

    python3 -m bench.attn_kernel_bench --out $OUT [--decode]
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

from bench.gpu_bench import BLOCK_SIZE, time_ms, uniform_batch
from gptoss_engine.kernels.paged_attention import paged_attention, prefill_tiles
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset


def decode_sweep(cfg: ModelConfig, out: pathlib.Path) -> int:
    from bench.moe_kernel_bench import time_us
    from gptoss_engine.kernels.paged_attention import decode_splits
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    results, bad = {}, []
    for batch in (8, 16, 64, 256):
        for context in (1024, 2048):
            blocks = context // BLOCK_SIZE + 2
            pool = torch.randn(batch * blocks, 1, 2, BLOCK_SIZE, hkv, d, device="cuda", dtype=torch.bfloat16)
            b = uniform_batch(batch, context, 1, blocks)
            q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
            sinks = torch.randn(hq, device="cuda")
            for window in (None, cfg.sliding_window):
                name = f"b{batch} ctx{context} {'full' if window is None else 'sliding'}"
                keys = (context + 1) if window is None else min(window, context + 1)
                kv_bytes = batch * keys * hkv * d * 2 * 2
                default = decode_splits(batch, hkv, window)
                ref = paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5, window)
                rows = []
                for splits in (1, 2, 4, 8, 16):
                    got = paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5, window, splits=splits)
                    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not rel < 1e-2:
                        bad.append(f"{name} splits {splits}: rel {rel:.2g}")
                    us = time_us(lambda: paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5,
                                                         window, splits=splits), graph=True)
                    rows.append((us, splits, kv_bytes / us / 1e3))
                rows.sort()
                print(f"== {name}: default (splits {default}) "
                      f"{next(u for u, sp, _ in rows if sp == default):.1f} us; "
                      + "; ".join(f"splits {sp} {u:.1f} us ({g:.0f} GB/s)" for u, sp, g in rows), flush=True)
                results[name] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "attn_decode_splits.json").write_text(json.dumps({"results": results, "parity_failures": bad}))
    print("parity failures:", bad or "none")
    return 1 if bad else 0


def decode_tile_sweep(cfg: ModelConfig, out: pathlib.Path) -> int:
    """The decode kernels' tiles at 1k context, full and sliding layers: the split kernel's
    (keys a trip, warps, stages) at batch 1 and 8 (split there), the unsplit kernel's (rows, keys a
    trip, warps, stages) at 64 and 256; each against the default's output, then timed in CUDA graphs."""
    from bench.moe_kernel_bench import time_us
    from gptoss_engine.kernels import paged_attention as pa
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    split_default, unsplit_default = pa.SPLIT_TILES, pa.DECODE_TILES
    split_cfgs = [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (16, 4, 2), (32, 2, 2), (64, 8, 2)]
    unsplit_cfgs = [(16, 64, 4, 2), (16, 64, 4, 3), (16, 32, 4, 2), (16, 32, 4, 3), (16, 128, 4, 2),
                    (16, 128, 8, 2), (16, 64, 2, 2), (16, 64, 8, 3)]
    results, bad = {}, []
    context = 1024
    for batch in (1, 8, 64, 256):
        blocks = context // BLOCK_SIZE + 2
        pool = torch.randn(batch * blocks, 1, 2, BLOCK_SIZE, hkv, d, device="cuda", dtype=torch.bfloat16)
        b = uniform_batch(batch, context, 1, blocks)
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        sinks = torch.randn(hq, device="cuda")
        split = pa.decode_splits(batch, hkv) > 1
        for window in (None, cfg.sliding_window):
            name = f"b{batch} ctx{context} {'full' if window is None else 'sliding'}"
            ref = paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5, window)
            rows = []
            for t in (split_cfgs if split else unsplit_cfgs):
                if split:
                    pa.SPLIT_TILES = t
                else:
                    pa.DECODE_TILES = t
                try:
                    got = paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5, window)
                    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not rel < 1e-2:
                        bad.append(f"{name} {t}: rel {rel:.2g}")
                    us = time_us(lambda: paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5,
                                                         window), graph=True)
                    rows.append((us, list(t)))
                except Exception as e:  # noqa: BLE001 -- a tile Triton cannot build (shared memory, registers)
                    print(f"{name} {t}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                pa.SPLIT_TILES, pa.DECODE_TILES = split_default, unsplit_default
            rows.sort()
            default = list(split_default if split else unsplit_default)
            base = next((u for u, t in rows if t == default), float("nan"))
            print(f"== {name} ({'split' if split else 'unsplit'}): default {default} {base:.1f} us; "
                  + "; ".join(f"{tuple(t)} {u:.1f}" for u, t in rows), flush=True)
            results[name] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "attn_decode_tiles.json").write_text(json.dumps({"results": results, "parity_failures": bad}))
    print("parity failures:", bad or "none")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="20b")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    p.add_argument("--decode", action="store_true", help="sweep the decode key splits instead")
    p.add_argument("--decode-tiles", action="store_true", help="sweep the decode kernels' tiles instead")
    args = p.parse_args(argv)
    cfg = ModelConfig.from_dict(preset(args.preset))
    if args.decode:
        return decode_sweep(cfg, args.out)
    if args.decode_tiles:
        return decode_tile_sweep(cfg, args.out)
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    configs = ([(r, n, w, s) for r in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
               + [(256, n, 8, s) for n in (32, 64, 128) for s in (2, 3)])   # two warpgroups, one K/V tile
    results = {}
    bad = []
    for tokens in (1024, 8192):
        blocks = tokens // BLOCK_SIZE + 1
        pool = torch.randn(blocks, 1, 2, BLOCK_SIZE, hkv, d, device="cuda", dtype=torch.bfloat16)
        b = uniform_batch(1, 0, tokens, blocks)
        q = torch.randn(tokens, hq, d, device="cuda", dtype=torch.bfloat16)
        sinks = torch.randn(hq, device="cuda")
        for window in (None, cfg.sliding_window):
            name = f"{tokens} {'full' if window is None else 'sliding'}"
            keys = tokens * (tokens + 1) / 2 if window is None else tokens * window
            flops = 4 * keys * hq * d
            ref = paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5, window)
            rows = []
            for cfg_t in configs:
                try:
                    out = paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5, window,
                                          tiles=cfg_t)
                    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not rel < 1e-2:
                        bad.append(f"{name} {cfg_t}: rel {rel:.2g}")
                    ms = time_ms(lambda: paged_attention(q, pool, 0, b.full_block_tables, b, sinks, d ** -0.5,
                                                         window, tiles=cfg_t), warmup=2, iters=10)
                except Exception as e:  # noqa: BLE001 -- a tile Triton cannot build: report, go on
                    print(f"{name} {cfg_t}: {type(e).__name__} {str(e)[:120]}")
                    continue
                rows.append((ms * 1e3, cfg_t, flops / ms / 1e9))
            rows.sort()
            default = next(r for r in rows if r[1] == prefill_tiles(window, tokens))
            print(f"== {name}: default {default[0]:.0f} us ({default[2]:.0f} TFLOP/s); best "
                  + "; ".join(f"{c} {u:.0f} us ({t:.0f} TFLOP/s)" for u, c, t in rows[:3]), flush=True)
            results[name] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attn_kernels.json").write_text(json.dumps({"results": results, "parity_failures": bad}))
    print("parity failures:", bad or "none")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
