"""The control socket's requests as the running daemon answers them: which thread runs each, and
what `status` and `stats` report.

Threads: `on_request` is called on the control thread and only dispatches. "main" work reads the
engine's and the sensors' state between packets, on the detection loop; "admin" work is ban work
(list, block, unblock) on an admin worker, apart from detection and from the block queue, so
`portsentry list` answers while KILL_ROUTE commands hang. The counters are the main loop's.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from portsentry.core import messages
from portsentry.service import audit
from portsentry.service.admin import AdminError, admin_request
from portsentry.service.control import Command, Reply, Request, Response

if TYPE_CHECKING:
    from portsentry.bans.lifecycle import BanManager
    from portsentry.service.daemon import Daemon


class MinuteCounts:
    """Events in the last hour in 60 per-minute buckets: constant memory at any rate."""

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [minute, count], oldest first

    def add(self, now: float) -> None:
        minute = int(now // 60)
        if self._buckets and self._buckets[-1][0] == minute:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([minute, 1])
            while len(self._buckets) > 61:
                self._buckets.popleft()

    def total(self, now: float) -> int:
        oldest = int(now // 60) - 59
        return sum(count for minute, count in self._buckets if minute >= oldest)


class Counters:
    """What `stats` counts, kept by the main loop as probes and blocks go by."""

    def __init__(self) -> None:
        self.probes_seen = 0
        self.hosts_blocked = 0
        self._probes = MinuteCounts()
        self._blocks = MinuteCounts()

    def probe(self, now: float) -> None:
        self.probes_seen += 1
        self._probes.add(now)

    def block(self, at: float) -> None:
        self.hosts_blocked += 1
        self._blocks.add(at)

    def as_dict(self, now: float) -> dict[str, int]:
        return {
            "probes_seen": self.probes_seen,
            "probes_last_hour": self._probes.total(now),
            "hosts_blocked": self.hosts_blocked,
            "hosts_blocked_last_hour": self._blocks.total(now),
        }


Work = Callable[["Requests", Request], Response]


class Requests:
    def __init__(self, daemon: Daemon, on_main: Callable[[Callable[[], None]], None],
                 on_admin: Callable[[Callable[[], None]], object], bans_changed: Callable[[], None]) -> None:
        self._daemon = daemon
        self._on_main = on_main
        self._on_admin = on_admin
        self._bans_changed = bans_changed  # the engine hears of an admin's ban within this round

    def on_request(self, request: Request, reply: Reply) -> None:
        """On the control thread: dispatched from WHERE; any exception becomes an error reply."""
        where, work = self.WHERE[request.command]

        def run() -> None:
            try:
                reply(work(self, request))
            except AdminError as error:
                # A refusal says all there is to say, in the words `portsentry block` uses when
                # the daemon is not running; "block failed:" before it read as a fault.
                reply(Response.failure(str(error)))
            except Exception as error:
                reply(Response.failure(f"{request.command} failed: {error}"))

        if where == "main":
            self._on_main(run)
        else:
            self._on_admin(run)

    def _status(self, _request: Request) -> Response:
        return Response.success(status=self.status(self._daemon.clock()))

    def _stats(self, _request: Request) -> Response:
        return Response.success(stats=self.stats(self._daemon.clock()))

    def _reload(self, _request: Request) -> Response:
        if self._daemon.reload():
            return Response.success()
        return Response.failure("the new configuration was refused; see the log")

    def _ban(self, request: Request) -> Response:
        """list, block, unblock: the ban lifecycle's work, on an admin worker."""
        daemon = self._daemon
        if daemon.bans is None:
            response = Response.failure(f"{request.command}: this daemon keeps no ban store")
        else:
            try:
                response = admin_request(daemon.bans, daemon.responder, daemon.config, request,
                                         daemon.clock(), daemon.spared)
            except AdminError as error:
                self._audit(request, Response.failure(str(error)))
                raise
            except Exception as error:
                self._audit(request, Response.failure(f"{request.command} failed: {error}"))
                raise
            finally:
                self._bans_changed()
        self._audit(request, response)
        return response

    def _audit(self, request: Request, response: Response) -> None:
        """The line of who asked for a ban change and how it ended (service.audit); a list
        changes nothing and says nothing."""
        if request.command == "list":
            return
        what = audit.action(request.command, request.address, request.duration, request.local)
        by = audit.peer_who(request.peer)
        self._daemon.journal.log(messages.admin_done(what, by) if response.ok
                                 else messages.admin_failed(what, by, str(response.error)))

    WHERE: ClassVar[dict[Command, tuple[Literal["main", "admin"], Work]]] = {
        "status": ("main", _status),
        "stats": ("main", _stats),
        "reload": ("main", _reload),
        "list": ("admin", _ban),
        "block": ("admin", _ban),
        "unblock": ("admin", _ban),
    }

    def stats(self, now: float) -> dict[str, Any]:
        daemon = self._daemon
        return {
            **daemon.counters.as_dict(now),
            "log_failures": daemon.journal.file_errors,
            "packets_dropped": daemon.packet_drops(),
            "write_failures": daemon.journal.failures.snapshot(),
        }

    def status(self, now: float) -> dict[str, Any]:
        daemon = self._daemon
        backend = daemon.bans.backend if daemon.bans is not None else None
        ignore = daemon.engine.ignore
        return {
            "running": True,
            "pid": os.getpid(),
            "started": daemon.started,
            "uptime": round(now - daemon.started, 1),
            "config": daemon.config.source,
            "modes": [str(mode) for mode in daemon.modes],
            "watching": [line for sensor in daemon.sensors for line in sensor.describe()],
            "backend": backend.name if backend is not None else None,
            "fast_lane": daemon.lane.describe(),
            "ignore_entries": len(ignore) if isinstance(ignore, Sized) else None,
            "active_bans": daemon.active_bans,
            **({"ban_store": ban_store(daemon.bans)} if daemon.bans is not None else {}),
            **self.stats(now),
            "recent_events": daemon.journal.recent_events(),
            **({"fleet": daemon.fleet.status(daemon.feed_position())} if daemon.fleet is not None else {}),
        }


def ban_store(bans: BanManager) -> dict[str, Any]:
    """Where bans are kept, for status: the store, or memory only while it cannot be opened, and
    the records waiting to be written. Read without the store's lock, which a long transaction
    may hold: status is answered on the detection loop."""
    fallback = bans.fallback_from
    return {"path": fallback or bans.store.path, "in_memory": fallback is not None,
            "unsaved": bans.unsaved(), "error": bans.fallback_error if fallback is not None else None}
