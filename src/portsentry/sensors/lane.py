"""The fast lane's binding (sensors/lane.c, loaded with ctypes); the capture it reads is
sensors.lane_capture.

With the lane on, its C thread reads the AF_PACKET capture instead of the main loop. A lone TCP
SYN the daemon's compiled tables decide completely gets its detection line, its record and its
KILL_ROUTE from C within a fraction of a millisecond, and reaches the daemon as a report (`Act`);
every other packet reaches the daemon unchanged through a socket pair, in order with the reports,
which `lane_capture.LaneCapture.read_items` returns. The tables are the daemon's (service.lane): this module
only carries them to C. Without the compiled library (no C compiler where the package was
installed) `load()` says why and the daemon reads the capture itself, as before.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

from portsentry.core.probe import KIND_FIN, KIND_NULL, KIND_SYN, KIND_XMAS, IPAddress, Mode
from portsentry.sensors.capture import Network

# The C side's mode codes in its port table (lane.c MODES).
MODE_CODES = {Mode.STCP: 1, Mode.ATCP: 2}
MODES_BY_CODE = {code: mode for mode, code in MODE_CODES.items()}
# The probe kinds it takes (lane.c KIND_*): by the code in its reports, by the letter in its record.
KINDS_BY_CODE = {1: KIND_SYN, 2: KIND_FIN, 3: KIND_NULL, 4: KIND_XMAS}
KINDS_BY_LETTER = {"S": KIND_SYN, "F": KIND_FIN, "N": KIND_NULL, "X": KIND_XMAS}
PACKET_HEAD = struct.Struct("=cxxxI")  # 'P', seq; 'M', count (lane.c flush)
BATCH_ENTRY = struct.Struct("=IHxx")  # seq, length, then the packet
BATCH_BYTES = 65536  # lane.c
# struct act in lane.c: type, family, mode, sent, seq, port, source port, pid, pipe, spawn
# errno, record errno, record line, at, started, source, destination, kind.
ACT = struct.Struct("=cBBBIHHiiiiidd16s16sB7x")
RECORD_SLOT = 128  # bytes per line of the record file (lane.c)
KEY_SIZE = 16
STOP_POLL = 0.01  # seconds between looks at a stopping thread while its channel is quiet
_MAPPED = bytes(10) + b"\xff\xff"


class LaneUnavailable(Exception):
    """The compiled lane cannot be used here; the message says why."""


@dataclass(frozen=True, slots=True)
class Act:
    """What the lane did for one probe: its line (sent or not), its record, its KILL_ROUTE."""

    seq: int
    source: IPAddress
    destination: IPAddress
    port: int
    source_port: int
    mode: Mode
    sent: bool  # the detection line reached syslog
    pid: int  # KILL_ROUTE's shell, or -1 (none configured, or it could not start)
    pipe: int  # the read end of its output, or -1; whoever takes the Act closes it
    spawn_errno: int
    record_errno: int
    line: int  # its line in the record file (free it when its ban is in the store), or -1
    at: float  # time.time() of the decision
    started: float  # time.monotonic() when the shell was started
    kind: str = KIND_SYN  # 1.2's words for the probe (core.probe KIND_*)

    @classmethod
    def unpack(cls, data: bytes) -> Act:
        (_kind, family, mode, sent, seq, port, source_port, pid, pipe, spawn_errno, record_errno,
         line, at, started, source, destination, kind) = ACT.unpack(data)
        size = 4 if family == 4 else 16
        return cls(seq, ip_address(source[:size]), ip_address(destination[:size]), port, source_port,
                   MODES_BY_CODE[mode], bool(sent), pid, pipe, spawn_errno, record_errno, line, at,
                   started, KINDS_BY_CODE[kind])


def free_line(fd: int, line: int) -> None:
    """Zero `line` of the record file open on `fd`: its ban is in the store (raises OSError)."""
    if line >= 0:
        os.pwrite(fd, bytes(RECORD_SLOT), line * RECORD_SLOT)


def key(address: IPAddress) -> bytes:
    """The C tables' 16-byte key: IPv4 mapped into ::ffff:0:0/96, IPv6 as it is."""
    return _MAPPED + address.packed if isinstance(address, IPv4Address) else address.packed


def ranges(networks: Iterable[Network]) -> bytes:
    """Sorted, merged [first, last] key ranges of `networks`, as lane_set_deny takes them. The
    IPv6 network ::ffff:0:0/96 is left out: it is the IPv4 key space (lane.c defers every IPv6
    source in ::/80 itself)."""
    spans: list[tuple[int, int]] = []
    mapped = IPv6Network("::ffff:0:0/96")
    for network in networks:
        if isinstance(network, IPv6Network) and network.subnet_of(mapped):
            continue
        if isinstance(network, IPv4Network):
            base = int(IPv6Address(_MAPPED + network.network_address.packed))
            spans.append((base, base + network.num_addresses - 1))
        else:
            spans.append((int(network.network_address), int(network.broadcast_address)))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return b"".join(first.to_bytes(16, "big") + last.to_bytes(16, "big") for first, last in merged)


def library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_lane{suffix}"
        if candidate.exists():
            return candidate
    return None


_library: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The compiled lane; raises LaneUnavailable."""
    global _library
    if _library is not None:
        return _library
    path = library_path()
    if path is None:
        raise LaneUnavailable("the compiled fast lane is not installed (no C compiler when the "
                              "package was built)")
    try:
        lib = ctypes.CDLL(str(path), use_errno=True)
    except OSError as error:
        raise LaneUnavailable(f"cannot load {path}: {error}") from error
    p, i, u32, u64, size, text = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64,
                                  ctypes.c_size_t, ctypes.c_char_p)
    for name, result, arguments in (
        ("lane_new", p, ()), ("lane_start", i, (p, i, i)), ("lane_stop", None, (p,)),
        ("lane_stop_request", None, (p,)), ("lane_stopped", i, (p,)),
        ("lane_free", None, (p,)), ("lane_enable", None, (p, i)),
        ("lane_set_syslog", i, (p, text, text, text)), ("lane_set_record", i, (p, i)),
        ("lane_set_route", i, (p, text)), ("lane_render", i, (p, text, ctypes.c_uint, i, p, size)),
        ("lane_set_ports", None, (p, text)), ("lane_set_local", i, (p, text, size)),
        ("lane_set_deny", i, (p, text, size)), ("lane_set_ignore", i, (p, text, p)),
        ("lane_pin", i, (p, text)), ("lane_pin_many", i, (p, text, size)), ("lane_unpin", None, (p, text)),
        ("lane_pinned", i, (p, text)), ("lane_pin_count", size, (p,)),
        ("lane_pin_longest_run", size, (p,)), ("lane_clear_pins", None, (p,)),
        ("lane_processed", None, (p, u32)), ("lane_allow", u64, (p, u64, u64)), ("lane_claim", i, (p,)),
        ("lane_shell_done", None, (p,)), ("lane_set_shell_cap", None, (p, u32)), ("lane_errors", u64, (p,)),
    ):
        function = getattr(lib, name)
        function.restype = result
        function.argtypes = arguments
    _library = lib
    return lib


class _Freed:
    """A closed lane's library: every call does nothing. The blocks a lane began outlive it (a
    reload that rebinds the sensors, the stop): their workers and the main loop still report to
    it (shell reaped, record settled, source pinned or let go of), which on the freed C state
    crashed the daemon."""

    def __getattr__(self, name: str) -> Callable[..., int]:
        answer = 1 if name == "lane_stopped" else 0  # its thread has ended
        return lambda *_args: answer


class Lane:
    """One lane: its C state and thread. Setters may be called while the thread runs (C holds a
    lock per packet); every table starts empty and the lane off, so nothing acts until the
    daemon has compiled its tables and called enable(True). Once closed, every call does
    nothing."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | _Freed = load()
        self._freeing = threading.Lock()  # close() against shell_done() on a responder thread
        handle = self._lib.lane_new()
        if not handle:
            raise LaneUnavailable("cannot create the fast lane (no sock_diag netlink socket)")
        self._handle = ctypes.c_void_p(handle)
        self.channel: socket.socket | None = None
        self._writer: socket.socket | None = None

    def start(self, capture_fd: int) -> socket.socket:
        """Start the thread on `capture_fd`; returns the daemon's end of the channel."""
        reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Room for a scan burst while the main loop catches up, as the capture's own buffer.
        for sock, option in ((writer, socket.SO_SNDBUF), (reader, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        reader.setblocking(False)
        if self._lib.lane_start(self._handle, capture_fd, writer.fileno()) != 0:
            reader.close()
            writer.close()
            raise LaneUnavailable("cannot start the fast lane's thread")
        self.channel, self._writer = reader, writer
        return reader

    def stop(self) -> None:
        """Stop the thread (its packets in flight stay readable on the channel). Waits for it:
        the channel's reader calls stop_request() and reads until stopped() instead."""
        self._lib.lane_stop(self._handle)

    def stop_request(self) -> None:
        """Ask the thread to stop after its batch; it may still wait for room on the channel."""
        self._lib.lane_stop_request(self._handle)

    def stopped(self) -> bool:
        """Whether the thread has ended."""
        return bool(self._lib.lane_stopped(self._handle))

    def close(self) -> None:
        self.stop()
        with self._freeing:
            lib, self._lib = self._lib, _Freed()
            lib.lane_free(self._handle)
            self._handle = ctypes.c_void_p(None)
        for sock in (self.channel, self._writer):
            if sock is not None:
                sock.close()
        self.channel = self._writer = None

    def enable(self, on: bool) -> None:
        self._lib.lane_enable(self._handle, 1 if on else 0)

    def set_syslog(self, path: str, prefix: str, ident: str) -> None:
        if self._lib.lane_set_syslog(self._handle, os.fsencode(path), prefix.encode(), ident.encode()) != 0:
            raise LaneUnavailable(f"syslog socket path too long for the fast lane: {path}")

    def set_record(self, fd: int) -> None:
        """The record file, opened read-write (-1: none; the lane then starts no command); a
        line is freed by zeroing it (`free_line`), by whoever holds the file."""
        if self._lib.lane_set_record(self._handle, fd) != 0:
            why = os.strerror(ctypes.get_errno()) if ctypes.get_errno() else "error"
            raise LaneUnavailable(f"cannot map the fast lane's record file: {why}")


    def set_route(self, template: str | None) -> None:
        if self._lib.lane_set_route(self._handle, (template or "").encode()) != 0:
            raise LaneUnavailable("KILL_ROUTE is too long for the fast lane (4095 bytes at most)")

    def render(self, target: str, port: int, mode: Mode) -> str | None:
        """KILL_ROUTE as C fills it in (the daemon compares it with its own at each change)."""
        out = ctypes.create_string_buffer(8192)
        if self._lib.lane_render(self._handle, target.encode(), port, MODE_CODES[mode], out, len(out)) != 0:
            return None
        return out.value.decode()

    def set_ports(self, table: bytes) -> None:
        if len(table) != 65536:
            raise ValueError("the port table has one byte per port")
        self._lib.lane_set_ports(self._handle, table)

    def set_local(self, addresses: Collection[IPAddress]) -> None:
        blob = b"".join(key(a) for a in addresses)
        self._lib.lane_set_local(self._handle, blob, len(addresses))

    def set_deny(self, networks: Iterable[Network]) -> None:
        blob = ranges(networks)
        self._lib.lane_set_deny(self._handle, blob, len(blob) // 32)

    def set_ignore_file(self, path: str | None, file_key: tuple[int, int, int, int] | None) -> None:
        """The ignore file and the (dev, ino, size, mtime_ns) the list in force was read from
        (None: it could not be read); C stats it per probe and hands the probe on when it differs."""
        if path is None:
            self._lib.lane_set_ignore(self._handle, b"", None)
            return
        array = (ctypes.c_uint64 * 4)(*file_key) if file_key is not None else None
        if self._lib.lane_set_ignore(self._handle, os.fsencode(path), array) != 0:
            raise LaneUnavailable(f"ignore file path too long for the fast lane: {path}")

    def pin(self, address: IPAddress) -> None:
        if self._lib.lane_pin(self._handle, key(address)) != 0:
            raise LaneUnavailable("no memory for the fast lane's table of known sources")

    def pin_many(self, packed: Iterable[bytes]) -> None:
        """Pin addresses given packed (4 or 16 bytes): a million at start without an address
        object each."""
        blob = b"".join(_MAPPED + p if len(p) == 4 else p for p in packed)
        if self._lib.lane_pin_many(self._handle, blob, len(blob) // KEY_SIZE) != 0:
            raise LaneUnavailable("no memory for the fast lane's table of known sources")

    def unpin(self, address: IPAddress) -> None:
        self._lib.lane_unpin(self._handle, key(address))

    def pinned(self, address: IPAddress) -> bool:
        return bool(self._lib.lane_pinned(self._handle, key(address)))

    def pin_count(self) -> int:
        return int(self._lib.lane_pin_count(self._handle))

    def longest_run(self) -> int:
        """The longest run of used slots in the table of pins (how far a probe may walk)."""
        return int(self._lib.lane_pin_longest_run(self._handle))

    def clear_pins(self) -> None:
        self._lib.lane_clear_pins(self._handle)

    def processed(self, seq: int) -> None:
        self._lib.lane_processed(self._handle, seq & 0xFFFFFFFF)

    def allow(self, adopted: int, free: int) -> int:
        """The lane may make `free` bans beyond the `adopted` ones; returns how many it made."""
        return int(self._lib.lane_allow(self._handle, adopted, free))

    def claim(self) -> bool:
        """One of the lane's free bans for a ban the daemon starts itself; False: none left."""
        return bool(self._lib.lane_claim(self._handle))

    def shell_done(self) -> None:
        with self._freeing:
            self._lib.lane_shell_done(self._handle)

    def errors(self) -> int:
        """Failures inside the lane: a message the daemon's end of the channel never took, a
        source it could not remember (it then stays off)."""
        return int(self._lib.lane_errors(self._handle))

    def set_shell_cap(self, cap: int) -> None:
        self._lib.lane_set_shell_cap(self._handle, cap)
