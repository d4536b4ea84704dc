"""The values of the ban sets as nft spells and prints them: element timeouts (and the
kernel's limit on them), the interval elements and port ranges of the first-probe ban's sets,
and the elements `nft -j list set` prints (ban sets, caught4/caught6, dropped4/dropped6). Plain
text and numbers, no netlink: nft_elements encodes the same elements as messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    collapse_addresses,
    ip_address,
    ip_network,
)

from portsentry.core.probe import IPAddress, Protocol
from portsentry.responders.backend import BackendError, Caught, Guarded, check_timeout


def timeout_text(timeout: float) -> str:
    """nft's spelling of a timeout: whole seconds as `3600s`, anything else in milliseconds."""
    ms = timeout_ms(timeout)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


# A ban this long or longer goes into the set without a timeout. nf_tables refuses (ERANGE) an
# element timeout of 2**64 ns (584 years) or more, and with it the whole batch of bans it came in;
# some kernels store timeouts in fewer bits. The daemon lifts the element at the ban's end, as it
# does every ban, so 68 years without a kernel timer loses nothing.
KERNEL_TIMEOUT_LIMIT = float(2**31)


def held_for(timeout: float | None) -> float | None:
    """A ban's kernel timeout in seconds: None (no timeout) for forever and from the limit on."""
    timeout = check_timeout(timeout)
    return None if timeout is None or timeout >= KERNEL_TIMEOUT_LIMIT else timeout


def timeout_ms(timeout: float) -> int:
    # Rounded up, so a ban never ends before the daemon's own record of it.
    return max(1, math.ceil(timeout * 1000 - 1e-6))


class InconsistentListing(BackendError):
    """A set listing named an element twice, so it was taken while the set was being rehashed."""


def parse_set_json(text: str, source: str = "nft -j") -> dict[IPAddress, float | None]:
    """Elements of one set from `nft -j list set`: address -> seconds left (None = no timeout)."""
    try:
        document = json.loads(text)
        objects = document["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"{source}: unexpected output: {text[:200]!r}") from exc
    if not isinstance(objects, list):
        raise BackendError(f"{source}: unexpected output: {text[:200]!r}")
    found: dict[IPAddress, float | None] = {}
    for entry in set_elements(objects):
        value, expires = _element_value(entry, source)
        if value in found:
            raise InconsistentListing(f"{source}: {value} listed twice (set being resized)")
        found[value] = expires
    return found


def set_elements(objects: object) -> list[object]:
    """The "elem" entries of every set in a parsed `nft -j` listing; shapes nft never writes
    (a set that is not an object, elements that are not a list) contribute none."""
    found: list[object] = []
    for item in objects if isinstance(objects, list) else []:
        body = item.get("set") if isinstance(item, dict) else None
        entries = body.get("elem") if isinstance(body, dict) else None
        if isinstance(entries, list):
            found += entries
    return found


def _element_value(entry: object, source: str) -> tuple[IPAddress, float | None]:
    expires: float | None = None
    value = entry
    if isinstance(entry, dict) and isinstance(entry.get("elem"), dict):
        elem = entry["elem"]
        value = elem.get("val")
        left = elem.get("expires", elem.get("timeout"))
        if left is not None:
            if isinstance(left, bool) or not isinstance(left, int | float):
                raise BackendError(f"{source}: unexpected set element {entry!r}")
            expires = float(left)
    if not isinstance(value, str):
        raise BackendError(f"{source}: unexpected set element {entry!r}")
    try:
        address: IPv4Address | IPv6Address = ip_address(value)
    except ValueError as exc:
        raise BackendError(f"{source}: set element {value!r} is not an address") from exc
    return address, expires


# -- the first-probe ban's sets (nft_capture) -----------------------------------------------------



def intervals(members: Iterable[Guarded]) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 elements of an interval set: networks merged (an interval set refuses
    overlapping elements), as nft writes them."""
    v4: list[IPv4Network] = []
    v6: list[IPv6Network] = []
    for member in members:
        if isinstance(member, IPv4Address | IPv6Address):
            member = ip_network(member)
        if isinstance(member, IPv4Network):
            v4.append(member)
        elif isinstance(member, IPv6Network):
            v6.append(member)
        else:
            raise TypeError(f"a guarded source is an address or a network, not {member!r}")
    return ([str(n) for n in collapse_addresses(v4)], [str(n) for n in collapse_addresses(v6)])


def port_ranges(ports: Iterable[int]) -> list[str]:
    """Ports as nft interval elements: ["1-78", "80", "82-1023"]."""
    wanted = sorted({int(p) for p in ports})
    if any(not 0 < p < 0x10000 for p in wanted):
        raise ValueError(f"ports {wanted!r} are not all ports")
    found: list[str] = []
    start = previous = None
    for port in wanted:
        if previous is not None and port == previous + 1:
            previous = port
            continue
        if start is not None:
            found.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = port
    if start is not None:
        found.append(str(start) if start == previous else f"{start}-{previous}")
    return found


def parse_caught_json(text: str) -> list[Caught]:
    """The entries of caught4/caught6 from `nft -j list set`; malformed ones are skipped."""
    return [entry for entry, _left in parse_caught_left_json(text)]


def parse_caught_left_json(text: str) -> list[tuple[Caught, float | None]]:
    """The entries of caught4/caught6 with the seconds each has left (None: no timeout, as the
    kernel's ban with BLOCK_TIME 0); malformed ones are skipped."""
    try:
        objects = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        raise BackendError("nft -j list set: not the JSON nft writes") from None
    found: list[tuple[Caught, float | None]] = []
    for entry in set_elements(objects):
        left = None
        if isinstance(entry, dict) and isinstance(entry.get("elem"), dict):
            expires = entry["elem"].get("expires", entry["elem"].get("timeout"))
            if isinstance(expires, int | float) and not isinstance(expires, bool):
                left = float(expires)
            entry = entry["elem"].get("val")
        concat = entry.get("concat") if isinstance(entry, dict) else None
        if not (isinstance(concat, list) and len(concat) == 3):
            continue
        address, protocol, port = concat
        if not isinstance(address, str) or isinstance(port, bool) or not isinstance(port, int):
            continue
        try:
            found.append(((ip_address(address), Protocol(str(protocol).upper()), port), left))
        except ValueError:
            continue
    return found


def parse_dropped_json(text: str) -> dict[IPAddress, int]:
    """The counters of dropped4/dropped6 from `nft -j list set`: source -> packets. Entries
    without a counter or with a malformed one are skipped."""
    try:
        objects = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        raise BackendError("nft -j list set: not the JSON nft writes") from None
    found: dict[IPAddress, int] = {}
    for entry in set_elements(objects):
        element = entry.get("elem") if isinstance(entry, dict) else None
        if not isinstance(element, dict):
            continue
        counter = element.get("counter")
        packets = counter.get("packets") if isinstance(counter, dict) else None
        value = element.get("val")
        if isinstance(packets, bool) or not isinstance(packets, int) or packets < 0 \
                or not isinstance(value, str):
            continue
        try:
            found[ip_address(value)] = packets
        except ValueError:
            continue
    return found
