"""SSE keep-alive comments while a stream is silent; closing the stream closes the generation."""
from __future__ import annotations

import asyncio

from frontend_svc.sse import KEEPALIVE, with_keepalive


async def test_keepalive_while_silent_then_events_in_order():
    go, closed = asyncio.Event(), []

    async def events():
        try:
            yield "data: 1\n\n"
            await go.wait()          # e.g. tokens that make no visible delta, or queueing
            yield "data: 2\n\n"
        finally:
            closed.append(True)

    sent = []
    stream = with_keepalive(events(), 0.01, lambda: sent.append(1))
    assert await anext(stream) == "data: 1\n\n"
    assert await anext(stream) == KEEPALIVE == ": keep-alive\n\n"
    assert await anext(stream) == KEEPALIVE   # the pending read survived the first keep-alive
    go.set()
    rest = [e async for e in stream]
    assert rest[-1] == "data: 2\n\n" and set(rest[:-1]) <= {KEEPALIVE}
    assert closed == [True] and len(sent) >= 2


async def test_closing_mid_wait_cancels_the_generation():
    cancelled = asyncio.Event()

    async def events():
        try:
            await asyncio.Event().wait()   # a worker that never answers
            yield "never"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stream = with_keepalive(events(), 0.01)
    assert await anext(stream) == KEEPALIVE
    await stream.aclose()   # the client went away
    assert cancelled.is_set()
