"""A/B in one process: the token-grouped mma GEMV (new default) against the previous policy
(per-pair mma GEMV up to max(32, E/2) pairs, then the grouped kernel); decode steps at 1k context,
CUDA graph replays, 3 alternating rounds."""
import json, statistics, sys, gc
import torch
from bench.gpu_bench import BLOCK_SIZE, fast_random_model, time_ms, uniform_batch
from gptoss_engine.kernels import moe_mxfp4
from gptoss_engine.kernels.cuda_graphs import CudaGraphForward
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
out = {}
for name, batches in (("20b", (8, 16, 32)), ("120b", (8, 16, 32, 64))):
    config = ModelConfig.from_dict(preset(name))
    model = fast_random_model(config)
    E = config.num_local_experts
    max_blocks = -(-1040 // BLOCK_SIZE)
    bmax = max(batches)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), bmax * max_blocks, bmax * max_blocks, "cuda")
    for bs in batches:
        b = uniform_batch(bs, 1024, 1, max_blocks)
        times = {"old": [], "tokens": []}
        for rnd in range(3):
            for form in times:
                if form == "old":
                    moe_mxfp4.GEMV_MMA_MAX_PAIRS, moe_mxfp4.TOKENS_GEMV_MAX_ROWS = max(32, E // 2), 0
                else:
                    moe_mxfp4.GEMV_MMA_MAX_PAIRS, moe_mxfp4.TOKENS_GEMV_MAX_ROWS = 16, 4
                g = CudaGraphForward(model, kv, bs, max_blocks, buckets=[bs])
                times[form].append(time_ms(lambda: g(b, kv), warmup=3, iters=30))
                del g
        for form, ts in times.items():
            ms = statistics.median(ts)
            out[f"{name} b{bs} {form}"] = {"ms": ms, "tok_s": bs / ms * 1e3, "all": ts}
            print(name, bs, form, round(ms, 3), round(bs / ms * 1e3), [round(t, 3) for t in ts], flush=True)
    del model, kv
    gc.collect(); torch.cuda.empty_cache()
moe_mxfp4.GEMV_MMA_MAX_PAIRS, moe_mxfp4.TOKENS_GEMV_MAX_ROWS = 16, 4
json.dump(out, open(sys.argv[1], "w"), indent=1)
