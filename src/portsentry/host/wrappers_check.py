"""Checks for `portsentry check` on whether hosts.deny blocking can work here: a hosts.allow rule
that admits everyone makes hosts.deny entries void, and so does no daemon using TCP wrappers.

hosts_access(5) is consulted in order hosts.allow, then hosts.deny, and the first matching rule
decides, so a hosts.allow rule such as `ALL : ALL` (FreeBSD ships `ALL : ALL : allow`) admits a
client before its hosts.deny line is read. And only programs built with libwrap (or started
through tcpd) read those files at all; OpenSSH upstream dropped libwrap in 6.7 and many
distributions followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

DEFAULT_HOSTS_ALLOW = "/etc/hosts.allow"
# Daemons that were commonly linked with libwrap; checked when running processes cannot be.
COMMON_DAEMONS: tuple[str, ...] = (
    "/usr/sbin/sshd",
    "/usr/sbin/xinetd",
    "/usr/sbin/inetd",
    "/usr/sbin/tcpd",
    "/usr/sbin/vsftpd",
    "/usr/sbin/proftpd",
    "/usr/sbin/in.telnetd",
    "/usr/sbin/rpcbind",
    "/sbin/rpcbind",
    "/usr/sbin/stunnel4",
    "/usr/bin/stunnel",
    "/usr/sbin/exim4",
    "/usr/sbin/sendmail",
    "/usr/sbin/slapd",
    "/usr/sbin/dovecot",
)
_LIBWRAP = b"libwrap.so"
# Client patterns that match every address: hosts_access's ALL, wildcards, and /0 networks.
_EVERYONE = frozenset({"ALL", "*", "0.0.0.0/0", "0.0.0.0/0.0.0.0", "[::]/0", "[::/0]", "::/0"})
_CHUNK = 1 << 20
_MAX_BINARY = 256 << 20


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each rule: backslash-newline joins lines, as tcpd's xgets does."""
    start = 0
    parts: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        yield start, "".join(parts)
        parts = []
    if parts:
        yield start, "".join(parts)


def _split_fields(rule: str) -> list[str]:
    """Split at ':' outside [...], so bracketed IPv6 addresses stay whole."""
    fields: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in rule:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        elif ch == ":" and not depth:
            fields.append("".join(current))
            current = []
            continue
        current.append(ch)
    fields.append("".join(current))
    return fields


def _tokens(field: str) -> list[str]:
    return field.replace(",", " ").split()


def _matches_all(tokens: list[str], *, daemon: bool) -> tuple[bool, list[str]]:
    """Whether a list matches everyone (before EXCEPT) and the exceptions it then makes."""
    upper = [t.upper() for t in tokens]
    cut = upper.index("EXCEPT") if "EXCEPT" in upper else len(tokens)
    head, exceptions = tokens[:cut], tokens[cut + 1 :]
    if daemon:
        # `ALL@192.0.2.1` is every daemon on one of this host's addresses: still every daemon.
        hit = any(t.split("@", 1)[0].upper() == "ALL" for t in head)
    else:
        hit = any(t.upper() in _EVERYONE or t in _EVERYONE for t in head)
    return hit, exceptions


def hosts_allow_warnings(hosts_allow_text: str, *, path: str = DEFAULT_HOSTS_ALLOW) -> list[str]:
    """Warnings for hosts.allow rules that admit every client, so hosts.deny cannot refuse one."""
    warnings: list[str] = []
    for number, rule in _logical_lines(hosts_allow_text):
        stripped = rule.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = _split_fields(stripped)
        if len(fields) < 2:
            continue
        daemons, clients = _tokens(fields[0]), _tokens(fields[1])
        options = [o.strip().lower() for o in fields[2:]]
        # With the extended syntax a hosts.allow rule can still refuse (`: deny`), and `twist`
        # answers with a command instead of the service.
        if any(o.split(" ", 1)[0] in ("deny", "twist") for o in options):
            continue
        if not daemons:
            continue
        everyone, client_exceptions = _matches_all(clients, daemon=False)
        if not everyone:
            continue
        all_daemons, daemon_exceptions = _matches_all(daemons, daemon=True)
        shown = " ".join(stripped.split())
        if len(shown) > 80:
            shown = shown[:77] + "..."
        who = "every client"
        if client_exceptions:
            who += " except " + " ".join(client_exceptions)
        if all_daemons:
            what = "every service"
            if daemon_exceptions:
                what += " except " + " ".join(daemon_exceptions)
        else:
            what = " ".join(daemons)
        warnings.append(
            f"{path}:{number}: '{shown}' admits {who} to {what} before hosts.deny is read, so "
            "PortSentry's hosts.deny entries do not stop them; remove or narrow that rule, or block "
            "with KILL_ROUTE or a firewall backend instead"
        )
    return warnings


def _maps_libwrap(maps_path: str) -> bool:
    with open(maps_path, "rb") as f:
        return any(_LIBWRAP in line for line in f)


def _links_libwrap(binary: str) -> bool:
    """Whether the file names libwrap (its DT_NEEDED string), read without running it."""
    tail = b""
    read = 0
    with open(binary, "rb") as f:
        while read < _MAX_BINARY:
            chunk = f.read(_CHUNK)
            if not chunk:
                return False
            if _LIBWRAP in tail + chunk:
                return True
            tail = chunk[-len(_LIBWRAP) :]
            read += len(chunk)
    return False


def _process_name(proc: str, pid: str) -> str:
    try:
        with open(os.path.join(proc, pid, "comm"), encoding="utf-8", errors="replace") as f:
            return f.read().strip() or pid
    except OSError:
        return pid


def wrapper_users(proc: str = "/proc") -> tuple[list[str], int]:
    """Names of running processes with libwrap mapped, and how many processes could not be read."""
    users: set[str] = set()
    unreadable = 0
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return [], 0
    for pid in pids:
        try:
            if _maps_libwrap(os.path.join(proc, pid, "maps")):
                users.add(_process_name(proc, pid))
        except FileNotFoundError:
            continue  # the process ended meanwhile
        except OSError:
            unreadable += 1
    return sorted(users), unreadable


def wrappers_in_use(proc: str = "/proc", daemons: Sequence[str] = COMMON_DAEMONS) -> list[str]:
    """Warnings when no daemon here seems to consult hosts.deny; [] when one does."""
    have_proc = os.path.isdir(proc)
    users, unreadable = wrapper_users(proc) if have_proc else ([], 0)
    if users:
        return []
    linked = []
    for binary in daemons:
        try:
            if _links_libwrap(binary):
                linked.append(binary)
        except OSError:
            continue
    if have_proc and not unreadable:
        return [
            "no running daemon uses TCP wrappers (libwrap): hosts.deny entries stop nothing here; "
            "block with KILL_ROUTE or a firewall backend instead"
            + (f" (installed but not running: {', '.join(linked)})" if linked else "")
        ]
    if linked:
        # Not knowing what runs, an installed libwrap daemon is a reason not to warn.
        return []
    if have_proc:
        hint = "" if os.geteuid() == 0 else "; run as root to see all"
        seen = f"no readable running process ({unreadable} could not be read{hint}) "
    else:
        seen = f"{proc} is not available, "
    names = ", ".join(dict.fromkeys(os.path.basename(d) for d in daemons))
    return [
        f"{seen}and none of the common daemons ({names}) uses TCP wrappers (libwrap): "
        "hosts.deny entries probably stop nothing here"
    ]


def check_wrappers(hosts_allow: str = DEFAULT_HOSTS_ALLOW) -> list[str]:
    """All warnings about hosts.deny blocking on this host."""
    warnings: list[str] = []
    try:
        with open(hosts_allow, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        warnings.append(
            f"{hosts_allow}: cannot read it ({exc.strerror}), so rules there that admit everyone "
            "could not be checked"
        )
        text = ""
    warnings.extend(hosts_allow_warnings(text, path=hosts_allow))
    warnings.extend(wrappers_in_use())
    return warnings
