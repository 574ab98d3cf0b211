"""Does a prefill wait on the host? Times when the host has queued a whole prefill against when the
GPU finishes it, and counts host syncs inside it (torch.cuda sync debug mode), for 1k and 8k prompts
with the packed experts and then with bf16 expert copies (20b). Appends rows to
bench/results/prefill_host_probe.md.

    python3 -m bench.prefill_host_probe --commit <sha> --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import time
import warnings

import torch

from bench import provenance
from bench.gpu_bench import BLOCK_SIZE, RESULTS, fast_random_model, uniform_batch
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_host_probe needs a CUDA GPU")
        return 2
    config = ModelConfig.from_dict(preset("20b"))
    model = fast_random_model(config)
    blocks = 8193 // BLOCK_SIZE + 1
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), blocks, blocks, "cuda")
    rows = []
    for experts in ("mxfp4", "bf16 copies"):
        if experts == "bf16 copies":
            model.keep_bf16_experts()
        for tokens in (1024, 8192):
            batch = uniform_batch(1, 0, tokens, blocks)
            for _ in range(3):
                model(batch, kv)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(1)   # warn on every host sync
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                model(batch, kv)
                queued = time.perf_counter() - t0
                torch.cuda.synchronize()
                done = time.perf_counter() - t0
            torch.cuda.set_sync_debug_mode(0)
            print(f"{experts} {tokens}: queued after {queued * 1e3:.1f} ms, done after {done * 1e3:.1f} ms, "
                  f"{len(caught)} host syncs {sorted({str(w.message)[:100] for w in caught})}", flush=True)
            rows.append([datetime.date.today().isoformat(), torch.cuda.get_device_name(),
                         args.commit or provenance.commit(), experts, tokens, f"{queued * 1e3:.1f}",
                         f"{done * 1e3:.1f}", len(caught)])
    provenance.append_rows(args.out / "prefill_host_probe.md",
                           "Prefill: host queueing time against GPU completion (bench/prefill_host_probe.py)",
                           ["date", "GPU", "commit", "experts", "tokens", "queued ms", "done ms", "host syncs"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
