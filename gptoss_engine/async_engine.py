"""`AsyncEngine`: the LLMEngine driven by ONE background thread, for asyncio callers.

Everything that touches the engine (and so the block manager) runs on that thread: callers queue
commands to it and get answers through asyncio futures/queues resolved with
loop.call_soon_threadsafe. There are no locks in the core; a stats() snapshot is republished by
the thread with every batch of results (one attribute store, so reading it from the loop is safe).

When the thread hands results to the loop: on CUDA, while more steps follow, a step's outputs go
out when the NEXT step's forward has been launched, so the loop streams them (gRPC, one message
per token and request) while the device computes, instead of holding the GIL against the next
step's scheduling and batch building (bench/serve_overhead_bench.py measures it). That delays each
token by one step's host time (~2 ms at batch 256). The last step's results, and anything queued
in an iteration that launched nothing, go out at once. On CPU the "launch" is the computation
itself, so results go out at the end of every iteration instead.

Who frees what:
  - generate / generate_from_kv streams: the sequence's blocks are freed when it finishes; closing
    (aclose) or dropping an unfinished stream aborts the request, which frees them.
  - prefill: on success the caller owns the staged KV until release_staged(handle); if the call is
    cancelled, the request is aborted, or, when the result raced the cancel, its staging released.
  - reserve_kv: the caller owns the reservation until generate_from_kv adopts it (from then on the
    sequence does, even if adoption fails on the thread: the engine frees it) or free_reservation.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable, Sequence as Seq

from gptoss_engine.block_manager import NoKVCapacity, StagedKV
from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import EngineStats, LLMEngine, PrefillResult
from gptoss_engine.kv_layout import KVCache, KVLayout
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.types import InvalidRequest, RequestOutput, SamplingParams, TokenOutput

__all__ = ["AsyncEngine", "EngineStopped", "NoKVCapacity", "PrefillResult", "RequestStream", "StagedKV"]

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine thread is not running (not started, or shut down)."""


class RequestStream:
    """AsyncIterator[RequestOutput] of one request; the last item has finish_reason set."""

    def __init__(self, engine: "AsyncEngine", request_id: str) -> None:
        self._engine = engine
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False
        self._error: BaseException | None = None   # met by merge_ready, raised by the next __anext__

    def _push(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._error is not None:
            self._done = True
            raise self._error
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def merge_ready(self, out: RequestOutput) -> RequestOutput:
        """`out` joined with the outputs already queued behind it, as one output. A consumer that
        falls behind the engine (a slow gRPC reader) then sends fewer, larger messages instead of
        an ever longer backlog of one-token ones."""
        tokens, last = list(out.tokens), out
        while last.finish_reason is None and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                self._error = item
                break
            tokens += item.tokens
            last = item
        if last is out:
            return out
        if last.finish_reason is not None:
            self._done = True
        return RequestOutput(out.request_id, tokens, last.finish_reason, last.num_prompt_tokens, last.num_cached_tokens)

    async def aclose(self) -> None:
        """Abort the request unless it finished; returns once its blocks are freed."""
        if self._done:
            return
        self._done = True
        await self._engine._abort(self.request_id)

    def __del__(self) -> None:
        if not self._done:  # dropped without aclose: still abort, never leak blocks
            self._engine._abort_nowait(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, publish_at_launch: bool | None = None) -> None:
        """publish_at_launch: hand a step's results to the loop at the next step's launch (see the
        module doc); None = on CUDA when the engine does not overlap its steps (with overlap
        scheduling, step() returns a step's results after the next one is launched already)."""
        self._engine = engine
        if publish_at_launch is None:
            publish_at_launch = engine.runner.device.type == "cuda" and not engine.overlap
        self._publish_at_launch = publish_at_launch
        self._commands: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        # Engine thread only:
        self._streams: dict[str, RequestStream] = {}
        self._prefill_waiters: dict[str, asyncio.Future[PrefillResult]] = {}
        self._to_loop: list[Callable[[], None]] = []
        self._launched = False   # this iteration's step queued a forward (and published at that point)
        self._stats = engine.stats()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        """Blocking (loads the weights, allocates the KV cache): call it in a worker thread."""
        return cls(LLMEngine(config))

    # ---- read-only views -----------------------------------------------------------------------
    @property
    def overlap_scheduler(self) -> bool:
        return self._engine.overlap

    @property
    def kv_cache(self) -> KVCache:
        return self._engine.kv_cache

    @property
    def layout(self) -> KVLayout:
        return self._engine.layout

    @property
    def model_config(self) -> ModelConfig:
        return self._engine.model_config

    @property
    def model_fingerprint(self) -> str:
        return self._engine.model_config.fingerprint

    @property
    def max_model_len(self) -> int:
        """The context limit this engine enforces (prompt + generated tokens)."""
        return self._engine.max_model_len

    def stats(self) -> EngineStats:
        return self._stats

    # ---- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort every request (streams end with ABORT, pending prefills fail) and stop the thread.
        Staged KV stays pinned: its owner releases it (or the process ends)."""
        if not self._running or self._thread is None:
            return
        self._running = False
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join)

    # ---- commands (any thread -> engine thread) ---------------------------------------------------
    def _put(self, fn: Callable[[], Any]) -> None:
        if not self._running:
            raise EngineStopped("the engine is not running (call start(), or it was shut down)")
        self._commands.put(fn)

    def _later(self, fn: Callable[[], None]) -> None:
        """Engine thread: run fn on the event loop after this iteration's stats are published."""
        self._to_loop.append(fn)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread; its result or exception comes back here."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def command() -> None:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._later(lambda e=e: fut.done() or fut.set_exception(e))
            else:
                self._later(lambda: fut.done() or fut.set_result(result))

        self._put(command)
        return await fut

    def _abort_nowait(self, request_id: str) -> None:
        if self._running:
            self._commands.put(lambda: self._abort_on_thread(request_id))

    async def _abort(self, request_id: str) -> None:
        self._abort_nowait(request_id)
        if self._running:
            await self._call(lambda: None)  # FIFO: the abort above has run once this returns

    def _abort_on_thread(self, request_id: str) -> None:
        self._engine.abort_request(request_id)
        self._streams.pop(request_id, None)
        self._prefill_waiters.pop(request_id, None)

    # ---- public API ------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_ids: Seq[int], sampling: SamplingParams) -> RequestStream:
        """Stream a request's outputs. Raises InvalidRequest now for a bad request."""
        self._engine.validate(prompt_ids, sampling)
        stream = RequestStream(self, request_id)
        prompt = list(prompt_ids)

        def add() -> None:
            try:
                self._engine.add_request(request_id, prompt, sampling)
            except Exception as e:  # noqa: BLE001 - e.g. a duplicate request id: ends the stream
                self._later(lambda e=e: stream._push(e))
                return
            self._streams[request_id] = stream

        self._put(add)
        return stream

    async def prefill(self, request_id: str, prompt_ids: Seq[int], sampling: SamplingParams) -> PrefillResult:
        """Compute the prompt, sample token 0 and stage the prompt's KV (see PrefillResult)."""
        self._engine.validate(prompt_ids, sampling)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PrefillResult] = loop.create_future()
        prompt = list(prompt_ids)

        def add() -> None:
            try:
                self._engine.add_request(request_id, prompt, sampling, prefill_only=True)
            except Exception as e:  # noqa: BLE001
                self._later(lambda e=e: fut.done() or fut.set_exception(e))
                return
            self._prefill_waiters[request_id] = fut

        self._put(add)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                staged = fut.result().staged  # the result raced the cancel: nobody will read it
                if staged is not None:
                    self.release_staged_nowait(staged.handle)
            else:
                fut.cancel()
                self._abort_nowait(request_id)
            raise

    async def release_staged(self, handle: int) -> bool:
        return await self._call(lambda: self._engine.release_staged(handle))

    def release_staged_nowait(self, handle: int) -> None:
        """From any thread or callback: queue the release on the engine thread (a no-op once the
        engine is shut down: the cache goes away with it)."""
        if self._running:
            self._commands.put(lambda: self._engine.release_staged(handle))

    async def reserve_kv(self, num_tokens: int) -> StagedKV:
        """Blocks for an incoming hand-off of num_tokens; raises NoKVCapacity if not free now."""
        return await self._call(lambda: self._engine.reserve_kv(num_tokens))

    async def free_reservation(self, reservation: StagedKV) -> bool:
        return await self._call(lambda: self._engine.free_reservation(reservation))

    def generate_from_kv(self, request_id: str, prompt_ids: Seq[int], first: TokenOutput,
                         reservation: StagedKV, sampling: SamplingParams) -> RequestStream:
        """Continue from handed-off KV. Raises InvalidRequest now (reservation still the caller's);
        once this returns, the reservation belongs to the engine. The stream yields tokens 1.. only."""
        self._engine.validate(prompt_ids, sampling)
        if reservation.num_tokens != len(prompt_ids):
            raise InvalidRequest(f"reservation holds {reservation.num_tokens} tokens of KV, "
                                 f"the prompt has {len(prompt_ids)}")
        stream = RequestStream(self, request_id)
        prompt = list(prompt_ids)

        def adopt() -> None:
            try:
                final = self._engine.add_request_from_kv(request_id, prompt, first, reservation, sampling)
            except Exception as e:  # noqa: BLE001 - not adopted: the reservation is ours to free now
                self._engine.free_reservation(reservation)
                self._later(lambda e=e: stream._push(e))
                return
            if final is not None:
                self._later(lambda: stream._push(final))
            else:
                self._streams[request_id] = stream

        self._put(adopt)
        return stream

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                cmd = self._commands.get(block=not self._engine.has_unfinished())
            except queue.Empty:
                cmd = _noop
            stop = self._drain(cmd)
            self._launched = False
            if not stop and self._engine.has_unfinished():
                self._step()
            if not (self._launched and self._engine.has_unfinished()):
                self._publish()   # else they go out at the next step's launch (see the module doc)
        self._abort_all(EngineStopped("the engine was shut down"))
        self._publish()

    def _drain(self, first: Callable[[], Any] | None) -> bool:
        """Run `first` and every queued command; True when asked to stop."""
        cmd: Callable[[], Any] | None = first
        while True:
            if cmd is None:
                return True
            try:
                cmd()
            except Exception:  # noqa: BLE001 - a command must never kill the engine thread
                log.exception("engine command failed")
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _step(self) -> None:
        try:
            outputs = self._engine.step(on_launched=self._on_launched if self._publish_at_launch else None)
        except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
            log.exception("engine step failed")
            self._abort_all(e)
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finish_reason is not None:
                self._streams.pop(out.request_id, None)
            if stream is not None:
                self._later(lambda s=stream, o=out: s._push(o))
        for request_id, result in self._engine.pop_prefill_results().items():
            fut = self._prefill_waiters.pop(request_id, None)
            if fut is None:  # its caller is gone
                if result.staged is not None:
                    self._engine.release_staged(result.staged.handle)
                continue
            self._later(lambda f=fut, r=result: self._deliver_prefill(f, r))

    def _deliver_prefill(self, fut: asyncio.Future[PrefillResult], result: PrefillResult) -> None:
        """On the loop: hand the result over, or release its staging if the caller gave up."""
        if fut.done():
            if result.staged is not None:
                self.release_staged_nowait(result.staged.handle)
            return
        fut.set_result(result)

    def _abort_all(self, error: BaseException) -> None:
        for request_id in self._engine.request_ids():
            out = self._engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None and out is not None:
                self._later(lambda s=stream, o=out: s._push(o))
            fut = self._prefill_waiters.pop(request_id, None)
            if fut is not None:
                self._later(lambda f=fut: f.done() or f.set_exception(error))

    def _on_launched(self) -> None:
        self._launched = True
        self._publish()

    def _publish(self) -> None:
        self._stats = self._engine.stats()
        callbacks, self._to_loop = self._to_loop, []
        if callbacks and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(_run_all, callbacks)
            except RuntimeError:  # the loop closed meanwhile: nobody is left to tell
                pass


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for cb in callbacks:
        cb()


def _noop() -> None:
    pass
