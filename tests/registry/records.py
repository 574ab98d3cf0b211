"""Sample records for the registry tests."""
from __future__ import annotations

from registry import keys
from registry.record import InstanceRecord, KVLayoutInfo, LoadInfo


def make_record(instance_id: int, component: str = keys.PREFILL, namespace: str = keys.DEFAULT_NAMESPACE,
                num_running: int = 0) -> InstanceRecord:
    return InstanceRecord(
        namespace=namespace, component=component, endpoint=keys.ENDPOINT, instance_id=instance_id,
        role="prefill" if component == keys.PREFILL else "decode", grpc_address="127.0.0.1:5000",
        ucx_address="127.0.0.1:6000", model_name="tiny", model_fingerprint="abc123",
        kv_layout=KVLayoutInfo(16, "bfloat16", 2, 2, 2, 8, 128),
        load=LoadInfo(num_running=num_running, num_waiting=0, free_blocks=10, total_blocks=12),
        started_at=1700000000.5, pid=4242)
