"""CPU seconds the frontend process spends per streamed token (CPU only).

    python -m bench.frontend_cpu_bench [--endpoint completions|chat] [--streams 32] [--tokens 128]
                                       [--out bench/results]

The real stack of tests/e2e (etcd, one aggregated decode worker on the tiny model, the frontend)
serves `--streams` concurrent streams of `--tokens` tokens each (ignore_eos) through the official
openai client. `completions` (the default) sends every token to the client as a chunk, as a real
model's chat answer does. `chat` with the tiny model's random weights almost never leaves the
harmony header, so its stream carries three chunks whatever the tokens: it times the gRPC and
parsing side alone. The frontend's CPU time over the run (/proc, all its threads),
less its idle rate measured just before, divided by the tokens generated, is the figure: its
inverse is what one frontend process could stream per core. Appends a row to
<out>/frontend_cpu.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import pathlib
import sys
import tempfile
import time

from bench import provenance

RESULTS = pathlib.Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.frontend_cpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)

    from gptoss_engine.make_model import write_checkpoint
    from gptoss_engine.presets import preset
    from tests.e2e.stack import MODEL, Stack, cpu_seconds

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="frontend-cpu-"))
    model_dir = write_checkpoint(tmp / "tiny", preset("tiny"), seed=0, packed=True)
    (tmp / "stack").mkdir()
    stack = Stack(tmp / "stack", model_dir)
    try:
        stack.start_workers("decode")
        fe = stack.start_frontend()
        fe.wait_health({"backend"})
        client = fe.client()

        def one(i: int) -> tuple[int, int]:
            common = dict(model=MODEL, max_tokens=args.tokens, stream=True, stream_options={"include_usage": True},
                          extra_body={"ignore_eos": True})
            if args.endpoint == "chat":
                stream = client.chat.completions.create(messages=[{"role": "user", "content": f"hello {i}"}], **common)
            else:
                stream = client.completions.create(prompt=f"hello {i}", **common)
            chunks = list(stream)
            return sum(c.usage.completion_tokens for c in chunks if c.usage is not None), len(chunks)

        one(-1)   # warm up the path once
        pid = fe.proc.pid
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        time.sleep(5)
        idle = (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
            done = list(pool.map(one, range(args.streams)))
        tokens, chunks = sum(t for t, _ in done), sum(c for _, c in done)
        cpu, wall = cpu_seconds(pid) - c0, time.perf_counter() - t0
    finally:
        stack.close()
    if tokens != args.streams * args.tokens:
        raise SystemExit(f"got {tokens} tokens, expected {args.streams * args.tokens}")
    per_token_us = (cpu - idle * wall) / tokens * 1e6
    print(f"{args.endpoint}: {args.streams} streams x {args.tokens} tokens ({chunks} chunks) "
          f"in {wall:.1f} s: frontend CPU {cpu:.2f} s (idle {idle:.3f} s/s) = {per_token_us:.0f} us a token, "
          f"~{1e6 / per_token_us:.0f} tokens/s per core")
    provenance.append_rows(
        args.out / "frontend_cpu.md", "Frontend CPU per streamed chat token (bench/frontend_cpu_bench.py)",
        ["date", "machine", "commit", "streams x tokens", "wall s", "frontend CPU s", "us a token", "tokens/s per core"],
        [[datetime.date.today().isoformat(), provenance.machine(), args.commit or provenance.commit(),
          f"{args.streams} x {args.tokens} {args.endpoint}, {chunks} chunks", f"{wall:.1f}", f"{cpu:.2f}",
          f"{per_token_us:.0f}", f"{1e6 / per_token_us:.0f}"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
