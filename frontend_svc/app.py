"""The FastAPI app: routes, auth, the in-flight limit and per-endpoint metrics.

`create_app(config, source)` takes any TokenSource, so the HTTP layer is tested with a scripted
source and run for real with the gRPC Pipeline (see __main__)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptoss_engine.vocab import harmony_encoding

from . import auth, chat, completions, errors, responses
from .config import FrontendConfig
from .generation import AppState, new_request_id
from .harmony_parse import HarmonySpecials
from .metrics import Metrics
from .openai_models import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from .pipeline import TokenSource
from .sse import with_keepalive
from .workers import DECODE

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _endpoint_label(path: str) -> str:
    return path if path.startswith("/v1/") or path in auth.OPEN_PATHS else "other"


async def _unless_client_gone(request: Request, work: Awaitable[dict]) -> dict | Response:
    """Await a non-streaming completion, cancelling it (and so the worker calls under it) if the
    client disconnects first: nobody would read the answer, and the KV blocks should go now."""
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)   # never read: the client has gone


def create_app(cfg: FrontendConfig, source: TokenSource, metrics: Metrics | None = None,
               lifespan: Callable[[FastAPI], contextlib.AbstractAsyncContextManager] | None = None) -> FastAPI:
    enc = harmony_encoding()
    metrics = metrics or Metrics()
    state = AppState(enc, HarmonySpecials.from_encoding(enc), source, metrics, cfg.served_model_name,
                     cfg.context_length)
    app = FastAPI(title="gptoss-disagg frontend", lifespan=lifespan)
    app.state.frontend = state
    errors.install(app)
    app.add_middleware(_Gate, cfg=cfg, metrics=metrics)

    def sse_response(events) -> StreamingResponse:
        events = with_keepalive(events, cfg.sse_keepalive_s, metrics.sse_keepalives.inc)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    def rid(request: Request, prefix: str) -> str:
        return request.headers.get("x-request-id") or new_request_id(prefix)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        gen = chat.prepare(state, body, rid(request, "chatcmpl"))
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(chat.stream(gen, body.model, include))
        return await _unless_client_gone(request, chat.complete(gen, body.model))

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        gen = responses.prepare(state, body, rid(request, "resp"))
        if body.stream:
            return sse_response(responses.stream(gen, body))
        return await _unless_client_gone(request, responses.complete(gen, body))

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        gen = completions.prepare(state, body, rid(request, "cmpl"))
        if body.stream:
            return sse_response(completions.stream(gen, body))
        return await _unless_client_gone(request, completions.complete(gen, body))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "gptoss-disagg"}]}

    @app.get("/health")
    async def health():
        comps = source.components()
        endpoints = sorted(f"dyn://{cfg.namespace}.{c}.generate" for c, recs in comps.items() if recs)
        instances = [{"component": c, "endpoint": "generate", "namespace": cfg.namespace,
                      "instance_id": r.instance_id, "transport": {"grpc_tcp": r.grpc_address}}
                     for c, recs in sorted(comps.items()) for r in recs]
        healthy = bool(comps.get(DECODE))
        return JSONResponse({"status": "healthy" if healthy else "unhealthy", "endpoints": endpoints,
                             "instances": instances}, status_code=200 if healthy else 503)

    @app.get("/live")
    async def live():
        return {"status": "live"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class _Gate:
    """Pure ASGI middleware (so client disconnects still cancel streaming handlers): API key,
    the --max-inflight limit, and request counts by endpoint and status. A request counts as in
    flight until its response body is fully sent or the client has gone. One of a supervisor's
    processes names itself in an `x-gptoss-frontend-process` header (its number, 0..N-1)."""

    def __init__(self, app, cfg: FrontendConfig, metrics: Metrics):
        self.app = app
        self.cfg = cfg
        self.metrics = metrics
        self.inflight = 0
        self._extra_headers = ([] if cfg.worker_slot is None
                               else [(b"x-gptoss-frontend-process", str(cfg.worker_slot).encode())])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._extra_headers:
            send = self._with_headers(send)
        request = Request(scope)
        path = request.url.path
        label = _endpoint_label(path)
        limited = path.startswith("/v1/") and request.method == "POST"
        try:
            auth.check(request, self.cfg.api_key)
            if limited and self.cfg.max_inflight and self.inflight >= self.cfg.max_inflight:
                raise errors.ApiError(429, f"too many requests in flight (limit {self.cfg.max_inflight})",
                                      code="rate_limit_exceeded", retry_after=errors.RETRY_AFTER_S)
        except errors.ApiError as e:
            self.metrics.requests.labels(label, str(e.status)).inc()
            return await e.response()(scope, receive, send)
        status = {"code": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if limited:
            self.inflight += 1
            self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if limited:
                self.inflight -= 1
                self.metrics.inflight.dec()
            self.metrics.requests.labels(label, str(status["code"] or 499)).inc()

    def _with_headers(self, send):
        async def sender(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self._extra_headers]}
            await send(message)
        return sender
