"""The route ban backend, for hosts with neither nftables nor ipset: a blackhole (or unreachable,
prohibit) host route per banned address, like 1.2's KILL_ROUTE but without a shell.

It is asymmetric: the scanner's packets still arrive and reach listening services; only our
replies to it are dropped, so a handshake never completes but a single spoofed or one-way packet
still gets in. Routes have no expiry, so `add` ignores the timeout and the daemon removes expired
bans itself. Our routes carry their own protocol number (`proto`), and every delete, listing and
flush filters on it and on the route type, so routes made by anyone else are never touched.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from ipaddress import ip_network
from typing import ClassVar

from portsentry.core.probe import IPAddress
from portsentry.responders.backend import (
    BackendError,
    BanBackend,
    Runner,
    address_text,
    check_timeout,
    run_argv,
    unpacked,
)

IP = "ip"
KINDS = frozenset({"blackhole", "unreachable", "prohibit"})
# Route protocol that marks our routes (rtnetlink's RTPROT_*; 0-4 and common daemons avoided).
DEFAULT_PROTO = 213


class RouteBackend(BanBackend):
    """Bans as host routes of type `kind`; see the module docstring for what that does not stop."""

    name: ClassVar[str] = "route"
    families: ClassVar[frozenset[int]] = frozenset({4, 6})
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"kind", "proto"})

    def __init__(
        self, kind: str = "blackhole", runner: Runner = run_argv, *, proto: int = DEFAULT_PROTO
    ) -> None:
        super().__init__(runner)
        if kind not in KINDS:
            raise ValueError(f"route kind {kind!r} must be one of {', '.join(sorted(KINDS))}")
        if isinstance(proto, bool) or not isinstance(proto, int) or not 5 <= proto <= 255:
            raise ValueError(f"route proto must be an integer from 5 to 255, not {proto!r}")
        self.kind, self.proto = kind, proto

    @staticmethod
    def _family(address: IPAddress) -> str:
        address_text(address)
        return "-4" if address.version == 4 else "-6"

    def add_argv(self, address: IPAddress) -> list[str]:
        return [IP, self._family(address), "route", "replace", self.kind, address_text(address),
                "proto", str(self.proto)]

    def remove_argv(self, address: IPAddress) -> list[str]:
        return [IP, self._family(address), "route", "del", self.kind, address_text(address),
                "proto", str(self.proto)]

    def batch_script(self, bans: Iterable[tuple[IPAddress, float | None]]) -> str:
        # `ip -batch` lines take no -4/-6; the family follows from the address.
        lines = []
        for address, timeout in bans:
            check_timeout(timeout)
            lines.append(f"route replace {self.kind} {address_text(address)} proto {self.proto}\n")
        return "".join(lines)

    def list_argv(self, family: str) -> list[str]:
        return [IP, "-j", family, "route", "show", "proto", str(self.proto), "type", self.kind]

    def is_supported(self) -> bool:
        return self.probe(self.list_argv("-4")) and self.probe(self.list_argv("-6"))

    def setup(self) -> None:
        """Nothing to create: each ban is its own route."""

    def add(self, address: IPAddress, timeout: float | None) -> None:
        check_timeout(timeout)
        self.run(self.add_argv(address))

    def remove(self, address: IPAddress) -> None:
        argv = self.remove_argv(address)
        result = self.runner(argv, None)
        if result.ok:
            return
        # Deleting a route that is not there is success here; anything else is not.
        if "No such process" in result.stderr or "No such file" in result.stderr:
            return
        raise BackendError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")

    def add_many(self, bans: Iterable[tuple[IPAddress, float | None]]) -> None:
        script = self.batch_script(bans)
        if script:
            self.run([IP, "-batch", "-"], script)

    def restore_lost(self, active: Callable[[], Iterable[bytes]]) -> int:
        """A network restart takes our routes (`ip route flush`, systemd-networkd removing
        routes it did not make, an ifupdown script) while the store still lists the bans, and no
        table or rule of ours shows it: the routes are listed and the missing ones added again."""
        held: set[bytes] = set()
        for family, kind in (("-4", socket.AF_INET), ("-6", socket.AF_INET6)):
            argv = self.list_argv(family)
            held.update(packed_routes(self.run(argv).stdout, kind, " ".join(argv)))
        lost = [packed for packed in active() if packed not in held]
        if lost:
            self.add_many((unpacked(packed), None) for packed in lost)
        return len(lost)

    def replace_all(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        """Our routes made to match the stored bans (BanBackend.replace_all): the ones the store
        does not know are deleted, in one `ip -batch`, and the stored ones added."""
        wanted = [(unpacked(packed), timeout) for packed, timeout in bans]
        keep = {address for address, _timeout in wanted}
        stale = [address for address in self.members() if address not in keep]
        if stale:
            self.run([IP, "-batch", "-"], "".join(
                f"route del {self.kind} {address_text(address)} proto {self.proto}\n" for address in stale))
        self.add_many(wanted)

    def members(self) -> dict[IPAddress, float | None]:
        found: dict[IPAddress, float | None] = {}
        for family in ("-4", "-6"):
            argv = self.list_argv(family)
            found.update(parse_routes(self.run(argv).stdout, " ".join(argv)))
        return found

    def teardown(self) -> None:
        for family in ("-4", "-6"):
            self.run([IP, family, "route", "flush", "proto", str(self.proto), "type", self.kind])

    def describe(self) -> str:
        return (f"route: {self.kind} host routes (proto {self.proto}); replies dropped, the "
                "scanner's packets still arrive; no kernel expiry")


def _route_list(text: str, source: str) -> list[object]:
    """The JSON list `ip -j route show` printed; BackendError naming `source` for anything else."""
    try:
        routes = json.loads(text) if text.strip() else []
    except ValueError as exc:
        raise BackendError(f"{source}: unexpected output: {text[:200]!r}") from exc
    if not isinstance(routes, list):
        raise BackendError(f"{source}: unexpected output: {text[:200]!r}")
    return routes


def parse_routes(text: str, source: str = "ip -j route show") -> dict[IPAddress, float | None]:
    """Host routes from `ip -j route show`: address -> None (routes never expire)."""
    routes = _route_list(text, source)
    found: dict[IPAddress, float | None] = {}
    for route in routes:
        dst = route.get("dst") if isinstance(route, dict) else None
        if not isinstance(dst, str):
            continue
        try:
            network = ip_network(dst)
        except ValueError:
            continue
        if network.num_addresses == 1:
            found[network.network_address] = None
    return found


def packed_routes(text: str, family: int, source: str = "ip -j route show") -> set[bytes]:
    """The host routes of parse_routes as packed addresses: what restore_lost compares once a
    minute, without an address object per route (100,000 routes: a fifth of the time)."""
    routes = _route_list(text, source)
    found: set[bytes] = set()
    pton = socket.inet_pton
    for route in routes:
        dst = route.get("dst") if isinstance(route, dict) else None
        if not isinstance(dst, str):
            continue
        if "/" in dst:  # iproute2 writes a host route bare; a network is not a ban of ours
            address, _slash, length = dst.partition("/")
            if length not in ("32", "128"):
                continue
            dst = address
        try:
            found.add(pton(family, dst))
        except OSError:
            continue
    return found
