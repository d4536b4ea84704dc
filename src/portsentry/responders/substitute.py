"""Fill $TARGET$, $PORT$ and $MODE$ into KILL_ROUTE / KILL_HOSTS_DENY / KILL_RUN_CMD templates.

The results go to `/bin/sh -c` and into hosts.deny, so every value is type-checked at run time:
only an `ipaddress` object, an int port and a `Mode` can reach the text.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from portsentry.core.probe import IPAddress, Mode

TARGET_TOKEN = "$TARGET$"
PORT_TOKEN = "$PORT$"
MODE_TOKEN = "$MODE$"


def target_text(target: IPAddress) -> str:
    """The canonical text of `target`: IPv4 dotted quad, IPv6 compressed, no brackets, no scope.

    The address is rebuilt from its integer value so that neither a subclass overriding
    `__str__` nor an IPv6 scope id (`fe80::1%eth0`; interface names may hold shell
    metacharacters) can put anything but [0-9a-f.:] into a shell command. Firewalls and
    tcp_wrappers match the bare address anyway.
    """
    if isinstance(target, IPv4Address):
        return str(IPv4Address(int(target)))
    if isinstance(target, IPv6Address):
        return str(IPv6Address(int(target)))
    raise TypeError(
        f"target must be an IPv4Address or IPv6Address, not {type(target).__name__}: {target!r}"
    )


def _check_port_mode(port: int, mode: Mode) -> None:
    # bool is an int subclass; True as a port is a caller bug, not port 1.
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be an int, not {type(port).__name__}: {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    if not isinstance(mode, Mode):
        raise TypeError(f"mode must be a Mode, not {type(mode).__name__}: {mode!r}")


def _fill(template: str, target: str, port: int, mode: Mode) -> str:
    # Same order as 1.2 (TARGET, PORT, MODE); none of the inserted texts can contain '$',
    # so the order only matters for odd templates like "$TARGET$PORT$", where 1.2 agrees.
    return (
        template.replace(TARGET_TOKEN, target)
        .replace(PORT_TOKEN, str(port))
        .replace(MODE_TOKEN, mode.value)
    )


def substitute(template: str, target: IPAddress, port: int, mode: Mode) -> str:
    """Replace every $TARGET$, $PORT$ and $MODE$ in `template` (1.2 mode names: tcp, stcp, ...).

    IPv6 targets are written bare (`fd00::2`), as iptables/nft/route commands want them.
    Raises TypeError/ValueError if a value is not a validated address, port or Mode.
    """
    text = target_text(target)
    _check_port_mode(port, mode)
    return _fill(template, text, port, mode)


def hosts_deny_entry(template: str, target: IPAddress, port: int, mode: Mode) -> str:
    """Like `substitute`, but IPv6 targets are bracketed (`ALL: [fd00::2]`).

    tcp_wrappers only parses bracketed IPv6 in hosts.deny, and fail2ban's hostsdeny action
    writes (and removes) exactly that form, so both tools see the same lines.
    """
    text = target_text(target)
    _check_port_mode(port, mode)
    if isinstance(target, IPv6Address):
        text = f"[{text}]"
    return _fill(template, text, port, mode)
