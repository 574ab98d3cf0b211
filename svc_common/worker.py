"""The life cycle both daemons share: load -> serve -> register -> (load updates) -> drain -> exit 0.

Start-up order matters: READY=1 (systemd) and the registry record (the frontend's routing) come
only after the engine is loaded, the KV transfer endpoint listens and gRPC serves, so nobody is
sent to a worker that cannot answer yet.

Shutdown order (SIGTERM/SIGINT), each step bounded by --drain-timeout in total:
  1. revoke the registry lease: the frontend stops routing new requests here;
  2. health NOT_SERVING (for load balancers / grpc health probes);
  3. stop accepting RPCs, let in-flight ones finish; at the same time, on a prefill worker, wait
     until every staged KV has been read or released (a decode worker may be reading it);
  4. close the transfer endpoint (frees whatever is still staged) and the engine; exit 0.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import time
from typing import TYPE_CHECKING, Callable

from kv_transfer import KVTransferClient, KVTransferServer, ucx_runtime
from registry.etcd_settings import EtcdSettings
from registry.record import InstanceRecord, KVLayoutInfo, LoadInfo
from registry.registration import Registration
from svc_common import sd_notify
from svc_common.args import ConfigError, WorkerConfig
from svc_common.context import WorkerContext
from svc_common.convert import layout_to_pb
from svc_common.engine_yaml import EngineYaml
from svc_common.engine_factory import build_engine
from svc_common.logging import get_logger
from svc_common.server import GrpcServer, ServiceSpec, install_shutdown_signals, server_credentials

if TYPE_CHECKING:
    from gptoss_engine.async_engine import AsyncEngine

log = get_logger("worker")


def _record(ctx: WorkerContext, grpc_port: int, load: LoadInfo) -> InstanceRecord:
    cfg = ctx.config
    role = cfg.disaggregation_mode
    return InstanceRecord(
        namespace=cfg.namespace, component=cfg.component, endpoint="generate", instance_id=ctx.instance_id,
        role=role, grpc_address=f"{cfg.advertise_host or cfg.grpc_host}:{grpc_port}",
        ucx_address=ctx.ucx_address, model_name=cfg.served_model_name,
        model_fingerprint=ctx.engine.model_fingerprint, kv_layout=KVLayoutInfo.from_layout(ctx.engine.layout),
        load=load, started_at=time.time(), pid=os.getpid(), max_model_len=ctx.engine.max_model_len)


def etcd_settings(cfg: WorkerConfig) -> EtcdSettings:
    try:
        return EtcdSettings(list(cfg.etcd_endpoints), ca_file=cfg.etcd_ca, cert_file=cfg.etcd_cert,
                            key_file=cfg.etcd_key, username=cfg.etcd_user, password=cfg.etcd_password)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _load(ctx: WorkerContext) -> LoadInfo:
    s = ctx.engine.stats()
    return LoadInfo(num_running=s.num_running, num_waiting=s.num_waiting,
                    free_blocks=s.num_free_blocks, total_blocks=s.num_total_blocks)


async def _start_transfer(cfg: WorkerConfig, engine: AsyncEngine) -> tuple[object | None, object | None, str]:
    ucx_runtime.start()   # on this loop, before any ucxx use: transfers then await without spinning
    if cfg.disaggregation_mode == "prefill":
        server = KVTransferServer(engine.kv_cache, cfg.ucx_host, cfg.ucx_port)
        address = await server.start()
        return server, None, address
    return None, KVTransferClient(), ""


async def _wait_staged_empty(ctx: WorkerContext, deadline: float) -> int:
    """Wait (bounded) until no KV is staged: a decode worker may still be reading it."""
    while time.monotonic() < deadline:
        n = ctx.engine.stats().num_staged
        if n == 0:
            return 0
        await asyncio.sleep(0.05)
    return ctx.engine.stats().num_staged


async def run_worker(cfg: WorkerConfig, engine_yaml: EngineYaml, make_services: Callable[[WorkerContext], list[ServiceSpec]]) -> int:
    stop = install_shutdown_signals()
    sd_notify.status(f"loading {cfg.model_path}")
    log.info("loading model", config=repr(cfg))
    load_task = asyncio.create_task(asyncio.to_thread(build_engine, cfg, engine_yaml))
    await asyncio.wait([load_task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() and not load_task.done():
        log.info("stopped while loading")
        sd_notify.stopping("stopped while loading")
        return 0
    engine = load_task.result()
    await engine.start()
    transfer_server = transfer_client = None
    server: GrpcServer | None = None
    registration: Registration | None = None
    try:
        sd_notify.status("starting KV transfer endpoint")
        transfer_server, transfer_client, ucx_address = await _start_transfer(cfg, engine)
        ctx = WorkerContext(cfg, engine, layout_to_pb(engine.layout, engine.model_fingerprint),
                            secrets.randbits(63), transfer_server, transfer_client, ucx_address)
        server = GrpcServer(make_services(ctx), cfg.grpc_host, cfg.grpc_port,
                            server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
        await server.start()
        await server.set_serving(True)
        sd_notify.status("registering in etcd")
        record = _record(ctx, server.port, _load(ctx))
        registration = Registration(etcd_settings(cfg), record, ttl=cfg.registry_ttl)
        if not await registration.start(timeout_s=10.0):
            # The registration task keeps retrying; READY still waits for it (bounded by etcd's return).
            log.warning("etcd not reachable yet; registering in the background", etcd=etcd_settings(cfg).describe())
            while not await registration.wait_registered(5.0):
                if stop.is_set():
                    return 0

        sd_notify.ready(f"serving {cfg.served_model_name} ({cfg.disaggregation_mode}) on port {server.port}")
        log.info("ready", grpc_port=server.port, ucx_address=ucx_address, instance_id=f"{ctx.instance_id:016x}",
                 mode=cfg.disaggregation_mode, model=cfg.served_model_name, overlap_scheduler=engine.overlap_scheduler)
        await _serve_until_stopped(ctx, registration, stop)
        return await _drain(ctx, server, registration)
    finally:
        # Also reached on start-up errors: nothing may outlive the process's resources.
        try:
            if registration is not None:
                await registration.close()
            if transfer_server is not None:
                await transfer_server.close()
            if transfer_client is not None:
                await transfer_client.close()
            await engine.shutdown()
        finally:
            ucx_runtime.stop()   # last: the endpoints are closed; a running notifier thread would block exit


async def _serve_until_stopped(ctx: WorkerContext, registration: Registration, stop: asyncio.Event) -> None:
    interval = ctx.config.load_update_interval
    watchdog = sd_notify.watchdog_interval_s()
    if watchdog is not None:
        interval = min(interval, watchdog)
    last_load: LoadInfo | None = None
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except asyncio.TimeoutError:
            pass
        if stop.is_set():
            break
        sd_notify.watchdog()
        load = _load(ctx)
        if load != last_load:
            await registration.update(dataclasses.replace(registration.record, load=load))
            last_load = load


async def _drain(ctx: WorkerContext, server: GrpcServer, registration: Registration) -> int:
    deadline = time.monotonic() + ctx.config.drain_timeout
    sd_notify.stopping("draining")
    log.info("draining", drain_timeout=ctx.config.drain_timeout)
    await registration.close()   # revokes the lease: the record vanishes at once
    await server.set_serving(False)
    waits = [server.stop(max(0.0, deadline - time.monotonic()))]
    if ctx.transfer_server is not None:
        waits.append(_wait_staged_empty(ctx, deadline))
    results = await asyncio.gather(*waits)
    left = results[1] if len(results) > 1 else 0
    if left:
        log.warning("drain timeout: freeing staged KV nobody read", num_staged=left)
    log.info("stopped")
    return 0
