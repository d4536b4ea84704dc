"""The control socket's client side (service.control is the server): one request line out, one
reply line back, for `portsentry status` and the other admin commands, on the caller's thread.
"""

from __future__ import annotations

import json
import socket
from typing import Any


class NotRunning(Exception):
    """No daemon answers on the control socket."""


class NoAnswer(ConnectionError):
    """The daemon took the request but hung up without a reply (it is stopping, say).

    An OSError, so the admin commands report it as they report the socket's other failures."""


def exchange(path: str, data: bytes, timeout: float = 60.0) -> bytes:
    """Send `data` (a request line) and read the reply line; NotRunning when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise NotRunning(f"no daemon at {path}") from error
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    finally:
        sock.close()
    return reply


def request(path: str, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the daemon; NotRunning when nobody listens there."""
    reply = exchange(path, json.dumps(message).encode() + b"\n", timeout)
    try:
        response = json.loads(reply or b"null")
    except ValueError:  # also UnicodeDecodeError
        response = None
    if not isinstance(response, dict):
        raise NoAnswer(f"{path}: the daemon sent no answer")
    return response
