"""What serving over gRPC costs the engine thread, with the GPU simulated (CPU only).

    python -m bench.serve_overhead_bench [--batch 256] [--gpu-ms 20] [--output 200] [--out bench/results]

The decode worker's engine thread and its asyncio loop (gRPC streams, one message per token per
request) share the GIL. On the GPU the engine thread waits for each step's results with the GIL
released; here the stubbed forward returns constant logits at once and the sampler, where the
host waits for the GPU, sleeps until `--gpu-ms` after the launch (also without the GIL), so the
host side of every step is real and the device side is a fixed wait.

The simulated GPU runs queued steps back to back, so the overlap scheduler (launch step N+1,
then read back step N) can hide the host's work as on the device. Runs over the same engine
settings: `direct` (LLMEngine.generate in this process, nobody streaming), without and with the
overlap scheduler; `grpc, ...` (the real DecodeServicer on a real gRPC server in this process, a
client process streaming --batch concurrent Generate calls) with the overlap scheduler (CUDA's
default), and without it with a step's results handed to the loop at the next launch or at the end
of each step. Reported: steps per second, the host milliseconds a step beyond the simulated GPU
time (0 when the host's work is fully hidden behind it), and for `grpc`
the tokens the client received per second and per message (above 1 when the decode worker joined
tokens that queued behind a write). Appends rows to <out>/serve_overhead.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import sys
import time

import torch

from bench import provenance
from bench.stub_engine import stub_engine

RESULTS = pathlib.Path(__file__).parent / "results"
PROMPT = 64


def _engine(batch: int, output: int, gpu_ms: float, steps: list[float], overlap: bool):
    engine, logits = stub_engine(batch, PROMPT, output, overlap)
    gpu_free_at = [0.0]
    sampler = engine.runner.sampler
    launch = sampler.launch

    def forward(step, kv):  # noqa: ANN001, ANN202 - StepBatch, KVCache
        # The "GPU" runs queued steps back to back: this one finishes gpu_ms after the last one
        # or after now, whichever is later.
        gpu_free_at[0] = max(gpu_free_at[0], time.perf_counter()) + gpu_ms / 1e3
        return logits[:step.logits_indices.numel()]

    def timed_launch(picked, requests):  # noqa: ANN001, ANN202
        sampled, done_at = launch(picked, requests), gpu_free_at[0]
        resolve = sampled.resolve

        def wait_then_resolve():  # noqa: ANN202
            # Reading the draws back is where the host waits for the GPU (without the GIL).
            time.sleep(max(0.0, done_at - time.perf_counter()))
            steps.append(time.perf_counter())
            return resolve()
        sampled.resolve = wait_then_resolve
        return sampled
    engine.runner.forward_fn, sampler.launch = forward, timed_launch
    return engine


def _summary(steps: list[float], gpu_ms: float) -> dict:
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    gaps = gaps[len(gaps) // 4:]   # steady state: past the prompts' prefill and ramp-up
    per_step = sum(gaps) / len(gaps)
    return {"steps_per_s": 1 / per_step, "host_ms_per_step": per_step * 1e3 - gpu_ms}


def run_direct(batch: int, output: int, gpu_ms: float, overlap: bool) -> dict:
    from gptoss_engine import gc_policy
    from gptoss_engine.types import SamplingParams
    steps: list[float] = []
    engine = _engine(batch, output, gpu_ms, steps, overlap)
    prompts = [[(i * 7 + j) % 1000 + 1 for j in range(PROMPT)] for i in range(batch)]
    before = gc_policy.settle_for_serving()
    engine.generate(prompts, SamplingParams(max_tokens=output, ignore_eos=True))
    gc_policy.undo(before)
    return _summary(steps, gpu_ms)


async def _serve_grpc(batch: int, output: int, gpu_ms: float, overlap: bool, publish_at_launch: bool) -> dict:
    from decode_svc.servicer import DecodeServicer
    from gptoss_engine import gc_policy
    from gptoss_engine.async_engine import AsyncEngine
    from gptoss_pb.v1 import decode_pb2_grpc
    from svc_common.args import WorkerConfig
    from svc_common.context import WorkerContext
    from svc_common.convert import layout_to_pb
    from svc_common.server import GrpcServer, ServiceSpec

    steps: list[float] = []
    engine = AsyncEngine(_engine(batch, output, gpu_ms, steps, overlap), publish_at_launch=publish_at_launch)
    await engine.start()
    cfg = WorkerConfig(model_path="random-tiny", served_model_name="bench", disaggregation_mode="aggregated")
    ctx = WorkerContext(cfg, engine, layout_to_pb(engine.layout, engine.model_fingerprint), 1, None, None, "")
    server = GrpcServer([ServiceSpec("gptoss_pb.v1.Decode", DecodeServicer(ctx), decode_pb2_grpc.add_DecodeServicer_to_server)],
                        "127.0.0.1", 0)
    await server.start()
    before = gc_policy.settle_for_serving()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.serve_overhead_bench", "--client", f"127.0.0.1:{server.port}",
        "--batch", str(batch), "--output", str(output), stdout=asyncio.subprocess.PIPE,
        cwd=pathlib.Path(__file__).parent.parent)
    out, _ = await client.communicate()
    gc_policy.undo(before)
    await server.stop(1)
    await engine.shutdown()
    received = json.loads(out.decode().strip().splitlines()[-1])
    return {**_summary(steps, gpu_ms), **received}


async def _client(address: str, batch: int, output: int) -> None:
    import grpc

    from gptoss_pb.v1 import common_pb2, decode_pb2, decode_pb2_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)

        async def one(i: int) -> int:
            request = decode_pb2.DecodeRequest(
                request_id=f"r{i}", prompt_token_ids=[(i * 7 + j) % 1000 + 1 for j in range(PROMPT)],
                sampling=common_pb2.SamplingParams(max_tokens=output, ignore_eos=True))
            sizes = [len(r.tokens) async for r in stub.Generate(request)]
            return sum(sizes), len(sizes)
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(i) for i in range(batch)))
        wall = time.perf_counter() - t0
    tokens, messages = sum(t for t, _ in got), sum(m for _, m in got)
    if tokens != batch * output:
        raise SystemExit(f"client received {tokens} tokens, expected {batch * output}")
    print(json.dumps({"client_tok_per_s": tokens / wall, "tokens_per_message": tokens / messages}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_overhead_bench", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--output", type=int, default=200)
    p.add_argument("--gpu-ms", type=float, default=20.0, help="simulated device time of a step")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.client:
        asyncio.run(_client(args.client, args.batch, args.output))
        return 0
    b, o, g = args.batch, args.output, args.gpu_ms
    runs = {"direct": run_direct(b, o, g, False),
            "direct, overlap scheduler": run_direct(b, o, g, True),
            "grpc, overlap scheduler": asyncio.run(_serve_grpc(b, o, g, True, False)),
            "grpc, publish at launch": asyncio.run(_serve_grpc(b, o, g, False, True)),
            "grpc, publish at step end": asyncio.run(_serve_grpc(b, o, g, False, False))}
    for name, r in runs.items():
        extra = (f", client received {r['client_tok_per_s']:.0f} tok/s, {r['tokens_per_message']:.2f} tokens a "
                 f"message" if "client_tok_per_s" in r else "")
        print(f"{name}: {r['steps_per_s']:.1f} steps/s, host {r['host_ms_per_step']:.2f} ms a step beyond "
              f"the {args.gpu_ms:g} ms GPU wait{extra}", flush=True)
    date, machine, commit = datetime.date.today().isoformat(), provenance.machine(), args.commit or provenance.commit()
    provenance.append_rows(
        args.out / "serve_overhead.md", "Engine steps with the GPU simulated, direct vs served over gRPC "
        "(bench/serve_overhead_bench.py)",
        ["date", "machine", "commit", "batch", "GPU ms", "run", "steps/s", "host ms/step", "client tok/s"],
        [[date, machine, commit, args.batch, f"{args.gpu_ms:g}", name, f"{r['steps_per_s']:.1f}",
          f"{r['host_ms_per_step']:.2f}",
          f"{r['client_tok_per_s']:.0f} ({r['tokens_per_message']:.2f} a message)" if "client_tok_per_s" in r else "–"]
         for name, r in runs.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
