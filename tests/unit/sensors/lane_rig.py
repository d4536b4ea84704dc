"""A fast lane (sensors/lane.c) on a socket pair, for the unit tests: the lane reads one end of an
AF_UNIX datagram pair where the AF_PACKET socket would be, logs to a datagram socket bound in the
test's directory, records to a file there, and its KILL_ROUTE appends to a file there."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Iterable
from ipaddress import ip_address, ip_network
from pathlib import Path

from portsentry.core.addresses import IMPOSSIBLE_NETWORKS
from portsentry.core.probe import IPAddress, Mode
from portsentry.sensors.capture import Network
from portsentry.sensors.lane import MODE_CODES, Act, Lane
from portsentry.sensors.lane_capture import LaneCapture

HERE4 = ip_address("198.18.0.1")
HERE6 = ip_address("fd00::1")
SCANNER4 = ip_address("198.18.0.10")
SCANNER6 = ip_address("fd00::10")
DENIED4 = ip_network("198.18.5.0/24")
DENIED6 = ip_network("fd00:5::/64")
# What service.lane.deny_networks always holds, and one range of each family for the edge tests.
DENY: tuple[Network, ...] = (*IMPOSSIBLE_NETWORKS, ip_network("255.255.255.255/32"), DENIED4, DENIED6)
ATCP_PORT, STCP_PORT = 80, 81
ROUTE = "echo $TARGET$ $PORT$ $MODE$ >> {out}"
PID = 4321

TCP = struct.Struct("!HHIIBBHHH")


def tcp(port: int, flags: int = 0x02, source_port: int = 40000, offset: int = 5,
        options: bytes = b"") -> bytes:
    return TCP.pack(source_port, port, 1, 0, offset << 4, flags, 1024, 0, 0) + options


def ip4(source: str, destination: str, payload: bytes, protocol: int = 6, fragment: int = 0,
        options: bytes = b"", total: int | None = None) -> bytes:
    ihl = 5 + len(options) // 4
    length = ihl * 4 + len(payload) if total is None else total
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, fragment, 64, protocol, 0,
                       socket.inet_aton(source), socket.inet_aton(destination)) + options + payload


def ip6(source: str, destination: str, payload: bytes, next_header: int = 6,
        length: int | None = None) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload) if length is None else length, next_header, 64,
                       socket.inet_pton(socket.AF_INET6, source),
                       socket.inet_pton(socket.AF_INET6, destination)) + payload


def syn(source: IPAddress | str, destination: IPAddress | str, port: int, flags: int = 0x02) -> bytes:
    source, destination = ip_address(source), ip_address(destination)
    if source.version == 4:
        return ip4(str(source), str(destination), tcp(port, flags))
    return ip6(str(source), str(destination), tcp(port, flags))


class Pair:
    """One end of a datagram socket pair where the AF_PACKET socket would be."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)

    def fileno(self) -> int:
        return self.ours.fileno()

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


class Rig:
    """A lane on, with tables as the daemon would compile them for a host at HERE4 and HERE6
    watching ATCP_PORT (-atcp) and STCP_PORT (-stcp)."""

    def __init__(self, directory: Path, route: bool = True, record: bool = True) -> None:
        self.directory = directory
        self.log_path = directory / "log"
        self.record_path = directory / "record"
        self.route_out = directory / "route.out"
        self.log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.log.bind(str(self.log_path))
        self.log.setblocking(False)
        self.pair = Pair()
        self.lane = Lane()
        self.capture = LaneCapture(self.pair, self.lane)  # type: ignore[arg-type]
        self.record = os.open(self.record_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.ports = bytearray(65536)
        self.ports[ATCP_PORT] = MODE_CODES[Mode.ATCP]
        self.ports[STCP_PORT] = MODE_CODES[Mode.STCP]
        self.lane.set_ports(bytes(self.ports))
        self.lane.set_local([HERE4, HERE6])
        self.lane.set_deny(DENY)
        self.lane.set_syslog(str(self.log_path), "<29>", f" portsentry[{PID}]: ")
        self.lane.set_record(self.record if record else -1)
        self.lane.set_route(ROUTE.format(out=self.route_out) if route else None)
        self.lane.allow(0, 1000)
        self.lane.enable(True)
        self.acts: list[Act] = []

    def send(self, packet: bytes) -> None:
        self.pair.theirs.send(packet)

    def items(self, count: int = 1, timeout: float = 5.0) -> list[bytes | Act]:
        """The next `count` messages from the lane (fewer only when `timeout` passes)."""
        got: list[bytes | Act] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and (left := deadline - time.monotonic()) > 0:
            select.select([self.capture], [], [], left)
            got.extend(self.capture.read_items(count - len(got)))
        self.acts.extend(item for item in got if isinstance(item, Act))
        return got

    def one(self, packet: bytes, handled: bool = True) -> bytes | Act:
        """`packet` through the lane; what came out (then marked decided, unless told not to)."""
        self.send(packet)
        items = self.items()
        assert len(items) == 1, items
        if handled:
            self.capture.handled()
        return items[0]

    def lines(self) -> list[bytes]:
        lines = []
        while True:
            try:
                lines.append(self.log.recv(4096))
            except BlockingIOError:
                return lines

    def reap(self) -> list[str]:
        """Every shell the lane started, seen through as the daemon does; their outputs."""
        from portsentry.responders.shell import wait_shell

        outputs = []
        for act in self.acts:
            if act.pid >= 0:
                result = wait_shell("KILL_ROUTE", act.pid, act.pipe, act.started, 10.0)
                outputs.append(result.output)
                self.lane.shell_done()
        self.acts = [act for act in self.acts if act.pid < 0]
        return outputs

    def record_lines(self) -> list[str]:
        """The record's lines (space-padded slots in a zeroed ring), padding stripped."""
        text = self.record_path.read_bytes().replace(b"\0", b"").decode()
        return [line.strip() for line in text.splitlines() if line.strip()]

    def written(self) -> tuple[list[str], bytes]:
        """The record's lines and KILL_ROUTE's output so far."""
        out = self.route_out.read_bytes() if self.route_out.exists() else b""
        return self.record_lines(), out

    def close(self) -> None:
        for item in self.capture.stop():
            if isinstance(item, Act):
                self.acts.append(item)
        self.reap()
        self.capture.close()
        os.close(self.record)
        self.log.close()


def keys(addresses: Iterable[str]) -> list[IPAddress]:
    return [ip_address(a) for a in addresses]
