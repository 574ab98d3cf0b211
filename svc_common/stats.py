"""EngineStats -> the Stats RPC's response (both services answer Stats the same way)."""
from __future__ import annotations

from typing import Any

from gptoss_pb.v1 import prefill_pb2


def stats_pb(s: Any) -> prefill_pb2.StatsResponse:
    """`s` is a gptoss_engine EngineStats."""
    return prefill_pb2.StatsResponse(
        num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks,
        num_free_swa_blocks=s.num_free_swa_blocks, num_total_swa_blocks=s.num_total_swa_blocks,
        num_staged_transfers=s.num_staged, num_running=s.num_running, num_waiting=s.num_waiting)
