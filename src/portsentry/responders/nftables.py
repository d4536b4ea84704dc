"""The nftables ban backend: one table `inet portsentry` that we own, with timeout sets `blocked4`
and `blocked6` and one chain dropping their members, so bans expire in the kernel on their own.

Mechanism (measured with bench/ban_backends.py, nft 1.0.6, kernel 6.18, 100k bans active): the
table, chain and sets are made, listed and removed with the `nft` program, but bans are added and
removed with nf_tables netlink messages sent from this process: 0.03 ms per add, 0.02 ms per
remove. One `nft` process per ban costs 2-4 ms to add and ~16 ms to remove (nft 1.0.6 spends
that on any command containing `delete element`, even with an empty set); a long-lived `nft -i`
fed through a pipe costs ~0.19 ms but its only completion signal is parsing its error text. The
kernel answers netlink within the send call, with an errno per message. `mechanism="cli"` keeps
everything on `nft -f -` (~17 ms per operation) for systems where the socket cannot be opened.

Every add is one atomic transaction "add without timeout, delete, add with timeout", so re-adding
an address sets its new timeout on every kernel (older kernels keep the old timeout on a plain
re-add); every remove is "add, delete", so removing an absent address succeeds without needing
`destroy` (kernel 6.3, nft 1.0.8).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from types import TracebackType
from typing import ClassVar, TypeVar

from portsentry.core.probe import IPAddress, Protocol
from portsentry.netlink.codec import (
    NETLINK_CAP_ACK,
    NETLINK_NETFILTER,
    NLA_F_NESTED,
    NLA_HDRLEN,
    NLATTR,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSG_HDRLEN,
    NLMSGHDR,
    SOL_NETLINK,
    NoAnswer,
    attr,
    error_reply,
    nested,
    nf_message,
    open_socket,
    split,
    wait_acks,
)
from portsentry.responders.backend import (
    BackendError,
    BanBackend,
    Runner,
    address_text,
    check_timeout,
    run_argv,
    unpacked,
)

NFT = "nft"
HOOKS = frozenset({"prerouting", "input", "forward"})
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
SET4, SET6 = "blocked4", "blocked6"
CHAIN = "filter"
# The stealth sensor's NFLOG rules (sensors/nflog.py): a base chain on the input hook one priority
# step after CHAIN, so a packet CHAIN drops never reaches them.
CAPTURE_CHAIN = "capture"
# Elements per netlink message in add_many: a batch of three such messages stays well below the
# default 208 KiB socket send buffer even for IPv6 (about 40 bytes per element).
BATCH_ELEMENTS = 1024
LISTING_ATTEMPTS = 10
LISTING_RETRY_DELAY = 0.2

# ---------------------------------------------------------------------------------------------
# nf_tables messages (linux/netfilter/nf_tables.h); the netlink framing is portsentry.netlink's

BE64 = struct.Struct("!Q")
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFPROTO_UNSPEC, NFPROTO_INET = 0, 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT = 1, 4
NFTA_DATA_VALUE = 1

SocketFactory = Callable[[], socket.socket]

_T = TypeVar("_T")


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


@dataclass(frozen=True, slots=True)
class EncodedOp:
    """An ElementOp whose elements are encoded already (restore_many: a million of them)."""

    kind: int
    set_name: str
    items: tuple[bytes, ...]


def element_attribute(address: IPAddress, timeout_ms: int | None) -> bytes:
    """One set element as the layout declares it: LIST_ELEM { KEY { DATA_VALUE address },
    TIMEOUT }. element_message builds the same bytes from cached headers (a restore encodes a
    million of them); a unit test holds the two equal."""
    parts = [nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, address.packed))]
    if timeout_ms is not None:
        parts.append(attr(NFTA_SET_ELEM_TIMEOUT, BE64.pack(timeout_ms)))
    return nested(NFTA_LIST_ELEM, *parts)


_TIMEOUT_HEAD = NLATTR.pack(NLA_HDRLEN + BE64.size, NFTA_SET_ELEM_TIMEOUT)


@functools.cache
def _element_head(address_size: int, timed: bool) -> bytes:
    """The attribute headers in front of an element's address (4 or 16 bytes: no padding)."""
    value = NLA_HDRLEN + address_size
    key = NLA_HDRLEN + value
    whole = NLA_HDRLEN + key + (NLA_HDRLEN + BE64.size if timed else 0)
    return (NLATTR.pack(whole, NFTA_LIST_ELEM | NLA_F_NESTED)
            + NLATTR.pack(key, NFTA_SET_ELEM_KEY | NLA_F_NESTED) + NLATTR.pack(value, NFTA_DATA_VALUE))


def element_message(table: str, op: ElementOp | EncodedOp, seq: int) -> bytes:
    """The netlink message for `op` on `table` (family inet), asking for an acknowledgement."""
    items = list(op.items) if isinstance(op, EncodedOp) else []
    for address, timeout_ms in () if isinstance(op, EncodedOp) else op.elements:
        if not isinstance(address, IPv4Address | IPv6Address):
            address_text(address)  # raises the one TypeError for anything but an address
        packed = address.packed
        if timeout_ms is None:
            items.append(_element_head(len(packed), False) + packed)
        else:
            items.append(_element_head(len(packed), True) + packed + _TIMEOUT_HEAD + BE64.pack(timeout_ms))
    body = (
        attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        + attr(NFTA_SET_ELEM_LIST_SET, op.set_name.encode() + b"\0")
        + nested(NFTA_SET_ELEM_LIST_ELEMENTS, *items)
    )
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op.kind == NFT_MSG_NEWSETELEM else 0)
    return nf_message((NFNL_SUBSYS_NFTABLES << 8) | op.kind, flags, seq, NFPROTO_INET, 0, body)


def batch(table: str, ops: Sequence[ElementOp | EncodedOp], first_seq: int) -> bytes:
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


def _describe_errno(code: int, set_names: str) -> str:
    if code == errno.ENOENT:
        return f"table or set {set_names} does not exist (run setup first)"
    if code == errno.ENFILE:
        return f"set {set_names} is full (raise set_size)"
    return os.strerror(code)


class NetlinkElements:
    """Sends element transactions over one NETLINK_NETFILTER socket, opened on first use."""

    def __init__(self, table: str, socket_factory: SocketFactory = open_netlink) -> None:
        self.table = table
        self._factory = socket_factory
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def transact(self, ops: Sequence[ElementOp | EncodedOp]) -> None:
        """Apply `ops` atomically; BackendError names the errno if the kernel refused them."""
        with self._lock:
            try:
                self._transact(ops)
            except OSError as exc:
                self._close()
                raise BackendError(f"nf_tables netlink: {exc}") from exc

    def _transact(self, ops: Sequence[ElementOp | EncodedOp]) -> None:
        if self._sock is None:
            self._sock = self._factory()
        sock = self._sock
        first = self._seq = (self._seq + len(ops) + 2) % (1 << 31)
        sock.sendall(batch(self.table, ops, first))
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
            raise BackendError(
                f"nf_tables refused the update of inet {self.table} {names}: "
                f"{_describe_errno(errors[0], names)}"
            )

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


class _Sender:
    """Sends restore batches on a thread of its own, at most two waiting, so that encoding the
    next batch overlaps the kernel's work on this one. The first failure is raised on exit."""

    def __init__(self, netlink: NetlinkElements) -> None:
        self._netlink = netlink
        self._queue: queue.Queue[EncodedOp | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nft-restore", daemon=True)

    def __enter__(self) -> _Sender:
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


# ---------------------------------------------------------------------------------------------


def timeout_text(timeout: float) -> str:
    """nft's spelling of a timeout: whole seconds as `3600s`, anything else in milliseconds."""
    ms = timeout_ms(timeout)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def timeout_ms(timeout: float) -> int:
    # Rounded up, so a ban never ends before the daemon's own record of it.
    return max(1, math.ceil(timeout * 1000 - 1e-6))


class NftablesBackend(BanBackend):
    """Bans as elements of two timeout sets in a table of our own; see the module docstring."""

    name: ClassVar[str] = "nftables"
    families: ClassVar[frozenset[int]] = frozenset({4, 6})
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"table", "hook", "priority", "set_size", "mechanism", "socket_factory"}
    )

    def __init__(
        self,
        table: str = "portsentry",
        hook: str = "input",
        priority: int = -10,
        set_size: int = 262144,
        runner: Runner = run_argv,
        *,
        mechanism: str = "netlink",
        socket_factory: SocketFactory = open_netlink,
    ) -> None:
        super().__init__(runner)
        if not _NAME.fullmatch(table):
            raise ValueError(f"nftables table name {table!r} must be a letter then up to 31 "
                             "letters, digits or '_'")
        if hook not in HOOKS:
            raise ValueError(f"nftables hook {hook!r} must be one of {', '.join(sorted(HOOKS))}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"nftables priority must be an integer, not {priority!r}")
        if isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 1:
            raise ValueError(f"nftables set_size must be a positive integer, not {set_size!r}")
        if mechanism not in ("netlink", "cli"):
            raise ValueError(f"nftables mechanism must be 'netlink' or 'cli', not {mechanism!r}")
        self.table, self.hook, self.priority, self.set_size = table, hook, priority, set_size
        self.mechanism = mechanism
        self._netlink = NetlinkElements(table, socket_factory) if mechanism == "netlink" else None
        self._capture: CaptureSpec | None = None

    # -- commands as data (the golden tests pin these) ------------------------------------------

    def setup_script(self) -> str:
        """Creates the table, sets and chain if missing; `add` never replaces existing objects,
        and the rules are only added when the chain is new (flushing it would be racy)."""
        t = f"inet {self.table}"
        return (
            f"add table {t}\n"
            f"add set {t} {SET4} {{ type ipv4_addr; flags timeout; size {self.set_size}; }}\n"
            f"add set {t} {SET6} {{ type ipv6_addr; flags timeout; size {self.set_size}; }}\n"
            f"add chain {t} {CHAIN} {{ type filter hook {self.hook} priority {self.priority}; "
            "policy accept; }\n"
        )

    def rules_script(self) -> str:
        t = f"inet {self.table}"
        return (
            f"add rule {t} {CHAIN} ip saddr @{SET4} counter drop\n"
            f"add rule {t} {CHAIN} ip6 saddr @{SET6} counter drop\n"
        )

    def capture_script(self, spec: CaptureSpec) -> str:
        """Re-creates the capture chain with exactly `spec`'s rules in one transaction: the chain
        is made if missing, then deleted and made again, so re-running never duplicates a rule
        and a changed NFT_PRIORITY takes effect (a base chain's priority cannot be updated)."""
        t = f"inet {self.table}"
        c = f"{t} {CAPTURE_CHAIN}"
        lines = [
            f"add table {t}",
            f"add chain {c}",
            f"flush chain {c}",
            f"delete chain {c}",
            f"add chain {c} {{ type filter hook input priority {self.priority + 1}; policy accept; }}",
        ]
        lines += [f"add rule {c} {rule}" for rule in spec.rules()]
        return "".join(f"{line}\n" for line in lines)

    def _element(self, address: IPAddress, timeout: float | None = None) -> str:
        text = address_text(address)
        suffix = "" if timeout is None else f" timeout {timeout_text(timeout)}"
        return f"{text}{suffix}"

    def _set_for(self, address: IPAddress) -> str:
        address_text(address)
        return SET4 if address.version == 4 else SET6

    def add_script(self, address: IPAddress, timeout: float | None) -> str:
        timeout = check_timeout(timeout)
        where = f"element inet {self.table} {self._set_for(address)}"
        return (
            f"add {where} {{ {self._element(address)} }}\n"
            f"delete {where} {{ {self._element(address)} }}\n"
            f"add {where} {{ {self._element(address, timeout)} }}\n"
        )

    def remove_script(self, address: IPAddress) -> str:
        where = f"element inet {self.table} {self._set_for(address)}"
        return (
            f"add {where} {{ {self._element(address)} }}\n"
            f"delete {where} {{ {self._element(address)} }}\n"
        )

    def add_many_script(self, bans: Sequence[tuple[IPAddress, float | None]]) -> str:
        lines = []
        for set_name, elements in self._by_set(bans):
            where = f"element inet {self.table} {set_name}"
            plain = ", ".join(self._element(a) for a, _ in elements)
            timed = ", ".join(self._element(a, t) for a, t in elements)
            lines += [f"add {where} {{ {plain} }}", f"delete {where} {{ {plain} }}",
                      f"add {where} {{ {timed} }}"]
        return "".join(f"{line}\n" for line in lines)

    def add_ops(self, bans: Sequence[tuple[IPAddress, float | None]]) -> list[ElementOp]:
        """The netlink ops of add/add_many: per set, add bare, delete, add with timeouts."""
        ops = []
        for set_name, elements in self._by_set(bans):
            bare = tuple((a, None) for a, _ in elements)
            timed = tuple((a, None if t is None else timeout_ms(t)) for a, t in elements)
            ops += [ElementOp(NFT_MSG_NEWSETELEM, set_name, bare),
                    ElementOp(NFT_MSG_DELSETELEM, set_name, bare),
                    ElementOp(NFT_MSG_NEWSETELEM, set_name, timed)]
        return ops

    def remove_ops(self, address: IPAddress) -> list[ElementOp]:
        return self.remove_many_ops([address])

    def remove_many_ops(self, addresses: Iterable[IPAddress]) -> list[ElementOp]:
        """Per set: add bare, then delete, so an address that is not there is no error."""
        ops = []
        for set_name, elements in self._by_set((address, None) for address in addresses):
            bare = tuple((a, None) for a, _ in elements)
            ops += [ElementOp(NFT_MSG_NEWSETELEM, set_name, bare),
                    ElementOp(NFT_MSG_DELSETELEM, set_name, bare)]
        return ops

    def remove_many_script(self, addresses: Sequence[IPAddress]) -> str:
        lines = []
        for set_name, elements in self._by_set((address, None) for address in addresses):
            where = f"element inet {self.table} {set_name}"
            plain = ", ".join(self._element(a) for a, _ in elements)
            lines += [f"add {where} {{ {plain} }}", f"delete {where} {{ {plain} }}"]
        return "".join(f"{line}\n" for line in lines)

    def _by_set(
        self, bans: Iterable[tuple[IPAddress, float | None]]
    ) -> list[tuple[str, list[tuple[IPAddress, float | None]]]]:
        # One entry per address (the last wins): a duplicate in one delete message would make
        # the kernel refuse the whole transaction.
        latest: dict[IPAddress, float | None] = {}
        for address, timeout in bans:
            if not isinstance(address, IPv4Address | IPv6Address):
                address_text(address)  # the one TypeError for anything but an address
            latest[address] = timeout if timeout is None else check_timeout(timeout)
        v4: list[tuple[IPAddress, float | None]] = [(a, t) for a, t in latest.items() if a.version == 4]
        v6: list[tuple[IPAddress, float | None]] = [(a, t) for a, t in latest.items() if a.version == 6]
        return [(name, items) for name, items in ((SET4, v4), (SET6, v6)) if items]

    # -- the interface --------------------------------------------------------------------------

    def is_supported(self) -> bool:
        if not self.probe([NFT, "list", "tables"]):
            return False
        if self._netlink is None:
            return True
        try:
            sock = self._netlink._factory()
        except OSError:
            return False
        sock.close()
        return True

    def setup(self) -> None:
        self.run([NFT, "-f", "-"], self.setup_script())
        listing = self.run([NFT, "-j", "list", "chain", "inet", self.table, CHAIN])
        rules = [o for o in json.loads(listing.stdout).get("nftables", []) if "rule" in o]
        if not rules:
            self.run([NFT, "-f", "-"], self.rules_script())

    def capture_rules(
        self, group: int, max_port: int | None, protocols: Collection[Protocol],
        quiet_udp_ports: Collection[int] = (),
    ) -> None:
        """Log what can be a probe (the nft twin of bpf.build_probe_filter) to NFLOG group
        `group`, after the drop of blocked hosts; remembered for repair_capture. Needs setup()."""
        spec = CaptureSpec.of(group, max_port, protocols, quiet_udp_ports)
        self.run([NFT, "-f", "-"], self.capture_script(spec))
        self._capture = spec

    def drop_capture(self) -> None:
        """Removes the capture chain if there is one (the sensor went back to AF_PACKET)."""
        self._capture = None
        c = f"inet {self.table} {CAPTURE_CHAIN}"
        self.run([NFT, "-f", "-"], f"add chain {c}\nflush chain {c}\ndelete chain {c}\n")

    def capture_intact(self) -> bool:
        """Whether the capture chain still holds the rules of the last capture_rules call (an
        `nft flush ruleset` or `portsentry flush` removes them without telling us)."""
        spec = self._capture
        if spec is None:
            return True
        result = self.runner([NFT, "-j", "list", "chain", "inet", self.table, CAPTURE_CHAIN], None)
        if not result.ok:
            return False
        try:
            objects = json.loads(result.stdout).get("nftables", [])
        except (ValueError, AttributeError):
            return False
        logging = [
            o for o in objects
            if isinstance(o, dict) and isinstance(o.get("rule"), dict)
            and {"log": {"group": spec.group}} in o["rule"].get("expr", [])
        ]
        return len(logging) == len(spec.rules())

    def repair_capture(self) -> bool:
        """Re-creates table, sets, drop rules and capture rules if the capture rules have gone;
        True when it had to (the sets then start empty: re-add the active bans). For the daemon
        to call about once a minute; BackendError if nft refuses."""
        spec = self._capture
        if spec is None or self.capture_intact():
            return False
        self.setup()
        self.run([NFT, "-f", "-"], self.capture_script(spec))
        return True

    def add(self, address: IPAddress, timeout: float | None) -> None:
        if self._netlink is not None:
            self._netlink.transact(self.add_ops([(address, timeout)]))
        else:
            self.run([NFT, "-f", "-"], self.add_script(address, timeout))

    def remove(self, address: IPAddress) -> None:
        if self._netlink is not None:
            self._netlink.transact(self.remove_ops(address))
        else:
            self.run([NFT, "-f", "-"], self.remove_script(address))

    def add_many(self, bans: Iterable[tuple[IPAddress, float | None]]) -> None:
        self._in_batches(list(bans), self.add_ops, self.add_many_script)

    def restore_many(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        """One plain add with timeouts per set and batch, a third of add_many's messages. The
        dance in add_ops exists to reset the timeout of an element that is already there; at
        start such an element was put there with the very timeout the store recorded (the
        daemon does not flush its table when it stops, and every later change went to both), so
        keeping it is right. Over netlink the packed addresses go straight into the messages,
        and each batch is sent by a second thread while the next is encoded (the kernel's part
        releases the GIL): a million bans restored in about a second."""
        if self._netlink is None:
            self._in_batches([(unpacked(p), t) for p, t in bans], self.restore_ops, self.restore_script)
            return
        timed4, timed6 = _element_head(4, True), _element_head(16, True)
        bare4, bare6 = _element_head(4, False), _element_head(16, False)
        pack64 = BE64.pack
        netlink = self._netlink
        with _Sender(netlink) as sender:
            v4: list[bytes] = []
            v6: list[bytes] = []
            for packed, timeout in bans:
                size = len(packed) if type(packed) is bytes else 0
                if size == 4:
                    target, timed, bare = v4, timed4, bare4
                elif size == 16:
                    target, timed, bare = v6, timed6, bare6
                else:
                    unpacked(packed)  # raises the one TypeError for anything but an address
                    continue
                if timeout is None:
                    target.append(bare + packed)
                else:
                    if not 0 < timeout < math.inf:
                        check_timeout(timeout)  # raises the one ValueError for a bad timeout
                    ms = math.ceil(timeout * 1000 - 1e-6)  # timeout_ms, inlined
                    target.append(timed + packed + _TIMEOUT_HEAD + pack64(ms if ms > 0 else 1))
                if len(target) == BATCH_ELEMENTS:
                    sender.send(EncodedOp(NFT_MSG_NEWSETELEM, SET4 if target is v4 else SET6, tuple(target)))
                    target.clear()
            for set_name, rest in ((SET4, v4), (SET6, v6)):
                if rest:
                    sender.send(EncodedOp(NFT_MSG_NEWSETELEM, set_name, tuple(rest)))

    def restore_ops(self, bans: Sequence[tuple[IPAddress, float | None]]) -> list[ElementOp]:
        """The ops restore_many sends, from address objects (the `nft -f` fallback and tests)."""
        return [ElementOp(NFT_MSG_NEWSETELEM, set_name,
                          tuple((a, None if t is None else timeout_ms(t)) for a, t in elements))
                for set_name, elements in self._by_set(bans)]

    def restore_script(self, bans: Sequence[tuple[IPAddress, float | None]]) -> str:
        lines = []
        for set_name, elements in self._by_set(bans):
            timed = ", ".join(self._element(a, t) for a, t in elements)
            lines.append(f"add element inet {self.table} {set_name} {{ {timed} }}\n")
        return "".join(lines)

    def remove_many(self, addresses: Iterable[IPAddress]) -> None:
        """One transaction per BATCH_ELEMENTS addresses instead of one per address."""
        self._in_batches(list(addresses), self.remove_many_ops, self.remove_many_script)

    def _in_batches(self, items: Sequence[_T], ops: Callable[[Sequence[_T]], list[ElementOp]],
                    script: Callable[[Sequence[_T]], str]) -> None:
        for start in range(0, len(items), BATCH_ELEMENTS):
            chunk = items[start:start + BATCH_ELEMENTS]
            if self._netlink is not None:
                self._netlink.transact(ops(chunk))
            else:
                self.run([NFT, "-f", "-"], script(chunk))

    def members(self) -> dict[IPAddress, float | None]:
        found: dict[IPAddress, float | None] = {}
        for set_name in (SET4, SET6):
            argv = [NFT, "-j", "list", "set", "inet", self.table, set_name]
            # A listing taken while the kernel grows the set's hash table can repeat some
            # elements and miss others (seen right after a 100k restore); a repeat gives it away,
            # and a later listing is whole again.
            for attempt in range(LISTING_ATTEMPTS):
                try:
                    found.update(parse_set_json(self.run(argv).stdout, " ".join(argv)))
                    break
                except InconsistentListing:
                    if attempt == LISTING_ATTEMPTS - 1:
                        raise
                    time.sleep(LISTING_RETRY_DELAY)
        return found

    def teardown(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
        self._capture = None  # torn down on purpose: repair_capture must not bring it back
        # Only our own table, and only if it is there (`delete` of a missing table fails).
        listing = self.run([NFT, "-j", "list", "tables", "inet"])
        tables = [o["table"] for o in json.loads(listing.stdout).get("nftables", []) if "table" in o]
        if any(t.get("family") == "inet" and t.get("name") == self.table for t in tables):
            self.run([NFT, "delete", "table", "inet", self.table])

    def describe(self) -> str:
        how = "netlink" if self._netlink is not None else "nft -f"
        return (f"nftables: table inet {self.table}, sets {SET4}/{SET6} (size {self.set_size}), "
                f"hook {self.hook} priority {self.priority}, bans via {how}")


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What the capture rules log: TCP without ACK/RST and UDP, of `protocols`, addressed to this
    host's link address, to destination ports below `max_port` (None: any port)."""

    group: int
    max_port: int | None
    protocols: frozenset[Protocol]
    quiet_udp_ports: frozenset[int] = frozenset()

    @classmethod
    def of(cls, group: int, max_port: int | None, protocols: Collection[Protocol],
           quiet_udp_ports: Collection[int] = ()) -> CaptureSpec:
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group!r} is not between 0 and 65535")
        if max_port is not None and (isinstance(max_port, bool) or not isinstance(max_port, int)
                                     or not 0 <= max_port <= 0x10000):
            raise ValueError(f"max_port {max_port!r} is not between 0 and 65536")
        wanted = frozenset(protocols)
        if not wanted <= set(Protocol):
            raise ValueError(f"protocols {sorted(map(str, protocols))} are not TCP/UDP")
        # 65536 bounds nothing, and nft cannot spell it for a 16-bit port.
        quiet = frozenset(quiet_udp_ports)
        if any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 0x10000 for p in quiet):
            raise ValueError(f"quiet UDP ports {sorted(quiet)!r} are not all ports")
        return cls(group, None if max_port == 0x10000 else max_port, wanted, quiet)

    def rules(self) -> list[str]:
        """The rule bodies, in order; none when no port can match (max_port 0)."""
        if self.max_port == 0:
            return []
        log = f"log group {self.group}"
        found = []
        if Protocol.TCP in self.protocols:
            bound = "" if self.max_port is None else f" tcp dport < {self.max_port}"
            # `meta pkttype host`: the BPF filter's PACKET_HOST test (no broadcast/multicast).
            found.append(f"meta pkttype host tcp flags & (ack | rst) == 0{bound} {log}")
        if Protocol.UDP in self.protocols:
            match = "meta l4proto udp" if self.max_port is None else f"udp dport < {self.max_port}"
            # Replies to our own queries (DNS, NTP) belong to a tracked flow; probes do not.
            quiet = ""
            if self.quiet_udp_ports:
                # Services' own traffic (a busy syslog server) never reaches the daemon.
                quiet = f" udp dport != {{ {', '.join(map(str, sorted(self.quiet_udp_ports)))} }}"
            found.append(f"meta pkttype host {match}{quiet} ct state != {{ established, related }} {log}")
        return found


class InconsistentListing(BackendError):
    """A set listing named an element twice, so it was taken while the set was being rehashed."""


def parse_set_json(text: str, source: str = "nft -j") -> dict[IPAddress, float | None]:
    """Elements of one set from `nft -j list set`: address -> seconds left (None = no timeout)."""
    try:
        document = json.loads(text)
        objects = document["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"{source}: unexpected output: {text[:200]!r}") from exc
    found: dict[IPAddress, float | None] = {}
    for obj in objects:
        if not isinstance(obj, dict) or "set" not in obj:
            continue
        for entry in obj["set"].get("elem", []):
            value, expires = _element_value(entry, source)
            if value in found:
                raise InconsistentListing(f"{source}: {value} listed twice (set being resized)")
            found[value] = expires
    return found


def _element_value(entry: object, source: str) -> tuple[IPAddress, float | None]:
    expires: float | None = None
    value = entry
    if isinstance(entry, dict) and isinstance(entry.get("elem"), dict):
        elem = entry["elem"]
        value = elem.get("val")
        if "expires" in elem:
            expires = float(elem["expires"])
        elif "timeout" in elem:
            expires = float(elem["timeout"])
    if not isinstance(value, str):
        raise BackendError(f"{source}: unexpected set element {entry!r}")
    try:
        address: IPv4Address | IPv6Address = ip_address(value)
    except ValueError as exc:
        raise BackendError(f"{source}: set element {value!r} is not an address") from exc
    return address, expires
