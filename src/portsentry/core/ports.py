"""Port lists as written in portsentry.conf ("1,7, 9,512-515"): parse them into sorted port
tuples and format tuples back into the compact text form."""

from __future__ import annotations

import re
from collections.abc import Iterable

MIN_PORT = 1
MAX_PORT = 65535

# ASCII digits only: str.isdigit() and \d would also accept digits such as "²" or "٣".
_SINGLE = re.compile(r"[0-9]+", re.ASCII)
_RANGE = re.compile(r"([0-9]+)[ \t]*-[ \t]*([0-9]+)", re.ASCII)
# Longer digit strings cannot be ports; the cap also keeps int() away from Python's
# limit on huge integer strings.
_MAX_DIGITS = 6


class PortListError(ValueError):
    """One entry of a port list is not a port or a range; `token` is the entry as written."""

    def __init__(self, token: str, reason: str) -> None:
        super().__init__(token, reason)
        self.token = token
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.token!r} {self.reason}"


def _port(digits: str, token: str) -> int:
    if len(digits) > _MAX_DIGITS or not MIN_PORT <= int(digits) <= MAX_PORT:
        raise PortListError(token, f"is not a port ({MIN_PORT}-{MAX_PORT})")
    return int(digits)


def _parse_token(token: str) -> range:
    if _SINGLE.fullmatch(token):
        port = _port(token, token)
        return range(port, port + 1)
    match = _RANGE.fullmatch(token)
    if match is None:
        raise PortListError(token, "is not a port number or a range like 512-515")
    first = _port(match.group(1), token)
    last = _port(match.group(2), token)
    if first > last:
        raise PortListError(token, "is not a valid range (the first port is above the last)")
    return range(first, last + 1)


def parse_ports(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of ports and inclusive ranges into sorted unique ports.

    Spaces and tabs around entries are allowed. One trailing comma is tolerated because
    1.2's strtok() parser accepted it; an empty entry anywhere else is an error, since it
    usually means a port was deleted by mistake. An empty or blank text is the empty list.
    """
    if text.strip(" \t") == "":
        return ()
    tokens = [token.strip(" \t") for token in text.split(",")]
    if len(tokens) > 1 and tokens[-1] == "":
        tokens.pop()
    ports: set[int] = set()
    for token in tokens:
        if token == "":
            raise PortListError(
                token, "is an empty entry (two commas in a row, or a leading comma)"
            )
        ports.update(_parse_token(token))
    return tuple(sorted(ports))


def format_ports(ports: Iterable[int]) -> str:
    """Format ports as parse_ports() reads them, with runs of consecutive ports as ranges."""
    ordered = sorted(set(ports))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        first = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == ordered[index] + 1:
            index += 1
        last = ordered[index]
        parts.append(str(first) if first == last else f"{first}-{last}")
        index += 1
    return ",".join(parts)
