"""The process's ucxx context: created once, on the event loop that awaits transfers, with
Python-future notification; stopped before the process exits.

Why not ucxx's defaults: with them every awaited ucxx request spins the event loop
(`await asyncio.sleep(0)` until the request completes). A KV server always has a receive posted on
each connected endpoint, so a prefill worker's loop spun for as long as a decode worker was
connected, taking the GIL from the engine thread: a launch-bound thread ran 2.4x slower beside one
pending receive (bench/results/ucx_wait.md), the likely cause of the GPU 1k prefill
that took 155 ms in the prefill process and 51 ms alone. With Python futures, ucxx's
notifier thread sleeps in C++ until a request completes and then resolves the awaited future on
the loop, so an idle endpoint costs nothing.

The futures belong to the loop that was current at start(), so start() runs on the worker's one
loop. A process that never calls start() (a test process running one loop per test) gets ucxx's
defaults on first use and works the same, only with the spinning. UCXPY_ENABLE_PYTHON_FUTURE and
UCXPY_PROGRESS_MODE in the environment still win (ucxx falls back to spinning outside its thread
progress modes).
"""
from __future__ import annotations

import logging
import os

import ucxx

log = logging.getLogger(__name__)

_started = False


def start() -> None:
    """Create the ucxx context for the running event loop. Call before any other ucxx use."""
    global _started
    if _started:
        return
    python_future = None if "UCXPY_ENABLE_PYTHON_FUTURE" in os.environ else True
    try:
        ucxx.init(enable_python_future=python_future)
    except RuntimeError as e:   # something used ucxx first: its context (and settings) stay
        log.warning("kv_transfer: ucxx was initialized before kv_transfer could set it up (%s); "
                    "awaited transfers will busy-wait the event loop", e)
        return
    _started = True


def stop() -> None:
    """Stop ucxx's notifier thread. It is not a daemon thread: without this the interpreter would
    wait for it at exit. Call after every listener and endpoint is closed; safe to call twice."""
    global _started
    if _started:
        ucxx.stop_notifier_thread()
        _started = False
