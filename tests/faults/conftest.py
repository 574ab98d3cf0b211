"""Fault tests run the real stack as processes (tests/e2e/stack.py) and break it on purpose:
kill -9, SIGTERM, SIGSTOP, etcd outages, client disconnects, bad input, overload. Every wait is
bounded; every test checks the workers' block counts where blocks could leak."""
from __future__ import annotations

import pytest

from tests.e2e.conftest import needs_engine
from tests.e2e.stack import Stack


@pytest.fixture(scope="module")
def make_stack(tmp_path_factory, tiny_model_dir, request):
    """Build this module's Stack: `make_stack("prefill", "decode", frontend_args=(...), worker_args=(...))`."""
    stacks: list[Stack] = []
    failed_before = request.session.testsfailed

    def make(*modes: str, frontend_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = ()) -> Stack:
        needs_engine()
        s = Stack(tmp_path_factory.mktemp("stack"), tiny_model_dir)
        stacks.append(s)
        s.start_workers(*modes, extra=worker_args)
        want = {"backend"} | ({"prefill"} if "prefill" in modes else set())
        s.start_frontend(*frontend_args).wait_health(want)
        return s

    yield make
    for s in stacks:
        if request.session.testsfailed > failed_before:
            print(s.logs())
        s.close()
