"""MoE kernel sweep on the GPU: every kernel variant x tile config at decode and prefill sizes.

One layer of gpt-oss experts (random MXFP4 codes, scales near 2^-6) at T tokens, top-4 routing
drawn uniformly. Each variant is checked against the fp32 reference first (rel < 2e-2, at a small
T), then timed: CUDA-graph replays (routing + kernels; median of 20 x 5 replays) where the path is
capturable, CUDA events around eager calls otherwise (the grouped_mm prefill path).
Prints a table per T (us, effective weight GB/s, TFLOP/s) and writes JSON to --out.

    python3 -m bench.moe_kernel_bench --preset 20b --out $OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import time
from typing import Callable

import torch

from gptoss_engine import mxfp4
from gptoss_engine.kernels.moe_mxfp4 import GEMV_MAX_PAIRS, Tiles, _tiles, moe_experts
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.moe import ExpertWeights, moe_experts_reference
from gptoss_engine.presets import preset


def random_experts(E: int, H: int, I: int, gen: torch.Generator) -> ExpertWeights:
    def u8(shape: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=gen, device="cuda", dtype=torch.uint8)
    return ExpertWeights(
        gate_up_bias=torch.randn(E, 2 * I, generator=gen, device="cuda").to(torch.bfloat16) * 0.02,
        down_bias=torch.randn(E, H, generator=gen, device="cuda").to(torch.bfloat16) * 0.02,
        gate_up_blocks=u8((E, 2 * I, H // 32, 16), 0, 256), gate_up_scales=u8((E, 2 * I, H // 32), 119, 123),
        down_blocks=u8((E, H, I // 32, 16), 0, 256), down_scales=u8((E, H, I // 32), 119, 123))


def routing(T: int, E: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.rand(T, E, generator=gen, device="cuda").argsort(dim=1)[:, :k].contiguous()
    wts = torch.softmax(torch.randn(T, k, generator=gen, device="cuda"), -1)
    return ids, wts


def time_us(fn: Callable[[], object], graph: bool) -> float:
    fn()
    torch.cuda.synchronize()
    inner = 5
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        run = g.replay
    else:
        def run() -> None:
            for _ in range(inner):
                fn()
    run()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / inner)
    return sorted(times)[len(times) // 2]


def variants(T: int, E: int, k: int, wide: bool = False) -> list[tuple[str, dict]]:
    """(name, kwargs) to time at T tokens: the default, the default on unpadded scales, then the
    grouped kernel's tiles varied one constant at a time around a base (a full grid costs minutes
    of compilation per T)."""
    rows = T * k / E
    out: list[tuple[str, dict]] = [("default", {}), ("default, as loaded", dict(plain=True)),
                                       ("default, two scale multiplies", dict(two_mul=True))]
    if T * k <= 64:
        out.append(("gemv fma", dict(gemv=True, gemv_mma=False)))
        if T * k <= 16:
            out.append(("gemv without PTX dequant", dict(gemv=True, gemv_asm=False)))
        if T * k > GEMV_MAX_PAIRS:
            out.append(("gemv", dict(gemv=True)))
        cfgs = [Tiles(16, 64, 128, 4, 3, 3, True)]
    elif rows <= 256:
        bm = min(128, max(16, 1 << (int(rows) - 1).bit_length()))
        base = Tiles(bm, 64, 128, 4, 3, 3, True)
        cfgs = [base, Tiles(64 if rows > 16 else 16, 64, 128, 4, 3, 0, False)]
        cfgs += [dataclasses.replace(base, bm=b) for b in (bm // 2, bm * 2) if 16 <= b <= 128]
        cfgs += [dataclasses.replace(base, bn=n) for n in (32, 128)]
        cfgs += [dataclasses.replace(base, bk=kk) for kk in (64, 256)]
        cfgs += [dataclasses.replace(base, warps=8)]
        cfgs += [dataclasses.replace(base, stages=st) for st in (2, 4, 5)]
        if wide:    # the full grid over the constants that moved the time (--wide)
            cfgs += [dataclasses.replace(base, bn=n, bk=kk, warps=wp, stages=st) for n in (32, 64, 128)
                     for kk in (64, 128) for wp in (4, 8) for st in (3, 4)]
            cfgs = list(dict.fromkeys(cfgs))
        if rows > 64:
            out += [("grouped_mm", dict(grouped_mm=True))]
    else:
        out += [("fused default", dict(grouped_mm=False)), ("grouped_mm", dict(grouped_mm=True))]
        cfgs = []
    default = None if T * k <= GEMV_MAX_PAIRS else _tiles(T * k, E, True)
    out += [(f"m{c.mode}{'s' if c.swap else ''} {c.bm}x{c.bn}x{c.bk} w{c.warps} st{c.stages}", dict(tiles=c))
            for c in cfgs if c != default]
    return out


def sweep_rows(label: str, rows: list[tuple[float, object]]) -> list[tuple[float, object]]:
    """(us, config) rows of one sweep, fastest first, printed on one line."""
    rows = sorted(rows, key=lambda r: r[0])
    print(f"{label}: " + "; ".join(f"{c} {u:.1f}" for u, c in rows), flush=True)
    return rows


_checkpoint_words: dict[int, ExpertWeights] = {}


def checkpoint_words(w: ExpertWeights) -> ExpertWeights:
    """`w` with its blocks in the checkpoint's word order (a copy, made once per `w`): what the
    grouped kernel's dot_scaled mode reads, and the "as loaded" variant."""
    if not w.permuted:
        return w
    if id(w) not in _checkpoint_words:
        _checkpoint_words[id(w)] = dataclasses.replace(
            w, gate_up_blocks=mxfp4.unpermute_words(w.gate_up_blocks), down_blocks=mxfp4.unpermute_words(w.down_blocks),
            permuted=False)
    return _checkpoint_words[id(w)]


def call(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, w: ExpertWeights, kw: dict) -> torch.Tensor:
    """kw: moe_experts' options, plus plain=True for the experts as loaded (checkpoint words, scale
    rows unpadded, largest scale unknown: two scale multiplies)."""
    kw = dict(kw)
    if kw.pop("two_mul", False):
        w = dataclasses.replace(w, scale_max=None)
    tiles = kw.get("tiles")
    if kw.pop("plain", False):
        c = checkpoint_words(w)
        w = ExpertWeights(c.gate_up_bias, c.down_bias, gate_up_blocks=c.gate_up_blocks,
                          gate_up_scales=c.gate_up_scales.contiguous(), down_blocks=c.down_blocks,
                          down_scales=c.down_scales.contiguous())
    elif tiles is not None and tiles.mode == 0:
        w = checkpoint_words(w)
    return moe_experts(x, ids, wts, w, 7.0, **kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="20b")
    p.add_argument("--tokens", default="1,8,64,256,1024,8192")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--wide", action="store_true", help="full tile grid for the grouped kernel at decode sizes")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    p.add_argument("--commit", default="unknown")
    p.add_argument("--gemv-sweep", action="store_true", help="sweep the small-batch GEMV's tile constants")
    p.add_argument("--mma-sweep", action="store_true", help="sweep the mma GEMV's warp arrangement")
    p.add_argument("--split-sweep", default="", help="token counts (e.g. 64,256) at which to vary the grouped "
                   "kernel's gate_up and down tiles one kernel at a time")
    p.add_argument("--token-sweep", default="", help="token counts (e.g. 1,8,64) at which to time the "
                   "token-grouped mma GEMV (each chunk count and warp arrangement) against the other forms")
    p.add_argument("--profile-tokens", type=int, default=0, help="kernel table of both prefill paths at this T")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(preset(args.preset))
    E, k, H, I = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = random_experts(E, H, I, gen).kernel_layout()   # as finalize_model lays experts out on the GPU
    expert_bytes = (2 * I * H + H * I) * (0.5 + 1 / 32)
    results: dict[str, dict[str, object]] = {}
    bad: list[str] = []
    for T in [int(t) for t in args.tokens.split(",")]:
        ids, wts = routing(T, E, k, gen)
        x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
        touched = torch.unique(ids).numel()
        flops = 2 * T * k * 3 * H * I
        check_T = min(T, 256)
        ref = None
        rows = []
        for name, kw in variants(T, E, k, args.wide):
            t0 = time.time()
            try:
                # Parity on a slice (the reference dequantizes every touched expert in fp32).
                xs, ids_s, wts_s = x[:check_T], ids[:check_T], wts[:check_T]
                if ref is None:
                    ref = moe_experts_reference(xs.float(), ids_s, wts_s.float(), ExpertWeights(
                        w.gate_up_bias.float(), w.down_bias.float(), gate_up_blocks=w.gate_up_blocks,
                        gate_up_scales=w.gate_up_scales, down_blocks=w.down_blocks, down_scales=w.down_scales,
                        permuted=w.permuted), 7.0)
                if check_T == T or not kw.get("tiles"):
                    got = call(xs, ids_s, wts_s, w, kw).float()
                else:
                    got = call(x, ids, wts, w, kw)[:check_T].float()
                rel = ((got - ref).norm() / ref.norm()).item()
                if not rel < 2e-2:
                    bad.append(f"T={T} {name}: rel {rel:.3g}")
                # The grouped_mm path is for eager prefill only (not captured in graphs).
                us = time_us(lambda: call(x, ids, wts, w, kw), graph=T * k < 256 * E)
            except Exception as e:  # noqa: BLE001 -- a config Triton cannot build: report, go on
                print(f"T={T} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            gbs = touched * expert_bytes / us / 1e3
            rows.append({"name": name, "us": us, "rel": rel, "GB/s": gbs, "TFLOP/s": flops / us / 1e6,
                         "compile_s": time.time() - t0})
            print(f"T={T:5d} {name:34s} {us:9.1f} us  {gbs:6.0f} GB/s  {flops / us / 1e6:6.1f} TFLOP/s  "
                  f"rel {rel:.1e}", flush=True)
        rows.sort(key=lambda r: r["us"])
        results[str(T)] = {"touched_experts": touched, "rows": rows}
        d = next((r for r in rows if r["name"] == "default"), None)
        print(f"== T={T}: default {d['us'] if d else float('nan'):.1f} us; best: "
              + "; ".join(f"{r['name']} {r['us']:.1f}" for r in rows[:3]), flush=True)
    if args.gemv_sweep:
        # The small-batch GEMV's tile constants (moe_gemv._TILES_OVERRIDE, read at each call).
        from gptoss_engine.kernels import moe_gemv
        sweep = [(8, 8, 512, 1024, 4, True), (8, 8, 512, 1024, 4, False), (16, 16, 512, 512, 4, False),
                 (8, 8, 256, 512, 4, True), (8, 8, 256, 512, 4, False), (8, 8, 1024, 1024, 4, True),
                 (8, 8, 1024, 1024, 4, False), (4, 4, 512, 1024, 4, True), (4, 4, 512, 1024, 4, False),
                 (8, 8, 512, 1024, 2, True), (8, 8, 512, 1024, 8, True), (16, 16, 256, 512, 4, True),
                 (32, 32, 256, 256, 4, True), (8, 8, 512, 512, 4, True)]
        res = {}
        for T in (1, 2, 4, 8):
            ids, wts = routing(T, E, k, gen)
            x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
            rows = [(time_us(lambda: call(x, ids, wts, w, {}), graph=True), "default")]
            for c in sweep:
                moe_gemv._TILES_OVERRIDE = c
                rows.append((time_us(lambda: call(x, ids, wts, w, {}), graph=True), c))
            moe_gemv._TILES_OVERRIDE = None
            res[str(T)] = sweep_rows(f"gemv T={T} (default {moe_gemv._TILES})", rows)
        (args.out / "gemv_sweep.json").write_text(json.dumps(res))
    if args.mma_sweep:
        # The mma GEMV's warp arrangement (moe_gemv_mma._TILES_OVERRIDE: (WN, WK, U, prefetch) for
        # gate_up and for down), every pair count it might serve.
        from gptoss_engine.kernels import moe_gemv_mma
        cfgs = [(1, 4, 1, True), (1, 4, 1, False), (1, 4, 2, False), (1, 2, 2, False), (1, 2, 1, True),
                (1, 1, 1, True), (1, 1, 2, False), (2, 2, 1, True), (1, 8, 1, True)]
        res = {}
        for T in (1, 2, 4, 8, 16):
            ids, wts = routing(T, E, k, gen)
            x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
            rows = [(time_us(lambda: call(x, ids, wts, w, dict(gemv=True, gemv_mma=False)), graph=True), "fma gemv")]
            rows.append((time_us(lambda: call(x, ids, wts, w, dict(gemv=True, gemv_mma=True)), graph=True),
                         "default"))
            rows.append((time_us(lambda: call(x, ids, wts, w, dict(gemv=False)), graph=True), "grouped"))
            for c in cfgs:
                for which in ("both", "gate_up", "down") if c != moe_gemv_mma._TILES[0] else ("both",):
                    d0, d1 = moe_gemv_mma._TILES
                    moe_gemv_mma._TILES_OVERRIDE = {"both": (c, c), "gate_up": (c, d1), "down": (d0, c)}[which]
                    rows.append((time_us(lambda: call(x, ids, wts, w, dict(gemv=True, gemv_mma=True)), graph=True),
                                 f"{which} {c}"))
            moe_gemv_mma._TILES_OVERRIDE = None
            res[str(T)] = sweep_rows(f"mma gemv T={T} (default {moe_gemv_mma._TILES})", rows)
        (args.out / "mma_sweep.json").write_text(json.dumps(res))
        # Kernel durations at T = 1, eager, each form (the profiler's own view: launch gaps excluded).
        from torch.profiler import ProfilerActivity, profile
        ids, wts = routing(1, E, k, gen)
        x = torch.randn(1, H, generator=gen, device="cuda").to(torch.bfloat16)
        for name, kw in (("fma", dict(gemv=True, gemv_mma=False)), ("mma", dict(gemv=True, gemv_mma=True))):
            for _ in range(3):
                call(x, ids, wts, w, kw)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    call(x, ids, wts, w, kw)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=50)
            print(f"kernels T=1 {name} (20 calls):\n{table}", flush=True)
    if args.split_sweep:
        # Tiles.down lets the down kernel differ from gate_up: each kernel's tiles varied with the
        # other's at the default.
        res = {}
        for T in (int(t) for t in args.split_sweep.split(",")):
            ids, wts = routing(T, E, k, gen)
            x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
            default = _tiles(T * k, E, True)
            base = dataclasses.replace(default, down=None)
            # The default down tiles as the grid writes them (with gate_up's bm), to skip like base.
            down0 = dataclasses.replace(default.down or base, bm=base.bm)
            # (bn 32 and 256, 8 warps, and register caps of 96 or 128 lost at T = 64 and 256 for both
            # kernels: bench/results/decode_v14/split_sweep*.json.)
            grid = [dataclasses.replace(base, bn=n, stages=st) for n in (64, 128) for st in (3, 4)]
            grid += [dataclasses.replace(base, bn=n, bk=256) for n in (64, 128)]
            rows = [(time_us(lambda: call(x, ids, wts, w, {}), graph=True), "default")]
            ref = call(x, ids, wts, w, {}).float()
            for which in ("gate_up", "down"):
                for c in grid:
                    if c == (down0 if which == "down" else base):
                        continue
                    t = dataclasses.replace(base, down=c) if which == "down" else dataclasses.replace(c, down=down0)
                    try:
                        got = call(x, ids, wts, w, dict(tiles=t)).float()
                        if not ((got - ref).norm() / ref.norm()).item() < 1e-2:
                            bad.append(f"split sweep T={T} {which} {c}")
                        us = time_us(lambda: call(x, ids, wts, w, dict(tiles=t)), graph=True)
                    except Exception as e:  # noqa: BLE001 -- a config Triton cannot build (registers, smem)
                        print(f"T={T} {which} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    rows.append((us, f"{which} bn{c.bn} bk{c.bk} w{c.warps} st{c.stages}"))
            res[str(T)] = sweep_rows(f"split sweep T={T} (default {base})", rows)
        (args.out / "split_sweep.json").write_text(json.dumps(res))
    if args.token_sweep:
        # The token-grouped mma GEMV (moe_gemv_mma._gate_up_tok / _down_tok) against the per-pair mma
        # GEMV and the grouped kernel, routing included, each checked against the first's output.
        from gptoss_engine.kernels import moe_gemv_mma
        res = {}
        for T in (int(t) for t in args.token_sweep.split(",")):
            ids, wts = routing(T, E, k, gen)
            x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
            ref = call(x, ids, wts, w, dict(gemv=False)).float()
            forms = [("grouped", dict(gemv=False)), ("default", {}), ("tokens", dict(gemv_tokens=True))]
            if T * k <= 64:
                forms.append(("per-pair mma", dict(gemv=True, gemv_mma=True)))
            rows = []
            for name, kw in forms:
                rel = ((call(x, ids, wts, w, kw).float() - ref).norm() / ref.norm()).item()
                if not rel < 1e-2:
                    bad.append(f"token sweep T={T} {name}: rel {rel:.3g}")
                rows.append((time_us(lambda: call(x, ids, wts, w, kw), graph=True), name))
            # (WN, WK, U, prefetch) of both kernels, around the default (1, 4, 1, True).
            for tile in ((1, 2, 1, True), (2, 2, 1, True), (2, 4, 1, True), (4, 1, 1, True), (4, 2, 1, True),
                         (8, 1, 1, True), (1, 4, 1, False)):
                moe_gemv_mma._TOK_TILES_OVERRIDE = (tile, tile)
                rel = ((call(x, ids, wts, w, dict(gemv_tokens=True)).float() - ref).norm() / ref.norm()).item()
                if not rel < 1e-2:
                    bad.append(f"token sweep T={T} {tile}: rel {rel:.3g}")
                rows.append((time_us(lambda: call(x, ids, wts, w, dict(gemv_tokens=True)), graph=True),
                             f"tokens {tile}"))
            moe_gemv_mma._TOK_TILES_OVERRIDE = None
            res[str(T)] = sweep_rows(f"token sweep T={T} (E={E}, tiles {moe_gemv_mma._TOK_TILES})", rows)
        (args.out / f"token_sweep{args.tag}.json").write_text(json.dumps(res))
    if args.profile_tokens:
        from torch.profiler import ProfilerActivity, profile
        T = args.profile_tokens
        ids, wts = routing(T, E, k, gen)
        x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
        for name, kw in (("grouped_mm", dict(grouped_mm=True)), ("fused", dict(grouped_mm=False))):
            call(x, ids, wts, w, kw)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call(x, ids, wts, w, kw)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
            print(f"profile T={T} {name}:\n{table}")
            (args.out / f"moe_profile_{name}_{T}.txt").write_text(table)
    doc = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "commit": args.commit,
           "preset": args.preset, "torch": torch.__version__, "results": results, "parity_failures": bad}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"moe_kernels_{args.preset}{args.tag}.json").write_text(json.dumps(doc, indent=1))
    print("parity failures:", bad or "none")
    for T, r in results.items():
        best = r["rows"][:4]
        print(f"T={T}: " + " | ".join(f"{b['name']} {b['us']:.0f}us" for b in best))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
