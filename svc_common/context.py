"""WorkerContext: what a servicer needs from the worker that hosts it (built once by run_worker)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptoss_pb.v1 import common_pb2
from svc_common.args import WorkerConfig


@dataclass
class WorkerContext:
    """What a servicer needs; built once by run_worker."""
    config: WorkerConfig
    engine: Any                         # gptoss_engine.async_engine.AsyncEngine
    layout_pb: common_pb2.KVLayout
    instance_id: int
    transfer_server: Any | None      # kv_transfer.KVTransferServer on prefill workers
    transfer_client: Any | None      # kv_transfer.KVTransferClient on decode/aggregated workers
    ucx_address: str                    # "host:port" of our transfer listener ("" if none)
