"""Builds the sensors for the requested modes: one per connect mode, one shared by the stealth modes,
and picks the stealth sensor's capture: NFLOG from our nftables table, or AF_PACKET with BPF.

Wiring, not a sensor: it joins sensors to the nftables backend that holds the NFLOG rules, so it
lives outside sensors/, which import neither responders nor bans (tests/unit/test_layering.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from portsentry.config.settings import Config
from portsentry.core.probe import Mode, Protocol
from portsentry.host import info as hostinfo
from portsentry.responders.backend import BackendError, BanBackend
from portsentry.responders.nft_capture import KernelBan
from portsentry.responders.nftables import NftablesBackend
from portsentry.sensors.base import Sensor
from portsentry.sensors.capture import Capture, CaptureError
from portsentry.sensors.connect import ConnectSensor
from portsentry.sensors.listeners import ListeningPorts
from portsentry.sensors.nflog import NflogCapture, NflogGroupTaken
from portsentry.sensors.packet_capture import lane_capture, open_packet_capture
from portsentry.sensors.stealth import HostAddresses, StealthSensor, Watch

CaptureFactory = Callable[[int | None, set[Protocol]], Capture]


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
    config: Config,
    modes: Sequence[Mode],
    log: Callable[[str], None],
    clock: Callable[[], float],
    ban_backend: BanBackend | None = None,
    at_start: bool = True,
) -> list[Sensor]:
    """`ban_backend` is the daemon's native backend, already set up; with nftables (and CAPTURE
    "auto" or "nflog") the stealth sensor reads NFLOG from rules added to its table.
    A mode that watches nothing says 1.2's "Shutting down." only where the daemon then does:
    at start, as its only mode (1.2 ran one mode a process); with other modes, or at a reload
    (refused, the old sensors open again), the daemon goes on."""
    sole = at_start and len(set(modes)) == 1
    sensors: list[Sensor] = []
    for mode in modes:
        if mode is Mode.TCP:
            sensors.append(ConnectSensor(mode, config.tcp_ports, log, sole))
        elif mode is Mode.UDP:
            sensors.append(ConnectSensor(mode, config.udp_ports, log, sole))
    watches = [watch_for(mode, config) for mode in modes if not mode.is_classic]
    if watches:
        addresses = HostAddresses(hostinfo.local_addresses, hostinfo.broadcast_addresses,
                                  relaying=hostinfo.relaying_interfaces)
        listeners = {protocol: ListeningPorts(protocol) for protocol in Protocol}
        capture = capture_factory(config, ban_backend, log, watches)
        sensors.append(StealthSensor(watches, log, clock, addresses, listeners, capture, sole=sole))
    return sensors


def kernel_ban_for(config: Config, protocols: set[Protocol]) -> KernelBan | None:
    """The first-probe ban for these stealth protocols: on unless KERNEL_BAN is "off", where
    BLOCK_x is 1; off with SCAN_TRIGGER above 1 or BAN_RATE_LIMIT_NET set."""
    if config.kernel_ban == "off" or config.scan_trigger > 1 or config.ban_rate_limit_net > 0:
        return None  # the kernel counts no hits, and caps no networks
    banning = frozenset(p for p in protocols
                        if (config.block_tcp if p is Protocol.TCP else config.block_udp) == 1)
    if not banning:
        return None
    return KernelBan(banning, config.block_time or None, config.ban_rate_limit)


def eligible_ports(watches: Sequence[Watch], protocol: Protocol, live: frozenset[int]) -> set[int]:
    """Ports whose probes the kernel may ban: watched by a stealth mode, not excluded, no live
    service."""
    found: set[int] = set()
    for watch in watches:
        if watch.mode.protocol is not protocol:
            continue
        if watch.below is None:
            found |= set(watch.ports)
        else:
            found |= set(range(1, min(watch.below, 0x10000))) - set(watch.exclude)
    return found - live


def capture_factory(
    config: Config, ban_backend: BanBackend | None, log: Callable[[str], None],
    watches: Sequence[Watch] = (),
) -> CaptureFactory:
    """How the stealth sensor will open its capture, from CAPTURE and the backend in use. With
    "auto" any NFLOG failure falls back to AF_PACKET with a warning; with "nflog" it is fatal."""
    nft = ban_backend if isinstance(ban_backend, NftablesBackend) else None
    explicit = config.capture == "nflog"
    if config.capture == "packet" or nft is None:
        if explicit:
            return _refuse(str(config.error(
                "CAPTURE", 'nflog needs the nftables ban backend (BAN_BACKEND="nftables", or '
                '"auto" on a host where nftables works)')))
        packet = lane_capture(log, open_packet_capture) if config.fast_lane != "off" else open_packet_capture
        if nft is None:
            return packet

        def open_packet(max_port: int | None, protocols: set[Protocol]) -> Capture:
            try:
                nft.drop_capture()  # rules a previous CAPTURE="auto" run left behind
            except (BackendError, OSError) as error:
                log(f"adminalert: WARNING: cannot remove the old NFLOG rules: {error}")
            return packet(max_port, protocols)

        return open_packet

    def open_nflog(max_port: int | None, protocols: set[Protocol]) -> Capture:
        def fail(key: str, error: Exception) -> Capture:
            if explicit:
                raise CaptureError(str(config.error(key, str(error)))) from error
            log(f"adminalert: WARNING: NFLOG capture unavailable ({error}); using AF_PACKET: "
                "packets from blocked hosts still reach the daemon, fragmented scans are unseen")
            return open_packet_capture(max_port, protocols)

        kernel = kernel_ban_for(config, protocols)

        def quiet(ports: frozenset[int]) -> None:
            try:
                nft.capture_rules(config.nflog_group, max_port, protocols, quiet_udp_ports=ports,
                                  kernel=kernel)
            except BackendError as error:  # the sensor knows OSError, not our backends
                raise OSError(str(error)) from error

        def live(ports: dict[Protocol, frozenset[int]]) -> None:
            if kernel is None:
                return
            try:
                nft.set_kernel_ports({p: eligible_ports(watches, p, ports.get(p, frozenset()))
                                      for p in kernel.protocols})
            except BackendError as error:
                raise OSError(str(error)) from error

        try:
            capture = NflogCapture(config.nflog_group, quieter=quiet, on_live=live)
        except NflogGroupTaken as error:
            return fail("NFLOG_GROUP", error)
        except CaptureError as error:
            return fail("CAPTURE", error)
        try:
            nft.capture_rules(config.nflog_group, max_port, protocols, kernel=kernel)
        except (BackendError, OSError, ValueError) as error:
            if kernel is None:
                capture.close()
                return fail("CAPTURE", CaptureError(f"cannot add the NFLOG rules: {error}"))
            # KERNEL_BAN="auto": a kernel without what the ban rules use (nft_socket, dynamic
            # sets) still gets NFLOG capture; the daemon bans, as with KERNEL_BAN="off". `quiet`
            # and `live` see the change (they read `kernel` when called).
            log(f"adminalert: WARNING: first-probe ban in the kernel unavailable ({error}); "
                "the daemon makes every ban")
            kernel = None
            try:
                nft.capture_rules(config.nflog_group, max_port, protocols, kernel=None)
            except (BackendError, OSError, ValueError) as again:
                capture.close()
                return fail("CAPTURE", CaptureError(f"cannot add the NFLOG rules: {again}"))
        return capture

    return open_nflog


def _refuse(message: str) -> CaptureFactory:
    def refuse(max_port: int | None, protocols: set[Protocol]) -> Capture:
        raise CaptureError(message)

    return refuse
