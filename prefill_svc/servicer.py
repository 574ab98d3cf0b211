"""The Prefill gRPC service: run the prompt, sample the first token, stage the prompt's KV for a
decode worker to read over UCX, and describe it (KVDescriptor) in the response.

Who frees a staged KV (pinned in the engine until engine.release_staged):
  - the transfer server, once a decode worker acked its read, or on Release, or when the lease runs
    out (all three call the on_release we hand it, exactly once);
  - this servicer, if the request finished with its first token (nothing to hand off) or if
    staging itself failed.
A cancelled Prefill call (client gone / deadline) cancels engine.prefill, which aborts the request
and frees its blocks; if the cancel lands after prefill returned, the staged KV is released here.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from gptoss_engine.types import InvalidRequest
from gptoss_pb.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from kv_transfer import kv_checksum
from svc_common.convert import RequestRejected, check_request, finish_to_pb, token_to_pb
from svc_common.logging import bind_request_id, get_logger
from svc_common.stats import stats_pb
from svc_common.context import WorkerContext

log = get_logger("prefill")


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._engine = ctx.engine
        self._transfer = ctx.transfer_server

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id or uuid.uuid4().hex
        log_id = bind_request_id(context.invocation_metadata(), request_id)
        try:
            sampling = check_request(request.model, self._ctx.config.served_model_name,
                                     request.prompt_token_ids, request.sampling, self._engine.model_config.vocab_size)
        except RequestRejected as e:
            await context.abort(e.code, e.message)
        prompt = list(request.prompt_token_ids)
        try:
            result = await self._engine.prefill(request_id, prompt, sampling)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        usage = common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=1,
                                 cached_prompt_tokens=result.num_cached_tokens)
        response = prefill_pb2.PrefillResponse(first=token_to_pb(result.first),
                                               finish_reason=finish_to_pb(result.finish_reason), usage=usage)
        if result.finish_reason is not None:
            # Finished with its first token: nobody will read the KV.
            if result.staged is not None:
                await self._engine.release_staged(result.staged.handle)
            log.info("prefill finished at first token", finish_reason=result.finish_reason.value)
            return response
        try:
            response.kv.CopyFrom(await self._stage(log_id, result.staged))
        except BaseException:
            # Covers a cancel arriving while the checksum is computed, too: until stage() handed the
            # blocks to the transfer server (the last, synchronous step) they are ours to free.
            await asyncio.shield(self._engine.release_staged(result.staged.handle))
            raise
        log.info("prefill staged", transfer_id=response.kv.transfer_id, num_tokens=len(prompt),
                 num_full_blocks=response.kv.num_full_blocks, num_swa_blocks=response.kv.num_swa_blocks,
                 checksum=response.kv.checksum)
        return response

    async def _stage(self, log_id: str, staged) -> common_pb2.KVDescriptor:
        """Describe the staged KV and hand it to the transfer server (from then on, it frees it)."""
        cfg = self._ctx.config
        transfer_id = uuid.uuid4().hex
        handle = staged.handle
        engine = self._engine
        full_ids, swa_ids = list(staged.full_block_ids), list(staged.swa_block_ids)
        layout = engine.layout
        checksum = 0   # 0 = not computed (the decode side then skips verification)
        if cfg.kv_checksum:
            # Off the event loop: on CUDA this copies the blocks to the host. The blocks are pinned
            # (staged), so nothing writes them meanwhile.
            checksum = await asyncio.to_thread(kv_checksum, engine.kv_cache, full_ids, swa_ids)

        def on_release(tid: str, reason: str) -> None:
            # Called exactly once by the transfer server: "read" (acked), "released" (Release RPC or
            # close) or "expired" (lease). The staged blocks go back to the engine's free pools.
            # Runs in the transfer server's task, not this RPC's: name the request explicitly.
            log.info("staged kv freed", request_id=log_id, transfer_id=tid, reason=reason)
            engine.release_staged_nowait(handle)

        descriptor = common_pb2.KVDescriptor(
            prefill_instance_id=f"{self._ctx.instance_id:016x}", ucx_address=self._ctx.ucx_address,
            transfer_id=transfer_id, layout=self._ctx.layout_pb, num_tokens=staged.num_tokens,
            num_full_blocks=len(full_ids), num_swa_blocks=len(swa_ids),
            swa_first_logical_block=staged.swa_first_logical_block,
            lease_expires_unix_ms=int((time.time() + cfg.kv_lease_seconds) * 1000),
            checksum=checksum,
            nbytes=len(full_ids) * layout.bytes_per_full_block + len(swa_ids) * layout.bytes_per_swa_block)
        self._transfer.stage(transfer_id, full_ids, swa_ids, lease_s=cfg.kv_lease_seconds, on_release=on_release)
        return descriptor

    async def Release(self, request: prefill_pb2.ReleaseRequest, context: grpc.aio.ServicerContext):
        bind_request_id(context.invocation_metadata())
        if not request.transfer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transfer_id is empty")
        released = bool(self._transfer.release(request.transfer_id))
        log.info("release", transfer_id=request.transfer_id, released=released)
        return prefill_pb2.ReleaseResponse(released=released)

    async def Stats(self, request: prefill_pb2.StatsRequest, context: grpc.aio.ServicerContext):
        return stats_pb(self._engine.stats())
