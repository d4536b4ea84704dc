"""Who changed the bans: the one `adminalert:` line each ban-changing admin command (block,
unblock, their --file forms, flush) leaves in syslog, after the lines of what it did.

The daemon writes it for a request on its control socket, naming the client the kernel vouches
for (SO_PEERCRED); the command line writes it itself, with its own lines, when it works without
the daemon (daemon stopped, --file, flush): an unblock while the daemon is down must leave a
trace as one through it does. The history file gets none of it: fail2ban's portsentry jail bans
every address a line there names, and an unblock cannot lift fail2ban's ban.
"""

from __future__ import annotations

import pwd
import sys
from collections.abc import Iterable

from portsentry.journal.journal import one_line
from portsentry.journal.syslog import SyslogWriter
from portsentry.service.control import Duration, Peer

_NO_LOGIN_UID = 4294967295  # (uid_t)-1: no login session (a service, a boot script)


def who(uid: int, pid: int | None) -> str:
    """`root (uid 0, pid 4242, login alice)`: the login, from the audit login uid, names the
    person behind a sudo or su, which uid 0 alone does not."""
    details = [f"uid {uid}"] + ([f"pid {pid}"] if pid is not None else [])
    login = _login_uid(pid) if pid is not None else None
    if login is not None and login != uid:
        details.append(f"login {_user(login) or login}")
    return f"{_user(uid) or 'user'} ({', '.join(details)})"


def peer_who(peer: Peer | None) -> str:
    return "an unknown control client" if peer is None else who(peer.uid, peer.pid)


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _login_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/loginuid", encoding="ascii") as handle:
            value = int(handle.read().strip())
    except (OSError, ValueError):
        return None
    return None if value == _NO_LOGIN_UID else value


def action(command: str, address: str | None = None, duration: Duration = "policy",
           local: bool = False, file: str | None = None) -> str:
    """The command as the line names it: `block 198.18.0.2 for 7200 seconds`, `unblock
    198.18.0.2 on this host only`, `block --file feed.txt`, `flush`."""
    text = command if file is None else f"{command} --file {file}"
    if address is not None:
        text = f"{text} {address}"
    if command == "block" and duration != "policy":
        text += " forever" if duration is None else f" for {int(duration)} seconds"
    if command == "unblock" and local:
        text += " on this host only"
    return text


class CommandLog:
    """The command line's own syslog lines (ident `portsentry`, its own pid). `path` None
    (`--no-syslog`) writes none. What could not be written is said once on standard error at
    the end, as the daemon says it at start: the admin must know the change left no trace."""

    def __init__(self, path: str | None) -> None:
        self._writer = SyslogWriter(path) if path else None
        self.said = False  # the command's outcome line is out: an error after it adds none

    def say(self, lines: Iterable[str]) -> None:
        self.said = True
        if self._writer is not None:
            for line in lines:
                self._writer.send(one_line(line))

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        if self._writer.failures:
            print(f"portsentry: warning: {self._writer.failures} lines not written to syslog "
                  f"({self._writer.path}: {self._writer.last_error}); pass --no-syslog where "
                  "there is none", file=sys.stderr)
