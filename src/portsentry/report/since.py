"""`--since`: a span back from now (90m, 24h, 7d, 2w) or a date or time (2026-12-01,
2026-12-01T08:00, local time). Anything else is a clear error, never a guess; so is a start in
the future (a window that ends before it begins) or before 1970 (nothing is stored from then, and
the timeline has a point per day of the window)."""

from __future__ import annotations

import re
from datetime import datetime

_SPAN = re.compile(r"([0-9]{1,6})([mhdw])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class SinceError(ValueError):
    pass


def parse_since(text: str, now: float) -> float:
    """The start of the report's window, in seconds since the epoch."""
    value = text.strip()
    match = _SPAN.fullmatch(value)
    if match is not None:
        return _checked(text, now - int(match.group(1)) * _UNITS[match.group(2)], now)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SinceError(
            f"--since {text!r}: give a span (90m, 24h, 7d, 2w) or a date (2026-12-01) "
            "or time (2026-12-01T08:00)"
        ) from None
    try:
        since = moment.timestamp()
    except (OverflowError, OSError, ValueError):
        raise SinceError(f"--since {text!r}: out of range") from None
    return _checked(text, since, now)


def _checked(text: str, since: float, now: float) -> float:
    if since > now:
        raise SinceError(f"--since {text!r} is in the future: the report ends now")
    if since < 0:
        raise SinceError(f"--since {text!r} is before 1970: give a later date or a shorter span")
    return since
