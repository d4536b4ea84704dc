"""METRICS_LISTEN: the address the metrics endpoint listens on, checked when the config is read."""

from __future__ import annotations

import re

DEFAULT_PORT = 9470


class MetricsError(Exception):
    """Metrics were asked for but cannot be provided; the text says what to do."""


_BRACKETED = re.compile(r"\[(?P<host>[^\]]+)\]:(?P<port>[0-9]+)")
_PLAIN = re.compile(r"(?P<host>[^:\[\]\s]+):(?P<port>[0-9]+)")


def parse_listen(address: str) -> tuple[str, int]:
    """'127.0.0.1:9470', 'localhost:9470' or '[::1]:9470' -> (host, port). Port 0 picks a free one."""
    text = address.strip()
    match = _BRACKETED.fullmatch(text) or _PLAIN.fullmatch(text)
    if match is None:
        raise MetricsError(
            f"metrics address {address!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT} "
            f"or [::1]:{DEFAULT_PORT})"
        )
    # Leading zeros off and the length checked before int(), which raises ValueError on strings
    # of over 4300 digits.
    digits = match["port"].lstrip("0") or "0"
    if len(digits) > 5 or int(digits) > 65535:
        raise MetricsError(f"metrics address {address!r}: port {digits} is not a port (0-65535)")
    return match["host"], int(digits)
