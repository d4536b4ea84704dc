"""Connect modes (-tcp, -udp): real sockets on the watched ports; every connection or datagram is a hit.

Each port gets one dual-stack IPv6 socket (IPv4 clients arrive as ::ffff:a.b.c.d and are reported as
IPv4), falling back to IPv4 only where the host has IPv6 disabled. A port that cannot be bound is
skipped with 1.2's message and the others go on.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import resource
import socket
from collections.abc import Callable, Collection, Iterable
from ipaddress import IPv4Network, IPv6Network

from portsentry.core import messages
from portsentry.core.addresses import canonical
from portsentry.core.ports import format_ports
from portsentry.core.probe import KIND_CONNECT, IPAddress, Mode, Probe, Protocol
from portsentry.sensors.base import Hit, Readable

Logger = Callable[[str], None]

# Descriptors kept free beyond the watched ports: accepted connections (RESOLVE_HOST holds up to
# 256 while their names are looked up), the history, blocked and hosts.deny files, the pipes of
# KILL_ROUTE/KILL_RUN_CMD. A quarter of the limit when that is smaller, so a tight limit still
# watches most ports.
FD_RESERVE = 512
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64  # no /proc: a guess at what a started daemon holds


def descriptor_room(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE (up to the hard one) so `wanted` more sockets fit with
    FD_RESERVE to spare; returns (how many may be opened, the limit). systemd starts services
    with a soft limit of 1024, which a TCP_PORTS range of a thousand ports used up: the rest
    were reported as "could not bind" as if in use, and accept() then failed for want of one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = _open_descriptors()
    needed = used + wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return wanted, soft
    return max(0, min(wanted, soft - used - min(FD_RESERVE, soft // 4))), soft


def source_address(text: str) -> IPAddress:
    """An address from accept()/recvfrom(), with IPv4-mapped IPv6 turned back into IPv4."""
    return canonical(ipaddress.ip_address(text.split("%", 1)[0]))


def _bind(protocol: Protocol, port: int) -> socket.socket:
    kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
    try:
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        host = "::"
    except OSError as error:
        if error.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise
        sock = socket.socket(socket.AF_INET, kind)
        host = "0.0.0.0"
    try:
        if protocol is Protocol.TCP:
            # Lets us rebind right after a restart despite TIME_WAIT; a live listener still conflicts.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if protocol is Protocol.TCP:
            sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ConnectSensor:
    """The sockets of one connect mode."""

    def __init__(self, mode: Mode, ports: Iterable[int], log: Logger, sole: bool = True) -> None:
        """`sole`: the daemon stops when this mode watches nothing (its only mode, at start)."""
        if not mode.is_classic:
            raise ValueError(f"{mode} is not a connect mode")
        self.mode = mode
        self.sole = sole
        self.ports = tuple(ports)
        self._log = log
        self._sockets: dict[int, tuple[socket.socket, int]] = {}

    @property
    def protocol(self) -> Protocol:
        return self.mode.protocol

    def open(self) -> list[Readable]:
        """Bind every port it can; returns the bound sockets (empty: nothing could be bound)."""
        room, limit = descriptor_room(len(self.ports))
        for index, port in enumerate(self.ports):
            try:
                if index >= room:
                    raise OSError(errno.EMFILE, "no descriptor left to spare")
                sock = _bind(self.protocol, port)
            except OSError as error:
                if error.errno in _OUT_OF_DESCRIPTORS:
                    # Not "could not bind": these ports are free, we lack descriptors. One line
                    # for all of them, not one per port.
                    self._log(messages.out_of_descriptors(
                        self.protocol, format_ports(self.ports[index:]), limit))
                    break
                # 1.2 announced every port before trying it, so a port in use reads as this pair.
                self._log(messages.listen_mode(self.protocol, port))
                self._log(messages.bind_failed(self.protocol, port))
                continue
            self._log(messages.listen_mode(self.protocol, port))
            self._sockets[sock.fileno()] = (sock, port)
        if not self._sockets:
            self._log(messages.no_socket_bound(self.protocol, None if self.sole else self.mode))
        return [sock for sock, _port in self._sockets.values()]

    def tick(self, now: float) -> None:
        pass  # bound sockets: nothing derived to keep current

    def capture_drops(self) -> int | None:
        return None  # accepted connections: the kernel's backlog is not a capture buffer

    def packet_drops(self) -> dict[str, int]:
        return {}  # every accepted connection is a real one: nothing to drop

    def skip_sources(self, networks: Collection[IPv4Network | IPv6Network]) -> None:
        pass  # a bound port accepts whoever connects; the engine ignores whom it must

    def describe(self) -> list[str]:
        families = "IPv4+IPv6" if any(s.family == socket.AF_INET6 for s, _p in self._sockets.values()) \
            else "IPv4"
        if not self._sockets:
            return [f"-{self.mode}: no {self.protocol} port could be bound: watching nothing"]
        return [f"-{self.mode}: {self.protocol} ports {format_ports(self.bound_ports())} bound ({families})"]

    def bound_ports(self) -> list[int]:
        return sorted(port for _sock, port in self._sockets.values())

    def read(self, handle: Readable) -> list[Hit]:
        """Drain one readable socket; the caller owns each Hit until it calls hit.close()."""
        sock, port = self._sockets[handle.fileno()]
        if self.protocol is Protocol.TCP:
            return self._accept(sock, port)
        return self._receive(sock, port)

    def _probe(self, peer: str, port: int) -> Probe:
        return Probe(source=source_address(peer), port=port, mode=self.mode, kind=KIND_CONNECT)

    def _accept(self, listener: socket.socket, port: int) -> list[Hit]:
        hits: list[Hit] = []
        for _ in range(64):
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                break
            except OSError:
                self._log(messages.accept_failed(port))
                break
            conn.setblocking(False)

            def reply(data: bytes, conn: socket.socket = conn) -> None:
                with contextlib.suppress(OSError):
                    conn.send(data)

            hits.append(Hit(self._probe(peer[0], port), reply, conn.close))
        return hits

    def _receive(self, sock: socket.socket, port: int) -> list[Hit]:
        hits: list[Hit] = []
        for _ in range(64):
            try:
                _data, peer = sock.recvfrom(1)
            except BlockingIOError:
                break
            except OSError:
                # e.g. ECONNREFUSED queued from an earlier banner reply: not a probe.
                continue

            def reply(data: bytes, peer: tuple[str, int] = peer[:2]) -> None:
                with contextlib.suppress(OSError):
                    sock.sendto(data, peer)

            hits.append(Hit(self._probe(peer[0], port), reply, lambda: None))
        return hits

    def handled(self) -> None:
        pass  # nothing waits for it

    def close(self) -> None:
        for sock, _port in self._sockets.values():
            sock.close()
        self._sockets.clear()
