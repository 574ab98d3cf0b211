"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message to $NOTIFY_SOCKET.

A no-op when NOTIFY_SOCKET is unset (not run by systemd as Type=notify). An address starting with
'@' is an abstract socket (leading NUL byte). Failures to send are logged, never raised: a daemon
must not die because its supervisor's socket went away.
"""
from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("sd_notify")


def _address(raw: str) -> str | bytes:
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def notify(message: str) -> bool:
    """Send e.g. "READY=1" / "STATUS=loading" / "STOPPING=1" / "WATCHDOG=1"; True if sent."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(raw))
            sock.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", error=str(e), message=message.split("\n")[0])
        return False


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """Half of WATCHDOG_USEC (systemd's advice), if the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
