"""The admin commands' light half: parsing what an admin types (addresses, durations) and
printing ban listings. Apart from service.admin so that `portsentry list` and friends, when the
daemon answers them, import neither the ban lifecycle nor the backends.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from ipaddress import ip_address

from portsentry.bans.records import LONGEST_BAN, normalise
from portsentry.core.actions import StepKind
from portsentry.core.probe import IPAddress

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AdminError(Exception):
    pass


def parse_duration(text: str) -> float | None:
    """`90`, `90s`, `15m`, `2h`, `7d`, `1w`, or `forever` (None)."""
    if text.strip().lower() in ("forever", "0"):
        return None
    match = _DURATION.match(text.lower())
    seconds = 0.0 if match is None else float(match.group(1)) * _UNITS[match.group(2)]
    # 400 digits are a float of inf, an expiry no backend accepts: "forever" says that.
    if not 0 < seconds < math.inf:
        raise AdminError(f"{text!r} is not a duration (e.g. 90, 15m, 2h, 7d, forever)")
    if seconds > LONGEST_BAN:
        raise AdminError(f"{text!r} is longer than 100 years: say forever")
    return seconds


def parse_address(text: str) -> IPAddress:
    try:
        return normalise(ip_address(text.strip()))
    except ValueError:
        raise AdminError(f"{text!r} is not an IP address") from None


def not_blocked(address: IPAddress) -> str:
    """Why `unblock` did nothing: one wording with the daemon answering or not."""
    return f"{address} is not blocked"


def not_done(command: str, address: IPAddress) -> str:
    """A block or unblock that did not happen: `portsentry: ` and this go to standard error."""
    return not_blocked(address) if command == "unblock" else f"could not block {address}"


# What became of a step of `block` that failed, and of one of `unblock`: what the daemon does
# about it as it is (bans.restore at its start, `hosts-deny tidy`), or that nothing does.
_BLOCK_LEFT = {
    StepKind.NATIVE: "its BAN_BACKEND ban failed (the daemon tries it again at its next start)",
    StepKind.HOSTS_DENY: "its hosts.deny line failed (the daemon tries it again at its next start)",
    StepKind.ROUTE: "KILL_ROUTE failed (never run again for this ban: fix it, then unblock and block again)",
    StepKind.RUN_CMD: "KILL_RUN_CMD failed (not run again)",
}
_UNBLOCK_LEFT = {
    StepKind.NATIVE: ("its removal from BAN_BACKEND failed (the daemon's next start leaves only the "
                      "stored bans there)"),
    StepKind.HOSTS_DENY: "its hosts.deny line could not be removed (`portsentry hosts-deny tidy` does it)",
    StepKind.ROUTE: "KILL_ROUTE_UNDO failed (what KILL_ROUTE did is still in place: undo it by hand)",
    StepKind.RUN_CMD: "KILL_RUN_CMD failed",
}


def partly_done(command: str, address: IPAddress, failed: Iterable[StepKind]) -> str:
    """A block or unblock recorded, and so in force or lifted, with steps that failed (their
    lines, as the log has them, come before this): which, and what becomes of each. Exit 1."""
    words = _BLOCK_LEFT if command == "block" else _UNBLOCK_LEFT
    done = "blocked" if command == "block" else "unblocked"
    parts = [words[kind] for kind in dict.fromkeys(failed)]
    return f"{address} is {done}, but not everywhere: {'; '.join(parts)}"


def format_listing(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "no active bans"
    header = (f"{'ADDRESS':<40} {'EXPIRES IN':>10} {'MODE':<5} {'PORT':>5} {'HITS':>5} {'BANS':>4}  "
              f"{'ORIGIN':<16} HELD BY")
    out = [header]
    for row in rows:
        remaining = row["remaining"]
        expires = "forever" if remaining is None else _short(float(str(remaining)))
        held_by = [str(b) for b in row["backends"]]  # type: ignore[attr-defined]
        # "-" only when nothing holds it: "- + hosts.deny" read as a ban held by nothing.
        held = " + ".join(filter(None, (", ".join(held_by),
                                        "hosts.deny" if row["hosts_deny_line"] else ""))) or "-"
        out.append(f"{row['address']!s:<40} {expires:>10} {row['mode']!s:<5} {row['port']!s:>5} "
                   f"{row['count']!s:>5} {row['offences']!s:>4}  {row.get('origin', 'local')!s:<16} {held}")
    return "\n".join(out)


def _short(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{int(seconds)}s"


def as_json(rows: list[dict[str, object]]) -> str:
    return json.dumps(rows, indent=2, sort_keys=True)
