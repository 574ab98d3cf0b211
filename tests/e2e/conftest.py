"""Fixtures for e2e tests: a frontend process on the per-test `etcd` (`start_frontend`) and the
whole stack shared by a module (`stack`); the process helpers live in tests/e2e/stack.py."""
from __future__ import annotations

import pytest

from tests.e2e.stack import MODEL, NAMESPACE, ROOT, Frontend, Stack  # noqa: F401 - re-exported for tests

__all__ = ["MODEL", "NAMESPACE", "ROOT", "needs_engine"]


@pytest.fixture
def start_frontend(tmp_path, etcd):
    started: list[Frontend] = []

    def start(*extra: str, model_dir=None) -> Frontend:
        f = Frontend(etcd.endpoint, tmp_path / f"frontend-{len(started)}.log", model_dir, *extra)
        started.append(f)
        f.wait_live()
        return f

    yield start
    for f in started:
        f.stop()


@pytest.fixture(scope="session")
def enc():
    from gptoss_engine.vocab import harmony_encoding

    return harmony_encoding()


def needs_engine():
    """The daemons need the engine's AsyncEngine; skip (with the reason) if it is missing."""
    pytest.importorskip("gptoss_engine.async_engine", reason="gptoss_engine.async_engine not available yet")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, request):
    """etcd + 1 prefill + 1 decode + a frontend, healthy; shared by the module's tests."""
    needs_engine()
    s = Stack(tmp_path_factory.mktemp("stack"), tiny_model_dir)
    failed_before = request.session.testsfailed
    try:
        s.start_workers("prefill", "decode")
        s.start_frontend().wait_health({"prefill", "backend"})
        yield s
    finally:
        if request.session.testsfailed > failed_before:
            print(s.logs())
        s.close()
