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

This module runs the operations: setup, adds and removes in batches, restore and replace at
start, listings and teardown. What each operation sends (nft scripts and netlink ops, which the
golden tests pin) is in nft_commands; the capture chains and the first-probe ban's state in
nft_capture_state, their rules in nft_capture; the element messages in nft_elements.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar, TypeVar

from portsentry.core.probe import IPAddress
from portsentry.responders.backend import Runner, run_argv, unpacked
from portsentry.responders.nft_capture import SLOT_SPAN, CaptureSpec
from portsentry.responders.nft_capture_state import CaptureState
from portsentry.responders.nft_commands import CAPTURE_CHAIN as CAPTURE_CHAIN
from portsentry.responders.nft_commands import CHAIN as CHAIN
from portsentry.responders.nft_commands import COUNT_CHAIN as COUNT_CHAIN
from portsentry.responders.nft_commands import MARK as MARK
from portsentry.responders.nft_commands import NFT as NFT
from portsentry.responders.nft_commands import SET4 as SET4
from portsentry.responders.nft_commands import SET6 as SET6
from portsentry.responders.nft_elements import (
    BE64,
    KERNEL_TIMEOUT_LIMIT,
    NFT_MSG_NEWSETELEM,
    TIMEOUT_HEAD,
    ElementOp,
    EncodedOp,
    FlushOp,
    InconsistentListing,
    NetlinkElements,
    Sender,
    SocketFactory,
    element_head,
    held_for,
    open_netlink,
    parse_set_json,
)

_T = TypeVar("_T")

HOOKS = frozenset({"prerouting", "input", "forward"})
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
# Elements per netlink message in add_many: a batch of three such messages stays well below the
# default 208 KiB socket send buffer even for IPv6 (about 40 bytes per element).
BATCH_ELEMENTS = 1024
LISTING_ATTEMPTS = 10
LISTING_RETRY_DELAY = 0.2


class NftablesBackend(CaptureState):
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

    def teardown(self) -> str | None:
        if self._netlink is not None:
            self._netlink.close()
        self._capture = None  # torn down on purpose: repair_capture must not bring it back
        self._set_up = False
        # Only our own table, and only if it is there (`delete` of a missing table fails).
        if not self.has_table():
            return None
        self.run([NFT, "delete", "table", "inet", self.table])
        return f"table inet {self.table}"

    def owned(self) -> str:
        return f"nftables table inet {self.table}"

    def describe(self) -> str:
        how = "netlink" if self._netlink is not None else "nft -f"
        return (f"nftables: table inet {self.table}, sets {SET4}/{SET6} (size {self.set_size}), "
                f"hook {self.hook} priority {self.priority}, bans via {how}")
