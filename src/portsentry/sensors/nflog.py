"""The stealth sensor's NFLOG source: a NETLINK_NETFILTER socket bound to one nfnetlink_log group,
fed by the `log group` rules of our nftables table (NftablesBackend.capture_rules).

It offers CaptureSocket's interface. The rules sit after the drop of blocked hosts, so a blocked
scanner costs the daemon nothing, and IPv4 is reassembled before the input hook, so fragmented
scans are seen (docs/capture.md has the measurements).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import socket
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType

from portsentry.core.probe import Protocol
from portsentry.netlink.codec import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_OVERRUN,
    NoAnswer,
    acks,
    attr,
    attributes,
    nf_message,
    open_socket,
    split,
    wait_acks,
)
from portsentry.sensors.capture import SO_RCVBUFFORCE, CaptureError, CaptureStats, Network

# ---------------------------------------------------------------------------------------------
# nfnetlink_log's messages (linux/netfilter/nfnetlink_log.h); the netlink framing is ..netlink's

CFG_CMD = struct.Struct("!B")  # nfulnl_msg_config_cmd
CFG_MODE = struct.Struct("!IBx")  # nfulnl_msg_config_mode: copy_range, copy_mode, pad
BE32 = struct.Struct("!I")
BE16 = struct.Struct("!H")

NFNL_SUBSYS_ULOG = 4


class NlMsg(enum.IntEnum):
    ERROR = NLMSG_ERROR
    DONE = NLMSG_DONE  # closes a multi-packet batch
    OVERRUN = NLMSG_OVERRUN
    ULOG_PACKET = (NFNL_SUBSYS_ULOG << 8) | 0  # NFULNL_MSG_PACKET
    ULOG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | 1  # NFULNL_MSG_CONFIG


class CfgAttr(enum.IntEnum):
    CMD = 1
    MODE = 2
    NLBUFSIZ = 3
    TIMEOUT = 4  # flush timer, hundredths of a second
    QTHRESH = 5  # packets per message batch
    FLAGS = 6


class CfgCmd(enum.IntEnum):
    BIND = 1
    UNBIND = 2
    # PF_BIND (3) and PF_UNBIND (4) are deliberately not used: they set the namespace's default
    # logger (net.netfilter.nf_log.N) for everyone, and `log group N` rules never need them.


class PacketAttr(enum.IntEnum):
    PAYLOAD = 9  # the packet from its network header, up to the copy range
    SEQ = 12  # instance-local sequence number (with CFG_F_SEQ)


NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x1
SEQ_MODULUS = 1 << 32

# parse_nflog_batch runs once per packet: what it compares with, as plain ints and locals.
_PACKET, _DONE = int(NlMsg.ULOG_PACKET), int(NlMsg.DONE)
_PAYLOAD = int(PacketAttr.PAYLOAD)
_PACKET_ATTRIBUTES = frozenset({_PAYLOAD, int(PacketAttr.SEQ)})
_NFGENMSG_SIZE = NFGENMSG.size
_SEQ_SIZE = BE32.size
_unpack_be32 = BE32.unpack

# Defaults. 256 bytes hold any IPv4 header with options plus TCP (120), and IPv6 with up to 196
# bytes of extension headers before the TCP/UDP header; SYNs are shorter than that anyway.
COPY_RANGE = 256
# Every packet is sent to us at once: batching 64 (about 47 syscalls per 1,000 SYNs instead of
# 1,000) made a lone probe wait up to a flush interval (10 ms) in the kernel, and the first probe
# is the one whose block must be fast. Floods are drained many packets per wake-up anyway.
QTHRESH = 1
FLUSH_CENTISECONDS = 1
NLBUFSIZ = 1 << 16  # room for QTHRESH packets of COPY_RANGE plus metadata (kernel max 128 KiB)
RCVBUF = 4 << 20
RECV_SIZE = 1 << 18  # above the kernel's 128 KiB cap on one batch, so nothing is truncated
CONFIG_TIMEOUT = 2.0


def open_nfnetlink() -> socket.socket:
    return open_socket(NETLINK_NETFILTER)


@dataclass(frozen=True, slots=True)
class NflogBatch:
    """What one netlink datagram held: packet payloads in order, the count of malformed or
    unexpected parts skipped, and the first and last NFULA_SEQ seen (None without sequence)."""

    payloads: list[bytes]
    errors: int
    first_seq: int | None
    last_seq: int | None


def parse_nflog_batch(data: bytes) -> NflogBatch:
    """Split a datagram from an nfnetlink_log socket into packet payloads. Never raises: bad
    lengths and foreign messages are counted in `errors` and skipped (or end the walk, when the
    length of a message cannot be trusted)."""
    payloads: list[bytes] = []
    errors = 0
    first_seq: int | None = None
    last_seq: int | None = None
    spans, stop = split(data)
    for kind, _flags, _seq, _pid, start, end in spans:
        if kind == _PACKET:
            payload: bytes | None = None
            seq: bytes | None = None
            found, clean = attributes(data, start + _NFGENMSG_SIZE, end, _PACKET_ATTRIBUTES)
            if not clean:
                errors += 1
            for attribute, value in found:
                if attribute == _PAYLOAD:
                    payload = value
                elif len(value) == _SEQ_SIZE:  # PacketAttr.SEQ, the only other type asked for
                    seq = value
            if payload is None:
                errors += 1
            else:
                payloads.append(payload)
            if seq is not None:
                last_seq = _unpack_be32(seq)[0]
                if first_seq is None:
                    first_seq = last_seq
        elif kind != _DONE:
            errors += 1
    if stop < len(data):
        errors += 1  # a message whose length cannot be trusted, or a tail too short for a header
    return NflogBatch(payloads, errors, first_seq, last_seq)


def parse_nflog(data: bytes) -> tuple[list[bytes], int]:
    """The IP packets in one nfnetlink_log datagram, and how many malformed parts were skipped."""
    batch = parse_nflog_batch(data)
    return batch.payloads, batch.errors


def config_message(group: int, seq: int, attributes: bytes) -> bytes:
    """An NFULNL_MSG_CONFIG request for log group `group`, asking for an acknowledgement."""
    return nf_message(NlMsg.ULOG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, socket.AF_UNSPEC, group,
                      attributes)


def bind_attributes() -> bytes:
    return attr(CfgAttr.CMD, CFG_CMD.pack(CfgCmd.BIND))


def mode_attributes(copy_range: int, qthresh: int, flush_cs: int, nlbufsiz: int) -> bytes:
    return (
        attr(CfgAttr.MODE, CFG_MODE.pack(copy_range, NFULNL_COPY_PACKET))
        + attr(CfgAttr.NLBUFSIZ, BE32.pack(nlbufsiz))
        + attr(CfgAttr.TIMEOUT, BE32.pack(flush_cs))
        + attr(CfgAttr.QTHRESH, BE32.pack(qthresh))
        + attr(CfgAttr.FLAGS, BE16.pack(NFULNL_CFG_F_SEQ))
    )


def ack_errno(data: bytes, seq: int) -> int | None:
    """The errno the kernel answered request `seq` with (0 = success), None if `data` holds no
    answer to it. Never raises."""
    for answered, code in acks(data):
        if answered == seq:
            return code
    return None


class NflogGroupTaken(CaptureError):
    """Another socket (ulogd, a second daemon) already holds the log group."""


class NflogCapture:
    """Packets the nftables `log group <group>` rules pass, read without blocking.

    read_batch stops receiving once it holds `limit` packets but never splits a kernel batch
    (up to `qthresh` packets), so nothing waits in user space where poll() cannot see it.
    """

    before_nat = False  # the input hook: after prerouting NAT

    def __init__(
        self,
        group: int,
        *,
        copy_range: int = COPY_RANGE,
        qthresh: int = QTHRESH,
        flush_cs: int = FLUSH_CENTISECONDS,
        nlbufsiz: int = NLBUFSIZ,
        rcvbuf: int = RCVBUF,
        socket_factory: Callable[[], socket.socket] = open_nfnetlink,
        quieter: Callable[[frozenset[int]], None] | None = None,
        on_live: Callable[[dict[Protocol, frozenset[int]]], None] | None = None,
    ) -> None:
        # Updates our nftables log rule so datagrams to live UDP services are not copied to us.
        self._quieter = quieter
        self._on_live = on_live
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group!r} is not between 0 and 65535")
        self.group = group
        self._packets = 0
        self._gaps = 0
        self._overruns = 0
        self._unaccounted_overrun = False
        self._malformed = 0
        self._next_seq: int | None = None
        self._seq = 0
        try:
            sock = socket_factory()
        except OSError as error:
            raise CaptureError(f"cannot open an nfnetlink_log socket: {error}") from error
        self._sock = sock
        try:
            sock.bind((0, 0))
            self._set_rcvbuf(rcvbuf)
            sock.settimeout(CONFIG_TIMEOUT)
            self._configure(bind_attributes(), "bind")
            self._configure(mode_attributes(copy_range, qthresh, flush_cs, nlbufsiz), "configure")
            sock.setblocking(False)
        except CaptureError:
            sock.close()
            raise
        except OSError as error:
            sock.close()
            raise CaptureError(f"cannot set up NFLOG group {group}: {error}") from error

    def _set_rcvbuf(self, rcvbuf: int) -> None:
        try:
            # Scan bursts must fit while Python catches up; FORCE may exceed rmem_max.
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)

    def _configure(self, attributes: bytes, what: str) -> None:
        self._seq += 1
        self._sock.send(config_message(self.group, self._seq, attributes))
        try:
            # Packets logged between bind and configure: keep the count honest, drop them.
            answers = wait_acks(self._sock, (self._seq,), RECV_SIZE,
                                lambda data: self._account(parse_nflog_batch(data)))
        except NoAnswer:
            raise CaptureError(f"NFLOG group {self.group}: no answer to {what}") from None
        code = answers[self._seq]
        if code:
            raise self._config_error(code, what)

    def _config_error(self, code: int, what: str) -> CaptureError:
        if code in (errno.EPERM, errno.EBUSY) and what == "bind":
            return NflogGroupTaken(
                f"NFLOG group {self.group} is already in use by another program (ulogd, another "
                "portsentry?): set NFLOG_GROUP to a free group, or CAPTURE=\"packet\""
            )
        if code == errno.EPERM:
            return CaptureError(f"NFLOG group {self.group}: {what} refused: "
                                "stealth modes need root or CAP_NET_ADMIN")
        return CaptureError(f"NFLOG group {self.group}: {what} failed: {os.strerror(code)}")

    def _account(self, batch: NflogBatch) -> None:
        self._packets += len(batch.payloads)
        self._malformed += batch.errors
        if batch.first_seq is not None and batch.last_seq is not None:
            if self._next_seq is not None:
                gap = (batch.first_seq - self._next_seq) % SEQ_MODULUS
                # A "gap" of more than half the sequence space is a restart, not a loss.
                if gap < SEQ_MODULUS // 2:
                    self._gaps += gap
            self._next_seq = (batch.last_seq + 1) % SEQ_MODULUS
            self._unaccounted_overrun = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_batch(self, limit: int = 256) -> list[bytes]:
        """Queued packets, IP header first, in whole kernel batches until `limit` is reached;
        empty when nothing is waiting."""
        packets: list[bytes] = []
        recv = self._sock.recv
        while len(packets) < limit:
            try:
                data = recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped at least one batch; the next sequence number says how much.
                self._overruns += 1
                self._unaccounted_overrun = True
                continue
            batch = parse_nflog_batch(data)
            self._account(batch)
            packets += batch.payloads
        return packets

    @property
    def overruns(self) -> int:
        """ENOBUFS reports: times the kernel found the socket buffer full."""
        return self._overruns

    @property
    def malformed(self) -> int:
        return self._malformed

    def stats(self) -> CaptureStats:
        drops = self._gaps + (1 if self._unaccounted_overrun else 0)
        return CaptureStats(self._packets + drops, drops)

    def quiet_udp(self, ports: frozenset[int]) -> None:
        if self._quieter is not None:
            self._quieter(ports)

    def live_ports(self, live: dict[Protocol, frozenset[int]]) -> None:
        if self._on_live is not None:
            self._on_live(live)

    def skip_sources(self, networks: Collection[Network]) -> None:
        pass  # the first-probe ban's protect sets keep them in the kernel (service.kernelbans)

    def skip_interfaces(self, indexes: frozenset[int]) -> None:
        pass  # the input hook sees a packet once, whichever links it came in through

    def drops(self) -> int:
        """Packets logged to us that the kernel dropped for lack of buffer space (from gaps in
        the sequence numbers; an overrun not yet followed by a batch counts as one)."""
        return self.stats().drops

    def close(self) -> None:
        # Closing the socket destroys the kernel instance and frees the group.
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> NflogCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
