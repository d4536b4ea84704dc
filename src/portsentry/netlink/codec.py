"""The one netlink codec: message and attribute layouts, declared once, parsed by one function each,
and the two socket conversations everyone has with the kernel (a dump, and waiting for acks).

Used by host facts (rtnetlink), sock_diag, the NFLOG sensor and the nftables backend; each of them
declares only its own family's bodies. Parsing is pure and never raises on malformed bytes: the
walkers return what fitted and say where (or whether) they had to stop, and each caller decides
whether that is an error to count, a reason to stop, or something to refuse. `split` and
`attributes` are on the NFLOG sensor's per-packet path: they work on offsets into the datagram,
copy only the values asked for, and build plain tuples rather than objects.

Layouts are linux/netlink.h and linux/netfilter/nfnetlink.h, in host byte order except nfgenmsg.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

# --- Layouts and numbers -------------------------------------------------------------------------

NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
NLATTR = struct.Struct("=HH")  # nla_len, nla_type; the value follows, padded to NLA_ALIGNTO
NLMSGERR = struct.Struct("=i")  # struct nlmsgerr: negative errno, then the request's nlmsghdr
NFGENMSG = struct.Struct("!BBH")  # nfnetlink: nfgen_family, version, res_id (big-endian)

NLMSG_ALIGNTO = NLA_ALIGNTO = 4
NLMSG_HDRLEN = NLMSGHDR.size
NLA_HDRLEN = NLATTR.size
NLMSGERR_LEN = NLMSGERR.size + NLMSGHDR.size  # an error payload holds at least this much

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the dump raced a change: its view may be inconsistent
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200  # on a new object: fail with EEXIST when it is there already
NLM_F_CREATE = 0x400

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
ANY_TYPE: Container[int] = range(NLA_TYPE_MASK + 1)  # `wanted` for every attribute

NETLINK_ROUTE, NETLINK_SOCK_DIAG, NETLINK_NETFILTER = 0, 4, 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # error replies then quote only the failed request's header
NFNETLINK_V0 = 0

DUMP_RECV_SIZE = 1 << 16  # kernel dump skbs are at most ~32 KiB
ACK_RECV_SIZE = 1 << 16

# One message as `split` reports it: type, flags, seq, pid, and where its payload starts and ends in
# the datagram. A plain tuple, not a class: one is built per packet on the NFLOG path.
Span = tuple[int, int, int, int, int, int]

_unpack_header = NLMSGHDR.unpack_from
_unpack_attribute = NLATTR.unpack_from
_unpack_error = NLMSGERR.unpack_from


def align(length: int) -> int:
    """`length` rounded up to netlink's 4-byte alignment (NLMSG_ALIGN, NLA_ALIGN)."""
    return (length + 3) & ~3


# --- Parsing: bytes in, records out, nothing raises on bad input ----------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message with its payload copied out (for the callers not on a packet path)."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def split(data: bytes) -> tuple[list[Span], int]:
    """The messages of a datagram, in order, and the offset where the walk stopped.

    The walk stops at the first header whose length cannot be trusted (shorter than a header, or
    running past the datagram) or at a tail too short for a header. So the stop offset is
    len(data) or more (the last message's padding may be missing) when every byte was used;
    otherwise at least NLMSG_HDRLEN bytes left means a bad header, fewer a short tail.
    """
    spans: list[Span] = []
    size = len(data)
    offset = 0
    while offset + NLMSG_HDRLEN <= size:
        length, kind, flags, seq, pid = _unpack_header(data, offset)
        end = offset + length
        if length < NLMSG_HDRLEN or end > size:
            break
        spans.append((kind, flags, seq, pid, offset + NLMSG_HDRLEN, end))
        offset += (length + 3) & ~3
    return spans, offset


def messages(data: bytes) -> list[Message]:
    """The messages of a datagram, up to the first that does not fit."""
    return [
        Message(kind, flags, seq, pid, data[start:end])
        for kind, flags, seq, pid, start, end in split(data)[0]
    ]


def attributes(
    data: bytes, start: int = 0, end: int | None = None, wanted: Container[int] = ANY_TYPE
) -> tuple[list[tuple[int, bytes]], bool]:
    """(type, value) of the attributes in data[start:end] whose type (without NLA_F_NESTED and
    NLA_F_NET_BYTEORDER) is in `wanted`, in order; and whether the walk was clean. It is not when
    `start` lies past `end` or an attribute's length cannot be trusted: the walk stops there, and
    what came before is still returned. Trailing bytes too short for an attribute are ignored.
    The bounds are the caller's to get right (0 <= start, end <= len(data)), as a span of `split`
    or a payload's length gives them: they are not checked again on the per-packet path.
    """
    if end is None:
        end = len(data)
    found: list[tuple[int, bytes]] = []
    if start > end:
        return found, False
    last = end - NLA_HDRLEN
    while start <= last:
        length, kind = _unpack_attribute(data, start)
        if length < NLA_HDRLEN or start + length > end:
            return found, False
        kind &= NLA_TYPE_MASK
        if kind in wanted:
            found.append((kind, data[start + NLA_HDRLEN : start + length]))
        start += (length + 3) & ~3
    return found, True


def error_reply(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(seq of the request answered, errno) from the payload data[start:end] of an NLMSG_ERROR;
    errno 0 is an acknowledgement. None if the payload is too short for struct nlmsgerr."""
    if end - start < NLMSGERR_LEN:
        return None
    (code,) = _unpack_error(data, start)
    seq: int = _unpack_header(data, start + NLMSGERR.size)[3]
    return seq, -code


def acks(data: bytes) -> list[tuple[int, int]]:
    """(seq, errno) of every NLMSG_ERROR in a datagram, in order, up to the first message that
    does not fit; other messages, and errors too short to say what they answer, are skipped."""
    found: list[tuple[int, int]] = []
    for kind, _flags, _seq, _pid, start, end in split(data)[0]:
        if kind == NLMSG_ERROR:
            reply = error_reply(data, start, end)
            if reply is not None:
                found.append(reply)
    return found


# --- Building: records in, bytes out --------------------------------------------------------------


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to NLA_ALIGNTO (nla_len counts the value, not the padding)."""
    size = NLA_HDRLEN + len(value)
    if size > 0xFFFF:
        raise ValueError(f"netlink attribute {kind} is {size} bytes long (at most 65535)")
    return NLATTR.pack(size, kind) + value + bytes(-size % NLA_ALIGNTO)


def nested(kind: int, *children: bytes) -> bytes:
    """An attribute holding `children` (built by attr or nested), flagged NLA_F_NESTED."""
    return attr(kind | NLA_F_NESTED, b"".join(children))


def message(kind: int, flags: int, seq: int, body: bytes = b"", pid: int = 0) -> bytes:
    """One message, padded to NLMSG_ALIGNTO so that another may follow it in the datagram."""
    length = NLMSG_HDRLEN + len(body)
    return NLMSGHDR.pack(length, kind, flags, seq, pid) + body + bytes(-length % NLMSG_ALIGNTO)


def nf_message(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes = b"") -> bytes:
    """One nfnetlink message: nfgenmsg (version 0) in front of `body`."""
    return message(kind, flags, seq, NFGENMSG.pack(family, NFNETLINK_V0, res_id) + body)


# --- The socket conversations ---------------------------------------------------------------------


def open_socket(protocol: int) -> socket.socket:
    """A raw netlink socket for `protocol` (NETLINK_ROUTE, ...), not inherited across exec."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)


def dump(
    sock: socket.socket, request: bytes, seq: int, recv_size: int = DUMP_RECV_SIZE
) -> tuple[list[Message], bool]:
    """Send a dump request numbered `seq` and collect the messages answering it, up to
    NLMSG_DONE; also whether the kernel flagged the dump as interrupted (NLM_F_DUMP_INTR: ask
    again for a consistent view). Messages answering other requests are skipped.

    Raises OSError: with the kernel's errno when it refuses the dump, EBADMSG for a reply that
    does not parse, EIO if the socket closes, TimeoutError when the socket's timeout passes.
    """
    sock.send(request)
    found: list[Message] = []
    interrupted = False
    while True:
        data = sock.recv(recv_size)
        if not data:
            raise OSError(errno.EIO, "netlink socket closed during a dump")
        spans, stop = split(data)
        if stop < len(data):
            raise OSError(errno.EBADMSG, f"malformed netlink reply at byte {stop} of {len(data)}")
        for kind, flags, answered, pid, start, end in spans:
            if answered != seq:
                continue
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            if kind == NLMSG_DONE:
                return found, interrupted
            if kind == NLMSG_ERROR:
                reply = error_reply(data, start, end)
                code = errno.EBADMSG if reply is None else reply[1]
                if code == 0:
                    return found, interrupted
                raise OSError(code, f"netlink dump refused: {os.strerror(code)}")
            found.append(Message(kind, flags, answered, pid, data[start:end]))


def dump_any(sock: socket.socket, seq: int, found: Callable[[int, bytes, int, int], bool], what: str,
             worth_a_look: Callable[[bytes], bool] | None = None) -> bool:
    """Read the dump answering request `seq` (already sent) until a message for which
    `found(type, datagram, payload start, payload end)` is true, then True; the rest of the dump
    is left unread (close `sock` after). False at the dump's end. `worth_a_look(datagram)`, when
    given, skips a datagram's messages cheaply (a byte search before any parse). Raises OSError:
    the kernel's errno when it refuses the dump, EBADMSG for a reply that does not parse, EIO if
    the socket closes."""
    while True:
        data = sock.recv(DUMP_RECV_SIZE)
        if not data:
            raise OSError(errno.EIO, f"netlink socket closed during a {what}")
        spans, stop = split(data)
        if stop < len(data):
            raise OSError(errno.EBADMSG, f"malformed netlink reply to a {what}")
        look = worth_a_look is None or worth_a_look(data)
        for kind, _flags, answered, _pid, start, end in spans:
            if answered != seq:
                continue
            if kind == NLMSG_DONE:
                return False
            if kind == NLMSG_ERROR:
                reply = error_reply(data, start, end)
                code = errno.EBADMSG if reply is None else reply[1]
                if code == 0:
                    return False
                raise OSError(code, f"{what} refused: {os.strerror(code)}")
            if look and found(kind, data, start, end):
                return True


class NoAnswer(TimeoutError):
    """The socket's timeout passed with `missing` requests still unanswered."""

    def __init__(self, missing: int) -> None:
        super().__init__(errno.ETIMEDOUT, f"no answer to {missing} netlink request(s)")
        self.missing = missing


def wait_acks(
    sock: socket.socket,
    seqs: Iterable[int],
    recv_size: int = ACK_RECV_SIZE,
    other: Callable[[bytes], None] | None = None,
) -> dict[int, int]:
    """Receive until every request numbered in `seqs` is answered, or one is refused; returns
    errno by seq for those answered, in the order the answers came (0 is an acknowledgement).
    A datagram answering none of them is handed to `other` (packets of a subscription that
    arrived meanwhile), or dropped. Raises NoAnswer when the socket's timeout passes first."""
    wanted = set(seqs)
    answers: dict[int, int] = {}
    refused = False
    while wanted and not refused:
        try:
            data = sock.recv(recv_size)
        except TimeoutError:
            raise NoAnswer(len(wanted)) from None
        answered = False
        for seq, code in acks(data):
            if seq in wanted:
                wanted.discard(seq)
                answers[seq] = code
                answered = True
                refused |= code != 0
        if not answered and other is not None:
            other(data)
    return answers
