"""The packet sensor's socket: an AF_PACKET SOCK_DGRAM socket on all interfaces with a BPF filter.

It hands raw IP packets (no link header) to `parse_packet` in batches and reports the kernel's
drop count, so an overloaded sensor is visible instead of silently blind.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from types import TracebackType
from typing import Protocol

from portsentry.core.probe import Protocol as ProbeProtocol
from portsentry.sensors.bpf import Insn, pack_filter, reject_all_filter

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20+
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

_TPACKET_STATS = struct.Struct("=II")  # tp_packets, tp_drops


class CaptureError(Exception):
    """The capture socket could not be set up; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Cumulative kernel counts: packets that passed the filter, and those of them the socket
    buffer had no room for."""

    packets: int
    drops: int


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def attach_filter(sock: socket.socket, program: list[Insn]) -> None:
    """Attach (or replace) the socket's classic BPF filter."""
    array = ctypes.create_string_buffer(pack_filter(program))
    # The kernel copies the array during setsockopt; `array` stays referenced until then.
    fprog = _SockFprog(len(program), ctypes.addressof(array))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


class Capture(Protocol):
    """What the stealth sensor reads packets from: this AF_PACKET socket, or NFLOG."""

    # A tap sees packets before prerouting NAT, so a port published by DNAT looks unserved
    # (sensors.conntrack); NFLOG in the input hook sees them after it.
    before_nat: bool

    def fileno(self) -> int: ...
    def read_batch(self, limit: int = 256) -> list[bytes]: ...
    def drops(self) -> int: ...
    def quiet_udp(self, ports: frozenset[int]) -> None:
        """Keep datagrams to these UDP ports (live services) away from us in the kernel."""
        ...
    def live_ports(self, live: dict[ProbeProtocol, frozenset[int]]) -> None:
        """Watched ports that now have a live service: a capture that bans in the kernel
        (NFLOG with the first-probe ban) must stop banning probes to them."""
        ...
    def skip_sources(self, networks: Collection[Network]) -> None:
        """Keep packets from these sources (the ignore list) away from us in the kernel."""
        ...
    def skip_interfaces(self, indexes: frozenset[int]) -> None:
        """Bridge and bond ports: a tap sees their packets again on the master, so only the
        master's copy may count."""
        ...
    def close(self) -> None: ...


Network = IPv4Network | IPv6Network
# Builds the filter program that also keeps these UDP ports, these sources and what comes in on
# these interfaces away.
FilterBuilder = Callable[[frozenset[int], tuple[Network, ...], frozenset[int]], list[Insn]]


class CaptureSocket:
    """Inbound packets on every interface that pass `program`, read without blocking.

    `builder(ports, sources, interfaces)` builds the program that also keeps those UDP ports
    (quiet_udp), those sources (skip_sources) and those interfaces' packets (skip_interfaces)
    away."""

    before_nat = True

    def __init__(self, program: list[Insn], rcvbuf: int = 4 << 20, snaplen: int = 2048,
                 ignore_outgoing: bool = True, builder: FilterBuilder | None = None) -> None:
        self._builder = builder
        # Why no fast lane reads this capture where one was wanted (sensors.packet_capture.lane_capture).
        self.lane_unavailable: str | None = None
        self._quiet: frozenset[int] = frozenset()
        self._skip: tuple[Network, ...] = ()
        self._interfaces: frozenset[int] = frozenset()
        try:
            # A protocol in socket() starts delivery at once, before any filter is attached;
            # the reject-all filter and drain below close that window.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError as error:
            raise CaptureError(
                f"cannot open a packet capture socket ({error.strerror}): "
                "stealth modes need root or CAP_NET_RAW"
            ) from error
        except OSError as error:
            raise CaptureError(f"cannot open a packet capture socket: {error}") from error
        try:
            attach_filter(sock, reject_all_filter())
            sock.setblocking(False)
            self._sock = sock
            self._snaplen = snaplen
            self._packets = 0
            self._drops = 0
            while self._recv_one() is not None:
                pass
            self._read_stats()
            self._packets = self._drops = 0
            self._set_options(rcvbuf, ignore_outgoing)
            attach_filter(sock, program)
        except OSError as error:
            sock.close()
            raise CaptureError(f"cannot set up the packet capture socket: {error}") from error

    def _set_options(self, rcvbuf: int, ignore_outgoing: bool) -> None:
        # Our own outgoing packets would be rejected by the filter anyway; this saves the
        # kernel cloning each one to run it. Older kernels lack it; the filter still works.
        if ignore_outgoing:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            # A scan burst must fit while Python catches up; FORCE may exceed rmem_max.
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)

    def _recv_one(self) -> bytes | None:
        try:
            return self._sock.recv(self._snaplen)
        except BlockingIOError:
            return None

    def quiet_udp(self, ports: frozenset[int]) -> None:
        self._quiet = ports
        self._rebuild()

    def skip_sources(self, networks: Collection[Network]) -> None:
        self._skip = tuple(networks)
        self._rebuild()

    def skip_interfaces(self, indexes: frozenset[int]) -> None:
        self._interfaces = indexes
        self._rebuild()

    def _rebuild(self) -> None:
        if self._builder is not None:
            self.replace_filter(self._builder(self._quiet, self._skip, self._interfaces))

    def live_ports(self, live: dict[ProbeProtocol, frozenset[int]]) -> None:
        pass  # AF_PACKET only reads: nothing is banned here

    def replace_filter(self, program: list[Insn]) -> None:
        """Swap the BPF program in place (e.g. to quiet ports that gained a service)."""
        attach_filter(self._sock, program)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_batch(self, limit: int = 256) -> list[bytes]:
        """Up to `limit` queued packets, IP header first; empty when nothing is waiting."""
        batch: list[bytes] = []
        recv = self._sock.recv
        snaplen = self._snaplen
        try:
            while len(batch) < limit:
                batch.append(recv(snaplen))
        except BlockingIOError:
            pass
        return batch

    def _read_stats(self) -> None:
        # The kernel zeroes its counters on every read, so they are accumulated here.
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        packets, drops = _TPACKET_STATS.unpack(raw)
        self._packets += packets
        self._drops += drops

    def stats(self) -> CaptureStats:
        self._read_stats()
        return CaptureStats(self._packets, self._drops)

    def drops(self) -> int:
        """Packets the kernel passed through the filter but dropped for lack of buffer space."""
        return self.stats().drops

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CaptureSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
