"""SSE keep-alive: while a stream has nothing to send (queued behind other requests, or tokens
that make no client-visible delta, e.g. after the harmony turn ended under ignore_eos), send a
comment line now and then. SSE clients (the openai SDK included) skip comments, and clients or
proxies with read timeouts keep the connection."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

KEEPALIVE = ": keep-alive\n\n"


async def with_keepalive(events: AsyncIterator[str], interval_s: float,
                         on_keepalive: Callable[[], None] = lambda: None) -> AsyncIterator[str]:
    """`events` as they come, plus KEEPALIVE after every `interval_s` without one.

    The pending read of `events` lives in a task that a keep-alive does not interrupt (cancelling
    it would abort the generation); it is cancelled only when this stream is closed (client gone),
    which runs `events`' own clean-up (the worker calls are cancelled, KV freed)."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                on_keepalive()
                yield KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})
        await events.aclose()
