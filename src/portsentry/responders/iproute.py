"""The route ban backend, for hosts with neither nftables nor ipset: a blackhole (or unreachable,
prohibit) host route per banned address, like 1.2's KILL_ROUTE but without a shell.

It is asymmetric: the scanner's packets still arrive and reach listening services; only our
replies to it are dropped, so a handshake never completes but a single spoofed or one-way packet
still gets in. Routes have no expiry, so `add` ignores the timeout and the daemon removes expired
bans itself. Our routes carry their own protocol number (`proto`), and every delete, listing and
flush filters on it and on the route type, so routes made by anyone else are never touched.
A ban is an `ip route add`, never a `replace`: that took over whatever route had the ban's key
(1.2's reject route for a host it blocked, an admin's route to the host), which the lift then
deleted. Where `add` finds a route there, the address's routes are read: ours is kept (made again
if of another kind), another's ban route (blackhole, unreachable, prohibit) already drops the
replies and is left alone, and another's route of any other kind makes the ban fail, said.
"""

from __future__ import annotations

import json
import re
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
EXISTS = "File exists"  # what `ip route add` says of a route with the same key
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
        # Addresses whose ban another's route (not a ban route) refused: restore_lost leaves them.
        self._refused: set[bytes] = set()

    @staticmethod
    def _family(address: IPAddress) -> str:
        address_text(address)
        return "-4" if address.version == 4 else "-6"

    def add_argv(self, address: IPAddress, verb: str = "add") -> list[str]:
        return [IP, self._family(address), "route", verb, self.kind, address_text(address),
                "proto", str(self.proto)]

    def remove_argv(self, address: IPAddress) -> list[str]:
        return [IP, self._family(address), "route", "del", self.kind, address_text(address),
                "proto", str(self.proto)]

    def batch_script(self, bans: Iterable[tuple[IPAddress, float | None]]) -> str:
        # `ip -batch` lines take no -4/-6; the family follows from the address.
        lines = []
        for address, timeout in bans:
            check_timeout(timeout)
            lines.append(f"route add {self.kind} {address_text(address)} proto {self.proto}\n")
        return "".join(lines)

    def list_argv(self, family: str) -> list[str]:
        return [IP, "-j", family, "route", "show", "proto", str(self.proto), "type", self.kind]

    def is_supported(self) -> bool:
        return self.probe(self.list_argv("-4")) and self.probe(self.list_argv("-6"))

    def setup(self) -> None:
        """Nothing to create: each ban is its own route."""

    def add(self, address: IPAddress, timeout: float | None) -> None:
        check_timeout(timeout)
        argv = self.add_argv(address)
        result = self.runner(argv, None)
        if result.ok:
            return
        if EXISTS not in result.stderr:
            raise BackendError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        self._existing(address)

    def _existing(self, address: IPAddress) -> None:
        """`add` found a route for `address`: keep ours, leave another's ban route, refuse the
        rest (module docstring)."""
        argv = [IP, "-j", self._family(address), "route", "show", "exact", address_text(address)]
        routes = [r for r in _route_list(self.run(argv).stdout, " ".join(argv)) if isinstance(r, dict)]
        for route in routes:
            if str(route.get("protocol")) == str(self.proto):
                if route.get("type") != self.kind:  # BAN_OPTIONS changed the kind since
                    self.run(self.add_argv(address, "replace"))
                return
        if any(route.get("type") in KINDS for route in routes):
            return
        self._refused.add(address.packed)
        held = ", ".join(f"{route.get('type', 'unicast')} {route.get('dst')}"
                         + (f" via {route['gateway']}" if "gateway" in route else "") for route in routes)
        raise BackendError(f"{address} has a route that is not ours ({held or 'unknown'}); "
                           "not replaced")

    def remove(self, address: IPAddress) -> None:
        argv = self.remove_argv(address)
        self._refused.discard(address.packed)
        result = self.runner(argv, None)
        if result.ok:
            return
        # Deleting a route that is not there is success here; anything else is not.
        if "No such process" in result.stderr or "No such file" in result.stderr:
            return
        raise BackendError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")

    def add_many(self, bans: Iterable[tuple[IPAddress, float | None]]) -> None:
        wanted = list(bans)
        script = self.batch_script(wanted)
        if not script:
            return
        # -force: past a line that fails; each failure names its line ("Command failed -:N").
        result = self.runner([IP, "-force", "-batch", "-"], script)
        if result.ok:
            return
        failed = sorted({int(n) for n in re.findall(r"Command failed -:(\d+)", result.stderr)})
        if not failed or any(not 0 < n <= len(wanted) for n in failed):
            raise BackendError(f"ip -force -batch - exited {result.returncode}: "
                               f"{result.stderr.strip()[:500]}")
        refused: list[str] = []
        for n in failed:
            address = wanted[n - 1][0]
            try:
                self._existing(address)
            except BackendError as error:
                refused.append(str(error))
        if refused:
            raise BackendError(f"{len(refused)} of {len(wanted)} routes not made: {'; '.join(refused[:5])}")

    def restore_lost(self, active: Callable[[], Iterable[bytes]]) -> int:
        """A network restart takes our routes (`ip route flush`, systemd-networkd removing
        routes it did not make, an ifupdown script) while the store still lists the bans, and no
        table or rule of ours shows it: the routes are listed and the missing ones added again."""
        # Anyone's ban routes count: a host 1.2 blocked stays blocked by its route (and ours is
        # added once the admin deletes that one). A ban another's route of another kind refused
        # is not tried again each minute.
        held: set[bytes] = set()
        for family, af in (("-4", socket.AF_INET), ("-6", socket.AF_INET6)):
            for kind in sorted(KINDS):
                argv = [IP, "-j", family, "route", "show", "type", kind]
                held.update(packed_routes(self.run(argv).stdout, af, " ".join(argv)))
        lost = [packed for packed in active() if packed not in held and packed not in self._refused]
        if lost:
            self.add_many((unpacked(packed), None) for packed in lost)
        return len(lost)

    def replace_all(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        """Our routes made to match the stored bans (BanBackend.replace_all): the ones the store
        does not know are deleted, in one `ip -batch`, and the stored ones added."""
        wanted = [(unpacked(packed), timeout) for packed, timeout in bans]
        keep = {address for address, _timeout in wanted}
        ours = self.members()
        stale = [address for address in ours if address not in keep]
        if stale:
            self.run([IP, "-batch", "-"], "".join(
                f"route del {self.kind} {address_text(address)} proto {self.proto}\n" for address in stale))
        self.add_many((address, timeout) for address, timeout in wanted if address not in ours)

    def holds_any(self) -> bool:
        return bool(self.members())

    def members(self) -> dict[IPAddress, float | None]:
        found: dict[IPAddress, float | None] = {}
        for family in ("-4", "-6"):
            argv = self.list_argv(family)
            found.update(parse_routes(self.run(argv).stdout, " ".join(argv)))
        return found

    def teardown(self) -> str | None:
        # Listed first: a flush says nothing of what it removed, and where the main table does
        # not exist yet (no address configured) it fails rather than flush nothing.
        count = 0
        for family in ("-4", "-6"):
            argv = self.list_argv(family)
            routes = len(_route_list(self.run(argv).stdout, " ".join(argv)))
            if routes:
                self.run([IP, family, "route", "flush", "proto", str(self.proto), "type", self.kind])
                count += routes
        if not count:
            return None
        return f"{count} {self.kind} route{'s' if count != 1 else ''} (proto {self.proto})"

    def owned(self) -> str:
        return f"{self.kind} routes with proto {self.proto}"

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
        except (OSError, ValueError):  # ValueError: a NUL in the text
            continue
    return found
