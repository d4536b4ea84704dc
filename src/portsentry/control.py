"""The control socket: a root-only Unix socket speaking one JSON object per line, each way.

The daemon answers status, list, stats, block, unblock and reload; `portsentry status` and the
other admin commands use it when the daemon runs and fall back to the ban store when it does not.
JSON, never pickle: a request is data, not code. Only root (or the daemon's own user) may talk:
the socket is 0600 in a 0700 directory, and the peer's uid is checked again with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from .sensors.base import Hit, Readable

DEFAULT_PATH = "/run/portsentry/control.sock"
MAX_REQUEST = 64 * 1024
_UCRED = struct.Struct("3i")  # pid, uid, gid

Reply = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Reply], None]


class NotRunning(Exception):
    """No daemon answers on the control socket."""


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


def _send(conn: socket.socket, response: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(response, sort_keys=True).encode() + b"\n")
    conn.close()


def _read_line(conn: socket.socket, timeout: float) -> bytes:
    conn.settimeout(timeout)
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


class ControlServer:
    """Polled by the daemon's loop like a sensor; it yields no hits, only answers requests."""

    def __init__(self, path: str, handler: Handler, read_timeout: float = 1.0) -> None:
        self.path = path
        self.handler = handler
        self.read_timeout = read_timeout
        self.refused = 0
        self._sock: socket.socket | None = None

    def open(self) -> list[Readable]:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: no window where others could connect
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        return [sock]

    def read(self, handle: Readable) -> list[Hit]:
        assert self._sock is not None
        while True:
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return []
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid not in (0, os.geteuid()):
            self.refused += 1
            _send(conn, {"ok": False, "error": "permission denied: the control socket is for root"})
            return
        try:
            request = json.loads(_read_line(conn, self.read_timeout) or b"null")
        except (OSError, ValueError):
            _send(conn, {"ok": False, "error": "bad request: expected one JSON object and a newline"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            _send(conn, {"ok": False, "error": 'bad request: expected {"command": ...}'})
            return
        conn.setblocking(True)
        conn.settimeout(5.0)
        self.handler(request, lambda response: _send(conn, response))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def request(path: str, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the daemon; NotRunning when nobody listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise NotRunning(f"no daemon at {path}") from error
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    response = json.loads(data or b"null")
    if not isinstance(response, dict):
        raise ValueError("the daemon sent no answer")
    return response
