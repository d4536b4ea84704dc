"""Stealth modes (-stcp, -sudp, -atcp, -audp): inbound packets to watched ports, never bound.

One capture socket serves every stealth mode of the process. The kernel's BPF filter passes only
what can be a probe (TCP without ACK/RST, UDP, addressed to this host); Python then parses, drops
traffic from the host itself or to broadcast addresses, and checks the port against each mode's
watch list and the live table of listening services (a port with a real service is never a hit,
also when the service started after us: 1.2's Smart-Verify without a bind() per packet).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from ipaddress import ip_network

from portsentry.core import messages
from portsentry.core.addresses import possible_networks
from portsentry.core.ports import format_ports
from portsentry.core.probe import KIND_UDP, IPAddress, Mode, Probe, Protocol
from portsentry.sensors.base import Hit, Readable
from portsentry.sensors.capture import Capture, CaptureSocket, Network
from portsentry.sensors.conntrack import PublishedPorts
from portsentry.sensors.host_addresses import HostAddresses as HostAddresses
from portsentry.sensors.lane import Act, Lane
from portsentry.sensors.lane_capture import LaneCapture
from portsentry.sensors.listeners import ListeningPorts
from portsentry.sensors.packet import DropCounter, DropReason, Packet, classify_tcp, parse_packet
from portsentry.sensors.packet_capture import open_packet_capture
from portsentry.sensors.watches import Watch as Watch
from portsentry.sensors.watches import modes_by_port as modes_by_port

FLOW_CAPACITY = 65536  # remembered outgoing UDP flows; the oldest is forgotten first
FLOW_LIFETIME = 30.0  # seconds a reply may take to count as one (conntrack's UDP default)
Logger = Callable[[str], None]
Clock = Callable[[], float]


class StealthSensor:
    def __init__(
        self,
        watches: Sequence[Watch],
        log: Logger,
        clock: Clock,
        addresses: HostAddresses,
        listeners: dict[Protocol, ListeningPorts],
        capture_factory: Callable[[int | None, set[Protocol]], Capture] | None = None,
        published: PublishedPorts | None = None,
        sole: bool = True,
    ) -> None:
        """`sole`: the daemon stops when these watches watch nothing (its only mode, at start)."""
        self.watches = tuple(watches)
        self.sole = sole
        self._log = log
        self._clock = clock
        self.addresses = addresses
        self.listeners = listeners
        self.drops = DropCounter()
        self.packets = 0
        self._capture: Capture | None = None
        self._capture_factory = capture_factory or open_packet_capture
        self._by_protocol: dict[Protocol, tuple[Watch, ...]] = {}
        # protocol -> port -> the modes watching it, for every port below the highest watched:
        # one index on the packet path instead of a method call per watch, twice.
        self._modes_at: dict[Protocol, list[tuple[Mode, ...]]] = {}
        # Our own recent outgoing UDP (local port, peer, peer port) -> when: a datagram coming
        # back on such a flow is a reply (DNS, NTP), even if the client socket is gone by now.
        self._udp_flows: OrderedDict[tuple[int, IPAddress, int], float] = OrderedDict()
        self._quieted: frozenset[int] = frozenset()
        self._live: dict[Protocol, frozenset[int]] | None = None
        self._live_from: tuple[frozenset[int], ...] = ()  # the listener tables _live was made from
        self._skipped: tuple[Network, ...] = ()
        self._ignored: tuple[Network, ...] = ()
        self._relaying: frozenset[int] = frozenset()
        self.published = published if published is not None else PublishedPorts(log)

    def open(self) -> list[Readable]:
        now = self._clock()
        self.addresses.refresh(now)
        for listener in self.listeners.values():
            listener.refresh(now)
        active: list[Watch] = []
        for watch in self.watches:
            kept = self._announce(watch)
            if kept is not None:
                active.append(kept)
        self.watches = tuple(active)
        if not active:
            return []
        for protocol in Protocol:
            self._by_protocol[protocol] = watches = tuple(w for w in active if w.mode.protocol is protocol)
            self._modes_at[protocol] = modes_by_port(watches)
        protocols = {w.mode.protocol for w in active}
        max_port = max(w.upper_bound() for w in active)
        self._capture = self._capture_factory(max_port if max_port <= 0xFFFF else None, protocols)
        self._report_live_ports()
        self.published.refresh(now, self._capture.before_nat)
        return [self._capture]

    def _announce(self, watch: Watch) -> Watch | None:
        """1.2's start-up lines; explicit ports with a service already running are dropped."""
        protocol = watch.mode.protocol
        listening = self.listeners[protocol]
        if watch.below is None:
            kept = []
            for port in sorted(watch.ports):
                # 1.2 announced every port before its in-use check, so a port in use reads as
                # this line followed by the error.
                self._log(messages.stealth_listen_mode(protocol, port))
                if listening.is_listening(port):
                    self._log(messages.port_in_use(port))
                else:
                    kept.append(port)
            if not kept:
                self._log(messages.all_ports_in_use(protocol, None if self.sole else watch.mode))
                return None
            return Watch(watch.mode, ports=frozenset(kept))
        self._log(messages.advanced_monitor(watch.below))
        for port in sorted(watch.exclude):
            self._log(messages.advanced_exclude(port))
        if not watch.exclude:
            self._log(messages.advanced_exclude_none())
        for port in sorted(watch.exclude | {p for p in listening.ports() if p < watch.below}):
            self._log(messages.advanced_excluded(protocol, port))
        return watch

    def capture_drops(self) -> int | None:
        """Packets the kernel dropped for want of buffer space (PACKET_STATISTICS)."""
        try:
            return self._capture.drops() if self._capture is not None else None
        except OSError:
            return None

    def packet_drops(self) -> dict[str, int]:
        return self.drops.as_dict()

    def describe(self) -> list[str]:
        lines = []
        for watch in self.watches:
            protocol = watch.mode.protocol
            if watch.below is None:
                what = f"{protocol} ports {format_ports(sorted(watch.ports))}"
            else:
                what = f"{protocol} ports below {watch.below}"
                if watch.exclude:
                    what += f" except {format_ports(sorted(watch.exclude))}"
            lines.append(f"-{watch.mode}: {what}, ports with a live service skipped (IPv4+IPv6 capture)")
        return lines

    @property
    def lane(self) -> Lane | None:
        """The fast lane in front of the capture, when there is one (service.lane runs it)."""
        capture = self._capture
        return capture.lane if isinstance(capture, LaneCapture) else None

    @property
    def lane_unavailable(self) -> str | None:
        """Why no fast lane runs in front of the AF_PACKET capture where FAST_LANE wanted one (the
        compiled lane is not installed, or could not start); status says it."""
        capture = self._capture
        return capture.lane_unavailable if isinstance(capture, CaptureSocket) else None

    def read(self, handle: Readable) -> list[Hit]:
        capture = self._capture
        assert capture is not None
        batch: list[bytes] | list[bytes | Act]
        batch = capture.read_items() if isinstance(capture, LaneCapture) else capture.read_batch()
        if not batch:
            return []
        # The tables and filters are kept current by tick(), once a second, not here: a lone
        # probe's line would wait for them (tens of microseconds, a netlink dump when due).
        now = self._clock()
        hits: list[Hit] = []
        for data in batch:
            self.packets += 1
            if isinstance(data, Act):
                hits.append(self._lane_hit(data))
                continue
            packet = parse_packet(data, self.drops)
            if packet is not None:
                hits.extend(self.hits_for(packet, now))
        return hits

    def handled(self) -> None:
        if isinstance(self._capture, LaneCapture):
            self._capture.handled()

    def lane_unreadable(self) -> int:
        """Messages from the fast lane of no known kind (a bug; status shows the count)."""
        capture = self._capture
        return capture.unreadable if isinstance(capture, LaneCapture) else 0

    def stop_lane(self) -> list[Hit]:
        """Before the capture closes: the fast lane stopped, and the hits it had queued (its
        reports among them, bans it began that the daemon must take in)."""
        capture = self._capture
        if not isinstance(capture, LaneCapture):
            return []
        now = self._clock()
        hits: list[Hit] = []
        for item in capture.stop():
            if isinstance(item, Act):
                hits.append(self._lane_hit(item))
            elif (packet := parse_packet(item, self.drops)) is not None:
                hits.extend(self.hits_for(packet, now))
        return hits

    @staticmethod
    def _lane_hit(act: Act) -> Hit:
        return Hit(Probe(source=act.source, port=act.port, mode=act.mode, kind=act.kind,
                         destination=act.destination), lane=act)

    def hits_for(self, packet: Packet, now: float) -> list[Hit]:
        if packet.source in self.addresses.local:
            if packet.protocol is Protocol.UDP:
                self._remember_flow((packet.source_port, packet.destination, packet.destination_port), now)
            return []
        if packet.destination in self.addresses.broadcast:
            return []
        if packet.source in self.addresses.broadcast:
            # The parser knows no subnet; a source equal to one of our subnet broadcasts is forged.
            self.drops.add(DropReason.SOURCE_BROADCAST)
            return []
        if packet.protocol is Protocol.UDP and self._is_reply(packet, now):
            return []
        if self.addresses.local and packet.destination not in self.addresses.local:
            return []  # passing through (a router's forwarded traffic), not addressed to us
        if packet.protocol is Protocol.TCP:
            kind = classify_tcp(packet.tcp_flags)
            if kind is None:
                return []
        else:
            kind = KIND_UDP
        port = packet.destination_port
        watching = self._modes_at.get(packet.protocol, ())
        modes = watching[port] if port < len(watching) else ()
        if not modes:
            return []
        flow = (packet.destination.packed, packet.source.packed, packet.source_port)
        if self.listeners[packet.protocol].confirm(port, now, flow):
            return []
        if self.published.active and self.published.rewritten(
                packet.protocol, packet.source.packed, packet.source_port, packet.destination.packed,
                port, now):
            return []  # a port published by DNAT or REDIRECT: served, elsewhere or on another port
        return [
            Hit(Probe(source=packet.source, port=port, mode=mode, kind=kind,
                      destination=packet.destination, ip_options=packet.ip_options))
            for mode in modes
        ]

    def tick(self, now: float) -> None:
        """The host's addresses, its listening ports and the capture's filters, kept current
        here for read(), traffic or not: a service started on a watched port must stop the
        kernel's first-probe ban there within a second, and probes from ignored sources, which
        the kernel keeps from us, are no traffic for read()."""
        if self._capture is None:
            return
        self.addresses.refresh(now)
        for listener in self.listeners.values():
            listener.refresh(now)
        self._quiet_busy_udp_ports()
        self._report_live_ports()
        self._skip_own_and_ignored()
        self._skip_relaying_ports()
        self.published.refresh(now, self._capture.before_nat)

    def _report_live_ports(self) -> None:
        """Tell the capture which watched ports have a live service whenever that changes: a
        capture that bans in the kernel must not ban a client of a service started just now."""
        if self._capture is None:
            return
        # This runs for every packet batch: unchanged tables (the common case) cost a compare
        # of two small sets, not the filtering below.
        tables = tuple(self.listeners[protocol].ports() for protocol in Protocol)
        if self._live is not None and tables == self._live_from:
            return
        self._live_from = tables
        live = {protocol: frozenset(p for p in self.listeners[protocol].ports()
                                    if any(w.covers(p) for w in self._by_protocol.get(protocol, ())))
                for protocol in Protocol}
        if live == self._live:
            return
        self._live = live
        self._update_capture("the kernel's banned ports", lambda capture: capture.live_ports(live))

    def skip_sources(self, networks: Collection[Network]) -> None:
        """Sources whose packets the kernel may keep from us: the ignore list, when none of
        their probes would be logged anyway (not verbose). The engine still checks every
        probe against the ignore list, so this only saves the work."""
        self._ignored = tuple(networks)
        self._skip_own_and_ignored()

    def _skip_own_and_ignored(self) -> None:
        """Our own addresses always, and first (the filter holds a few dozen networks): an
        inbound packet from one of them is forged, and read here it would be taken for our own
        outgoing UDP, making the sender's probes from that port "replies". Our real outgoing
        packets take the filter's other branch and still arrive."""
        local = sorted(self.addresses.local, key=lambda a: (a.version, int(a)))
        own = possible_networks(ip_network(address) for address in local)
        wanted = own + tuple(n for n in self._ignored if n not in own)
        if self._capture is None or wanted == self._skipped:
            return
        self._skipped = wanted
        self._update_capture("the capture filter", lambda capture: capture.skip_sources(wanted))

    def _skip_relaying_ports(self) -> None:
        """A packet that comes in on a bridge or bond port reaches a packet tap twice, on the
        port and on its master (which shares the port's MAC, as a bond always and a bridge by
        default does); counted twice, one SYN made SCAN_TRIGGER="2" ban."""
        wanted = self.addresses.relaying
        if self._capture is None or wanted == self._relaying:
            return
        self._relaying = wanted
        self._update_capture("the capture filter", lambda capture: capture.skip_interfaces(wanted))

    def _quiet_busy_udp_ports(self) -> None:
        """Tell the kernel filter to keep traffic to UDP services away from us (a syslog server
        receiving thousands of datagrams a second would otherwise wake the daemon for each).
        Such datagrams are never hits anyway; TCP needs nothing, its data has ACK set."""
        watches = self._by_protocol.get(Protocol.UDP, ())
        if self._capture is None or not watches:
            return
        busy = frozenset(p for p in self.listeners[Protocol.UDP].ports() if any(w.covers(p) for w in watches))
        if busy == self._quieted:
            return
        self._quieted = busy
        self._update_capture("the capture filter", lambda capture: capture.quiet_udp(busy))

    def _update_capture(self, what: str, update: Callable[[Capture], None]) -> None:
        """A filter or set the kernel refuses to change leaves the previous one in force: said,
        and detection goes on (the next change tries again)."""
        if self._capture is None:
            return
        try:
            update(self._capture)
        except (OSError, ValueError) as error:
            self._log(f"adminalert: WARNING: cannot update {what}: {error}")

    def _remember_flow(self, key: tuple[int, IPAddress, int], now: float) -> None:
        self._udp_flows[key] = now
        self._udp_flows.move_to_end(key)
        while len(self._udp_flows) > FLOW_CAPACITY:
            self._udp_flows.popitem(last=False)

    def _is_reply(self, packet: Packet, now: float) -> bool:
        sent = self._udp_flows.get((packet.destination_port, packet.source, packet.source_port))
        return sent is not None and 0 <= now - sent < FLOW_LIFETIME

    def close(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None
        self._skipped = ()  # a capture opened again starts with its plain filter
        self._relaying = frozenset()
        self.published.close()  # its socket is opened again at the next question
