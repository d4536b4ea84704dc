"""Debian's layout around portsentry.conf, read as its package left it.

- /etc/default/portsentry chooses the modes: `TCP_MODE="tcp"` (or stcp, atcp, or empty for none)
  and `UDP_MODE="udp"` (sudp, audp, empty). Debian's init script sources it as shell; here it is
  parsed, never run: assignments with optional quotes, comments and blank lines, `export`
  allowed; anything else is an error naming the file and line.
- Debian builds IGNORE_FILE from portsentry.ignore.static at every start (and its builder finds
  no host address on current systems). When IGNORE_FILE is missing and the .static file exists,
  that is used: this host's own addresses are never blocked anyway, live.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from portsentry.core.probe import Mode

DEFAULTS_PATH = "/etc/default/portsentry"
_ASSIGNMENT = re.compile(
    r"""\s*(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)=
        (?:"(?P<double>[^"\\$`]*)"|'(?P<single>[^']*)'|(?P<bare>[^\s"'\\$`;&|<>()]*))
        \s*(?:\#.*)?""",
    re.VERBOSE,
)
TCP_MODES = {"tcp": Mode.TCP, "stcp": Mode.STCP, "atcp": Mode.ATCP}
UDP_MODES = {"udp": Mode.UDP, "sudp": Mode.SUDP, "audp": Mode.AUDP}


class DefaultsError(ValueError):
    """The defaults file says something we will not guess at; the text names file and line."""


def parse_defaults(text: str, source: str = DEFAULTS_PATH) -> list[Mode] | None:
    """The modes TCP_MODE and UDP_MODE choose, TCP first; None when the file sets neither (it
    may hold only an init script's own variables, such as PORTSENTRY_MODES). Never raises
    anything but DefaultsError."""
    values: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGNMENT.fullmatch(line)
        if match is None:
            raise DefaultsError(f"{source}:{number}: not a plain assignment (KEY=\"value\"): "
                                f"{line.strip()[:80]!r}")
        value = next(v for v in (match["double"], match["single"], match["bare"]) if v is not None)
        values[match["key"]] = (value, number)
    if "TCP_MODE" not in values and "UDP_MODE" not in values:
        return None
    modes: list[Mode] = []
    for key, known in (("TCP_MODE", TCP_MODES), ("UDP_MODE", UDP_MODES)):
        if key not in values:
            continue
        value, number = values[key]
        if not value:
            continue
        if value not in known:
            raise DefaultsError(f"{source}:{number}: {key}: {value!r} is not one of "
                                f"{', '.join(known)} (or empty for none)")
        modes.append(known[value])
    return modes


def read_defaults(path: str = DEFAULTS_PATH) -> list[Mode] | None:
    """The modes from `path`, or None when it does not exist or chooses none; DefaultsError when
    it is unreadable or says something else."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            text = handle.read(64 * 1024)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise DefaultsError(f"{path}: {error.strerror or error}") from None
    return parse_defaults(text, path)


@dataclass(frozen=True)
class IgnoreChoice:
    path: str | None
    note: str | None = None  # said by check-config and at start when the .static file stands in


def ignore_file_to_use(path: str | None) -> IgnoreChoice:
    """IGNORE_FILE, or Debian's portsentry.ignore.static when IGNORE_FILE is missing."""
    if path is None or os.path.exists(path):
        return IgnoreChoice(path)
    static = f"{path}.static"
    if os.path.isfile(static):
        return IgnoreChoice(static, f"IGNORE_FILE {path} does not exist; using {static} (Debian builds "
                                    "the first from the second at every start; this host's own "
                                    "addresses are never blocked anyway)")
    return IgnoreChoice(path)
