"""InstanceRecord: what a worker publishes under its key (JSON), and tolerant parsing of it.

Parsing never crashes a reader: unknown extra fields are ignored (newer writers), a record whose
identity fields are missing or mistyped raises MalformedRecord (readers skip it with a warning),
and a malformed `load` only falls back to zeros, since load is advisory.
No torch import here: the frontend reads records and must not pay for torch.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from registry.keys import instance_key

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "aggregated"]
ROLES: tuple[str, ...] = get_args(Role)


class MalformedRecord(ValueError):
    """A registry value that cannot be read as an InstanceRecord."""


@dataclass(frozen=True)
class KVLayoutInfo:
    block_size: int
    dtype: str               # "bfloat16", "float32", ... (torch dtype name without "torch.")
    num_full_layers: int
    num_swa_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int

    @classmethod
    def from_layout(cls, layout: Any) -> "KVLayoutInfo":
        """From a gptoss_engine.kv_layout.KVLayout (duck-typed, so no torch import here)."""
        return cls(layout.block_size, str(layout.dtype).removeprefix("torch."), layout.num_full_layers,
                   layout.num_swa_layers, layout.num_kv_heads, layout.head_dim, layout.sliding_window)


@dataclass(frozen=True)
class LoadInfo:
    num_running: int = 0
    num_waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0


@dataclass(frozen=True)
class InstanceRecord:
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    role: Role
    grpc_address: str          # "host:port"
    ucx_address: str           # "host:port" of the KV transfer listener; "" when the worker has none
    model_name: str
    model_fingerprint: str
    kv_layout: KVLayoutInfo
    load: LoadInfo = field(default_factory=LoadInfo)
    started_at: float = 0.0    # unix seconds
    pid: int = 0
    # The context limit (prompt + generated tokens) the worker's engine enforces; 0 = not published
    # (records of older workers): readers then fall back to the model's config.json.
    max_model_len: int = 0

    @property
    def key(self) -> str:
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "InstanceRecord":
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise MalformedRecord(f"not JSON: {e}") from None
        if not isinstance(data, dict):
            raise MalformedRecord(f"expected a JSON object, got {type(data).__name__}")
        kv = data.get("kv_layout")
        if not isinstance(kv, dict):
            raise MalformedRecord("kv_layout missing or not an object")
        values = {f.name: _typed(data, f.name, f.type) for f in fields(cls)
                  if f.name not in ("kv_layout", "load", "started_at", "pid", "max_model_len")}
        if values["role"] not in ROLES:
            raise MalformedRecord(f"role must be one of {ROLES}, got {values['role']!r}")
        layout = KVLayoutInfo(**{f.name: _typed(kv, f.name, f.type) for f in fields(KVLayoutInfo)})
        return cls(**values, kv_layout=layout, load=_load(data.get("load")),
                   started_at=_optional_number(data, "started_at", float),
                   pid=_optional_number(data, "pid", int),
                   max_model_len=max(0, _optional_number(data, "max_model_len", int)))


_TYPES = {"int": int, "str": str, "Role": str}


def _typed(data: dict, name: str, type_name: Any) -> Any:
    want = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    value = data.get(name)
    # bool is an int subclass: a JSON true is never a valid count or id.
    if not isinstance(value, want) or isinstance(value, bool):
        raise MalformedRecord(f"field {name!r} must be {want.__name__}, got {value!r}")
    return value


def _optional_number(data: dict, name: str, kind: type) -> Any:
    value = data.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        log.warning("registry record: ignoring malformed %s=%r", name, value)
        return kind(0)
    return kind(value)


def _load(raw: Any) -> LoadInfo:
    if raw is None:
        return LoadInfo()
    try:
        if not isinstance(raw, dict):
            raise MalformedRecord(f"load must be an object, got {raw!r}")
        return LoadInfo(**{f.name: _typed(raw, f.name, f.type) for f in fields(LoadInfo) if f.name in raw})
    except MalformedRecord as e:
        log.warning("registry record: ignoring malformed load (%s)", e)
        return LoadInfo()
