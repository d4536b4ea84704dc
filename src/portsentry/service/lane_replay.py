"""The fast lane's record file at start (part of the daemon's start, service.startup).

lane.c appends a line to STATE_DIR/lane-record before it starts KILL_ROUTE, and the daemon
empties the file once every ban in it is in the ban store (service.lane.LaneKeeper). What a
daemon that stopped in between (a crash, SIGKILL) left there is a ban in force that no record
holds: `replay` records it before the restore, which gives it its hosts.deny line as any ban it
finds, and the start writes its history line. KILL_RUN_CMD does not run for it, as it does not
for a block of the Python path cut short the same way.

Thread: main, at start only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from ipaddress import ip_address

from portsentry.bans.lifecycle import BanManager
from portsentry.bans.store import StoreError
from portsentry.core import messages
from portsentry.core.probe import KIND_SYN, IPAddress, Mode, Probe
from portsentry.sensors.lane import KINDS_BY_LETTER

RECORD_FILE = "lane-record"
Logger = Callable[[str], None]


def replay(path: str, bans: BanManager, hosts_deny_line: Callable[[IPAddress, int, Mode], str | None],
           log: Logger) -> list[tuple[Probe, float]]:
    """At start, before the restore: bans the fast lane began while the daemon that ran it did
    not live to record them. Each is recorded now (with its KILL_ROUTE mark: its KILL_ROUTE ran,
    and an unblock runs KILL_ROUTE_UNDO) and said; the file is emptied. Returns the probes
    recorded, with their times, for their history lines."""
    try:
        with open(path, "rb") as handle:
            # Space-padded lines in a zeroed ring (sensors/lane.c RECORD_SLOT), or plain lines.
            lines = handle.read().replace(b"\0", b"").decode("ascii", "replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        log(messages.config_error(f"cannot read the fast lane's record {path}: {error}"))
        return []
    recorded: list[tuple[Probe, float]] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            # A line without the kind's letter was written by a lane that took only SYNs.
            _seq, at_text, address_text, port_text, mode_text, *letter = line.split()
            at, address = float(at_text), ip_address(address_text)
            port, mode = int(port_text), Mode(mode_text)
            kind = KINDS_BY_LETTER.get(letter[0]) if len(letter) == 1 else KIND_SYN if not letter else None
            if kind is None:
                raise ValueError(line)
        except ValueError:
            continue  # a line cut short by a crash: nothing more can be known of it
        try:
            known = bans.store.get(address)
        except StoreError:
            known = None
        if known is not None and known.active(at):
            continue  # recorded after all (the record file is emptied a moment later)
        bans.remember(address, reason=kind, mode=str(mode), port=port, now=at,
                      duration=bans.duration(address, at),
                      hosts_deny_line=hosts_deny_line(address, port, mode), native=False, route=True)
        log(f"adminalert: Host {address} was blocked by the fast lane and not recorded before the "
            "daemon stopped: recorded now")
        recorded.append((Probe(address, port, mode, kind), at))
    with contextlib.suppress(OSError):
        os.truncate(path, 0)
    return recorded
