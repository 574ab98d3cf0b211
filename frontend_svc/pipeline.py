"""Prompt token ids -> a stream of generated tokens from the workers (no text here).

Flow per attempt: pick a decode/aggregated worker; if the prompt is at least --disagg-threshold
tokens and a prefill worker is live and the decode worker is a `decode` one, run Prefill there and
hand its KV descriptor to Decode; otherwise Decode without kv (the worker prefills itself).

Who frees the staged KV: after a successful Prefill the prefill worker holds the prompt's blocks
pinned until a decode worker acks its read. If no Decode response ever arrives (client gone,
decode refused or failed), we call Prefill.Release so the blocks are freed now rather than at the
lease expiry; Release after a completed read is a no-op on the worker.

Migration: if a worker fails (UNAVAILABLE and the like) before the request finished and fewer
than --migration-limit migrations happened, re-run prompt + tokens already sent on another live
worker (without kv) and continue the same client stream.

Hand-off fallback: a Decode WITH kv that fails before its first response (transfer gone, lease
expired, layout refused, checksum mismatch, busy, read timeout, prefill gone, no blocks for the
hand-off) is not the client's problem: the prefill's staged KV is released, the failure counted
(gptoss_frontend_kv_handoff_failures_total), and the request re-runs WITHOUT kv (the decode worker
prefills locally), bounded by --migration-limit like a migration. When sampling is reproducible
(greedy, or seeded: token i is drawn from (seed, i)) the re-run uses the unchanged prompt and
sampling, and the token the client already has from the prefill is regenerated and checked, not
re-sent, so the output equals an uninterrupted run; otherwise (or if the check fails) it
continues from prompt + that token like a migration. INVALID_ARGUMENT stays a 400.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from gptoss_engine.types import SamplingParams, TokenOutput
from gptoss_pb.v1 import common_pb2, decode_pb2, prefill_pb2

from . import errors
from .metrics import Metrics
from .routing import Router
from .workers import DECODE, PREFILL, Channels, WorkerDirectory

log = logging.getLogger(__name__)

_MIGRATABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN,
               grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
# What a Decode WITH kv answers, before any response, when the hand-off (not the request) failed;
# see decode_svc/servicer.py for which transfer error maps to which code.
_HANDOFF_FAILED = _MIGRATABLE | {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                 grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED}
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_ABORT: "abort"}


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    model: str


@dataclass
class TokenChunk:
    tokens: list[TokenOutput]
    finish_reason: str | None = None     # "stop" | "length" | "abort" on the last chunk
    num_cached_tokens: int = 0


class TokenSource(Protocol):
    """The seam between the HTTP layer and the workers (tests put a scripted source here)."""

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]: ...
    def components(self) -> dict[str, list]: ...
    def context_limit(self, num_prompt_tokens: int) -> int | None: ...


class _WorkerFailed(Exception):
    def __init__(self, instance_id: int, err: grpc.aio.AioRpcError):
        super().__init__(f"worker {instance_id:016x}: {err.code().name} {err.details()}")
        self.instance_id = instance_id
        self.err = err


class _HandoffFailed(Exception):
    """Decode could not take the prefill's KV; neither worker is known to be broken."""

    def __init__(self, instance_id: int, err: grpc.aio.AioRpcError):
        super().__init__(f"KV hand-off to {instance_id:016x} failed: {err.code().name} {err.details()}")
        self.code = err.code()


class _ReplayDiverged(Exception):
    """The local re-prefill sampled another first token than the one the client already has."""


def _reproducible(s: SamplingParams) -> bool:
    return s.temperature == 0 or s.seed is not None


def sampling_to_pb(s: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
        min_tokens=s.min_tokens, ignore_eos=s.ignore_eos, stop_token_ids=list(s.stop_token_ids),
        logprobs=s.logprobs, top_logprobs=s.top_logprobs)
    if s.seed is not None:
        pb.seed = s.seed
    return pb


def _tokens(pbs) -> list[TokenOutput]:
    return [TokenOutput(t.token_id, t.logprob, [(x.token_id, x.logprob) for x in t.top_logprobs]) for t in pbs]


def _rpc_error(instance_id: int, e: grpc.aio.AioRpcError) -> Exception:
    if e.code() in _MIGRATABLE:
        return _WorkerFailed(instance_id, e)
    return errors.from_grpc(e.code(), e.details() or "")


class Pipeline:
    def __init__(self, directory: WorkerDirectory, channels: Channels, router: Router, metrics: Metrics,
                 *, disagg_threshold: int, migration_limit: int, timeout_s: float):
        self._dir = directory
        self._channels = channels
        self._router = router
        self._metrics = metrics
        self._threshold = disagg_threshold
        self._migration_limit = migration_limit
        self._timeout_s = timeout_s
        self._background: set[asyncio.Task] = set()

    def components(self) -> dict[str, list]:
        return {c: list(self._dir.instances(c)) for c in (DECODE, PREFILL)}

    def context_limit(self, num_prompt_tokens: int) -> int | None:
        """The smallest max_model_len the live workers that could serve this prompt publish
        (None: none does). Prefill workers count only for prompts long enough to go there."""
        components = [DECODE] + ([PREFILL] if num_prompt_tokens >= self._threshold else [])
        limits = [r.max_model_len for c in components for r in self._dir.instances(c) if r.max_model_len > 0]
        return min(limits, default=None)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        sent: list[int] = []
        failed: set[int] = set()
        migrations = 0
        replay = False
        while True:
            try:
                async for chunk in self._attempt(req, sent, failed, replay):
                    sent.extend(t.token_id for t in chunk.tokens)
                    yield chunk
                return
            except _WorkerFailed as f:
                failed.add(f.instance_id)
                reason, replay = f, False
            except _HandoffFailed as h:
                # Neither worker goes into `failed`: with one decode worker that would end the
                # request; if the decode worker itself is gone, the next attempt finds out.
                self._metrics.kv_handoff_failures.labels(h.code.name).inc()
                reason, replay = h, _reproducible(req.sampling)
            except _ReplayDiverged as d:
                reason, replay = d, False
            if migrations >= self._migration_limit:
                raise errors.unavailable(f"request failed and may not migrate further: {reason}") from None
            migrations += 1
            if isinstance(reason, _WorkerFailed):
                self._metrics.migrations.inc()
            log.warning("re-running request %s after %d tokens (replay=%s): %s", req.request_id, len(sent),
                        replay, reason)

    async def _attempt(self, req: GenerateRequest, sent: list[int], failed: set[int],
                       replay: bool) -> AsyncIterator[TokenChunk]:
        """One try on one worker pair. replay: run the original prompt and sampling again and
        check, not send, the first len(sent) tokens (the client has them already)."""
        s = req.sampling
        if replay:
            sampling, prompt, expect = s, req.prompt_ids, list(sent)
        else:
            sampling = replace(s, max_tokens=s.max_tokens - len(sent), min_tokens=max(0, s.min_tokens - len(sent)))
            prompt, expect = req.prompt_ids + sent, []
        decoder = self._router.pick(DECODE, self._dir.instances(DECODE), failed)
        if decoder is None or decoder.instance_id in failed:
            raise errors.unavailable("no decode worker is available")
        prefiller = None
        if not sent and decoder.role == "decode" and len(prompt) >= self._threshold:
            prefiller = self._router.pick(PREFILL, self._dir.instances(PREFILL), failed)
            if prefiller is not None and prefiller.instance_id in failed:
                prefiller = None
        md = (("x-request-id", req.request_id),)
        first: common_pb2.TokenOutput | None = None
        kv = None
        cached = 0
        if prefiller is not None:
            presp = await self._prefill(prefiller, req, prompt, sampling, md)
            cached = presp.usage.cached_prompt_tokens
            finish = _FINISH.get(presp.finish_reason)
            if finish is not None:
                yield TokenChunk(_tokens([presp.first]), finish, cached)
                return
            first, kv = presp.first, presp.kv
        dreq = decode_pb2.DecodeRequest(request_id=req.request_id, prompt_token_ids=prompt,
                                        sampling=sampling_to_pb(sampling), model=req.model)
        if kv is not None:
            dreq.first.CopyFrom(first)
            dreq.kv.CopyFrom(kv)
        got_response = False
        self._router.begin(decoder.instance_id)
        call = self._channels.decode(decoder.grpc_address).Generate(dreq, metadata=md, timeout=self._timeout_s)
        t0 = time.monotonic()
        try:
            if kv is not None:
                # The prefill's first token goes out now (TTFT), while decode reads the KV.
                yield TokenChunk(_tokens([first]), None, cached)
            async for resp in call:
                if not got_response and kv is not None:
                    self._metrics.kv_handoff.observe(time.monotonic() - t0)
                got_response = True
                tokens = _tokens(resp.tokens)
                while expect and tokens:
                    if tokens[0].token_id != expect[0]:
                        raise _ReplayDiverged(f"re-prefill sampled {tokens[0].token_id}, the client has {expect[0]}")
                    tokens, expect = tokens[1:], expect[1:]
                finish = _FINISH.get(resp.finish_reason)
                if tokens or finish is not None:
                    yield TokenChunk(tokens, finish, cached)
        except grpc.aio.AioRpcError as e:
            if kv is not None and not got_response and e.code() in _HANDOFF_FAILED:
                raise _HandoffFailed(decoder.instance_id, e) from None
            raise _rpc_error(decoder.instance_id, e) from None
        finally:
            self._router.end(decoder.instance_id)
            call.cancel()   # no-op when finished; on client disconnect it aborts the worker's request
            if kv is not None and not got_response:
                self._release(prefiller, kv.transfer_id, md)

    async def _prefill(self, prefiller, req: GenerateRequest, prompt: list[int], sampling: SamplingParams, md):
        preq = prefill_pb2.PrefillRequest(request_id=req.request_id, prompt_token_ids=prompt,
                                          sampling=sampling_to_pb(sampling), model=req.model)
        self._router.begin(prefiller.instance_id)
        try:
            return await self._channels.prefill(prefiller.grpc_address).Prefill(preq, metadata=md, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(prefiller.instance_id, e) from None
        finally:
            self._router.end(prefiller.instance_id)

    def _release(self, prefiller, transfer_id: str, md) -> None:
        """Free staged KV nobody will read. A task, because this runs during cancellation."""
        async def release():
            try:
                await self._channels.prefill(prefiller.grpc_address).Release(
                    prefill_pb2.ReleaseRequest(transfer_id=transfer_id), metadata=md, timeout=5.0)
            except grpc.aio.AioRpcError as e:   # the lease timer on the worker is the backstop
                log.warning("Prefill.Release(%s) failed: %s", transfer_id, e.code().name)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
