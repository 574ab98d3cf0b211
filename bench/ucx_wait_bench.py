"""What one pending ucxx receive costs the rest of its process (CPU; no GPU needed).

    python -m bench.ucx_wait_bench [--repeats 3] [--out bench/results]

A KV transfer server keeps a receive posted on every connected endpoint. Each case runs in a fresh
process: a listener, one connected endpoint whose receive stays pending, and a launch-bound thread
(tiny torch ops, like an eager prefill's Python side) timed beside it; then one idle second.
Cases: `none` (no ucxx at all), `spin` (ucxx's defaults: the awaited request busy-waits the event
loop), `future` (kv_transfer.ucx_runtime, what the daemons run). Prints the launch-bound thread's
best time and the process's CPU seconds per wall second, and appends rows to <out>/ucx_wait.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import resource
import subprocess
import sys
import time

from bench import provenance

RESULTS = pathlib.Path(__file__).parent / "results"
CASES = ("none", "spin", "future")


def _busy(steps: int) -> float:
    import torch
    x = torch.randn(64, 64)
    t = time.perf_counter()
    for _ in range(steps):
        y = torch.relu(x @ x + 1)
    del y
    return time.perf_counter() - t


async def _case(case: str, steps: int) -> dict:
    import torch
    torch.set_num_threads(1)
    if case != "none":
        import ucxx
        from kv_transfer import ucx_runtime
        if case == "future":
            ucx_runtime.start()

        async def on_connect(ep) -> None:
            try:
                await ep.recv_obj()   # stays pending, like the KV server's posted receive
            except Exception:  # noqa: BLE001 - the endpoint closes at exit
                pass
        listener = ucxx.create_listener(on_connect)
        endpoint = await ucxx.create_endpoint("127.0.0.1", listener.port)   # held: a dropped one closes
        await asyncio.sleep(0.5)
    _busy(steps // 10)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    times = [await asyncio.to_thread(_busy, steps) for _ in range(3)]
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.sleep(1.0)
    r2, w2 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = lambda a, b: (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)  # noqa: E731
    return {"busy_ms": min(times) * 1e3, "busy_cpu_per_s": cpu(r0, r1) / (w1 - w0),
            "idle_cpu_per_s": cpu(r1, r2) / (w2 - w1), "connected": case == "none" or not endpoint.closed}


def _child(case: str, steps: int) -> None:
    import os
    result = asyncio.run(_case(case, steps))
    print(json.dumps(result), flush=True)
    os._exit(0)   # skip ucxx teardown: the listener and endpoint are still open by design


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ucx_wait_bench", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per case (the best is reported)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.steps)
        return 0
    rows = {}
    for case in CASES:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-m", "bench.ucx_wait_bench", "--child", case, "--steps", str(args.steps)],
                                 capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parent.parent)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not all(r["connected"] for r in runs):
            print(f"{case}: the endpoint closed during the run; nothing was pending, so no figure")
            return 1
        best = min(runs, key=lambda r: r["busy_ms"])
        rows[case] = {"busy_ms": best["busy_ms"], "busy_cpu_per_s": best["busy_cpu_per_s"],
                      "idle_cpu_per_s": min(r["idle_cpu_per_s"] for r in runs)}
        print(f"{case:>6}: launch-bound thread {best['busy_ms']:7.1f} ms, process CPU {best['busy_cpu_per_s']:.2f} s/s "
              f"while it runs, {rows[case]['idle_cpu_per_s']:.2f} s/s idle", flush=True)
    date, machine, commit = datetime.date.today().isoformat(), provenance.machine(), args.commit or provenance.commit()
    provenance.append_rows(
        args.out / "ucx_wait.md", "One pending ucxx receive vs a launch-bound thread (bench/ucx_wait_bench.py)",
        ["date", "machine", "commit", "case", "launch-bound thread ms", "process CPU s/s busy", "idle"],
        [[date, machine, commit, case, f"{r['busy_ms']:.1f}", f"{r['busy_cpu_per_s']:.2f}", f"{r['idle_cpu_per_s']:.2f}"]
         for case, r in rows.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
