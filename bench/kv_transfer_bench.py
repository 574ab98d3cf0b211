"""KV hand-off benchmark: two processes on this machine, a prefill-side KVTransferServer in a child,
fetches timed here. Reports hand-off time and bytes/s for 1k- and 8k-token prompts of the tiny and
20b KV layouts, and appends a row per case to bench/results/kv_transfer.md.

    python -m bench.kv_transfer_bench [--layouts tiny,20b] [--tokens 1024,8192] [--repeats 5]
UCX_* environment variables (UCX_TLS, UCX_RNDV_THRESH, ...) apply to both processes and are recorded,
as is KV_TRANSFER_SAME_HOST=1 (the opt-in same-host cma data path, kv_transfer/direct.py).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Recorded before kv_transfer imports ucxx, which sets its own UCX_* defaults in os.environ.
USER_UCX_ENV = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                        if k.startswith("UCX_") or k == "KV_TRANSFER_SAME_HOST") or "default"

from bench import provenance  # noqa: E402
from gptoss_engine.kv_layout import KVCache, KVLayout  # noqa: E402
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
from kv_transfer import KVTransferClient, KVTransferServer

RESULTS = Path(__file__).parent / "results" / "kv_transfer.md"
HEADER = """# KV hand-off over UCX (kv_transfer), two processes on one machine

Hand-off = one `KVTransferClient.fetch` on a warmed-up endpoint: request, header, data, ack
(no checksum in the timed runs; the warm-up fetch verifies it). Full blocks cover the prompt, swa
blocks only the window (`swa_blocks_per_window`). Median of the repeats.

## Results

| date | machine | cpu | commit | device | UCX env | layout | tokens | MiB | hand-off ms | GB/s |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def layout_of(name: str) -> KVLayout:
    return ModelConfig.from_dict(preset(name)).kv_layout(16, torch.bfloat16)


def blocks_for(layout: KVLayout, tokens: int) -> tuple[int, int]:
    num_full = -(-tokens // layout.block_size)
    return num_full, min(num_full, layout.swa_blocks_per_window)


def transfer_ids(tokens: int, repeats: int) -> list[str]:
    return [f"{tokens}-{i}" for i in range(repeats + 1)]   # +1: the warm-up fetch


async def serve(layout_name: str, tokens_list: list[int], repeats: int, device: str) -> None:
    """Child: stage every transfer the parent will fetch (same blocks, one reader each)."""
    layout = layout_of(layout_name)
    max_full, max_swa = blocks_for(layout, max(tokens_list))
    kv = KVCache.allocate(layout, max_full, max_swa, device)
    kv.full.normal_()
    kv.swa.normal_()
    server = KVTransferServer(kv)
    address = await server.start()
    checksums = {}
    for tokens in tokens_list:
        num_full, num_swa = blocks_for(layout, tokens)
        for tid in transfer_ids(tokens, repeats):
            server.stage(tid, range(num_full), range(num_swa), lease_s=600)
        checksums[tokens] = server.checksum(transfer_ids(tokens, repeats)[0])
    print(json.dumps({"address": address, "checksums": checksums}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)   # until the parent closes stdin
    await server.close(timeout_s=1)


async def measure(layout_name: str, tokens_list: list[int], repeats: int, device: str) -> list[dict]:
    child = subprocess.Popen([sys.executable, "-m", "bench.kv_transfer_bench", "--serve", layout_name,
                              "--tokens", ",".join(map(str, tokens_list)), "--repeats", str(repeats),
                              "--device", device], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(child.stdout.readline())
        layout = layout_of(layout_name)
        max_full, max_swa = blocks_for(layout, max(tokens_list))
        kv = KVCache.allocate(layout, max_full, max_swa, device)
        client = KVTransferClient()
        await client.connect(hello["address"])
        rows = []
        for tokens in tokens_list:
            num_full, num_swa = blocks_for(layout, tokens)
            ids = transfer_ids(tokens, repeats)
            full, swa = list(range(num_full)), list(range(num_swa))
            await client.fetch(hello["address"], ids[0], kv, full, swa,
                               expected_checksum=hello["checksums"][str(tokens)], timeout_s=120)
            times = []
            for tid in ids[1:]:
                start = time.perf_counter()
                nbytes = await client.fetch(hello["address"], tid, kv, full, swa, timeout_s=120)
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            rows.append({"layout": layout_name, "tokens": tokens, "nbytes": nbytes, "seconds": t,
                         "gbps": nbytes / t / 1e9})
        await client.close()
        return rows
    finally:
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def machine_facts() -> dict:
    return {"date": datetime.date.today().isoformat(), "machine": os.uname().nodename, "cpu": provenance.cpu_model(),
            "commit": provenance.commit(), "ucx_env": USER_UCX_ENV}


def append_results(rows: list[dict], device: str) -> None:
    facts = machine_facts()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as f:
        for r in rows:
            f.write(f"| {facts['date']} | {facts['machine']} | {facts['cpu']} | {facts['commit']} | {device} | "
                    f"{facts['ucx_env']} | {r['layout']} | {r['tokens']} | {r['nbytes'] / 2**20:.1f} | "
                    f"{r['seconds'] * 1e3:.2f} | {r['gbps']:.2f} |\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_transfer_bench", description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default="tiny,20b")
    p.add_argument("--tokens", default="1024,8192")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA IPC between the two processes)")
    p.add_argument("--no-append", action="store_true", help="print only; leave the results file alone")
    p.add_argument("--serve", metavar="LAYOUT", help=argparse.SUPPRESS)   # internal: the child process
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.serve:
        asyncio.run(serve(args.serve, tokens, args.repeats, args.device))
        return 0
    rows = []
    for layout_name in args.layouts.split(","):
        rows += asyncio.run(measure(layout_name, tokens, args.repeats, args.device))
    for r in rows:
        print(f"{r['layout']:>5} {r['tokens']:>6} tokens: {r['nbytes'] / 2**20:8.1f} MiB  "
              f"{r['seconds'] * 1e3:8.2f} ms  {r['gbps']:6.2f} GB/s")
    if not args.no_append:
        append_results(rows, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
