"""sd_notify over a real datagram socket (path and abstract); request ids on log lines."""
from __future__ import annotations

import json
import os
import socket

import pytest
import structlog

from svc_common import sd_notify
from svc_common.logging import bind_request_id, configure_logging, get_logger, request_id_var


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_the_socket(tmp_path, monkeypatch, abstract):
    name = f"@gptoss-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode() if abstract else name)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    try:
        assert sd_notify.status("loading") and sd_notify.ready("serving")
        assert sock.recv(256) == b"STATUS=loading"
        assert sock.recv(256) == b"READY=1\nSTATUS=serving"
        assert sd_notify.stopping()
        assert sock.recv(256) == b"STOPPING=1"
    finally:
        sock.close()


def test_notify_without_socket_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.ready() is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.watchdog_interval_s() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sd_notify.watchdog_interval_s() is None


def test_request_id_from_metadata_is_on_every_line(capsys):
    configure_logging("json", "info")
    structlog.reset_defaults  # keep configure's processors for this test
    token = request_id_var.set(None)
    try:
        assert bind_request_id([("x-request-id", "req-42"), ("other", "x")], fallback="rid") == "req-42"
        get_logger("t").info("hello", n=1)
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["request_id"] == "req-42" and line["event"] == "hello" and line["n"] == 1
        assert bind_request_id([], fallback="rid-2") == "rid-2"
    finally:
        request_id_var.reset(token)
