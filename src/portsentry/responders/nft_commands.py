"""The nftables backend's commands as data: the `nft -f` scripts and the netlink element ops of
every operation, built from the table's settings alone, so the golden tests pin them without a
kernel or a runner. The names of our sets and chains are here too.

Every add is one atomic transaction "add without timeout, delete, add with timeout", so re-adding
an address sets its new timeout on every kernel (older kernels keep the old timeout on a plain
re-add); every remove is "add, delete", so removing an absent address succeeds without needing
`destroy` (kernel 6.3, nft 1.0.8). NftablesBackend (responders.nftables) runs them; the capture
chain's rules come from nft_capture and the element messages are encoded by nft_elements.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address

from portsentry.core.probe import IPAddress, Protocol
from portsentry.responders.backend import Caught, Guarded, address_text
from portsentry.responders.nft_capture import (
    BAN_SLOTS,
    CAUGHT4,
    CAUGHT6,
    DROPPED4,
    DROPPED6,
    DROPPED_TIMEOUT,
    KPORTS,
    NOKERNEL4,
    NOKERNEL6,
    OLD_BAN_LIMIT,
    PROTECT4,
    PROTECT6,
    CaptureSpec,
    KernelBan,
)
from portsentry.responders.nft_elements import (
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    ElementOp,
    EncodedOp,
    Op,
    element_head,
)
from portsentry.responders.nft_values import held_for, intervals, port_ranges, timeout_ms, timeout_text

NFT = "nft"
SET4, SET6 = "blocked4", "blocked6"
CHAIN = "filter"
# The stealth sensor's NFLOG rules (sensors/nflog.py): a base chain on the input hook one priority
# step after CHAIN, so a packet CHAIN drops never reaches them.
CAPTURE_CHAIN = "capture"
# Counts the probes of banned sources (nft_capture.count_rules): one priority step before CHAIN,
# which drops them.
COUNT_CHAIN = "count"
MARK = struct.Struct("=I")  # BAN_SLOTS holds marks: host byte order, as `meta mark` is


class NftCommands:
    """What each operation sends, as text for `nft -f` and as netlink ops; the settings are
    NftablesBackend's, checked by its __init__."""

    table: str
    hook: str
    priority: int
    set_size: int

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

    def replace_script(self, bans: Sequence[tuple[IPAddress, float | None]]) -> str:
        """replace_all's transaction for `nft -f`."""
        return (f"flush set inet {self.table} {SET4}\nflush set inet {self.table} {SET6}\n"
                + self.restore_script(bans))

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
