"""Host time of one engine step at large batch, with the model's forward stubbed out (CPU).

    python -m bench.host_step_bench [--batch 256] [--prompt 1000] [--output 1000] [--out bench/results]

On the GPU a decode step's host work (scheduling, building the batch, the sampler's Python side,
the engine's per-token bookkeeping) is not overlapped with the GPU: every millisecond here is a
millisecond of the 1000/1000 step (~25 ms at b256 on the H100). This measures that host work
alone: LLMEngine.generate over `--batch` requests, the forward replaced by a constant logits tensor
(32 columns, so the sampler's device work, an argmax, is negligible as on the GPU); prefix caching on, as in
gpu_bench's 1000/1000 run. Reports milliseconds
per step, split by wrapping the engine's own methods, and appends a row to <out>/host_step.md.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time

import torch

from bench import provenance
from bench.stub_engine import stub_engine

RESULTS = pathlib.Path(__file__).parent / "results"


def measure(batch: int, prompt: int, output: int) -> dict[str, float]:
    from gptoss_engine import gc_policy
    from gptoss_engine.types import SamplingParams

    engine, _ = stub_engine(batch, prompt, output)
    t = {"schedule": 0.0, "build": 0.0, "sample": 0.0}
    steps = {"all": 0, "decode": 0}
    runner, scheduler = engine.runner, engine.scheduler

    def timed(obj: object, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the wrapped method's own types
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            t[key] += time.perf_counter() - t0
            return out
        setattr(obj, name, wrapper)

    timed(scheduler, "schedule", "schedule")
    timed(runner, "build_batch", "build")
    timed(runner.sampler, "launch", "sample")
    launch = runner.launch

    def counted_launch(scheduled, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        steps["all"] += 1
        steps["decode"] += all(s.num_tokens == 1 for s in scheduled)
        return launch(scheduled, *args, **kwargs)
    runner.launch = counted_launch
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 200_000, (batch, prompt), generator=g).tolist()
    gc_before = gc_policy.settle_for_serving()   # as the worker daemons and gpu_bench run
    t0 = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_tokens=output, ignore_eos=True))
    wall = time.perf_counter() - t0
    gc_policy.undo(gc_before)
    if sum(len(r.token_ids) for r in results) != batch * output:
        raise RuntimeError("the engine produced the wrong number of tokens")
    n = steps["all"]
    rest = wall - sum(t.values())
    return {"steps": n, "decode_steps": steps["decode"], "wall_s": wall, "ms_per_step": wall / n * 1e3,
            **{f"{k}_ms": v / n * 1e3 for k, v in t.items()}, "rest_ms": rest / n * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_step_bench", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--output", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="whole runs; the fastest is reported")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    best = min((measure(args.batch, args.prompt, args.output) for _ in range(args.repeats)),
               key=lambda r: r["ms_per_step"])
    print(f"b{args.batch}, {args.prompt} in / {args.output} out: {best['steps']} steps ({best['decode_steps']} decode "
          f"only), host {best['ms_per_step']:.2f} ms a step = schedule {best['schedule_ms']:.2f} + build "
          f"{best['build_ms']:.2f} + sampler {best['sample_ms']:.2f} + engine bookkeeping {best['rest_ms']:.2f}")
    provenance.append_rows(
        args.out / "host_step.md", "Host time per engine step, forward stubbed (bench/host_step_bench.py)",
        ["date", "machine", "commit", "batch", "in/out", "steps", "ms/step", "schedule", "build", "sampler", "bookkeeping"],
        [[datetime.date.today().isoformat(), provenance.machine(), args.commit or provenance.commit(), args.batch,
          f"{args.prompt}/{args.output}", best["steps"], f"{best['ms_per_step']:.2f}", f"{best['schedule_ms']:.2f}",
          f"{best['build_ms']:.2f}", f"{best['sample_ms']:.2f}", f"{best['rest_ms']:.2f}"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
