"""One decode step's sampling: time and operator count (CPU or CUDA).

    python -m bench.sampler_bench [--device cpu|cuda] [--batch 1 8 64 256] [--out bench/results]

Sampler.launch + resolve on [batch, 201088] float32 logits (the gpt-oss vocabulary), for the
sampling mixes a server sees: greedy (what gpu_bench times), temperature 1 (the OpenAI API's
default, so what a chat request without `temperature` gets), temperature 1 with top_p 0.9 and
top_k 50, with top_p 0.9 alone (the OpenAI API has no top_k), and half the rows seeded. Reported: the median of timed steps, and the operators one
step runs (torch.profiler's count of aten ops; on CUDA each is roughly one kernel launch, so the
count is what a step pays in launches). Appends rows to <out>/sampler.md.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time

import torch

from bench import provenance

RESULTS = pathlib.Path(__file__).parent / "results"
VOCAB = 201088
MIXES = {
    "greedy": dict(temperature=0.0),
    "temperature 1": dict(temperature=1.0),
    "t 1, top_p 0.9, top_k 50": dict(temperature=1.0, top_p=0.9, top_k=50),
    "t 1, top_p 0.9": dict(temperature=1.0, top_p=0.9),
    "t 1, half seeded": dict(temperature=1.0),
}


def _requests(mix: str, batch: int):
    from gptoss_engine.sampling import SampleRequest
    from gptoss_engine.types import SamplingParams

    kw = MIXES[mix]
    return [SampleRequest(SamplingParams(**kw, seed=row if mix.endswith("seeded") and row % 2 else None), 5)
            for row in range(batch)]


def _ops(sampler, logits, requests) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sampler.launch(logits, requests).resolve()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampler_bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    p.add_argument("--draw", choices=["default", "torch", "both"], default="default",
                   help="torch: the CUDA draw through the torch operators instead of kernels/sample's one "
                        "launch (mix suffix ', torch draw'); both: each mix both ways, in turn")
    p.add_argument("--top-p", choices=["default", "select", "sort", "both"], default="default",
                   help="top-p without top-k by kernels/top_p's radix select (mix suffix ', select') or by the "
                        "torch sort (', sort'); both: those mixes both ways; default: sampling.TOP_P_RADIX_SELECT")
    args = p.parse_args(argv)

    from gptoss_engine import sampling
    from gptoss_engine.sampling import Sampler

    kernel_draw = sampling._gumbel_draw
    ways = {"default": [False], "torch": [True], "both": [False, True]}[args.draw]
    selects = {"default": [None], "select": [True], "sort": [False], "both": [True, False]}[args.top_p]

    default_select = sampling.TOP_P_RADIX_SELECT
    sampler = Sampler((200002, 200012), args.device)
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else provenance.machine()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for batch in args.batch:
        logits = torch.randn(batch, VOCAB, device=args.device) * 3
        for mix, torch_draw, select in ((m, t, o) for m in MIXES for t in ways
                                        for o in (selects if "top_p" in m and "top_k" not in m else [None])):
            sampling._gumbel_draw = (lambda: None) if torch_draw else kernel_draw  # type: ignore[assignment]
            sampling.TOP_P_RADIX_SELECT = default_select if select is None else select
            requests = _requests(mix, batch)
            label = mix + (", torch draw" if torch_draw else "") + {None: "", True: ", select", False: ", sort"}[select]
            sampler.launch(logits, requests).resolve()   # warm-up
            times = []
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                sampler.launch(logits, requests).resolve()
                sync()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            ops = _ops(sampler, logits, requests)
            print(f"batch {batch:4d}  {label:38s} {ms:9.2f} ms  {ops:6d} ops", flush=True)
            rows.append([datetime.date.today().isoformat(), machine, args.commit or provenance.commit(),
                         args.device, str(batch), label, f"{ms:.2f}", str(ops)])
    provenance.append_rows(args.out / "sampler.md", "One step's sampling (bench/sampler_bench.py): median ms, aten ops",
                           ["date", "machine", "commit", "device", "batch", "mix", "ms a step", "ops a step"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
