"""Tells systemd how the service is doing (sd_notify protocol): ready, reloading, stopping, status.

Every call is a no-op returning False when $NOTIFY_SOCKET is unset, so the daemon calls these
unconditionally; nothing here raises, because a lost notification must never stop detection.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

ENV_SOCKET = "NOTIFY_SOCKET"


def socket_address(value: str) -> bytes | None:
    """The AF_UNIX address for a $NOTIFY_SOCKET value: a path, or '@name' for the abstract
    namespace (a leading NUL on the wire). None for anything else (e.g. systemd 254's 'vsock:')."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (newline-separated VAR=value assignments) to $NOTIFY_SOCKET.

    True when the datagram was sent; False when no socket is configured or sending failed.
    `environ` defaults to os.environ; tests pass their own.
    """
    value = (os.environ if environ is None else environ).get(ENV_SOCKET, "")
    address = socket_address(value) if value else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"), address)
    except OSError:
        return False
    return True


def ready(environ: Mapping[str, str] | None = None) -> bool:
    """Start-up (or a reload) is complete: systemd moves the unit to 'active'."""
    return notify("READY=1", environ)


def reloading(monotonic_usec: int | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """A reload has begun; send ready() when it is done. systemd >= 253 wants MONOTONIC_USEC
    (CLOCK_MONOTONIC in microseconds, taken now) to match the reload to the request."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 if monotonic_usec is None else monotonic_usec
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """Shutdown has begun (so systemd does not mistake a slow exit for a hang)."""
    return notify("STOPPING=1", environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """A one-line status for `systemctl status`; line breaks would end the assignment early, so
    they become spaces."""
    line = " ".join(text.splitlines())
    return notify(f"STATUS={line}", environ)
