"""Prometheus metrics for the daemon (off by default): what it saw, what it decided, what it banned.

`Metrics` needs the prometheus_client package and imports it only when created, so a daemon with
metrics off runs on the standard library alone. `journal.telemetry.NullMetrics` has the same methods and does
nothing, so the daemon can call them without checking whether metrics are on.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from portsentry.config.listen import DEFAULT_PORT as DEFAULT_PORT
from portsentry.config.listen import MetricsError as MetricsError
from portsentry.config.listen import parse_listen as parse_listen
from portsentry.core.probe import KIND_CONNECT, KIND_FIN, KIND_NULL, KIND_SYN, KIND_UDP, KIND_XMAS

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client import CollectorRegistry

# A scrape is one short request. A client gets a thread for at most CLIENT_TIMEOUT seconds of
# silence per read or write, and at most MAX_CLIENTS at once: slow or idle clients otherwise
# held a thread each for ever, and enough of them used up the tasks KILL_ROUTE needs. One more
# makes the oldest go (waiting up to EVICT_WAIT for its thread to end): closing the newcomer
# instead let MAX_CLIENTS clients sending a byte now and then keep every scrape out for good.
CLIENT_TIMEOUT = 10.0
MAX_CLIENTS = 8
EVICT_WAIT = 1.0
SLOT_GRACE = 0.05  # seconds a newcomer waits for a slot to come free before the oldest goes


# Lift reasons become a few label values: a fleet peer's lift names the peer ("unblocked on HOST
# (fleet)"), and one series per peer ever seen is a cardinality problem in a large fleet. The
# event log keeps the full text.
UNBAN_LABELS = {
    "ban expired": "expired",
    "unblocked by admin": "admin",
    "unblocked by admin on this host only": "admin_local",
}
FLEET_LIFT_SUFFIX = " (fleet)"


def unban_label(reason: str) -> str:
    if reason.endswith(FLEET_LIFT_SUFFIX):
        return "fleet"
    return UNBAN_LABELS.get(reason, "other")


# Probe kinds become short label values. 1.2's "Unknown Type: TCP Packet Flags: ..." texts vary
# with the flags, and every distinct label value is a new time series, so they all count as "other".
KIND_LABELS = {
    KIND_CONNECT: "connect",
    KIND_SYN: "syn",
    KIND_FIN: "fin",
    KIND_XMAS: "xmas",
    KIND_NULL: "null",
    KIND_UDP: "udp",
}
OTHER_KIND = "other"

# Seconds a blocking step may take: hosts.deny appends are milliseconds, KILL_ROUTE/KILL_RUN_CMD
# commands up to COMMAND_TIMEOUT (30 s by default).
ACTION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, OTHER_KIND)


@dataclass(frozen=True)
class MetricsServer:
    """A running /metrics endpoint; `port` is the bound one (useful when 0 was asked for)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


class Metrics:
    """The daemon's counters and gauges, in `registry` (a fresh one with process metrics when
    None, so two instances never collide in prometheus_client's global registry).

    Thread-safe, as prometheus_client's metric objects are: responder threads report actions.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as error:
            raise MetricsError(
                "metrics need the prometheus_client package: pip install prometheus-client"
            ) from error
        if registry is None:
            registry = prom.CollectorRegistry()
            prom.ProcessCollector(registry=registry)
            prom.PlatformCollector(registry=registry)
        self.registry = registry
        self._probes = prom.Counter(
            "portsentry_probes", "Probes seen on watched ports, by mode and kind of scan",
            ["mode", "kind"], registry=registry)
        self._decisions = prom.Counter(
            "portsentry_decisions", "What the engine decided for each probe", ["decision"],
            registry=registry)
        self._active = prom.Gauge(
            "portsentry_bans_active", "Addresses banned right now, per ban backend", ["backend"],
            registry=registry)
        self._bans = prom.Counter("portsentry_bans", "Bans made (all backends)", registry=registry)
        self._unbans = prom.Counter(
            "portsentry_unbans", "Bans lifted, by reason", ["reason"], registry=registry)
        self._state = prom.Gauge(
            "portsentry_state_entries", "Entries in the daemon's in-memory tables", ["table"],
            registry=registry)
        self._drops = prom.Counter(
            "portsentry_capture_drops", "Packets the kernel dropped before capture read them",
            registry=registry)
        self._packet_drops = prom.Counter(
            "portsentry_packets_dropped",
            "Packets dropped before the engine, by reason: malformed, a source no real peer can have "
            "(forged: unspecified, loopback, multicast, broadcast, reserved), or "
            "banned_source_in_kernel (probes of banned sources the kernel dropped, NFLOG capture)",
            ["reason"], registry=registry)
        self._packet_drops_seen: dict[str, int] = {}
        self._record_failures = prom.Counter(
            "portsentry_record_write_failures",
            "Records that could not be written (and were rolled back), by file: history, blocked, "
            "hosts_deny, event_log, ban_store; and log lines lost: syslog, stderr", ["file"],
            registry=registry)
        self._failures = prom.Counter(
            "portsentry_action_failures", "Blocking steps that failed", ["step"], registry=registry)
        self._seconds = prom.Histogram(
            "portsentry_action_seconds", "Time taken by each blocking step", ["step"],
            buckets=ACTION_BUCKETS, registry=registry)
        self._fleet = {
            event: prom.Counter(f"portsentry_fleet_{event}", text, registry=registry)
            for event, text in (("published", "Fleet decisions (bans, lifts) this host sent to Redis"),
                                ("received", "Fleet decisions of other hosts read from Redis"),
                                ("applied", "Fleet decisions of other hosts carried out here"))}
        self._fleet_refused = prom.Counter(
            "portsentry_fleet_refused", "Fleet decisions refused here, by reason (unsigned, bad_signature, "
            "malformed, host_not_accepted, replay, own_address, ignored, protected, impossible, expired, "
            "rate_limited)", ["reason"], registry=registry)
        self._fleet_lag = prom.Gauge(
            "portsentry_fleet_lag_seconds", "From a peer's ban to the same ban here, the last one",
            registry=registry)
        self._fleet_up = prom.Gauge(
            "portsentry_fleet_link_up", "1 while both fleet threads reach Redis, else 0", registry=registry)
        self._drops_seen = 0
        self._lock = threading.Lock()

    def probe(self, mode: str, kind: str) -> None:
        """One probe; `kind` is the Probe's classification text (see KIND_LABELS)."""
        self._probes.labels(mode=str(mode), kind=kind_label(kind)).inc()

    def decision(self, name: str) -> None:
        self._decisions.labels(decision=name).inc()

    def ban(self, backend: str) -> None:
        # `backend` is accepted for symmetry with set_active(); the total is kept as one series.
        self._bans.inc()

    def unban(self, reason: str) -> None:
        self._unbans.labels(reason=unban_label(reason)).inc()

    def set_active(self, backend: str, count: int) -> None:
        self._active.labels(backend=backend).set(count)

    def set_state(self, table: str, count: int) -> None:
        self._state.labels(table=table).set(count)

    def capture_drops(self, total: int) -> None:
        """The capture's cumulative drop count (as PACKET_STATISTICS reports it, summed); only
        growth is added, so a capture reopened after a reload (count back at 0) loses nothing."""
        with self._lock:
            grown = total - self._drops_seen if total >= self._drops_seen else total
            self._drops_seen = total
        if grown > 0:
            self._drops.inc(grown)

    def packet_drops(self, totals: dict[str, int]) -> None:
        """The sensors' cumulative drop counts per reason; only growth is added (see capture_drops)."""
        for reason, total in totals.items():
            with self._lock:
                seen = self._packet_drops_seen.get(reason, 0)
                grown = total - seen if total >= seen else total
                self._packet_drops_seen[reason] = total
            if grown > 0:
                self._packet_drops.labels(reason=reason).inc(grown)

    def record_failure(self, file: str) -> None:
        self._record_failures.labels(file=file).inc()

    def action(self, step: str, seconds: float, ok: bool) -> None:
        self._seconds.labels(step=step).observe(max(seconds, 0.0))
        if not ok:
            self._failures.labels(step=step).inc()

    def fleet_decisions(self, event: str, reason: str | None, count: int) -> None:
        if event == "refused":
            self._fleet_refused.labels(reason=reason or "unknown").inc(count)
        elif event in self._fleet:
            self._fleet[event].inc(count)

    def fleet_lag(self, seconds: float) -> None:
        self._fleet_lag.set(seconds)

    def fleet_link(self, up: bool) -> None:
        self._fleet_up.set(1 if up else 0)

    def serve(self, address: str) -> MetricsServer:
        """Serve /metrics at `address` ('127.0.0.1:9470', '[::1]:9470') on a daemon thread."""
        import prometheus_client as prom

        host, port = parse_listen(address)
        try:
            family, host = _best_family(host, port)
            server = _server_class(family)((host, port), _handler_class())
        except OSError as error:
            raise MetricsError(
                f"cannot serve metrics on {address}: {error.strerror or error}") from error
        server.set_app(prom.make_wsgi_app(self.registry))
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        return MetricsServer(host, int(server.server_port), server, thread)


def _best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """IPv4 or IPv6 for `host`, as prometheus_client's own server picks it."""
    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])


def _handler_class() -> type[WSGIRequestHandler]:
    from wsgiref.simple_server import WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        timeout = CLIENT_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape on stderr is noise

    return Handler


def _server_class(family: socket.AddressFamily) -> type[WSGIServer]:
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIServer

    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    lock = threading.Lock()
    held: dict[socket.socket, None] = {}  # connections with a thread, oldest first

    def release(request: socket.socket) -> None:
        """Its slot back, once: before its socket is closed, so a client that saw the end of its
        answer and comes again finds the slot free (released after the close, the next scrape
        could find every slot taken and make another client go)."""
        with lock:
            if request not in held:
                return
            del held[request]
        slots.release()

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

        def process_request(self, request: Any, client_address: Any) -> None:
            # A moment's wait first: a scrape just answered gives its slot back a little after
            # its client has read the answer, and a scraper coming straight back must not make
            # a waiting client go for a slot about to be free.
            if not slots.acquire(timeout=SLOT_GRACE):
                with lock:
                    oldest = next(iter(held), None)
                if oldest is not None:
                    with contextlib.suppress(OSError):  # its thread's read or write ends at once
                        oldest.shutdown(socket.SHUT_RDWR)
                if not slots.acquire(timeout=EVICT_WAIT):
                    self.shutdown_request(request)  # no thread for it
                    return
            with lock:
                held[request] = None
            try:
                super().process_request(request, client_address)
            except BaseException:
                release(request)
                raise

        def shutdown_request(self, request: Any) -> None:
            # ThreadingMixIn's thread ends here, whatever happened in it.
            release(request)
            super().shutdown_request(request)

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that timed out or went away: not worth a traceback on stderr

    return Server
