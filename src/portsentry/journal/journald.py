"""Writes log entries straight to the systemd journal (its native protocol), with our own
PORTSENTRY_* fields beside MESSAGE, so `journalctl PORTSENTRY_SRC=198.18.0.2` finds a scanner.

One datagram per entry to /run/systemd/journal/socket. An entry too big for a datagram goes in
a sealed memfd whose descriptor is passed instead, as sd_journal_send() does.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Mapping

from portsentry.journal.logsend import HeldWriter, Sender

DEFAULT_SOCKET = "/run/systemd/journal/socket"
ENV_STREAM = "JOURNAL_STREAM"
IDENTIFIER = "portsentry"
LOG_NOTICE = 5

# journald accepts upper-case letters, digits and underscores, not starting with a digit or an
# underscore (those fields are the trusted ones journald adds itself), at most 64 characters.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_LENGTH = struct.Struct("<Q")

# Event fields (journal/events.py) that become PORTSENTRY_* journal fields; "ts" is left out
# because the journal stamps each entry itself.
EVENT_FIELDS = ("event", "src", "dst", "port", "proto", "mode", "kind", "host", "action", "backend",
                "duration", "reason", "count")


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when systemd connected `fd` to the journal: $JOURNAL_STREAM holds "device:inode" of
    that stream, and a shell redirect since then would change the inode."""
    value = (os.environ if environ is None else environ).get(ENV_STREAM, "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def journald_available(
    enabled: bool = False,
    path: str = DEFAULT_SOCKET,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Whether to log through journald: the socket must exist, and either systemd started us with
    stderr on the journal, or the user asked for it (`enabled`, e.g. a command-line flag)."""
    try:
        is_socket = os.path.exists(path) and os.stat(path).st_mode & 0o170000 == 0o140000
    except OSError:
        is_socket = False
    return bool(is_socket and (enabled or stderr_is_journal(environ)))


def encode_field(name: str, value: object) -> bytes:
    """One field in the native format: NAME=value\\n, or for a value holding a newline
    NAME\\n + 64-bit little-endian length + raw value + \\n."""
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a journal field name (A-Z, 0-9, _; not first a digit or _)")
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in raw:
        return key + b"\n" + _LENGTH.pack(len(raw)) + raw + b"\n"
    return key + b"=" + raw + b"\n"


def encode_entry(fields: Mapping[str, object]) -> bytes:
    return b"".join(encode_field(name, value) for name, value in fields.items())


def event_fields(event: Mapping[str, object]) -> dict[str, object]:
    """PORTSENTRY_EVENT, PORTSENTRY_SRC, ... for the fields an event (journal/events.py) has;
    a null value (a permanent ban's duration) becomes "forever"."""
    return {
        f"PORTSENTRY_{key.upper()}": "forever" if event[key] is None else event[key]
        for key in EVENT_FIELDS
        if key in event
    }


class JournaldWriter(HeldWriter):
    """Sends entries to journald; reconnects after errors and never raises from `send`.

    `send(message, priority)` and `close()` are called like SyslogWriter's, so Journal can hold
    either.
    """

    unit = "entries"

    def __init__(self, path: str = DEFAULT_SOCKET, identifier: str = IDENTIFIER,
                 facility: int | None = 3) -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.facility = facility  # SYSLOG_FACILITY for syslog daemons fed from the journal

    def entry(self, message: str, priority: int = LOG_NOTICE, **fields: object) -> bytes:
        """The datagram `send` would write (raises ValueError for a bad field name)."""
        base: dict[str, object] = {"MESSAGE": message, "PRIORITY": priority,
                                   "SYSLOG_IDENTIFIER": self.identifier}
        if self.facility is not None:
            base["SYSLOG_FACILITY"] = self.facility
        base.update({name.upper(): value for name, value in fields.items()})
        return encode_entry(base)

    def emit(self, message: str, severity: int, fields: Mapping[str, object]) -> bool:
        """The Journal's call: the message with its fields (PORTSENTRY_SRC etc.)."""
        return self.send(message, severity, **fields)

    def send(self, message: str, priority: int = LOG_NOTICE, **fields: object) -> bool:
        """Log `message` with `fields` (names as journald wants them, e.g. PORTSENTRY_SRC; lower
        case is raised). journald stamps the entry itself. Raises ValueError only for a bad
        field name, which is a programming error. Never waits: entries journald does not read
        yet are held (journal.logsend)."""
        return self._deliver(self.entry(message, priority, **fields))

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self._sock

    def _sender(self, sock: socket.socket) -> Sender:
        def send(data: bytes) -> int:
            try:
                return sock.sendto(data, socket.MSG_DONTWAIT, self.path)
            except OSError as error:
                if error.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise  # BlockingIOError among them: Held keeps the entry
                self._send_memfd(sock, data)
                return len(data)

        return send

    def _send_memfd(self, sock: socket.socket, data: bytes) -> None:
        """An entry bigger than a datagram: journald reads it from a sealed memfd we pass it."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd])
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], socket.MSG_DONTWAIT, self.path)
        finally:
            os.close(fd)
