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

One class, over 400 lines, on purpose: each operation's nft script or netlink ops sit next to the
call that runs them, which the golden tests pin side by side; the first-probe ban's rules are in
nft_capture and the element messages in nft_elements.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar, TypeVar

from portsentry.core.probe import IPAddress, Protocol
from portsentry.responders.backend import (
    BanBackend,
    Caught,
    Guarded,
    Runner,
    address_text,
    failed,
    run_argv,
    unpacked,
)
from portsentry.responders.nft_capture import (
    BAN_SLOTS,
    CAUGHT4,
    CAUGHT6,
    DAEMON_SLOTS,
    DROPPED4,
    DROPPED6,
    DROPPED_TIMEOUT,
    KPORTS,
    NOKERNEL4,
    NOKERNEL6,
    OLD_BAN_LIMIT,
    PROTECT4,
    PROTECT6,
    SLOT_SPAN,
    CaptureSpec,
    KernelBan,
)
from portsentry.responders.nft_elements import (
    BE64,
    KERNEL_TIMEOUT_LIMIT,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    TIMEOUT_HEAD,
    ElementOp,
    EncodedOp,
    FlushOp,
    InconsistentListing,
    NetlinkElements,
    Op,
    Refused,
    Sender,
    SocketFactory,
    element_head,
    held_for,
    intervals,
    open_netlink,
    parse_caught_json,
    parse_caught_left_json,
    parse_dropped_json,
    parse_set_json,
    port_ranges,
    timeout_ms,
    timeout_text,
)

_T = TypeVar("_T")

NFT = "nft"
HOOKS = frozenset({"prerouting", "input", "forward"})
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
SET4, SET6 = "blocked4", "blocked6"
CHAIN = "filter"
# The stealth sensor's NFLOG rules (sensors/nflog.py): a base chain on the input hook one priority
# step after CHAIN, so a packet CHAIN drops never reaches them.
CAPTURE_CHAIN = "capture"
# Counts the probes of banned sources (nft_capture.count_rules): one priority step before CHAIN,
# which drops them.
COUNT_CHAIN = "count"
# Elements per netlink message in add_many: a batch of three such messages stays well below the
# default 208 KiB socket send buffer even for IPv6 (about 40 bytes per element).
BATCH_ELEMENTS = 1024
LISTING_ATTEMPTS = 10
LISTING_RETRY_DELAY = 0.2
MARK = struct.Struct("=I")  # BAN_SLOTS holds marks: host byte order, as `meta mark` is

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
        # Caught entries may wait with the first-probe ban off: left by a run that had it (until
        # a first read), or made before a reload turned it off; they must still be settled.
        self._caught_left = True
        # The first-probe ban's guards and ports as last set: `nft flush ruleset` empties their
        # sets, and the daemon pushes them again only when they change, so a repair restores them.
        self._guards: str | None = None
        self._kernel_ports: str | None = None
        # Set up by this process and not torn down: without a capture, the drop chain is what
        # repair_capture watches.
        self._set_up = False
        # The daemon's own BAN_SLOTS numbers (claim_ban_slot): above the ban rules' four ranges,
        # from a random start, so that a restart within the minute does not reuse the last run's
        # (re-adding a number still in the set takes no slot).
        self._slots = itertools.count(secrets.randbelow(SLOT_SPAN))  # next() is atomic: threads share it

    # -- commands as data (the golden tests pin these) ------------------------------------------

    def setup_script(self) -> str:
        """Creates the table, sets and chain if missing; `add` never replaces existing objects,
        and the rules are only added when the chain is new (flushing it would be racy)."""
        t = f"inet {self.table}"
        return (
            f"add table {t}\n"
            f"add set {t} {SET4} {{ type ipv4_addr; flags timeout; size {self.set_size}; }}\n"
            f"add set {t} {SET6} {{ type ipv6_addr; flags timeout; size {self.set_size}; }}\n"
            # The first-probe ban's sets (nft_capture): guards as intervals, ports, caught probes.
            f"add set {t} {PROTECT4} {{ type ipv4_addr; flags interval; }}\n"
            f"add set {t} {PROTECT6} {{ type ipv6_addr; flags interval; }}\n"
            f"add set {t} {NOKERNEL4} {{ type ipv4_addr; flags interval; }}\n"
            f"add set {t} {NOKERNEL6} {{ type ipv6_addr; flags interval; }}\n"
            f"add set {t} {KPORTS[Protocol.TCP]} {{ type inet_service; flags interval; }}\n"
            f"add set {t} {KPORTS[Protocol.UDP]} {{ type inet_service; flags interval; }}\n"
            f"add set {t} {CAUGHT4} {{ type ipv4_addr . inet_proto . inet_service; flags timeout; "
            f"size {self.set_size}; }}\n"
            f"add set {t} {CAUGHT6} {{ type ipv6_addr . inet_proto . inet_service; flags timeout; "
            f"size {self.set_size}; }}\n"
            f"add set {t} {DROPPED4} {{ type ipv4_addr; flags dynamic, timeout; timeout {DROPPED_TIMEOUT}s; "
            f"size {self.set_size}; }}\n"
            f"add set {t} {DROPPED6} {{ type ipv6_addr; flags dynamic, timeout; timeout {DROPPED_TIMEOUT}s; "
            f"size {self.set_size}; }}\n"
            f"add chain {t} {CHAIN} {{ type filter hook {self.hook} priority {self.priority}; "
            "policy accept; }\n"
        )

    def rules_script(self) -> str:
        t = f"inet {self.table}"
        return (
            f"add rule {t} {CHAIN} ip saddr @{SET4} counter drop\n"
            f"add rule {t} {CHAIN} ip6 saddr @{SET6} counter drop\n"
        )

    def capture_script(self, spec: CaptureSpec, previous: CaptureSpec | None = None) -> str:
        """Re-creates the capture chain with exactly `spec`'s rules in one transaction: the chain
        is made if missing, then deleted and made again, so re-running never duplicates a rule
        and a changed NFT_PRIORITY takes effect (a base chain's priority cannot be updated).
        `previous` is the spec in force in this table, if this process made it: with the same
        BAN_RATE_LIMIT, the ban slots taken in the last minute are kept."""
        t = f"inet {self.table}"
        c = f"{t} {CAPTURE_CHAIN}"
        lines = [
            f"add table {t}",
            f"add chain {c}",
            f"flush chain {c}",
            f"delete chain {c}",
        ]
        if spec.kernel is not None:
            # Objects can go only once the old chain, their user, has; each first `add` makes
            # its delete safe when there is none. (A capture without the first-probe ban leaves
            # an old set unused: it needs nothing from the kernel beyond plain rules.)
            name = f"{t} {OLD_BAN_LIMIT}"
            lines += [f"add limit {name} {{ rate 1/minute }}", f"delete limit {name}"]
            # The ban rules' shared slots (nft_capture.BAN_SLOTS). Made again (empty) only when
            # the cap is new to this process: every other capture change (UDP ports quieted, a
            # repair) keeps the last minute's slots, or it would open a fresh minute of bans.
            # `add` leaves an existing set's size as it was on older kernels, so a changed
            # BAN_RATE_LIMIT (or a previous run's) is a new set.
            slots = spec.kernel.slots()
            kept = previous.kernel if previous is not None else None
            if kept is None or kept.rate != spec.kernel.rate:
                name = f"{t} {BAN_SLOTS}"
                lines += [f"add set {name} {{ {KernelBan.slots_of(1)} }}", f"delete set {name}"]
            if slots is not None:
                lines.append(f"add set {t} {BAN_SLOTS} {{ {slots} }}")
        lines.append(f"add chain {c} {{ type filter hook input priority {self.priority + 1}; "
                     "policy accept; }")
        lines += [f"add rule {c} {rule}" for rule in spec.rules()]
        n = f"{t} {COUNT_CHAIN}"
        lines += [f"add chain {n}", f"flush chain {n}", f"delete chain {n}"]
        counting = spec.count_rules()
        if counting:
            lines.append(f"add chain {n} {{ type filter hook input priority {self.priority - 1}; "
                         "policy accept; }")
            lines += [f"add rule {n} {rule}" for rule in counting]
        return "".join(f"{line}\n" for line in lines)

    def _element(self, address: IPAddress, timeout: float | None = None) -> str:
        text = address_text(address)
        suffix = "" if timeout is None else f" timeout {timeout_text(timeout)}"
        return f"{text}{suffix}"

    def _set_for(self, address: IPAddress) -> str:
        address_text(address)
        return SET4 if address.version == 4 else SET6

    def add_script(self, address: IPAddress, timeout: float | None) -> str:
        timeout = held_for(timeout)
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
            latest[address] = timeout if timeout is None else held_for(timeout)
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
        self._set_up = True

    def capture_rules(
        self, group: int, max_port: int | None, protocols: Collection[Protocol],
        quiet_udp_ports: Collection[int] = (), kernel: KernelBan | None = None,
    ) -> None:
        """Log what can be a probe (the nft twin of bpf.build_probe_filter) to NFLOG group
        `group`, after the drop of blocked hosts, and with `kernel` ban qualifying probes on the
        spot (nft_capture); remembered for repair_capture. Needs setup()."""
        spec = CaptureSpec.of(group, max_port, protocols, quiet_udp_ports, kernel)
        self.run([NFT, "-f", "-"], self.capture_script(spec, self._capture))
        if self._capture is not None and self._capture.kernel is not None and kernel is None:
            self._caught_left = True  # the bans it made meanwhile still wait for their record
        self._capture = spec

    # -- the first-probe ban's state (nft_capture) ------------------------------------------------

    def claim_ban_slot(self, address: IPAddress) -> bool:
        """BAN_RATE_LIMIT is one cap for the kernel's first-probe bans and the daemon's own (the
        connect modes', and stealth probes the kernel left to the daemon): the daemon's ban takes
        a slot of BAN_SLOTS too, or with -tcp beside a kernel-banning stealth mode a minute held
        N of each. One transaction: `address` added to its ban set only if absent (then taken out
        again: the ban itself is the lifecycle's to add, after its record), and a slot. Already
        there, the kernel made this ban and took its slot: nothing is applied; no slot free: ENFILE,
        nothing is applied either."""
        spec = self._capture
        if spec is None or spec.kernel is None or not spec.kernel.rate:
            return True
        slot = DAEMON_SLOTS + next(self._slots) % SLOT_SPAN
        if self._netlink is None:
            result = self.runner([NFT, "-f", "-"], self.claim_script(address, slot))
            if result.ok or "File exists" in result.stderr:
                return True
            if "Too many open files" in result.stderr:  # ENFILE: the set is full
                return False
            raise failed([NFT, "-f", "-"], result)
        try:
            self._netlink.transact(self.claim_ops(address, slot))
        except Refused as refused:
            if errno.EEXIST in refused.codes:
                return True
            if errno.ENFILE in refused.codes:
                return False
            raise
        return True

    def claim_ops(self, address: IPAddress, slot: int) -> list[Op]:
        set_name = self._set_for(address)
        bare = ((address, None),)
        return [ElementOp(NFT_MSG_NEWSETELEM, set_name, bare, exclusive=True),
                ElementOp(NFT_MSG_DELSETELEM, set_name, bare),
                EncodedOp(NFT_MSG_NEWSETELEM, BAN_SLOTS, (element_head(4, False) + MARK.pack(slot),))]

    def claim_script(self, address: IPAddress, slot: int) -> str:
        where = f"element inet {self.table} {self._set_for(address)}"
        return (f"create {where} {{ {self._element(address)} }}\n"
                f"delete {where} {{ {self._element(address)} }}\n"
                f"add element inet {self.table} {BAN_SLOTS} {{ {slot} }}\n")

    def first_probe_bans(self) -> bool:
        return self._capture is not None and self._capture.kernel is not None

    def keeps_caught(self) -> bool:
        return self.first_probe_bans() or self._caught_left

    def guards_script(self, protect: Iterable[Guarded], nokernel: Iterable[Guarded]) -> str:
        t = f"inet {self.table}"
        lines = []
        for (name4, name6), members in (((PROTECT4, PROTECT6), protect), ((NOKERNEL4, NOKERNEL6), nokernel)):
            v4, v6 = intervals(members)
            for name, networks in ((name4, v4), (name6, v6)):
                lines.append(f"flush set {t} {name}")
                if networks:
                    lines.append(f"add element {t} {name} {{ {', '.join(networks)} }}")
        return "".join(f"{line}\n" for line in lines)

    def set_guards(self, protect: Iterable[Guarded], nokernel: Iterable[Guarded]) -> None:
        """Replace, in one transaction, the sources the kernel never bans: `protect` (neither
        banned nor copied to the daemon) and `nokernel` (copied; the daemon decides)."""
        script = self.guards_script(protect, nokernel)
        self.run([NFT, "-f", "-"], script)
        self._guards = script

    def kernel_ports_script(self, ports: dict[Protocol, Iterable[int]]) -> str:
        t = f"inet {self.table}"
        lines = []
        for protocol, wanted in ports.items():
            name = KPORTS[protocol]
            lines.append(f"flush set {t} {name}")
            ranges = port_ranges(wanted)
            if ranges:
                lines.append(f"add element {t} {name} {{ {', '.join(ranges)} }}")
        return "".join(f"{line}\n" for line in lines)

    def set_kernel_ports(self, ports: dict[Protocol, Iterable[int]]) -> None:
        """Replace the ports whose probes the kernel bans (watched, no live service)."""
        script = self.kernel_ports_script(ports)
        self.run([NFT, "-f", "-"], script)
        self._kernel_ports = script

    def forget_caught(self, addresses: Iterable[IPAddress]) -> None:
        # Two `nft -j list` runs an unblock: not when this process installed a capture without
        # the first-probe ban and has read its caught sets settled. An admin command (no capture
        # known here) always looks.
        if not self.keeps_caught() and self._capture is not None:
            return
        super().forget_caught(addresses)

    def caught(self) -> list[Caught]:
        """The kernel's first-probe bans not yet settled by the daemon: (source, protocol, port)."""
        found: list[Caught] = []
        for name in (CAUGHT4, CAUGHT6):
            found += parse_caught_json(self.run([NFT, "-j", "list", "set", "inet", self.table, name]).stdout)
        if not found and not self.first_probe_bans():
            self._caught_left = False  # all settled: nothing more can be caught until it is on
        return found

    def dropped(self) -> dict[IPAddress, int]:
        """Per banned source, the probes dropped before the daemon could see them (count_rules),
        counted since the source's count began (it ends DROPPED_TIMEOUT after its last probe)."""
        found: dict[IPAddress, int] = {}
        if self._capture is None:
            return found  # AF_PACKET capture: the daemon sees every probe, nothing is counted
        for name in (DROPPED4, DROPPED6):
            listing = self.run([NFT, "-j", "list", "set", "inet", self.table, name])
            found.update(parse_dropped_json(listing.stdout))
        return found

    def release_script(self, entries: Iterable[Caught]) -> str:
        lines = []
        for address, protocol, port in entries:
            if not 0 < port < 0x10000:
                raise ValueError(f"port {port!r} is not a port")
            name = CAUGHT4 if address.version == 4 else CAUGHT6
            element = f"{{ {address_text(address)} . {Protocol(protocol).value.lower()} . {int(port)} }}"
            # add, then delete: an entry that has gone meanwhile is no error.
            lines += [f"add element inet {self.table} {name} {element}",
                      f"delete element inet {self.table} {name} {element}"]
        return "".join(f"{line}\n" for line in lines)

    def release_caught(self, entries: Iterable[Caught]) -> None:
        """Forget caught entries the daemon has settled (the ban itself stays or goes apart)."""
        script = self.release_script(entries)
        if script:
            self.run([NFT, "-f", "-"], script)

    def drop_capture(self) -> None:
        """Removes the capture chain if there is one (the sensor went back to AF_PACKET)."""
        if self._capture is not None and self._capture.kernel is not None:
            self._caught_left = True
        self._capture = None
        self.run([NFT, "-f", "-"], "".join(f"add chain {c}\nflush chain {c}\ndelete chain {c}\n"
                                           for c in (f"inet {self.table} {name}"
                                                     for name in (CAPTURE_CHAIN, COUNT_CHAIN))))

    def capture_intact(self) -> bool:
        """Whether the capture and count chains still hold the rules of the last capture_rules
        call (an `nft flush ruleset` or `portsentry flush` removes them without telling us)."""
        spec = self._capture
        if spec is None:
            return True
        rules = self._rules(CAPTURE_CHAIN)
        if rules is None:
            return False  # gone: no need to list the count chain as well
        counting = self._rules(COUNT_CHAIN) if spec.count_rules() else []
        if counting is None:
            return False
        logging = [rule for rule in rules
                   if isinstance(expr := rule.get("expr"), list) and {"log": {"group": spec.group}} in expr]
        # Not every rule logs: the first-probe ban's guards (protect sets, the socket lookup)
        # only return. Counting only logging rules against all of them took a kernel-ban chain
        # for gone, and the repair re-added every active ban once a minute.
        expected = spec.rules()
        return (len(rules) == len(expected)
                and len(logging) == sum(f"log group {spec.group}" in rule for rule in expected)
                and len(counting) == len(spec.count_rules()))

    def _rules(self, chain: str) -> list[dict[str, object]] | None:
        """The rules of one of our chains as `nft -j` lists them; None if it cannot be listed."""
        result = self.runner([NFT, "-j", "list", "chain", "inet", self.table, chain], None)
        if not result.ok:
            return None
        try:
            objects = json.loads(result.stdout).get("nftables", [])
        except (ValueError, AttributeError):
            return None
        if not isinstance(objects, list):
            return None
        return [o["rule"] for o in objects if isinstance(o, dict) and isinstance(o.get("rule"), dict)]

    def repair_capture(self) -> bool:
        """Re-creates table, sets, drop rules and capture rules if the capture rules have gone;
        True when it had to (the sets then start empty: re-add the active bans). For the daemon
        to call about once a minute; BackendError if nft refuses. Without a capture (connect
        modes, CAPTURE="packet") the drop chain is watched instead: `nft flush ruleset` (Debian's
        nftables.conf starts with it) took every ban, and nothing put them back."""
        spec = self._capture
        if spec is None:
            if not self._set_up or self._rules(CHAIN):
                return False
            self.setup()
            return True
        if self.capture_intact():
            return False
        self.setup()
        # Before the ban rules: they must never meet empty guards.
        for script in (self._guards, self._kernel_ports):
            if script is not None:
                self.run([NFT, "-f", "-"], script)
        # The same spec: the last minute's ban slots stay if the table did (made again if not).
        self.run([NFT, "-f", "-"], self.capture_script(spec, spec))
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
        """One plain add with timeouts per set and batch, a third of add_many's messages: for
        addresses the set does not hold (a fleet batch), or holds with this very timeout. Over
        netlink the packed addresses go straight into the messages, and each batch is sent by a
        second thread while the next is encoded (the kernel's part releases the GIL)."""
        if self._netlink is None:
            self._in_batches([(unpacked(p), t) for p, t in bans], self.restore_ops, self.restore_script)
            return
        with Sender(self._netlink) as sender:
            for op in self._encoded(bans):
                sender.send(op)

    def replace_all(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        """Both ban sets emptied and filled with `bans`, and with the kernel's first-probe bans
        that still have a caught entry (recorded late by the daemon, service.kernelbans), in one
        transaction: no moment without the bans, and every element gets the time given here. A
        plain add kept elements the store no longer knows (bans.sqlite3 deleted or restored from
        a backup: for ever with BLOCK_TIME 0, invisible to `list`), and, before Linux 6.10, an
        element's shorter timeout (the wall clock set back while the daemon was stopped). Not by
        listing the sets: the kernel walks a hash set from its start for every 32 KiB of a dump,
        and a million elements took a minute of system time. A million bans cost about what
        restore_many does (measured in the commit that made this)."""
        keep = self._unsettled()
        if keep:
            listed = list(bans)
            for packed, _timeout in listed:
                keep.pop(packed, None)  # recorded after all: the store's time wins
            bans = listed + list(keep.items())
        if self._netlink is None:
            self.run([NFT, "-f", "-"], self.replace_script([(unpacked(p), t) for p, t in bans]))
            return
        self._netlink.transact([FlushOp(SET4), FlushOp(SET6), *self._encoded(bans)])

    def holds_any(self) -> bool:
        if self._netlink is None:
            return True  # nft lists every element: replacing them costs less than knowing
        return any(self._netlink.holds_any(name) for name in (SET4, SET6))

    def replace_script(self, bans: Sequence[tuple[IPAddress, float | None]]) -> str:
        """replace_all's transaction for `nft -f`."""
        return (f"flush set inet {self.table} {SET4}\nflush set inet {self.table} {SET6}\n"
                + self.restore_script(bans))

    def _unsettled(self) -> dict[bytes, float | None]:
        """Packed source -> seconds left of every first-probe ban whose caught entry the daemon
        has not settled (its ban element was added by the same rule with the same timeout)."""
        held: dict[bytes, float | None] = {}
        for name in (CAUGHT4, CAUGHT6):
            listing = self.run([NFT, "-j", "list", "set", "inet", self.table, name]).stdout
            for (address, _protocol, _port), left in parse_caught_left_json(listing):
                packed = address.packed
                if left is None or (packed in held and held[packed] is None):
                    held[packed] = None
                else:
                    held[packed] = max(left, held.get(packed) or 0.0, 1.0)
        return held

    def _encoded(self, bans: Iterable[tuple[bytes, float | None]]) -> Iterator[EncodedOp]:
        """Timed adds of packed addresses, BATCH_ELEMENTS to a message, encoded without an
        address object each (a million of them at start)."""
        timed4, timed6 = element_head(4, True), element_head(16, True)
        bare4, bare6 = element_head(4, False), element_head(16, False)
        pack64 = BE64.pack
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
            if timeout is not None and not 0 < timeout < KERNEL_TIMEOUT_LIMIT:
                timeout = held_for(timeout)  # raises the one ValueError for a bad timeout
            if timeout is None:
                target.append(bare + packed)
            else:
                ms = math.ceil(timeout * 1000 - 1e-6)  # timeout_ms, inlined
                target.append(timed + packed + TIMEOUT_HEAD + pack64(ms if ms > 0 else 1))
            if len(target) == BATCH_ELEMENTS:
                yield EncodedOp(NFT_MSG_NEWSETELEM, SET4 if target is v4 else SET6, tuple(target))
                target.clear()
        for set_name, rest in ((SET4, v4), (SET6, v6)):
            if rest:
                yield EncodedOp(NFT_MSG_NEWSETELEM, set_name, tuple(rest))

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

    def has_table(self) -> bool:
        """Whether our table is in the kernel."""
        listing = self.run([NFT, "-j", "list", "tables", "inet"])
        tables = [o["table"] for o in json.loads(listing.stdout).get("nftables", []) if "table" in o]
        return any(t.get("family") == "inet" and t.get("name") == self.table for t in tables)

    def teardown(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
        self._capture = None  # torn down on purpose: repair_capture must not bring it back
        self._set_up = False
        # Only our own table, and only if it is there (`delete` of a missing table fails).
        if self.has_table():
            self.run([NFT, "delete", "table", "inet", self.table])

    def describe(self) -> str:
        how = "netlink" if self._netlink is not None else "nft -f"
        return (f"nftables: table inet {self.table}, sets {SET4}/{SET6} (size {self.set_size}), "
                f"hook {self.hook} priority {self.priority}, bans via {how}")
