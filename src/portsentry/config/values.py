"""What each configuration value may be: the converters the key table (config.settings.KEYS)
pairs with its keys. Each takes the value's text and returns the value or raises BadValue with
what is wrong; the parser adds file, line and key."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Final
from urllib.parse import urlsplit

from portsentry.core.ports import PortListError, parse_ports


class BadValue(Exception):
    """Raised by converters; parse_config adds file, line and key."""


def port_list(value: str) -> tuple[int, ...]:
    try:
        return parse_ports(value)
    except PortListError as error:
        raise BadValue(str(error)) from None


_INTEGER = re.compile(r"[ \t]*([0-9]+)[ \t]*", re.ASCII)


def integer(low: int, high: int, expected: str) -> Callable[[str], int]:
    """Whole numbers in [low, high]; surrounding blanks are fine ("1 " meant 1 to atoi)."""

    def convert(value: str) -> int:
        match = _INTEGER.fullmatch(value)
        # The length check keeps int() away from absurdly long digit strings; it is taken
        # without leading zeros and against `high`, so the top of every range is reachable.
        digits = (match.group(1).lstrip("0") or "0") if match else ""
        if match is None or len(digits) > len(str(high)) or not low <= int(digits) <= high:
            raise BadValue(f"{value!r} is not {expected}")
        return int(digits)

    return convert


def flag(value: str) -> bool:
    return bool(integer(0, 1, "0 or 1")(value))


_NUMBER = re.compile(
    r"[ \t]*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)[ \t]*", re.ASCII
)
_MAX_TIMEOUT: Final = 86400.0


def seconds(value: str) -> float:
    match = _NUMBER.fullmatch(value)
    number = float(match.group(1)) if match else math.nan
    if not 0 < number <= _MAX_TIMEOUT:  # also false for nan
        raise BadValue(f"{value!r} is not a number of seconds above 0 and at most 86400")
    return number


def optional(value: str) -> str | None:
    # An empty value switches the feature off, as leaving the key out does.
    return value or None


def required(value: str) -> str:
    if not value:
        raise BadValue("must not be empty (leave the key out to use the default)")
    return value


def url(value: str) -> str | None:
    if not value:
        return None
    try:
        urlsplit(value)
    except ValueError:
        # Neither the text nor urlsplit's message (which may quote the netloc) is repeated:
        # the URL may hold the Redis password.
        raise BadValue(
            "is not a valid URL (an IPv6 address needs both brackets: redis://[fd00::1]:6379)"
        ) from None
    return value


PLACEHOLDERS: Final = ("TARGET", "PORT", "MODE")
_MASK: Final = "\0"  # stands for a placeholder spelt right; no value holds it (_check_text)
_DOLLAR_WORD: Final = re.compile(r"\$([A-Za-z_]+)\$")
_NO_CLOSING: Final = re.compile(r"\$(?:TARGET|PORT|MODE)(?![A-Za-z0-9_$])")
_NO_OPENING: Final = re.compile(r"(?<![$A-Za-z0-9_])(?:TARGET|PORT|MODE)\$")


def placeholder_mistakes(command: str) -> list[str]:
    """What in a KILL_ command looks meant as $TARGET$, $PORT$ or $MODE$ but is not one, such as
    `$TAGRET$` or `$PORT` with no closing `$`: it is left as written, as 1.2 left it, so the
    command runs with that text. Said, not refused: 1.2 configurations keep loading. Shell
    words (`$HOME`, `$1`, `$(date)`) are not placeholders and are left alone."""
    text = command
    for name in PLACEHOLDERS:  # in _fill's order, so "$TARGET$PORT$" reads as it is filled
        text = text.replace(f"${name}$", _MASK)
    found: list[tuple[int, str]] = []
    for match in _DOLLAR_WORD.finditer(text):
        near = difflib.get_close_matches(match.group(1).upper(), PLACEHOLDERS, n=1, cutoff=0.6)
        if near:
            found.append((match.start(), f"{match.group()!r} is not a placeholder (did you mean "
                                         f"${near[0]}$?): it is left as written, not replaced"))
    every = ", ".join(f"${name}$" for name in PLACEHOLDERS)
    for pattern, lacks in ((_NO_CLOSING, "closing"), (_NO_OPENING, "opening")):
        for match in pattern.finditer(text):
            found.append((match.start(), f"{match.group()!r} has no {lacks} $: it is left as "
                                         f"written, not replaced (placeholders: {every})"))
    return [message for _start, message in sorted(found)]


def command_with_target(value: str) -> str | None:
    if not value:
        return None
    if "$TARGET$" not in value:
        # 1.2 only noticed this when an attack came, then skipped the block.
        raise BadValue("has no $TARGET$ to substitute")
    return value


def factor(value: str) -> float:
    match = _NUMBER.fullmatch(value)
    number = float(match.group(1)) if match else math.nan
    if not 1 <= number <= 100:  # also false for nan
        raise BadValue(f"{value!r} is not a factor from 1 to 100")
    return number


def choice(*choices: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if value.strip() not in choices:
            raise BadValue(f"{value!r} is not one of {', '.join(choices)}")
        return value.strip()

    return convert


# What the nftables backend takes (responders.nftables): a '-' or a leading '_' passed here and
# the start then died in the backend's ValueError traceback.
_NFT_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}", re.ASCII)


def nft_table(value: str) -> str:
    # Goes into nft commands: a plain identifier only.
    if not _NFT_TABLE.fullmatch(value):
        raise BadValue(f"{value!r} is not an nftables table name (a letter, then up to 31 letters, "
                       "digits or _)")
    return value


def priority(value: str) -> int:
    match = re.fullmatch(r"[ \t]*(-?[0-9]{1,4})[ \t]*", value)
    if match is None:
        raise BadValue(f"{value!r} is not a whole number from -9999 to 9999")
    return int(match.group(1))


def absolute_path(value: str) -> str:
    # --daemon changes to / (as 1.2 did), and reloads and ignore-file re-reads come after it: a
    # relative path would name one file at the start and another from then on.
    if not value.startswith("/"):
        raise BadValue(f"{value!r} is not an absolute path")
    return value


def required_path(value: str) -> str:
    return absolute_path(required(value))


def optional_path(value: str) -> str | None:
    # Empty switches the feature off, as leaving the key out does.
    return absolute_path(value) if value else None


BLOCK_LABELS: Final = ("log only", "block", "run KILL_RUN_CMD only")
BLOCK = integer(0, 2, "0 (log only), 1 (block) or 2 (run KILL_RUN_CMD only)")
# 2.x keeps SCAN_TRIGGER in 16 bits and silently wraps larger values; refuse them instead.
TRIGGER = integer(0, 65535, "a whole number of hits from 0 to 65535")
PORT_COUNT = integer(1, 65535, "a number of ports from 1 to 65535")


def listen(value: str) -> str | None:
    if not value:
        return None
    from portsentry.config.listen import MetricsError, parse_listen

    try:
        parse_listen(value)
    except MetricsError as error:
        raise BadValue(str(error)) from None
    return value


RATE = integer(0, 1_000_000, "a number of bans per minute (0 = no cap)")


def networks(value: str) -> tuple[IPv4Network | IPv6Network, ...]:
    found = []
    for token in value.replace(",", " ").split():
        try:
            found.append(ip_network(token, strict=False))
        except ValueError:
            raise BadValue(f"{token!r} is not an address or network (a.b.c.d/nn, x::/nn)") from None
    return tuple(found)


def host_ids(value: str) -> tuple[str, ...]:
    found = tuple(value.replace(",", " ").split())
    for host in found:
        if not _HOST_ID.fullmatch(host):
            raise BadValue(f"{host!r} is not a host id (letters, digits, '.', '_', '-', at most 64)")
    return found


def host_id(value: str) -> str | None:
    if value and not _HOST_ID.fullmatch(value.strip()):
        raise BadValue(f"{value!r} is not a host id (letters, digits, '.', '_', '-', at most 64)")
    return value.strip() or None


_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_FLEET_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)


def fleet_name(value: str) -> str:
    # Inside a Redis hash tag: braces would move the fleet's keys to other Cluster slots.
    if not _FLEET_NAME.fullmatch(value):
        raise BadValue(f"{value!r} is not a fleet name (letters, digits, '.', '_', '-', at most 64)")
    return value


LINES = integer(0, 1_000_000, "a number of lines (0 = no limit)")
ROWS = integer(0, 1_000_000_000, "a number of rows (0 = no limit)")
DURATION = integer(0, 10 * 365 * 86400, "a number of seconds, at most ten years (0 = no limit)")
