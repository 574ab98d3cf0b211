"""Where one stream's decode step goes through LLMEngine on the GPU: a generate under the torch
profiler, then the GPU's busy time against its span per token and the idle gaps between kernels,
summed by the pair of kernels around them (the graph replay's own kernels and what the engine adds
between replays: input copies, the draw, the token's read-back).

    python3 -m bench.engine_stream_probe --preset 20b --tokens 64 --out $OUT/engine_stream_20b.txt
"""
from __future__ import annotations

import argparse
import collections
import pathlib

import torch

from bench.gpu_bench import BLOCK_SIZE, fast_random_model
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="20b")
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", type=pathlib.Path, required=True)
    a = p.parse_args(argv)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from gptoss_engine.config import EngineConfig
    from gptoss_engine.engine import LLMEngine
    from gptoss_engine.types import SamplingParams
    model = fast_random_model(ModelConfig.from_dict(preset(a.preset)))
    config = EngineConfig(model_path="random-weights", device="cuda", block_size=BLOCK_SIZE, max_batch_size=1,
                          max_num_tokens=8192, max_model_len=a.prompt + a.tokens + BLOCK_SIZE)
    engine = LLMEngine(config, model=model)
    prompt = torch.randint(0, 200000, (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=a.tokens, ignore_eos=True)
    engine.generate([prompt], params)      # compile, capture
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.generate([prompt], params)
        torch.cuda.synchronize()
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    # Decode steps only: the prompt's prefill runs at the timeline's start, so keep its second half.
    ks = ks[len(ks) // 2:]
    busy = sum(e - s for s, e, _ in ks)
    span = ks[-1][1] - ks[0][0]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for s, e, n in ks:
        by_name[n[:70]].append(e - s)
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for x, y in zip(ks, ks[1:]):
        gaps[(x[2][:50], y[2][:50])].append(y[0] - x[1])
    # Steps: one per lm_head-like GEMM launch is model-specific; count the most frequent kernel that
    # runs once a step instead: the one whose count is smallest among the frequent ones.
    steps = max(1, min(len(v) for v in by_name.values() if len(v) >= 8))
    lines = [f"{a.preset}, one stream, {a.tokens} tokens after a {a.prompt}-token prompt; second half of the "
             f"timeline: {len(ks)} kernels, ~{steps} steps",
             f"span {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f} ms; a step: span "
             f"{span / steps:.1f} us, busy {busy / steps:.1f} us, idle {(span - busy) / steps:.1f} us",
             "", "kernels (us a step, count a step, name):"]
    for n, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {sum(v) / steps:9.1f} {len(v) / steps:6.2f}  {n}")
    lines += ["", "idle gaps summed by the kernels around them (us a step, count a step):"]
    for (x, y), v in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:25]:
        lines.append(f"  {sum(v) / steps:9.1f} {len(v) / steps:6.2f}  {x} -> {y}")
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
