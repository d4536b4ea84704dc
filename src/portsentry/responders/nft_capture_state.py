"""The nftables backend's capture and first-probe ban, as this process keeps them: the capture
and count chains it installed (so `repair_capture` can bring them back after an `nft flush
ruleset`), the guards and kernel ports it last set, the ban slots the daemon claims under
BAN_RATE_LIMIT, and the caught entries of the kernel's own bans that the daemon must still
settle. The rules themselves are nft_capture's; the scripts and ops are nft_commands'.
"""

from __future__ import annotations

import errno
import itertools
import json
from collections.abc import Collection, Iterable

from portsentry.core.probe import IPAddress, Protocol
from portsentry.responders.backend import BanBackend, Caught, Guarded, failed
from portsentry.responders.nft_capture import (
    CAUGHT4,
    CAUGHT6,
    DAEMON_SLOTS,
    DROPPED4,
    DROPPED6,
    SLOT_SPAN,
    CaptureSpec,
    KernelBan,
)
from portsentry.responders.nft_commands import CAPTURE_CHAIN, CHAIN, COUNT_CHAIN, NFT, NftCommands
from portsentry.responders.nft_elements import NetlinkElements, Refused
from portsentry.responders.nft_values import parse_caught_json, parse_caught_left_json, parse_dropped_json


class CaptureState(NftCommands, BanBackend):
    """The capture's and the first-probe ban's state; NftablesBackend.__init__ sets it up."""

    _netlink: NetlinkElements | None
    _capture: CaptureSpec | None
    _caught_left: bool
    _guards: str | None
    _kernel_ports: str | None
    _set_up: bool
    _slots: itertools.count[int]

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

    def first_probe_bans(self) -> bool:
        return self._capture is not None and self._capture.kernel is not None

    def keeps_caught(self) -> bool:
        return self.first_probe_bans() or self._caught_left

    def set_guards(self, protect: Iterable[Guarded], nokernel: Iterable[Guarded]) -> None:
        """Replace, in one transaction, the sources the kernel never bans: `protect` (neither
        banned nor copied to the daemon) and `nokernel` (copied; the daemon decides)."""
        script = self.guards_script(protect, nokernel)
        self.run([NFT, "-f", "-"], script)
        self._guards = script

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
