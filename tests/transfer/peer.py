"""A prefill-side KVTransferServer in its own process, driven by JSON lines on stdin.

Commands: {"cmd": "stage", "transfer_id", "full", "swa", "lease_s"} -> {"checksum"};
{"cmd": "release", "transfer_id"} -> {"ok"}; {"cmd": "state"} -> {"num_staged", "released": [[id, reason]]};
{"cmd": "reset"} -> {"ok"}: releases whatever is still staged and forgets the release log, so one peer
process can serve several tests.
The KV cache holds deterministic data (fill_known) so the reader can rebuild and compare it.
"""
from __future__ import annotations

import asyncio
import json
import sys

import torch

from gptoss_engine.kv_layout import KVCache, KVLayout
from kv_transfer import KVTransferServer, ucx_runtime

TINY = KVLayout(block_size=4, num_full_layers=2, num_swa_layers=2, num_kv_heads=2, head_dim=8,
                sliding_window=8, dtype=torch.bfloat16)
NUM_BLOCKS = 16


def fill_known(kv: KVCache, seed: int = 1234) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    kv.full.copy_(torch.randn(kv.full.shape, generator=g).to(kv.full.dtype))
    kv.swa.copy_(torch.randn(kv.swa.shape, generator=g).to(kv.swa.dtype))
    return kv


async def serve() -> None:
    ucx_runtime.start()   # as the daemons do; this test process itself keeps ucxx's defaults
    kv = fill_known(KVCache.allocate(TINY, NUM_BLOCKS, NUM_BLOCKS, "cpu"))
    server = KVTransferServer(kv)
    released: list[list[str]] = []
    staged: set[str] = set()
    print(json.dumps({"address": await server.start()}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        if cmd["cmd"] == "stage":
            server.stage(cmd["transfer_id"], cmd["full"], cmd["swa"], cmd["lease_s"],
                         lambda tid, reason: released.append([tid, reason]))
            staged.add(cmd["transfer_id"])
            reply = {"checksum": server.checksum(cmd["transfer_id"])}
        elif cmd["cmd"] == "reset":
            for tid in staged:
                server.release(tid)
            staged.clear()
            # A release while a read is in flight (a reader that refused the bytes and has not yet
            # closed) frees the transfer when that read ends, as "expired": wait for it (bounded), so
            # the next test starts with nothing staged and no late release in its log. Without the
            # wait, CI once saw reset fail after the checksum test and the next test find two
            # "expired" entries.
            deadline = loop.time() + 5.0
            while server.num_staged and loop.time() < deadline:
                await asyncio.sleep(0.01)
            released.clear()
            reply = {"ok": server.num_staged == 0}
        elif cmd["cmd"] == "release":
            reply = {"ok": server.release(cmd["transfer_id"])}
        else:
            reply = {"num_staged": server.num_staged, "released": released}
        print(json.dumps(reply), flush=True)
    await server.close()


if __name__ == "__main__":
    try:
        asyncio.run(serve())
    finally:
        ucx_runtime.stop()
