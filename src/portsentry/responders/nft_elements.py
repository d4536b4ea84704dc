"""nf_tables set elements over netlink: the messages (linux/netfilter/nf_tables.h, framed by
netlink.codec), atomic batches and their acknowledgements, and the sending thread a big restore
uses. The ban-set backend (responders.nftables, with nft_commands and nft_capture_state) is the
only user; the sets and chains themselves are made with the `nft` program, and the elements as
nft spells and lists them are nft_values'.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType

from portsentry.core.probe import IPAddress
from portsentry.netlink.codec import (
    NETLINK_CAP_ACK,
    NETLINK_NETFILTER,
    NFGENMSG,
    NLA_F_NESTED,
    NLA_HDRLEN,
    NLATTR,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSG_HDRLEN,
    NLMSGHDR,
    SOL_NETLINK,
    NoAnswer,
    attr,
    attributes,
    dump_any,
    error_reply,
    nested,
    nf_message,
    open_socket,
    split,
    wait_acks,
)
from portsentry.responders.backend import BackendError, address_text

# The nft text of the same elements lives in nft_values; still importable from here, where
# responders.nftables and the tests import them.
from portsentry.responders.nft_values import KERNEL_TIMEOUT_LIMIT as KERNEL_TIMEOUT_LIMIT
from portsentry.responders.nft_values import InconsistentListing as InconsistentListing
from portsentry.responders.nft_values import held_for as held_for
from portsentry.responders.nft_values import parse_caught_json as parse_caught_json
from portsentry.responders.nft_values import parse_dropped_json as parse_dropped_json
from portsentry.responders.nft_values import parse_set_json as parse_set_json
from portsentry.responders.nft_values import timeout_text as timeout_text

# ---------------------------------------------------------------------------------------------
# nf_tables messages (linux/netfilter/nf_tables.h); the netlink framing is portsentry.netlink's

BE64 = struct.Struct("!Q")
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFPROTO_UNSPEC, NFPROTO_INET = 0, 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT = 1, 4
NFTA_DATA_VALUE = 1

SocketFactory = Callable[[], socket.socket]
SEND_BUFFER = 1 << 20  # what open_netlink asks for; a bigger transaction asks for more
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

def open_netlink() -> socket.socket:
    """A NETLINK_NETFILTER socket in this process's network namespace."""
    sock = open_socket(NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        # Error replies then carry only the failed message's header, not its (large) payload.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class ElementOp:
    """One NEWSETELEM or DELSETELEM message: elements of one set, each with an optional timeout."""

    kind: int
    set_name: str
    elements: tuple[tuple[IPAddress, int | None], ...]  # address, timeout in milliseconds
    exclusive: bool = False  # a NEWSETELEM that fails (EEXIST) when an element is there already


@dataclass(frozen=True, slots=True)
class FlushOp:
    """A DELSETELEM naming no element: the kernel deletes every element of the set (in the
    transaction it belongs to, so adds after it in the same batch rebuild the set atomically)."""

    set_name: str
    kind: int = NFT_MSG_DELSETELEM


@dataclass(frozen=True, slots=True)
class EncodedOp:
    """An ElementOp whose elements are encoded already (restore_many: a million of them)."""

    kind: int
    set_name: str
    items: tuple[bytes, ...]
    exclusive: bool = False


def element_attribute(address: IPAddress, timeout_ms: int | None) -> bytes:
    """One set element as the layout declares it: LIST_ELEM { KEY { DATA_VALUE address },
    TIMEOUT }. element_message builds the same bytes from cached headers (a restore encodes a
    million of them); a unit test holds the two equal."""
    parts = [nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, address.packed))]
    if timeout_ms is not None:
        parts.append(attr(NFTA_SET_ELEM_TIMEOUT, BE64.pack(timeout_ms)))
    return nested(NFTA_LIST_ELEM, *parts)


TIMEOUT_HEAD = NLATTR.pack(NLA_HDRLEN + BE64.size, NFTA_SET_ELEM_TIMEOUT)


@functools.cache
def element_head(address_size: int, timed: bool) -> bytes:
    """The attribute headers in front of an element's address (4 or 16 bytes: no padding)."""
    value = NLA_HDRLEN + address_size
    key = NLA_HDRLEN + value
    whole = NLA_HDRLEN + key + (NLA_HDRLEN + BE64.size if timed else 0)
    return (NLATTR.pack(whole, NFTA_LIST_ELEM | NLA_F_NESTED)
            + NLATTR.pack(key, NFTA_SET_ELEM_KEY | NLA_F_NESTED) + NLATTR.pack(value, NFTA_DATA_VALUE))


Op = ElementOp | EncodedOp | FlushOp


def element_message(table: str, op: Op, seq: int) -> bytes:
    """The netlink message for `op` on `table` (family inet), asking for an acknowledgement."""
    names = (attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
             + attr(NFTA_SET_ELEM_LIST_SET, op.set_name.encode() + b"\0"))
    if isinstance(op, FlushOp):
        # Without NFTA_SET_ELEM_LIST_ELEMENTS: an empty list would delete nothing.
        return nf_message((NFNL_SUBSYS_NFTABLES << 8) | op.kind, NLM_F_REQUEST | NLM_F_ACK, seq,
                          NFPROTO_INET, 0, names)
    items = list(op.items) if isinstance(op, EncodedOp) else []
    for address, timeout_ms in () if isinstance(op, EncodedOp) else op.elements:
        if not isinstance(address, IPv4Address | IPv6Address):
            address_text(address)  # raises the one TypeError for anything but an address
        packed = address.packed
        if timeout_ms is None:
            items.append(element_head(len(packed), False) + packed)
        else:
            items.append(element_head(len(packed), True) + packed + TIMEOUT_HEAD + BE64.pack(timeout_ms))
    body = names + nested(NFTA_SET_ELEM_LIST_ELEMENTS, *items)
    flags = (NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op.kind == NFT_MSG_NEWSETELEM else 0)
             | (NLM_F_EXCL if op.exclusive else 0))
    return nf_message((NFNL_SUBSYS_NFTABLES << 8) | op.kind, flags, seq, NFPROTO_INET, 0, body)


def batch(table: str, ops: Sequence[Op], first_seq: int) -> bytes:
    """One nf_tables transaction: BATCH_BEGIN, a message per op (seq first_seq+1...), BATCH_END.
    The kernel applies all of it or none of it."""
    begin = nf_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, NFPROTO_UNSPEC,
                       NFNL_SUBSYS_NFTABLES)
    messages = [element_message(table, op, first_seq + 1 + i) for i, op in enumerate(ops)]
    end = nf_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, first_seq + 1 + len(ops), NFPROTO_UNSPEC,
                     NFNL_SUBSYS_NFTABLES)
    return begin + b"".join(messages) + end


def parse_acks(data: bytes) -> list[tuple[int, int]]:
    """(seq, errno) for every NLMSG_ERROR in `data` (errno 0 is an acknowledgement); other
    messages are skipped. Raises ValueError on a truncated or malformed message."""
    acks: list[tuple[int, int]] = []
    spans, stop = split(data)
    for kind, _flags, _seq, _pid, start, end in spans:
        if kind == NLMSG_ERROR:
            reply = error_reply(data, start, end)
            if reply is None:
                raise ValueError(f"short netlink error message at byte {start - NLMSG_HDRLEN}")
            acks.append(reply)
    rest = len(data) - stop
    if rest >= NLMSG_HDRLEN:
        length = NLMSGHDR.unpack_from(data, stop)[0]
        raise ValueError(f"malformed netlink message at byte {stop} (length {length})")
    if rest >= 4:
        raise ValueError(f"{rest} trailing bytes after the last netlink message")
    return acks


def has_elements(sock: socket.socket, table: str, set_name: str, seq: int = 1) -> bool:
    """Whether set `set_name` of inet `table` holds an element, from the first answer of a dump
    of its elements; the rest of the dump is left unread (close `sock` after). Not a listing: the
    kernel walks a hash set from its start for every 32 KiB it answers, and a million elements
    took a minute of system time; the first answer takes a moment."""
    body = (attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            + attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
    sock.send(nf_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP,
                         seq, NFPROTO_INET, 0, body))

    def holds_one(kind: int, data: bytes, start: int, end: int) -> bool:
        if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
            return False
        lists, _clean = attributes(data, start + NFGENMSG.size, end, {NFTA_SET_ELEM_LIST_ELEMENTS})
        return any(attributes(value, wanted={NFTA_LIST_ELEM})[0] for _kind, value in lists)

    return dump_any(sock, seq, holds_one, "set element dump")


def _describe_errno(code: int, set_names: str) -> str:
    if code == errno.ENOENT:
        return f"table or set {set_names} does not exist (run setup first)"
    if code == errno.ENFILE:
        return f"set {set_names} is full (raise set_size)"
    return os.strerror(code)


def _make_room(sock: socket.socket, size: int) -> None:
    """A socket send buffer that takes one `size`-byte transaction: the kernel reads a batch only
    from a single message, and refuses one larger than the buffer (EMSGSIZE). SO_SNDBUFFORCE
    passes net.core.wmem_max (the daemon has CAP_NET_ADMIN); without it, what wmem_max allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size + (1 << 16))
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size + (1 << 16))


class Refused(BackendError):
    """The kernel refused a transaction (none of it was applied); `codes`: the errnos it gave."""

    def __init__(self, message: str, codes: frozenset[int]) -> None:
        super().__init__(message)
        self.codes = codes


class NetlinkElements:
    """Sends element transactions over one NETLINK_NETFILTER socket, opened on first use."""

    def __init__(self, table: str, socket_factory: SocketFactory = open_netlink) -> None:
        self.table = table
        self._factory = socket_factory
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def transact(self, ops: Sequence[Op]) -> None:
        """Apply `ops` atomically; BackendError names the errno if the kernel refused them."""
        with self._lock:
            try:
                self._transact(ops)
            except OSError as exc:
                self._close()
                raise BackendError(f"nf_tables netlink: {exc}") from exc

    def _transact(self, ops: Sequence[Op]) -> None:
        if self._sock is None:
            self._sock = self._factory()
        sock = self._sock
        first = self._seq = (self._seq + len(ops) + 2) % (1 << 31)
        data = batch(self.table, ops, first)
        if len(data) > SEND_BUFFER:
            _make_room(sock, len(data))
        sock.sendall(data)
        # nfnetlink handles the batch inside the send call, so every answer is queued by now; the
        # short timeout only guards against a kernel that behaves otherwise.
        sock.settimeout(2.0)
        try:
            answers = wait_acks(sock, range(first + 1, first + 1 + len(ops)))
        except NoAnswer as exc:
            raise BackendError(f"nf_tables netlink: no answer for {exc.missing} message(s)") from None
        errors = [code for code in answers.values() if code]
        if errors:
            # Drain what else this transaction queued, so the next one reads only its own answers.
            sock.settimeout(0)
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while sock.recv(1 << 16):
                    pass
            names = "/".join(sorted({op.set_name for op in ops}))
            raise Refused(
                f"nf_tables refused the update of inet {self.table} {names}: "
                f"{_describe_errno(errors[0], names)}", frozenset(errors))

    def holds_any(self, set_name: str) -> bool:
        """Whether `set_name` holds an element (has_elements), on a socket of its own: the dump
        it leaves unread goes with it."""
        try:
            sock = self._factory()
            try:
                sock.settimeout(2.0)
                return has_elements(sock, self.table, set_name)
            finally:
                sock.close()
        except OSError as exc:
            raise BackendError(f"nf_tables netlink: {exc}") from exc

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


class Sender:
    """Sends restore batches on a thread of its own, at most two waiting, so that encoding the
    next batch overlaps the kernel's work on this one. The first failure is raised on exit."""

    def __init__(self, netlink: NetlinkElements) -> None:
        self._netlink = netlink
        self._queue: queue.Queue[EncodedOp | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nft-restore", daemon=True)

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def send(self, op: EncodedOp) -> None:
        if self._error is None:
            self._queue.put(op)

    def _run(self) -> None:
        while (op := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._netlink.transact([op])
                except BaseException as error:  # reported on exit, in the caller's thread
                    self._error = error

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and kind is None:
            raise self._error
