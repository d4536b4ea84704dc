"""The control socket: a root-only Unix socket speaking one JSON object per line, each way.

The daemon answers status, list, stats, block, unblock and reload; `portsentry status` and the
other admin commands use it when the daemon runs and fall back to the ban store when it does not.
JSON, never pickle: a request is data, not code. Only root (or the daemon's own user) may talk:
the socket is 0600 in a 0700 directory, and the peer's uid is checked again with SO_PEERCRED.

Threads and ownership: the server runs on its own thread (`control`), which owns the listening
socket and every client connection until the request is read. Reads are non-blocking; a request
has one deadline from its accept (not per recv, so a client sending a byte a second cannot hold
anything) and a size cap; at most MAX_CLIENTS are read, and MAX_PENDING of each command answered,
at once, so the sockets held stay bounded whatever clients do and a flood of `list` leaves
`status` its own places. A complete request is parsed into a typed `Request` and handed to the
daemon's handler with a `Reply`; the handler may answer from any thread. Anything that goes
wrong, a bad request, a handler that raises, becomes an error reply; the detection loop never
reads a client socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from portsentry.bans.records import LONGEST_BAN
from portsentry.service.control_client import NoAnswer as NoAnswer
from portsentry.service.control_client import NotRunning as NotRunning
from portsentry.service.control_client import exchange as exchange
from portsentry.service.control_client import request as request

DEFAULT_PATH = "/run/portsentry/control.sock"
MAX_REQUEST = 64 * 1024
REQUEST_DEADLINE = 5.0  # seconds from accept to a complete request line
REPLY_TIMEOUT = 5.0  # a client that does not read its reply is dropped after this
MAX_CLIENTS = 64  # connections being read at once; one more makes the oldest go
# Seconds the listening socket is left alone after accept() failed (EMFILE: the process is out of
# fds): it stays readable, so retrying at once spins the control thread.
ACCEPT_PAUSE = 1.0
# Requests of one command handed on and not yet answered: each holds its client's socket until
# its reply, even when the client has hung up, so without a cap a script sending faster than the
# daemon answers (`list` of many bans) held every fd the process may open.
MAX_PENDING = 32
_UCRED = struct.Struct("3i")  # pid, uid, gid

Command = Literal["status", "stats", "reload", "list", "block", "unblock"]
COMMANDS: tuple[Command, ...] = ("status", "stats", "reload", "list", "block", "unblock")
# "policy": as long as BLOCK_TIME and escalation say; None: forever; else seconds.
Duration = float | None | Literal["policy"]


class BadRequest(ValueError):
    """A request the daemon cannot act on; the text is the error reply."""


@dataclass(frozen=True)
class Peer:
    """Who sent a request, as the kernel says (SO_PEERCRED): the audit line names them."""

    pid: int
    uid: int


@dataclass(frozen=True)
class Request:
    command: Command
    address: str | None = None
    duration: Duration = "policy"
    local: bool = False  # unblock on this host only, not across the fleet
    # Set by the server from the connection, never from the request's JSON.
    peer: Peer | None = field(default=None, compare=False)


def parse_request(line: bytes) -> Request:
    """One request line as a typed Request; BadRequest for anything else. Never raises another
    exception (a hostile request such as 60,000 '[' is a BadRequest, not a RecursionError)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise BadRequest("bad request: expected one JSON object and a newline") from None
    if not isinstance(data, dict) or data.get("command") not in COMMANDS:
        raise BadRequest(f"bad request: expected {{\"command\": one of {', '.join(COMMANDS)}}}")
    command: Command = data["command"]
    address = data.get("address")
    if command in ("block", "unblock") and not isinstance(address, str):
        raise BadRequest(f"bad request: {command} needs an \"address\"")
    raw = data.get("duration", "policy")
    duration: Duration
    if raw is None or raw == "policy":
        duration = raw
    elif isinstance(raw, int | float) and not isinstance(raw, bool) and (seconds := _seconds(raw)):
        duration = seconds
    else:
        raise BadRequest('bad request: "duration" is seconds above 0 (up to 100 years), null (forever) '
                         'or "policy"')
    local = data.get("local", False)
    if not isinstance(local, bool):
        raise BadRequest('bad request: "local" is true or false')
    return Request(command, address if isinstance(address, str) else None, duration, local)


def _seconds(value: int | float) -> float | None:
    """`value` as seconds above 0 up to LONGEST_BAN, or None. Not Infinity (which json takes), nor
    a century or more: as an expiry, the store's time functions and the kernel refuse them. Not an
    integer beyond a float: float() raises OverflowError for it."""
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if 0 < seconds <= LONGEST_BAN else None


@dataclass(frozen=True)
class Response:
    """One reply line: `ok`, an `error` text when not, and the command's own fields (`status`,
    `stats`, `bans`, `lines`), which the CLI and scripts read by name."""

    ok: bool
    error: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def success(cls, **fields: Any) -> Response:
        return cls(True, None, fields)

    @classmethod
    def failure(cls, error: str, **fields: Any) -> Response:
        return cls(False, error, fields)

    def to_json(self) -> dict[str, Any]:
        body = {"ok": self.ok, **self.fields}
        if self.error is not None or not self.ok:
            body["error"] = self.error
        return body


Reply = Callable[[Response], None]
Handler = Callable[[Request, Reply], None]


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(int(pid), int(uid))


def _send(conn: socket.socket, response: Response) -> None:
    """Send the reply and close; safe to call from any thread, once."""
    try:
        conn.setblocking(True)
        conn.settimeout(REPLY_TIMEOUT)
        conn.sendall(json.dumps(response.to_json(), sort_keys=True, default=str).encode() + b"\n")
    except OSError:
        pass
    finally:
        conn.close()


@dataclass
class _Client:
    conn: socket.socket
    deadline: float
    peer: Peer
    data: bytes = b""


class ControlServer:
    def __init__(self, path: str, handler: Handler, deadline: float = REQUEST_DEADLINE,
                 max_request: int = MAX_REQUEST, log: Callable[[str], None] | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.path = path
        self.handler = handler
        self.deadline = deadline
        self.max_request = max_request
        self.max_pending = max_pending
        self.refused = 0  # peers that are not root
        self.bad_requests = 0  # malformed, oversized, too slow, or failed in the handler
        self._log = log or (lambda _text: None)
        self._sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._clients: dict[int, _Client] = {}
        self._accept_paused_until: float | None = None
        self._accept_failing = False
        # Per command: handed to the handler, not yet answered; replies come from any thread.
        self._pending: dict[Command, int] = dict.fromkeys(COMMANDS, 0)
        self._pending_lock = threading.Lock()
        self._stop_read, self._stop_write = socket.socketpair()
        self._thread: threading.Thread | None = None

    # -- lifecycle (the daemon's thread) -----------------------------------------------------

    def start(self) -> None:
        """Bind (OSError if that fails) and serve on the control thread."""
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: no window where others could connect
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._selector.register(self._stop_read, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._serve_forever, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(OSError):
                self._stop_write.send(b"\0")
            self._thread.join(timeout=5.0)
            self._thread = None
        for client in list(self._clients.values()):
            client.conn.close()
        self._clients.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._stop_read.close()
        self._stop_write.close()

    # -- the control thread ------------------------------------------------------------------

    def _serve_forever(self) -> None:
        assert self._selector is not None
        while True:
            wake = [c.deadline for c in self._clients.values()]
            if self._accept_paused_until is not None:
                wake.append(self._accept_paused_until)
            timeout = max(0.0, min(wake, default=time.monotonic() + 1.0) - time.monotonic())
            for key, _events in self._selector.select(timeout):
                if key.fileobj is self._stop_read:
                    return
                try:
                    if key.fileobj is self._sock:
                        self._accept()
                    else:
                        self._read(key.fd)
                except Exception as error:  # a bug here must not end the control thread
                    self._log(f"adminalert: ERROR: control socket: {error!r}")
            now = time.monotonic()
            for fd in [fd for fd, c in self._clients.items() if c.deadline <= now]:
                self._fail(fd, f"bad request: no complete request line within {self.deadline:g} s")
            if self._accept_paused_until is not None and now >= self._accept_paused_until and self._sock:
                self._accept_paused_until = None
                self._selector.register(self._sock, selectors.EVENT_READ, None)

    def _accept(self) -> None:
        assert self._sock is not None and self._selector is not None
        while True:
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client left while queued
                continue
            except OSError as error:
                self._pause_accepting(error)
                return
            if self._accept_failing:
                self._accept_failing = False
                self._log("adminalert: control socket: accepting connections again")
            peer = peer_of(conn)
            if peer.uid not in (0, os.geteuid()):
                self.refused += 1
                _send(conn, Response.failure("permission denied: the control socket is for root"))
                continue
            if len(self._clients) >= MAX_CLIENTS:
                # The oldest makes room, not the newest: refusing newcomers let clients that
                # connect and send nothing keep `portsentry status` out for as long as they came.
                self._fail(next(iter(self._clients)), f"busy: {MAX_CLIENTS} other control connections; "
                                                      "this one sent no complete request line")
            conn.setblocking(False)
            self._clients[conn.fileno()] = _Client(conn, time.monotonic() + self.deadline, peer)
            self._selector.register(conn, selectors.EVENT_READ, None)

    def _pause_accepting(self, error: OSError) -> None:
        """Leave the listening socket alone for ACCEPT_PAUSE; said once until an accept works."""
        assert self._sock is not None and self._selector is not None
        if not self._accept_failing:
            self._accept_failing = True
            self._log(f"adminalert: ERROR: control socket: cannot accept a connection "
                      f"({error.strerror or error}); trying again every {ACCEPT_PAUSE:g} s")
        self._selector.unregister(self._sock)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def _read(self, fd: int) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        try:
            chunk = client.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        client.data += chunk
        line, newline, _rest = client.data.partition(b"\n")
        if not newline:
            if not chunk:
                self._fail(fd, "bad request: expected one JSON object and a newline")
            elif len(client.data) > self.max_request:
                self._fail(fd, f"bad request: longer than {self.max_request} bytes")
            return
        if len(line) > self.max_request:
            self._fail(fd, f"bad request: longer than {self.max_request} bytes")
            return
        conn = self._release(fd)
        try:
            request = dataclasses.replace(parse_request(line), peer=client.peer)
        except BadRequest as error:
            self.bad_requests += 1
            _send(conn, Response.failure(str(error)))
            return
        with self._pending_lock:
            busy = self._pending[request.command] >= self.max_pending
            if not busy:
                self._pending[request.command] += 1
        if busy:
            self.bad_requests += 1
            _send(conn, Response.failure(f"busy: {self.max_pending} {request.command} requests are still "
                                         "being answered"))
            return
        self._dispatch(request, conn)

    def _dispatch(self, request: Request, conn: socket.socket) -> None:
        answered = threading.Event()
        once = threading.Lock()

        def reply(response: Response) -> None:
            with once:
                if answered.is_set():
                    return
                answered.set()
            with self._pending_lock:
                self._pending[request.command] -= 1
            _send(conn, response)

        try:
            self.handler(request, reply)
        except Exception as error:
            self.bad_requests += 1
            reply(Response.failure(f"{request.command} failed: {error}"))

    def _fail(self, fd: int, error: str) -> None:
        self.bad_requests += 1
        _send(self._release(fd), Response.failure(error))

    def _release(self, fd: int) -> socket.socket:
        client = self._clients.pop(fd)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.conn)
        return client.conn
