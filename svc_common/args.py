"""Command-line flags of the Prefill and Decode daemons, shared by both (`gptoss prefill|decode`).

The engine flags follow the seeds (Dynamo's TensorRT-LLM worker): --model-path,
--served-model-name, --extra-engine-args FILE.yaml, --max-num-tokens, ... Every flag can also be
given as an environment variable GPTOSS_<FLAG> (upper case, dashes as underscores), so a systemd
unit can take its settings from an EnvironmentFile; a flag on the command line wins over the env.
The etcd password is read from GPTOSS_ETCD_PASSWORD only: a flag would show in `ps`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Mapping

ENV_PREFIX = "GPTOSS_"
ETCD_PASSWORD_ENV = "GPTOSS_ETCD_PASSWORD"
MODES = ("prefill", "decode", "aggregated")


class ConfigError(ValueError):
    """A flag, env var or engine YAML value the daemon cannot run with. Message is user-facing."""


@dataclass(frozen=True)
class WorkerConfig:
    model_path: str
    served_model_name: str
    disaggregation_mode: str                 # prefill | decode | aggregated
    extra_engine_args: str | None = None     # engine YAML file
    max_num_tokens: int | None = None        # None: engine default (or the YAML's)
    max_batch_size: int | None = None
    max_model_len: int | None = None         # None: the model's max_position_embeddings
    free_gpu_memory_fraction: float | None = None
    device: str = "auto"                     # auto | cpu | cuda
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0                       # 0: any free port (the registry record carries the real one)
    advertise_host: str | None = None        # what the record names, if not grpc_host
    ucx_host: str = "127.0.0.1"
    ucx_port: int = 0
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = field(default=None, repr=False)  # from the env only; never logged
    namespace: str = "dynamo"
    registry_ttl: int = 10
    load_update_interval: float = 2.0
    kv_lease_seconds: float = 30.0
    kv_checksum: bool = True                 # CRC-32 of staged KV in the descriptor, verified on arrival
    drain_timeout: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None         # set: mutual TLS (clients must present a cert it signed)
    log_format: str = "json"
    log_level: str = "info"

    @property
    def component(self) -> str:
        """Registry component: prefill workers under `prefill`, decode/aggregated under `backend`."""
        return "prefill" if self.disaggregation_mode == "prefill" else "backend"


def _int(text: str) -> int:
    return int(text)


def build_parser(prog: str, default_mode: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="gpt-oss worker daemon (token-in/token-out gRPC).")
    e = p.add_argument_group("engine (as in the seeds)")
    e.add_argument("--model-path", "--model", dest="model_path", help="HF-format gpt-oss checkpoint folder")
    e.add_argument("--served-model-name", help="model name clients ask for (default: the folder's name)")
    e.add_argument("--extra-engine-args", metavar="FILE.yaml", help="engine YAML (TensorRT-LLM style keys)")
    e.add_argument("--max-num-tokens", type=_int)
    e.add_argument("--max-batch-size", type=_int)
    e.add_argument("--max-model-len", type=_int, help="context limit in tokens (default: the model's)")
    e.add_argument("--free-gpu-memory-fraction", type=float)
    e.add_argument("--tensor-parallel-size", type=_int, default=1)
    e.add_argument("--expert-parallel-size", type=_int, default=1)
    e.add_argument("--disaggregation-mode", choices=MODES, default=default_mode)
    e.add_argument("--is-prefill-worker", action="store_true", help="same as --disaggregation-mode prefill (vLLM seed)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    compat = p.add_argument_group("accepted for the seeds' command lines; the frontend does this work")
    compat.add_argument("--disaggregation-strategy", choices=("prefill_first", "decode_first"))
    compat.add_argument("--dyn-reasoning-parser")
    compat.add_argument("--dyn-tool-call-parser")
    n = p.add_argument_group("network")
    n.add_argument("--grpc-host", default="127.0.0.1")
    n.add_argument("--grpc-port", type=_int, default=0)
    n.add_argument("--advertise-host", help="host written in the registry record (default: --grpc-host)")
    n.add_argument("--ucx-host", default=None, help="KV transfer listener host (default: --grpc-host)")
    n.add_argument("--ucx-port", type=_int, default=0)
    n.add_argument("--tls-cert")
    n.add_argument("--tls-key")
    n.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    r = p.add_argument_group("registry (etcd)")
    r.add_argument("--etcd-endpoints", default="http://127.0.0.1:2379", help="comma-separated")
    r.add_argument("--etcd-ca")
    r.add_argument("--etcd-cert")
    r.add_argument("--etcd-key")
    r.add_argument("--etcd-user", help=f"password from env {ETCD_PASSWORD_ENV}")
    r.add_argument("--namespace", default="dynamo")
    r.add_argument("--registry-ttl", type=_int, default=10, help="etcd lease TTL (s) of this worker's record")
    r.add_argument("--load-update-interval", type=float, default=2.0, help="seconds between load updates in the record")
    k = p.add_argument_group("KV hand-off and shutdown")
    k.add_argument("--kv-lease-seconds", type=float, default=30.0, help="staged KV is freed if not read by then")
    k.add_argument("--kv-checksum", action=argparse.BooleanOptionalAction, default=True,
                   help="checksum staged KV (prefill) and verify it on arrival (decode); costs a host copy on GPU")
    k.add_argument("--drain-timeout", type=float, default=30.0, help="max seconds to drain on SIGTERM")
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-format", choices=("json", "console"), default="json")
    lg.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    _defaults_from_env(p)
    return p


def _defaults_from_env(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """GPTOSS_<FLAG> becomes the flag's default, so the command line still overrides it."""
    env = os.environ if env is None else env
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.dest == "help":
            continue
        name = ENV_PREFIX + longs[0][2:].upper().replace("-", "_")
        if name not in env:
            continue
        raw = env[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no", ""):
                raise ConfigError(f"{name}={raw!r}: expected true or false")
            action.default = raw.lower() in ("1", "true", "yes")
            continue
        try:
            value = action.type(raw) if action.type else raw
        except ValueError as e:
            raise ConfigError(f"{name}={raw!r}: {e}") from None
        if action.choices and value not in action.choices:
            raise ConfigError(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value


def parse_worker_args(argv: list[str] | None, prog: str, default_mode: str) -> WorkerConfig:
    """Flags (+ GPTOSS_* env) -> WorkerConfig; raises ConfigError for what we cannot run."""
    ns = build_parser(prog, default_mode).parse_args(argv)
    if not ns.model_path:
        raise ConfigError("--model-path is required (or GPTOSS_MODEL_PATH)")
    if ns.tensor_parallel_size != 1 or ns.expert_parallel_size != 1:
        raise ConfigError(
            f"multi-GPU (tensor-parallel-size={ns.tensor_parallel_size}, expert-parallel-size="
            f"{ns.expert_parallel_size}) is not supported yet: run one worker per GPU with both set to 1")
    for flag in ("max_num_tokens", "max_batch_size", "max_model_len", "registry_ttl"):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    fraction = ns.free_gpu_memory_fraction
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--free-gpu-memory-fraction must be in (0, 1], got {fraction}")
    for flag in ("kv_lease_seconds", "drain_timeout", "load_update_interval"):
        if getattr(ns, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    if bool(ns.tls_cert) != bool(ns.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if ns.tls_client_ca and not ns.tls_cert:
        raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if bool(ns.etcd_cert) != bool(ns.etcd_key):
        raise ConfigError("--etcd-cert and --etcd-key go together")
    mode = "prefill" if ns.is_prefill_worker else ns.disaggregation_mode
    endpoints = tuple(e.strip() for e in ns.etcd_endpoints.split(",") if e.strip())
    if not endpoints:
        raise ConfigError("--etcd-endpoints is empty")
    return WorkerConfig(
        model_path=ns.model_path,
        served_model_name=ns.served_model_name or os.path.basename(os.path.normpath(ns.model_path)),
        disaggregation_mode=mode,
        extra_engine_args=ns.extra_engine_args,
        max_num_tokens=ns.max_num_tokens,
        max_batch_size=ns.max_batch_size,
        max_model_len=ns.max_model_len,
        free_gpu_memory_fraction=fraction,
        device=ns.device,
        grpc_host=ns.grpc_host,
        grpc_port=ns.grpc_port,
        advertise_host=ns.advertise_host,
        ucx_host=ns.ucx_host or ns.grpc_host,
        ucx_port=ns.ucx_port,
        etcd_endpoints=endpoints,
        etcd_ca=ns.etcd_ca,
        etcd_cert=ns.etcd_cert,
        etcd_key=ns.etcd_key,
        etcd_user=ns.etcd_user,
        etcd_password=os.environ.get(ETCD_PASSWORD_ENV) or None,
        namespace=ns.namespace,
        registry_ttl=ns.registry_ttl,
        load_update_interval=ns.load_update_interval,
        kv_lease_seconds=ns.kv_lease_seconds,
        kv_checksum=ns.kv_checksum,
        drain_timeout=ns.drain_timeout,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        log_format=ns.log_format,
        log_level=ns.log_level,
    )
