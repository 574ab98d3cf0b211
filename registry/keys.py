"""The etcd key layout. This is the ONLY module that spells key strings.

    v1/instances/{namespace}/{component}/{endpoint}/{instance_id:016x}

Prefixes end with "/" so that watching namespace "dyn" never matches namespace "dynamo".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "v1/instances/"
DEFAULT_NAMESPACE = "dynamo"
PREFILL = "prefill"    # prefill workers
DECODE = "backend"     # decode (and aggregated) workers, named as in the seeds' /health output
ENDPOINT = "generate"

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} must match [A-Za-z0-9_.-]+, got {value!r}")
    return value


@dataclass(frozen=True)
class InstanceKey:
    namespace: str
    component: str
    endpoint: str
    instance_id: int


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    if not (0 <= instance_id < 2**64):
        raise ValueError(f"instance_id must be a 64-bit unsigned int, got {instance_id}")
    return (f"{ROOT}{_check_name('namespace', namespace)}/{_check_name('component', component)}/"
            f"{_check_name('endpoint', endpoint)}/{instance_id:016x}")


def all_instances_prefix() -> str:
    return ROOT


def namespace_prefix(namespace: str) -> str:
    return f"{ROOT}{_check_name('namespace', namespace)}/"


def component_prefix(namespace: str, component: str) -> str:
    return f"{namespace_prefix(namespace)}{_check_name('component', component)}/"


def parse_instance_key(key: str | bytes) -> InstanceKey:
    """Inverse of instance_key; raises ValueError for anything else under (or outside) ROOT."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="replace")
    if not key.startswith(ROOT):
        raise ValueError(f"not an instance key (no {ROOT!r} prefix): {key!r}")
    parts = key[len(ROOT):].split("/")
    if len(parts) != 4 or not all(_NAME.match(p) for p in parts[:3]):
        raise ValueError(f"malformed instance key: {key!r}")
    namespace, component, endpoint, hex_id = parts
    if not re.fullmatch(r"[0-9a-f]{16}", hex_id):
        raise ValueError(f"malformed instance id in key {key!r}")
    return InstanceKey(namespace, component, endpoint, int(hex_id, 16))
