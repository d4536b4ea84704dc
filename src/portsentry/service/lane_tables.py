"""What the fast lane decides with (sensors/lane.c), compiled from the daemon's configuration,
engine, guards and stealth sensor: whether it may be on at all (`why_off`), the watched TCP
ports without a live service (`port_table`, one mode each) and every source it must hand on
(`deny_networks`: the ignore list, own and broadcast addresses, gateways, resolvers,
SENSITIVE_NETWORKS, impossible sources). `Tables` is what was last pushed, compared whole at each
tick. Pure functions of their arguments; service.lane (main loop) calls them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config
from portsentry.core.actions import StepKind
from portsentry.core.addresses import IMPOSSIBLE_NETWORKS
from portsentry.core.engine import Engine
from portsentry.core.probe import IPAddress, Protocol
from portsentry.journal.journal import Journal
from portsentry.journal.syslog import SyslogWriter
from portsentry.sensors.lane import MODE_CODES
from portsentry.sensors.stealth import StealthSensor

Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Tables:
    """What was last compiled into the lane (compared whole at each tick)."""

    ports: bytes
    local: frozenset[IPAddress]
    deny: tuple[Network, ...]
    route: str | None
    ignore: tuple[str | None, tuple[int, int, int, int] | None]
    syslog: tuple[str, str, str]


def why_off(config: Config, engine: Engine, journal: Journal, sensor: StealthSensor | None,
            unavailable: str | None = None) -> str | None:
    """Why the lane must stay off now (None: it may act). Everything here makes the engine's
    decision for a first SYN something other than "detection line, then block": the lane would
    otherwise write a line or start a command the daemon would not. `unavailable`: why the
    capture has no lane in front of it where one was wanted (StealthSensor.lane_unavailable)."""
    settings = engine.settings
    if config.fast_lane == "off":
        return 'FAST_LANE="off"'
    if sensor is None or sensor.lane is None:
        return unavailable or "no TCP stealth mode with the AF_PACKET capture"
    if settings.block_tcp != 1:
        return "BLOCK_TCP is not 1"
    steps = settings.steps(1)
    if not steps or any(step.kind is StepKind.NATIVE for step in steps):
        return "blocks go through a native ban backend" if steps else "no blocking step is configured"
    if settings.kill_run_cmd_first:
        return "KILL_RUN_CMD_FIRST runs a command before the block"
    if settings.scan_trigger > 1:
        return "SCAN_TRIGGER is above 1"
    if config.resolve_host:
        return "RESOLVE_HOST looks up names for the lines"
    if config.ban_rate_limit_net:
        return "BAN_RATE_LIMIT_NET caps bans per network"
    if not isinstance(journal.syslog, SyslogWriter):
        return "lines go to the systemd journal, not syslog"
    if sensor.published.active:
        return "ports are published by DNAT or REDIRECT here"
    if not sensor.addresses.local:
        return "this host's addresses are not known"
    return None


def port_table(sensor: StealthSensor) -> bytes:
    """One byte per port: the lane's code of the one TCP stealth mode that watches it, 0 where
    none or two do, or a service listens."""
    table = bytearray(65536)
    listening = sensor.listeners[Protocol.TCP].ports()
    watches = [w for w in sensor.watches if w.mode.protocol is Protocol.TCP and w.mode in MODE_CODES]
    for watch in watches:
        code = MODE_CODES[watch.mode]
        ports: Iterable[int] = watch.ports if watch.below is None else range(min(watch.below, 65536))
        for port in ports:
            if watch.covers(port) and port not in listening and 0 < port < 65536:
                table[port] = 0xFF if table[port] else code
    return bytes(table.translate(_CLASH))


_CLASH = bytes(range(255)) + b"\0"  # 0xFF (two modes) -> 0


def deny_networks(config: Config, ignore: IgnoreSource, now: float, protected: Iterable[IPAddress],
                  sensor: StealthSensor) -> tuple[Network, ...]:
    """Every source the lane must hand on: the engine would ignore or refuse it, or the sensor
    drop it."""
    hosts = (*sensor.addresses.local, *sensor.addresses.broadcast, *protected)
    return (*IMPOSSIBLE_NETWORKS, *ignore.current(now).networks, *config.sensitive_networks,
            *(ip_network(address) for address in hosts), ip_network("255.255.255.255/32"))
