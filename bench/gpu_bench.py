"""`gptoss bench`: GPU benchmark of the engine's model with random weights of the real shapes.

Measures prefill tok/s (1k, 8k tokens), decode tok/s at batch 1/8/64/256 (1k context, CUDA-graph
replays one at a time and back to back (decode_<b>_steady), and eager), decode tok/s of 1 and 64
streams through LLMEngine (decode_1_engine, decode_64_engine), a 1000-in/1000-out max-throughput
figure, and for the 20b shape HF transformers' GptOssForCausalLM (bf16, eager, random weights) as
the peer. Writes bench/results/gpu_<preset>.json, a PNG (ours vs peer vs floor) and appends a row to
bench/results/gpu.md.

The 1000/1000 figure runs through the real scheduler: LLMEngine (chunked prefill, block manager,
CUDA-graph decode via the model runner, sampling) generating 1000 tokens (ignore_eos) for each of
256 random 1000-token prompts; output tok/s = 256,000 / wall time of `generate`.
`--profile` writes torch.profiler kernel tables (CUDA time) of one decode step and one prefill.

Weights are random MXFP4 codes and scales drawn on the GPU (no files, seconds even for 120b):
for timing only the shapes and a spread routing matter.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import time
from typing import Callable

import torch

from bench import provenance
from gptoss_engine import gc_policy
from gptoss_engine.checkpoint import finalize_model, place_tensor, tensor_specs
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
from gptoss_engine.step_batch import StepBatch

RESULTS = pathlib.Path(__file__).parent / "results"
BLOCK_SIZE = 16
# Derived floors (docs/PERF_NOTES.md, /work/shared/notes/gpt-oss.md), H100, tok/s.
FLOORS = {"20b": {"decode_1": 809, "decode_8": 2571, "decode_64": 13321, "decode_256": 38689,
                  "prefill_8192": 116000},
          "120b": {"decode_1": 600, "decode_8": 1402, "decode_64": 3265, "decode_256": 10248,
                   "prefill_8192": 77000}}
STEADY = 20   # back-to-back replays a timing of decode_{bs}_steady
GOALS = {"20b": {"decode_1": 560, "decode_64": 8000, "prefill_8192": 70000, "throughput_1000_1000": 12000},
         "120b": {"decode_1": 400}}


@torch.no_grad()
def fast_random_model(config: ModelConfig, seed: int = 0) -> GptOssForCausalLM:
    """Packed-MXFP4 model on CUDA with random bytes as expert codes (scales near 2^-6) and small
    normal bf16 elsewhere; norms at 1."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.device("meta"):
        model = GptOssForCausalLM(config, packed_experts=True)
    for spec in tensor_specs(config, packed=True):
        if spec.dtype == torch.uint8:
            lo, hi = (119, 123) if spec.name.endswith("_scales") else (0, 256)
            value = torch.randint(lo, hi, spec.shape, generator=g, device="cuda", dtype=torch.uint8)
        elif "norm" in spec.name:
            value = torch.ones(spec.shape, device="cuda")
        else:
            value = torch.randn(spec.shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        place_tensor(model, spec.name, value, "cuda", torch.bfloat16)
    return finalize_model(model, "cuda")


def uniform_batch(num_seqs: int, context: int, new: int, max_blocks: int, device: str = "cuda") -> StepBatch:
    """num_seqs sequences with `context` cached tokens and `new` tokens this step; sequence i owns
    blocks i*max_blocks .. in both pools (one block id space, the pools are sized alike)."""
    seq_len = context + new
    if -(-seq_len // BLOCK_SIZE) > max_blocks:
        raise ValueError(f"{seq_len} tokens need more than {max_blocks} blocks")
    i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
    tables = (torch.arange(num_seqs, **i32)[:, None] * max_blocks + torch.arange(max_blocks, **i32)[None, :])
    pos = (context + torch.arange(new, **i64)).repeat(num_seqs)
    seq = torch.arange(num_seqs, **i64).repeat_interleave(new)
    slots = (seq * max_blocks + pos // BLOCK_SIZE) * BLOCK_SIZE + pos % BLOCK_SIZE
    qsl = torch.arange(num_seqs + 1, **i32) * new
    return StepBatch(input_ids=torch.randint(0, 200000, (num_seqs * new,), **i64), positions=pos,
                     query_start_loc=qsl, seq_lens=torch.full((num_seqs,), seq_len, **i32),
                     full_block_tables=tables, swa_block_tables=tables.clone(),
                     full_slot_mapping=slots, swa_slot_mapping=slots.clone(),
                     logits_indices=(qsl[1:] - 1).long(), max_query_len=new, max_seq_len=seq_len)


def time_ms(fn: Callable[[], object], warmup: int = 2, iters: int = 10) -> float:
    """Median of `iters` CUDA-event-timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def back_to_back_ms(step: Callable[[], object]) -> float:
    """ms a step of STEADY calls of `step` between one pair of events (median of 5): a server's steps
    follow each other with no host sync between, so this leaves out the wait of an idle GPU for the
    host's launches that a call timed alone pays."""
    return time_ms(lambda: [step() for _ in range(STEADY)], iters=5) / STEADY


def kernel_timeline(prof: object, top: int = 8) -> str:
    """Where a profiled stretch left the GPU idle: the span from the first kernel's start to the last
    one's end against the kernels' summed time, and the largest gaps between consecutive kernels
    (one stream: kernels do not overlap)."""
    from torch.autograd import DeviceType
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()  # type: ignore[attr-defined]
                if e.device_type == DeviceType.CUDA)
    if not ks:
        return "no kernels recorded\n"
    busy = sum(end - start for start, end, _ in ks)
    span = ks[-1][1] - ks[0][0]
    gaps = sorted(((b[0] - a[1], a[2], b[2]) for a, b in zip(ks, ks[1:])), reverse=True)
    lines = [f"kernels: {len(ks)}, span {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f} ms "
             f"({sum(1 for g in gaps if g[0] > 2)} gaps > 2 us)"]
    lines += [f"  gap {g:8.1f} us after {a[:60]} before {b[:60]}" for g, a, b in gaps[:top]]
    return "\n".join(lines) + "\n"


def profile(model: GptOssForCausalLM, kv: KVCache, graphs: Callable[[StepBatch, KVCache], torch.Tensor],
            max_blocks: int, blocks: int, out: pathlib.Path, log: Callable[[str], None]) -> None:
    """Kernel tables (sorted by CUDA time) of decode b1/b64 at 1k context (eager and graph
    replay) and an 8k prefill, written to out/profile_*.txt."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    out.mkdir(parents=True, exist_ok=True)
    cases = {"decode_b1_eager": (lambda b: model(b, kv), uniform_batch(1, 1024, 1, max_blocks)),
             "decode_b1_graph": (lambda b: graphs(b, kv), uniform_batch(1, 1024, 1, max_blocks)),
             "decode_b64_graph": (lambda b: graphs(b, kv), uniform_batch(64, 1024, 1, max_blocks)),
             "prefill_8k": (lambda b: model(b, kv), uniform_batch(1, 0, 8192, blocks))}
    for case, (fn, b) in cases.items():
        fn(b)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            fn(b)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        table += "\n" + kernel_timeline(prof)
        (out / f"profile_{case}.txt").write_text(table)
        log(f"profile {case}:\n{table[:4000]}")


class _StepTimers:
    """Where the 1000/1000 wall time goes: launching steps (batch build, forward and draws queued),
    waiting for a step's tokens (the read-back: with overlap scheduling, the next step is queued
    before it), the scheduler, and the rest (engine bookkeeping per token). Wraps the engine's own
    objects' methods; counts decode-only steps (graph replays)."""

    def __init__(self, engine: object) -> None:
        self.t = {"launch": 0.0, "wait": 0.0, "schedule": 0.0}
        self.steps = self.decode_steps = self.max_batch = 0
        runner, sched = engine.runner, engine.scheduler  # type: ignore[attr-defined]
        launch, schedule = runner.launch, sched.schedule

        def timed_launch(scheduled, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - the wrapped method's types
            t0 = time.perf_counter()
            step = launch(scheduled, *args, **kwargs)
            self.t["launch"] += time.perf_counter() - t0
            self.steps += 1
            self.decode_steps += all(s.num_tokens == 1 for s in scheduled)
            self.max_batch = max(self.max_batch, len(scheduled))
            resolve = step.resolve

            def timed_resolve():  # noqa: ANN202
                t1 = time.perf_counter()
                out = resolve()
                self.t["wait"] += time.perf_counter() - t1
                return out
            step.resolve = timed_resolve
            return step

        def timed_schedule():  # noqa: ANN202
            t0 = time.perf_counter()
            out = schedule()
            self.t["schedule"] += time.perf_counter() - t0
            return out

        runner.launch, sched.schedule = timed_launch, timed_schedule

    def report(self, wall: float) -> str:
        rest = wall - sum(self.t.values())
        return (f"1000/1000 time: {self.steps} steps ({self.decode_steps} decode-only, at most {self.max_batch} "
                f"sequences a step); launch (build + forward + draws queued) {self.t['launch']:.1f} s, waiting for "
                f"tokens {self.t['wait']:.1f} s, scheduler {self.t['schedule']:.1f} s, engine/generate bookkeeping "
                f"{rest:.1f} s of {wall:.1f} s")


def throughput_engine(model: GptOssForCausalLM, num_requests: int, prompt_len: int, output_len: int,
                      log: Callable[[str], None], overlap: bool = True, *, results_dir: pathlib.Path = RESULTS,
                      commit: str = "unknown", preset_name: str = "?", temperature: float = 0.0) -> float:
    """Output tok/s of LLMEngine.generate on num_requests random prompts, each run to output_len
    tokens; overlap: the engine's overlap scheduler (on by default on CUDA); temperature > 0 draws
    every token (the OpenAI API's default is 1) instead of taking the argmax."""
    from gptoss_engine.config import EngineConfig
    from gptoss_engine.engine import LLMEngine
    from gptoss_engine.types import SamplingParams
    config = EngineConfig(model_path="random-weights", device="cuda", block_size=BLOCK_SIZE,
                          max_batch_size=num_requests, max_num_tokens=8192,
                          max_model_len=prompt_len + output_len + BLOCK_SIZE, overlap_scheduler=overlap)
    gc.collect()
    torch.cuda.empty_cache()  # the KV pool is sized from free memory: cached blocks would shrink it
    engine = LLMEngine(config, model=model)
    kv = engine.runner.kv_cache
    log(f"1000/1000 with {num_requests} requests: KV pools {kv.num_full_blocks} full + {kv.num_swa_blocks} sliding "
        f"blocks of {BLOCK_SIZE} tokens (full-attention room for {kv.num_full_blocks * BLOCK_SIZE} tokens)")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 200000, (num_requests, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=temperature)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # compile + capture b2
    gc_before = gc_policy.settle_for_serving()   # as the worker daemons run
    timed = _StepTimers(engine)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    log(timed.report(wall))
    produced = sum(len(r.token_ids) for r in results)
    if produced != num_requests * output_len:
        raise RuntimeError(f"engine produced {produced} tokens, expected {num_requests * output_len}")
    provenance.append_rows(
        results_dir / "throughput.md", "1000/1000 through LLMEngine by concurrency (bench/gpu_bench.py)",
        ["date", "GPU", "commit", "preset", "requests", "overlap scheduler", "output tok/s", "steps", "wall s"],
        [[datetime.date.today().isoformat(), torch.cuda.get_device_name(), commit, preset_name, num_requests,
          ("on" if overlap else "off") + (f" (temperature {temperature:g})" if temperature else ""),
          f"{produced / wall:.0f}", timed.steps, f"{wall:.1f}"]])
    log(f"1000/1000 through LLMEngine (overlap {'on' if overlap else 'off'}): {num_requests} requests x {prompt_len} in / {output_len} out in "
        f"{wall:.1f} s -> {produced / wall:.0f} output tok/s ({(produced + num_requests * prompt_len) / wall:.0f} "
        f"total tok/s)")
    del engine
    gc_policy.undo(gc_before)
    return produced / wall


def engine_streams(model: GptOssForCausalLM, log: Callable[[str], None], streams: int = 1, prompt_len: int = 1000,
                   output_len: int = 1000) -> float:
    """Decode tok/s of `streams` concurrent requests through LLMEngine (scheduler, overlap scheduling,
    the CUDA graph of that batch, the greedy draw, the host's work a step): a generate to output_len
    tokens each less one to a single token each (the same prefills), over output_len - 1 steps. Each
    is timed twice, the faster kept. The graph-replay figures time one step at a time from the host and
    so include the host's input copies and the graph launch before every step, which the engine
    overlaps with the step before. The contexts grow from prompt_len to prompt_len + output_len (the
    replay figures hold 1k); the prompts' prefill chunks (8192 tokens a step) precede the decode."""
    from gptoss_engine.config import EngineConfig
    from gptoss_engine.engine import LLMEngine
    from gptoss_engine.types import SamplingParams
    config = EngineConfig(model_path="random-weights", device="cuda", block_size=BLOCK_SIZE, max_batch_size=streams,
                          max_num_tokens=8192, max_model_len=prompt_len + output_len + BLOCK_SIZE)
    gc.collect()
    torch.cuda.empty_cache()
    engine = LLMEngine(config, model=model)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 200000, (streams, prompt_len), generator=g).tolist()
    engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))   # compile + capture this batch
    gc_before = gc_policy.settle_for_serving()   # as the worker daemons run
    best: dict[int, float] = {}
    for n in (1, output_len):
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            if any(len(o.token_ids) != n for o in out):
                raise RuntimeError(f"engine produced {[len(o.token_ids) for o in out]} tokens, expected {n} each")
            best[n] = min(best.get(n, wall), wall)
    rate = streams * (output_len - 1) / (best[output_len] - best[1])
    log(f"{streams} stream(s) through LLMEngine: {prompt_len} in, {output_len} out each in {best[output_len]:.3f} s, "
        f"one token each in {best[1]:.3f} s -> {rate:.0f} decode tok/s ({1e3 * streams / rate:.3f} ms a step)")
    del engine
    gc_policy.undo(gc_before)
    gc.collect()
    torch.cuda.empty_cache()
    return rate


def bench_ours(name: str, max_batch: int, max_context: int, log: Callable[[str], None],
               profile_dir: pathlib.Path | None = None, throughput_requests: tuple[int, ...] = (1024,),
               overlap_modes: tuple[bool, ...] = (True,), out: pathlib.Path = RESULTS,
               commit: str = "unknown", temperature: float = 0.0) -> dict[str, float]:
    from gptoss_engine.kernels.cuda_graphs import CudaGraphForward  # needs Triton: imported only on the GPU path
    config = ModelConfig.from_dict(preset(name))
    t0 = time.time()
    model = fast_random_model(config)
    log(f"{name}: model built in {time.time() - t0:.1f}s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    max_blocks = -(-max_context // BLOCK_SIZE)
    blocks = max(max_batch * max_blocks, 8192 // BLOCK_SIZE + 1)
    kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), blocks, blocks, "cuda")
    r: dict[str, float] = {}
    for tokens in (1024, 8192):
        b = uniform_batch(1, 0, tokens, blocks)
        # Warm-up 3: the first prefills after the build run below full clocks (1k: 37.3 ms at f0e5066
        # here against 33.4 in prefill_bench's rounds, the same code).
        ms = time_ms(lambda: model(b, kv), warmup=3, iters=10)
        r[f"prefill_{tokens}"] = tokens / ms * 1e3
        log(f"{name}: prefill {tokens}: {ms:.2f} ms = {r[f'prefill_{tokens}']:.0f} tok/s")
    graphs = CudaGraphForward(model, kv, max_batch, max_blocks)
    for bs in (1, 8, 64, 256):
        if bs > max_batch:
            continue
        b = uniform_batch(bs, 1024, 1, max_blocks)
        eager = time_ms(lambda: model(b, kv))
        replay = time_ms(lambda: graphs(b, kv), iters=20)
        steady = back_to_back_ms(lambda: graphs(b, kv))   # the headline decode_{bs} stays the single replay
        r[f"decode_{bs}"] = bs / replay * 1e3
        r[f"decode_{bs}_steady"] = bs / steady * 1e3
        r[f"decode_{bs}_eager"] = bs / eager * 1e3
        log(f"{name}: decode b={bs} ctx=1k: graph {replay:.2f} ms = {r[f'decode_{bs}']:.0f} tok/s; "
            f"{STEADY} replays back to back {steady:.3f} ms a step = {r[f'decode_{bs}_steady']:.0f} tok/s; "
            f"eager {eager:.2f} ms")
    if profile_dir is not None:
        profile(model, kv, graphs, max_blocks, blocks, profile_dir, log)
    del graphs, kv
    if max_context >= 2048:
        for streams in (1, 64):
            if streams <= max_batch:
                r[f"decode_{streams}_engine"] = engine_streams(model, log, streams)
        for n in throughput_requests:
            for overlap in overlap_modes:
                key = f"throughput_1000_1000_x{n}" + ("" if overlap else "_no_overlap")
                try:
                    r[key] = throughput_engine(model, n, 1000, 1000, log, overlap, results_dir=out,
                                               commit=commit, preset_name=name)
                    if temperature:   # the same run drawing its tokens, beside the greedy one
                        r[key + f"_t{temperature:g}"] = throughput_engine(
                            model, n, 1000, 1000, log, overlap, results_dir=out, commit=commit, preset_name=name,
                            temperature=temperature)
                except torch.cuda.OutOfMemoryError as e:  # a larger concurrency may not fit: keep the others
                    log(f"1000/1000 with {n} requests: out of memory ({e})")
                    gc.collect()
                    torch.cuda.empty_cache()
        # The table's max-throughput figure: the best concurrency, with the engine's defaults.
        best = max((n for n in throughput_requests if f"throughput_1000_1000_x{n}" in r),
                   key=lambda n: r[f"throughput_1000_1000_x{n}"], default=None)
        if best is not None:
            r["throughput_1000_1000"] = r[f"throughput_1000_1000_x{best}"]
            r["throughput_1000_1000_requests"] = best
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return r


def bench_hf_peer(name: str, log: Callable[[str], None]) -> dict[str, float]:
    """HF transformers GptOssForCausalLM, bf16, eager, random weights of the same shape."""
    from transformers import GptOssConfig, GptOssForCausalLM as HFModel
    cfg = GptOssConfig(**{k: v for k, v in preset(name).items() if k not in ("architectures", "model_type")})
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = HFModel(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    r: dict[str, float] = {}
    with torch.no_grad():
        for tokens in (1024, 8192):
            ids = torch.randint(0, 200000, (1, tokens), device="cuda")
            ms = time_ms(lambda: hf(ids, use_cache=False, logits_to_keep=1), warmup=1, iters=3)
            r[f"prefill_{tokens}"] = tokens / ms * 1e3
            log(f"hf {name}: prefill {tokens}: {ms:.1f} ms = {r[f'prefill_{tokens}']:.0f} tok/s")
        for bs in (1, 8, 64):
            ids = torch.randint(0, 200000, (bs, 128), device="cuda")
            out = hf(ids, use_cache=True, logits_to_keep=1)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

            def step() -> None:
                nonlocal nxt
                nxt = hf(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            ms = time_ms(step, warmup=2, iters=8)
            r[f"decode_{bs}"] = bs / ms * 1e3
            log(f"hf {name}: decode b={bs} ctx~128: {ms:.1f} ms = {r[f'decode_{bs}']:.0f} tok/s")
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return r


def plot(path: pathlib.Path, name: str, ours: dict[str, float], peer: dict[str, float], gpu: str) -> None:
    """The PNG beside the JSON (also redrawn from a results JSON on a machine without a GPU)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("prefill_1024", "prefill_8192", "decode_1", "decode_8", "decode_64", "decode_256",
                        "throughput_1000_1000") if k in ours]
    xs = range(len(keys))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.27
    ax.bar([x - w for x in xs], [ours[k] for k in keys], w, label="ours")
    ax.bar(list(xs), [peer.get(k, 0) for k in keys], w, label="HF transformers (eager)")
    ax.bar([x + w for x in xs], [FLOORS.get(name, {}).get(k, 0) for k in keys], w, label="floor (derived)")
    ax.set_xticks(list(xs), keys, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"gpt-oss-{name} shape, {gpu}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptoss bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["20b", "120b"], default="20b")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--no-peer", action="store_true", help="skip HF transformers")
    p.add_argument("--throughput-requests", default="1024",
                   help="concurrent requests of the 1000/1000 run(s), comma-separated (the engine's own batch cap); "
                        "each goes to the JSON as throughput_1000_1000_x<N>, the best to the table (with its N)")
    p.add_argument("--overlap", choices=["on", "off", "both"], default="on",
                   help="the engine's overlap scheduler in the 1000/1000 runs (off: key suffix _no_overlap)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="also run each 1000/1000 drawing its tokens at this temperature (key suffix _t<T>; "
                        "the table keeps the greedy figure)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None, help="commit id to record (default: git rev-parse HEAD)")
    p.add_argument("--profile", type=pathlib.Path, default=None, help="write kernel tables to this folder")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gptoss bench needs a CUDA GPU")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    ours = bench_ours(args.preset, args.max_batch, args.max_context, log, args.profile,
                      tuple(int(n) for n in args.throughput_requests.split(",")),
                      {"on": (True,), "off": (False,), "both": (True, False)}[args.overlap],
                      args.out, args.commit or provenance.commit(), args.temperature)
    peer = {} if args.no_peer or args.preset != "20b" else bench_hf_peer(args.preset, log)
    gpu = torch.cuda.get_device_name()
    commit = args.commit or provenance.commit()
    date = datetime.date.today().isoformat()
    doc = {"date": date, "gpu": gpu, "commit": commit, "preset": args.preset, "torch": torch.__version__,
           "ours": ours, "hf_peer": peer, "floors": FLOORS.get(args.preset, {}), "goals": GOALS.get(args.preset, {})}
    (args.out / f"gpu_{args.preset}.json").write_text(json.dumps(doc, indent=2))
    plot(args.out / f"gpu_{args.preset}.png", args.preset, ours, peer, gpu)
    md = args.out / "gpu.md"
    if not md.exists():
        md.write_text("| date | GPU | commit | preset | prefill 1k | prefill 8k | decode b1 | b8 | b64 | b256 "
                      "| 1000/1000 (LLMEngine, @requests; 256 where none) | HF decode b1 | HF prefill 8k |\n|" + "---|" * 13 + "\n")
    f = lambda k, d=ours: f"{d[k]:.0f}" if k in d else "-"  # noqa: E731
    n = ours.get("throughput_1000_1000_requests")
    tput_at = f" @{n:.0f}" if n else ""
    with md.open("a") as fh:
        fh.write(f"| {date} | {gpu} | {commit} | {args.preset} | {f('prefill_1024')} | {f('prefill_8192')} | "
                 f"{f('decode_1')} | {f('decode_8')} | {f('decode_64')} | {f('decode_256')} | "
                 f"{f('throughput_1000_1000')}{tput_at} | {f('decode_1', peer)} | {f('prefill_8192', peer)} |\n")
    log(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
