"""Which local ports have a real service, kept current so stealth modes never report hits on
them, even for a service started after the daemon (1.2 froze the list at start).

The kernel is asked through sock_diag netlink (tens of microseconds); /proc/net is the
fallback where netlink is not available (its TCP table costs milliseconds to read).
"""

from __future__ import annotations

import os
import re

from portsentry.core.probe import Protocol
from portsentry.sensors.sockdiag import SockDiag

# "  12: 0100007F:0277 00000000:0000 0A ..." -> slot, local address:port, remote, state.
_LINE = re.compile(
    r"""\s*[0-9]+:
        \s+[0-9A-Fa-f]+:(?P<port>[0-9A-Fa-f]{4})
        \s+[0-9A-Fa-f]+:[0-9A-Fa-f]{4}
        \s+(?P<state>[0-9A-Fa-f]{2})(?:\s|$)""",
    re.VERBOSE,
)
_TCP_LISTEN = 0x0A
# Busy servers have huge tcp tables of established sockets; a substring test skips most of them
# before the regex runs.
_TCP_LISTEN_FIELDS = (" 0A", " 0a")
# A packet as the kernel's socket lookup sees it: our address, the peer's, the peer's port.
Flow = tuple[bytes, bytes, int]
CONFIRM_BUDGET = 2000  # fresh kernel reads per second for confirm(); about 60 ms of CPU at most
_FILES = {Protocol.TCP: ("tcp", "tcp6"), Protocol.UDP: ("udp", "udp6")}


def parse_proc_net(text: str, protocol: Protocol) -> frozenset[int]:
    """Ports in a /proc/net/{tcp,tcp6,udp,udp6} table that a service holds.

    TCP counts only LISTEN sockets; UDP counts every bound port, since any of them would make
    1.2's bind test fail too. The header and malformed lines are skipped.
    """
    ports: set[int] = set()
    tcp = protocol is Protocol.TCP
    for line in text.splitlines():
        if tcp and not any(field in line for field in _TCP_LISTEN_FIELDS):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        port = int(match["port"], 16)
        if port == 0:
            continue
        if tcp and int(match["state"], 16) != _TCP_LISTEN:
            continue
        ports.add(port)
    return frozenset(ports)


class ListeningPorts:
    """The live set of ports with a listener, refreshed at most every `min_interval` seconds.

    Lookups are plain set membership so the packet path never makes a syscall; the caller
    drives `refresh(now)` from its loop. Nothing is read until the first refresh.
    """

    def __init__(self, protocol: Protocol, proc_root: str = "/proc", min_interval: float = 0.5):
        self.protocol = protocol
        self.min_interval = min_interval
        self._paths = tuple(os.path.join(proc_root, "net", name) for name in _FILES[protocol])
        self._ports: frozenset[int] = frozenset()
        self._refreshed_at: float | None = None
        self._diag: SockDiag | None = None
        self._budget_second = -1
        self._budget = CONFIRM_BUDGET
        if proc_root == "/proc":
            try:
                self._diag = SockDiag()
            except OSError:
                self._diag = None

    def refresh(self, now: float) -> None:
        """Re-read the tables if `min_interval` has passed (or the clock went backwards)."""
        last = self._refreshed_at
        if last is not None and 0 <= now - last < self.min_interval:
            return
        self._refreshed_at = now
        if self._diag is not None:
            try:
                self._ports = self._diag.ports(self.protocol)
                return
            except OSError:
                self._diag = None  # fall back to /proc from now on
        ports: set[int] = set()
        for path in self._paths:
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                continue  # no tcp6/udp6 when IPv6 is disabled
            ports.update(parse_proc_net(data.decode("ascii", "replace"), self.protocol))
        self._ports = frozenset(ports)

    def is_listening(self, port: int) -> bool:
        return port in self._ports

    def confirm(self, port: int, now: float, flow: Flow | None = None) -> bool:
        """Is `port` in use right now? Called only before reporting a hit.

        The kernel is asked again, so a service or a client socket awaiting a DNS reply that
        appeared a moment ago is honoured: a cached table, however young, can predate the
        socket the reply is for. With the packet's `flow`, the question is the kernel's own
        lookup for that packet (a few microseconds with sock_diag): a socket that would take
        it, as the kernel path's `socket` rule asks. A flood cannot make this expensive: at
        most CONFIRM_BUDGET fresh reads a second, after which the cached table answers.
        """
        if port in self._ports:
            # A service may have stopped since the table was read: a due re-read first, so a
            # lone probe after a quiet spell is judged on a table at most `min_interval` old.
            self.refresh(now)
            if port in self._ports:
                return True
        second = int(now)
        if second != self._budget_second:
            # /proc/net/tcp costs milliseconds a read: far fewer fresh reads without sock_diag.
            budget = CONFIRM_BUDGET if self._diag is not None else CONFIRM_BUDGET // 100
            self._budget_second, self._budget = second, budget
        if self._budget > 0:
            self._budget -= 1
            if self._diag is not None:
                try:
                    if flow is not None:
                        # Not cached when found: the socket may be one connection, not a service.
                        local, remote, remote_port = flow
                        return self._diag.takes(self.protocol, local, port, remote, remote_port)
                    # This one port only: a filtered dump, cheaper than the whole table.
                    if not self._diag.holds(self.protocol, port):
                        return False
                    self._ports = self._ports | {port}
                    return True
                except OSError:
                    self._diag = None  # fall back to /proc from now on
            self._refreshed_at = None
            self.refresh(now)
        return port in self._ports

    def ports(self) -> frozenset[int]:
        return self._ports
