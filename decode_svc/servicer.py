"""The Decode gRPC service: continue a request from a prefill worker's staged KV (disaggregated),
or run it whole (aggregated), streaming tokens back.

Who frees a reservation (blocks reserved here for an incoming hand-off):
  - this servicer, on every exit before engine.generate_from_kv took it (refused layout, failed or
    corrupt transfer, cancel while reading): free_reservation, then an error status. Decoding
    never continues on bytes that did not verify;
  - the engine, once generate_from_kv adopted it (the blocks belong to the sequence; closing the
    stream aborts the request and frees them).
The prefill side's staged blocks are freed by its transfer server on our read ack, or by its lease.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import AsyncIterator

import grpc

from gptoss_engine.block_manager import NoKVCapacity
from gptoss_engine.types import InvalidRequest, RequestOutput, SamplingParams
from gptoss_pb.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from svc_common.convert import (RequestRejected, check_request, finish_to_pb, layout_mismatches,
                                token_from_pb, token_to_pb)
from svc_common.logging import bind_request_id, get_logger
from svc_common.stats import stats_pb
from kv_transfer import (KVChecksumMismatch, KVLayoutMismatch, KVPeerGone, KVTransferBusy, KVTransferError,
                         KVTransferExpired, KVTransferNotFound, KVTransferTimeout)
from svc_common.context import WorkerContext

log = get_logger("decode")

# A failed hand-off never yields tokens; the code tells the caller what happened to the KV.
_TRANSFER_STATUS: dict[type, grpc.StatusCode] = {
    KVTransferNotFound: grpc.StatusCode.NOT_FOUND,            # unknown / already read / released
    KVTransferExpired: grpc.StatusCode.FAILED_PRECONDITION,   # lease ran out: prefill again
    KVLayoutMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    KVChecksumMismatch: grpc.StatusCode.DATA_LOSS,
    KVTransferBusy: grpc.StatusCode.ABORTED,
    KVTransferTimeout: grpc.StatusCode.UNAVAILABLE,
    KVPeerGone: grpc.StatusCode.UNAVAILABLE,                  # the prefill worker is gone
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._engine = ctx.engine

    async def Generate(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id or uuid.uuid4().hex
        bind_request_id(context.invocation_metadata(), request_id)
        try:
            sampling = check_request(request.model, self._ctx.config.served_model_name,
                                     request.prompt_token_ids, request.sampling, self._engine.model_config.vocab_size)
            prompt = list(request.prompt_token_ids)
            if request.HasField("kv"):
                stream = await self._from_handoff(request_id, prompt, request, sampling, context)
                completion = 1   # the first token came from the prefill worker
            else:
                stream = self._engine.generate(request_id, prompt, sampling)
                completion = 0
        except RequestRejected as e:
            log.warning("decode refused", code=e.code.name, error=e.message)
            await context.abort(e.code, e.message)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoKVCapacity as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no free KV blocks for this hand-off now: {e}")
        # aclosing: a cancelled call (client gone, deadline) closes the engine stream, which aborts
        # the request and frees its blocks.
        finish = None
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    out = stream.merge_ready(out)   # tokens that piled up while the last write waited
                    completion += len(out.tokens)
                    finish = out.finish_reason
                    yield self._message(out, len(prompt), completion)
        except InvalidRequest as e:   # raised on the engine thread (e.g. a duplicate request id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            log.info("decode ended", finish_reason=finish.value if finish else "cancelled",
                     num_completion_tokens=completion, handoff=request.HasField("kv"))

    @staticmethod
    def _message(out: RequestOutput, num_prompt: int, num_completion: int) -> decode_pb2.DecodeResponse:
        msg = decode_pb2.DecodeResponse(tokens=[token_to_pb(t) for t in out.tokens])
        if out.finish_reason is not None:
            msg.finish_reason = finish_to_pb(out.finish_reason)
            msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=num_prompt, completion_tokens=num_completion,
                                                cached_prompt_tokens=out.num_cached_tokens))
        return msg

    async def _from_handoff(self, request_id: str, prompt: list[int], request: decode_pb2.DecodeRequest,
                            sampling: SamplingParams, context: grpc.aio.ServicerContext) -> AsyncIterator[RequestOutput]:
        kv = request.kv
        if not request.HasField("first"):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "kv is set but first (the prefill's token) is not")
        if kv.num_tokens != len(prompt):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"kv.num_tokens ({kv.num_tokens}) != len(prompt_token_ids) ({len(prompt)})")
        mismatches = layout_mismatches(kv.layout, self._ctx.layout_pb)
        if mismatches:
            raise RequestRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                  "incompatible KV hand-off: " + "; ".join(mismatches))
        if self._ctx.transfer_client is None:
            raise RequestRejected(grpc.StatusCode.FAILED_PRECONDITION, "this worker takes no KV hand-offs")
        if kv.lease_expires_unix_ms and kv.lease_expires_unix_ms < time.time() * 1000:
            raise RequestRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"KV lease of transfer {kv.transfer_id} expired before decode started")
        reservation = await self._engine.reserve_kv(len(prompt))
        try:
            shape = (len(reservation.full_block_ids), len(reservation.swa_block_ids), reservation.swa_first_logical_block)
            if shape != (kv.num_full_blocks, kv.num_swa_blocks, kv.swa_first_logical_block):
                raise RequestRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"KV hand-off block counts (full, swa, swa_first) {(kv.num_full_blocks, kv.num_swa_blocks, kv.swa_first_logical_block)}"
                    f" differ from this worker's {shape} for {len(prompt)} tokens")
            timeout_s = max(1.0, (context.time_remaining() or 60.0))
            await self._fetch(kv, reservation, timeout_s)
            return self._engine.generate_from_kv(request_id, prompt, token_from_pb(request.first), reservation, sampling)
        except BaseException:
            # Not adopted by the engine: the reservation is ours to free (also on cancel).
            await asyncio.shield(self._engine.free_reservation(reservation))
            raise

    async def _fetch(self, kv: common_pb2.KVDescriptor, reservation, timeout_s: float) -> None:
        expected = kv.checksum if self._ctx.config.kv_checksum and kv.checksum else None
        try:
            nbytes = await self._ctx.transfer_client.fetch(
                kv.ucx_address, kv.transfer_id, self._engine.kv_cache, list(reservation.full_block_ids),
                list(reservation.swa_block_ids), expected_checksum=expected, timeout_s=timeout_s)
        except (KVTransferError, ValueError) as e:   # ValueError: a malformed ucx_address
            code = _TRANSFER_STATUS.get(type(e), grpc.StatusCode.UNAVAILABLE)
            log.warning("kv fetch failed", transfer_id=kv.transfer_id, code=code.name, error=str(e))
            raise RequestRejected(code, f"KV transfer {kv.transfer_id!r} from {kv.ucx_address!r} failed: {e}") from None
        log.info("kv received", transfer_id=kv.transfer_id, nbytes=nbytes, checksum_verified=expected is not None)

    async def Stats(self, request, context: grpc.aio.ServicerContext):
        return stats_pb(self._engine.stats())
