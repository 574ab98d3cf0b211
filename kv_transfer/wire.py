"""The small control messages of the KV transfer protocol (JSON objects via ucxx send_obj/recv_obj).

One fetch on one endpoint (endpoints carry one fetch at a time):
  client -> {"op": "fetch", "transfer_id", "layout", "full_runs", "swa_runs",  (its run lengths)
             "host_id", "worker_address", "tag_base"}  (the same-host fast path, kv_transfer/direct.py)
  server -> {"status": "ok"|<error status>, "message", "full_runs", "swa_runs", "nbytes", "direct"}
  server -> the data messages of the full pool, then of the swa pool (see blocks.plan_pool), on this
             endpoint, or if "direct" on its endpoint to the worker_address, tagged tag_base + i
  client -> {"ok": bool, "reason"}  (after it verified sizes and checksum)
and {"op": "ping"} -> {"status": "ok"} warms a new endpoint up before real data flows.
"""
from __future__ import annotations

import json
from typing import Any

MAX_CONTROL_BYTES = 1 << 20   # a control message larger than this is a protocol error


async def send_msg(ep: Any, msg: dict) -> None:
    await ep.send_obj(json.dumps(msg).encode())


async def recv_msg(ep: Any) -> dict:
    raw = await ep.recv_obj()
    if len(raw) > MAX_CONTROL_BYTES:
        raise ValueError(f"control message too large ({len(raw)} bytes)")
    msg = json.loads(bytes(raw))
    if not isinstance(msg, dict):
        raise ValueError("control message is not a JSON object")
    return msg
