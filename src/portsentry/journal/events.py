"""A JSON-lines event log for SIEMs: one JSON object per line with stable field names
(docs/events.md, docs/events.schema.json), plus builders that turn probes and bans into events.

The file is reopened when log rotation moves it away (its inode changes) and on `reopen()`, which
the daemon calls on SIGUSR1 (logrotate) and SIGHUP, so logrotate works with or without `copytruncate`.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections.abc import Callable

from portsentry.core.probe import IPAddress, Probe
from portsentry.journal.fileio import append_record

# The values of the "event" field.
EVENT_PROBE = "probe"
EVENT_BAN = "ban"
EVENT_UNBAN = "unban"
EVENT_IGNORED = "ignored"
EVENT_BELOW_TRIGGER = "below_trigger"
EVENT_ALREADY_BLOCKED = "already_blocked"
EVENT_ACTION_FAILED = "action_failed"
EVENTS = (EVENT_PROBE, EVENT_BAN, EVENT_UNBAN, EVENT_IGNORED, EVENT_BELOW_TRIGGER,
          EVENT_ALREADY_BLOCKED, EVENT_ACTION_FAILED)

# What the engine decided about one probe. The first two are detections (event "probe", the
# decision in "action"); the others are their own event types.
DECISION_BLOCK = "block"  # blocking steps were started
DECISION_LOG = "log"  # detected and recorded, but blocking is off for this protocol
DECISION_REFUSED = "refused"  # detected, but a spoofing guard kept it from blocking (see reason)
DECISIONS = (DECISION_BLOCK, DECISION_LOG, DECISION_REFUSED, EVENT_IGNORED, EVENT_BELOW_TRIGGER,
             EVENT_ALREADY_BLOCKED)

Event = dict[str, object]


def rfc3339(now: float) -> str:
    """UTC with milliseconds, e.g. 2024-05-01T12:34:56.789Z."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 3)


def probe_event(
    probe: Probe, decision: str, now: float, *, count: int | None = None, reason: str | None = None
) -> Event:
    """The event for one probe and what the engine decided about it (one of DECISIONS).

    `count` is the source's hit number so far in this mode (useful with below_trigger).
    """
    if decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r} (one of {', '.join(DECISIONS)})")
    detected = decision in (DECISION_BLOCK, DECISION_LOG, DECISION_REFUSED)
    event: Event = {
        "ts": rfc3339(now),
        "event": EVENT_PROBE if detected else decision,
        "src": str(probe.source),
    }
    if probe.destination is not None:
        event["dst"] = str(probe.destination)
    event["port"] = probe.port
    event["proto"] = probe.mode.protocol.value.lower()
    event["mode"] = probe.mode.value
    event["kind"] = probe.kind
    if probe.source_name and probe.source_name != str(probe.source):
        event["host"] = probe.source_name
    if detected:
        event["action"] = decision
    if count is not None:
        event["count"] = count
    if reason:
        event["reason"] = reason
    return event


def ban_event(
    address: IPAddress | str,
    backend: str,
    duration: float | None,
    reason: str,
    now: float,
    *,
    count: int | None = None,
) -> Event:
    """A ban was put in place by `backend` ("nftables", "ipset", "route", "hosts_deny", ...) for
    `duration` seconds (None: permanent, written as null). `count` = earlier bans of the address."""
    event: Event = {
        "ts": rfc3339(now),
        "event": EVENT_BAN,
        "src": str(address),
        "backend": backend,
        "duration": None if duration is None else _seconds(duration),
        "reason": reason,
    }
    if count is not None:
        event["count"] = count
    return event


def unban_event(address: IPAddress | str, reason: str, now: float) -> Event:
    """A ban was lifted; `reason` is e.g. "expired" or "unblock"."""
    return {"ts": rfc3339(now), "event": EVENT_UNBAN, "src": str(address), "reason": reason}


def action_failed_event(
    address: IPAddress | str, action: str, reason: str, now: float, *, probe: Probe | None = None
) -> Event:
    """A blocking step (`action`: "native", "hosts_deny", "route", "run_cmd") failed for `address`."""
    event: Event = {"ts": rfc3339(now), "event": EVENT_ACTION_FAILED, "src": str(address)}
    if probe is not None:
        event["port"] = probe.port
        event["proto"] = probe.mode.protocol.value.lower()
        event["mode"] = probe.mode.value
    event["action"] = action
    event["reason"] = reason
    return event


def encode(event: Event) -> str:
    """One line of JSON (no newline inside: json escapes them in strings)."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str)


class EventLog:
    """Appends events to `path`, one JSON object per line.

    Opens the file at once, so a bad path is reported at start-up (OSError). After that `write`
    never raises: a failure counts in `failures`, keeps its text in `last_error`, and the next
    write tries to reopen. Thread-safe: responder threads report bans while the main loop
    reports probes.
    """

    def __init__(self, path: str, mode: int = 0o640) -> None:
        self.path = path
        self.mode = mode
        self.failures = 0
        self.last_error: str | None = None
        # Told of each failed write (path, error), outside the lock: the daemon's WriteFailures.
        self.reporter: Callable[[str, str], None] | None = None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        info = os.fstat(fd)
        self._fd, self._identity = fd, (info.st_dev, info.st_ino)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._identity = self._fd, None, None
            os.close(fd)

    def _moved(self) -> bool:
        """True when `path` no longer names the file we hold open (rotated away or deleted)."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (info.st_dev, info.st_ino) != self._identity

    def write(self, event: Event) -> bool:
        data = (encode(event) + "\n").encode("utf-8", "replace")
        with self._lock:
            try:
                if self._fd is None or self._moved():
                    self._close()
                    self._open()
                assert self._fd is not None
                # O_APPEND and one write() per line: a line is never split by another writer's,
                # and a short one is cut back, so no reader ever gets half a JSON object.
                append_record(self._fd, data)
            except OSError as error:
                self.failures += 1
                self.last_error = f"{self.path}: {error.strerror or error}"
                self._close()
                failed = error.strerror or str(error)
            else:
                return True
        if self.reporter is not None:
            self.reporter(self.path, failed)
        return False

    def reopen(self) -> None:
        """Close and open the path again (SIGUSR1 after rotation); failures show in the next write."""
        with self._lock:
            self._close()
            try:
                self._open()
            except OSError as error:
                self.failures += 1
                self.last_error = f"{self.path}: {error.strerror or error}"

    def close(self) -> None:
        with self._lock:
            self._close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
