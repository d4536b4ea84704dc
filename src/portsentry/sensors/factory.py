"""Builds the sensors for the requested modes: one per connect mode, one shared by the stealth modes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .. import hostinfo
from ..config import Config
from ..probe import Mode, Protocol
from .base import Sensor
from .connect import ConnectSensor
from .listeners import ListeningPorts
from .stealth import HostAddresses, StealthSensor, Watch


def watch_for(mode: Mode, config: Config) -> Watch:
    if mode is Mode.STCP:
        return Watch(mode, ports=frozenset(config.tcp_ports))
    if mode is Mode.SUDP:
        return Watch(mode, ports=frozenset(config.udp_ports))
    if mode is Mode.ATCP:
        return Watch(mode, below=config.advanced_ports_tcp, exclude=frozenset(config.advanced_exclude_tcp))
    if mode is Mode.AUDP:
        return Watch(mode, below=config.advanced_ports_udp, exclude=frozenset(config.advanced_exclude_udp))
    raise ValueError(f"-{mode} is not a stealth mode")


def build_sensors(
    config: Config, modes: Sequence[Mode], log: Callable[[str], None], clock: Callable[[], float]
) -> list[Sensor]:
    sensors: list[Sensor] = []
    for mode in modes:
        if mode is Mode.TCP:
            sensors.append(ConnectSensor(mode, config.tcp_ports, log))
        elif mode is Mode.UDP:
            sensors.append(ConnectSensor(mode, config.udp_ports, log))
    watches = [watch_for(mode, config) for mode in modes if not mode.is_classic]
    if watches:
        addresses = HostAddresses(hostinfo.local_addresses, hostinfo.broadcast_addresses)
        listeners = {protocol: ListeningPorts(protocol) for protocol in Protocol}
        sensors.append(StealthSensor(watches, log, clock, addresses, listeners))
    return sensors
