"""Start N ranks of a function on this host without torchrun (tests, local CPU runs): each child
gets the env torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the
code under test initialises exactly as in production (process_group.init_parallel)."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable[..., Any], env: dict[str, str], args: tuple[Any, ...]) -> None:
    os.environ.update(env)
    fn(*args)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> None:
    """Run fn(*args) in world_size fresh processes (spawn: no inherited torch state) and wait.
    Raises RuntimeError naming the ranks that failed or hung; stragglers are killed."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        p = ctx.Process(target=_child, args=(fn, env, args), name=f"rank{rank}")
        p.start()
        procs.append(p)
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [p.name for p in procs if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
    if hung or failed:
        raise RuntimeError(f"ranks failed: {failed}; hung past {timeout_s}s: {hung}")
