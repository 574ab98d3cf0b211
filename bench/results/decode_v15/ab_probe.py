"""Whole-model decode A/B in one process (1k context, CUDA-graph replays, 3 rounds alternating the
forms), run from the repository root with PYTHONPATH=.:

    ab_probe.py policy OUT.json          the token-grouped GEMV (0fd81eb's policy) against the policy
                                         before (per-pair mma GEMV up to max(32, E/2) pairs, then the
                                         grouped kernel): 20b batch 8/16/32, 120b batch 8/16/32/64
    ab_probe.py tiles SWEEP.json OUT.json 
                                         20b batch 64/32/8 with the token-grouped kernels on the tile
                                         a token sweep (moe_kernel_bench --token-sweep) found fastest at
                                         T=64, and with it taking up to 8 rows an expert (batch 64)
    ab_probe.py router OUT.json          the post-attention add + norm + router in one launch
                                         (routing.add_rmsnorm_route) against add_rmsnorm then route:
                                         20b batch 1/8/64, 120b batch 1/8
"""
import ast, gc, json, statistics, sys
import torch
from bench.gpu_bench import BLOCK_SIZE, fast_random_model, time_ms, uniform_batch
from gptoss_engine import model as model_module
from gptoss_engine.kernels import moe_gemv_mma, moe_mxfp4
from gptoss_engine.kernels.cuda_graphs import CudaGraphForward
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset


def ab(name, batches, forms, out):
    """forms: {label: (GEMV_MMA_MAX_PAIRS, TOKENS_GEMV_MAX_ROWS, token tiles or None[, fused router])}."""
    config = ModelConfig.from_dict(preset(name))
    model = fast_random_model(config)
    max_blocks = -(-1040 // BLOCK_SIZE)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), max(batches) * max_blocks,
                          max(batches) * max_blocks, "cuda")
    for bs in batches:
        b = uniform_batch(bs, 1024, 1, max_blocks)
        times = {f: [] for f in forms}
        for _ in range(3):
            for f, (pairs, rows, tiles, *fused) in forms.items():
                moe_mxfp4.GEMV_MMA_MAX_PAIRS, moe_mxfp4.TOKENS_GEMV_MAX_ROWS = pairs, rows
                moe_gemv_mma._TOK_TILES_OVERRIDE = tiles
                model_module._add_rmsnorm_route = FUSED if fused == [] or fused[0] else (lambda: None)
                graph = CudaGraphForward(model, kv, bs, max_blocks, buckets=[bs])
                times[f].append(time_ms(lambda: graph(b, kv), warmup=3, iters=30))
        for f, ts in times.items():
            ms = statistics.median(ts)
            out[f"{name} b{bs} {f}"] = {"ms": ms, "tok_s": bs / ms * 1e3, "all": ts}
            print(name, bs, f, round(ms, 3), round(bs / ms * 1e3), [round(t, 3) for t in ts], flush=True)


FUSED = model_module._add_rmsnorm_route


def main() -> None:
    out: dict[str, object] = {}
    new = (moe_mxfp4.GEMV_MMA_MAX_PAIRS, moe_mxfp4.TOKENS_GEMV_MAX_ROWS, None)
    if sys.argv[1] == "router":
        for name, batches in (("20b", (1, 8, 64)), ("120b", (1, 8))):
            ab(name, batches, {"two launches": (*new, False), "fused": (*new, True)}, out)
            gc.collect()
            torch.cuda.empty_cache()
    elif sys.argv[1] == "policy":
        for name, batches, experts in (("20b", (8, 16, 32), 32), ("120b", (8, 16, 32, 64), 128)):
            ab(name, batches, {"old": (max(32, experts // 2), 0, None), "tokens": new}, out)
            gc.collect()
            torch.cuda.empty_cache()
    else:
        sweep = json.load(open(sys.argv[2]))
        name = min((r for r in sweep["64"] if str(r[1]).startswith("tokens")), key=lambda r: r[0])[1]
        t64 = moe_gemv_mma._TOK_TILES[0] if name == "tokens" else ast.literal_eval(name[len("tokens "):])
        out["t64"] = t64
        print("fastest token tile at T=64:", t64, flush=True)
        pairs, rows, _ = new
        ab("20b", (64, 32, 8), {"default": new, "t64 rows8": (pairs, 8, (t64, t64)),
                                "t64": (pairs, rows, (t64, t64))}, out)
    json.dump(out, open(sys.argv[-1], "w"), indent=1)


if __name__ == "__main__":
    main()
