"""Which captured packets become hits for which stealth mode (no root: packets are built by hand)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from ipaddress import ip_address, ip_network

from portsentry.core.probe import KIND_FIN, KIND_SYN, KIND_UDP, Mode, Protocol
from portsentry.sensors.capture import Network
from portsentry.sensors.listeners import ListeningPorts
from portsentry.sensors.packet import Packet, TcpFlag
from portsentry.sensors.stealth import HostAddresses, StealthSensor, Watch

HOST = ip_address("198.18.0.1")
SCANNER = ip_address("198.18.0.2")


class FixedListeners(ListeningPorts):
    def __init__(self, protocol: Protocol, ports: set[int]) -> None:
        super().__init__(protocol)
        self.fixed = ports

    def refresh(self, now: float) -> None:
        pass

    def is_listening(self, port: int) -> bool:
        return port in self.fixed

    def confirm(self, port: int, now: float, flow: object = None) -> bool:
        return port in self.fixed

    def ports(self) -> frozenset[int]:
        return frozenset(self.fixed)



class NullCapture:
    """Stands in for the capture when packets are fed to hits_for directly; records what the
    sensor tells it about live ports."""

    before_nat = False

    def __init__(self) -> None:
        self.live: list[dict[Protocol, frozenset[int]]] = []
        self.skipped: list[tuple[Network, ...]] = []
        self.interfaces: list[frozenset[int]] = []

    def quiet_udp(self, ports: frozenset[int]) -> None:
        pass

    def live_ports(self, live: dict[Protocol, frozenset[int]]) -> None:
        self.live.append(live)

    def skip_sources(self, networks: Collection[Network]) -> None:
        self.skipped.append(tuple(networks))

    def skip_interfaces(self, indexes: frozenset[int]) -> None:
        self.interfaces.append(indexes)

def sensor(
    watches: list[Watch], tcp_listening: Iterable[int] = (), udp_listening: Iterable[int] = (),
    lines: list[str] | None = None,
) -> StealthSensor:
    addresses = HostAddresses(lambda: [HOST, ip_address("fd00::1")],
                              lambda: [ip_address("198.18.0.255")])
    listeners: dict[Protocol, ListeningPorts] = {
        Protocol.TCP: FixedListeners(Protocol.TCP, set(tcp_listening)),
        Protocol.UDP: FixedListeners(Protocol.UDP, set(udp_listening)),
    }
    log: Callable[[str], None] = lines.append if lines is not None else (lambda _t: None)
    s = StealthSensor(watches, log, lambda: 0.0, addresses, listeners,
                      capture_factory=lambda _max, _protocols: NullCapture())  # type: ignore[arg-type,return-value]
    s.open()
    return s


def tcp(port, flags=TcpFlag.SYN, source=SCANNER, destination=HOST, options=False) -> Packet:
    return Packet(source, destination, Protocol.TCP, 40000, port, flags, options)


def udp(port, source=SCANNER, destination=HOST) -> Packet:
    return Packet(source, destination, Protocol.UDP, 40000, port, TcpFlag(0), False)


def test_stcp_reports_listed_ports_with_classification():
    s = sensor([Watch(Mode.STCP, ports=frozenset({1, 111}))])
    [hit] = s.hits_for(tcp(111, TcpFlag.FIN), 0.0)
    assert (hit.probe.mode, hit.probe.kind, hit.probe.port, hit.probe.source) == (
        Mode.STCP, KIND_FIN, 111, SCANNER)
    assert s.hits_for(tcp(112), 0.0) == []


def test_ack_and_rst_are_never_hits():
    s = sensor([Watch(Mode.STCP, ports=frozenset({1}))])
    for flags in (TcpFlag.ACK, TcpFlag.RST, TcpFlag.SYN | TcpFlag.ACK, TcpFlag.FIN | TcpFlag.ACK):
        assert s.hits_for(tcp(1, flags), 0.0) == []


def test_stcp_drops_ports_in_use_at_start_with_1_2_message():
    lines: list[str] = []
    s = sensor([Watch(Mode.STCP, ports=frozenset({1, 22}))], tcp_listening={22}, lines=lines)
    # 1.2 announced each port before its in-use check: the error follows that port's line.
    assert lines == ["adminalert: Going into stealth listen mode on TCP port: 1",
                     "adminalert: Going into stealth listen mode on TCP port: 22",
                     "adminalert: ERROR: Socket 22 is in use and will not be monitored. "
                     "Attempting to continue"]
    assert s.hits_for(tcp(22), 0.0) == []


def test_atcp_watches_below_limit_except_excluded_and_listening():
    lines: list[str] = []
    s = sensor([Watch(Mode.ATCP, below=1024, exclude=frozenset({113}))], tcp_listening={80}, lines=lines)
    assert [h.probe.kind for h in s.hits_for(tcp(25), 0.0)] == [KIND_SYN]
    assert s.hits_for(tcp(113), 0.0) == []
    assert s.hits_for(tcp(80), 0.0) == []
    assert s.hits_for(tcp(1024), 0.0) == []
    assert lines[:2] == ["adminalert: Advanced mode will monitor first 1024 ports",
                         "adminalert: Advanced mode will manually exclude port: 113 "]
    assert "adminalert: Advanced Stealth scan detection mode activated. Ignored TCP port: 80" in lines


def test_a_listener_started_later_is_honoured():
    s = sensor([Watch(Mode.ATCP, below=1024)])
    assert s.hits_for(tcp(80), 0.0)
    listeners = s.listeners[Protocol.TCP]
    assert isinstance(listeners, FixedListeners)
    listeners.fixed.add(80)
    assert s.hits_for(tcp(80), 0.0) == []


def test_udp_modes_and_both_protocols_in_one_sensor():
    s = sensor([Watch(Mode.SUDP, ports=frozenset({161})), Watch(Mode.AUDP, below=1024),
                Watch(Mode.STCP, ports=frozenset({161}))])
    modes = sorted(h.probe.mode for h in s.hits_for(udp(161), 0.0))
    assert modes == [Mode.AUDP, Mode.SUDP]
    assert all(h.probe.kind == KIND_UDP for h in s.hits_for(udp(161), 0.0))


def test_own_traffic_broadcasts_and_forwarded_packets_are_not_hits():
    s = sensor([Watch(Mode.AUDP, below=1024)])
    assert s.hits_for(udp(137, source=HOST), 0.0) == []
    assert s.hits_for(udp(137, destination=ip_address("198.18.0.255")), 0.0) == []
    assert s.hits_for(udp(137, destination=ip_address("198.18.9.9")), 0.0) == []
    assert s.hits_for(udp(137), 0.0)


def test_ipv6_and_ip_options_are_carried():
    s = sensor([Watch(Mode.STCP, ports=frozenset({1}))])
    [hit] = s.hits_for(tcp(1, source=ip_address("fd00::2"), destination=ip_address("fd00::1")), 0.0)
    assert hit.probe.source == ip_address("fd00::2")
    [hit] = s.hits_for(tcp(1, options=True), 0.0)
    assert hit.probe.ip_options


def test_replies_to_our_own_udp_queries_are_not_hits():
    s = sensor([Watch(Mode.AUDP, below=1024)])
    resolver = ip_address("198.18.0.53")
    # Our query leaves from port 999 (seen by the capture as an outgoing datagram)...
    assert s.hits_for(Packet(HOST, resolver, Protocol.UDP, 999, 53, TcpFlag(0), False), 10.0) == []
    # ...so the answer coming back to 999 is a reply, even after the client socket closed.
    assert s.hits_for(Packet(resolver, HOST, Protocol.UDP, 53, 999, TcpFlag(0), False), 10.2) == []
    # The same datagram from anyone else, or long after, is a probe.
    assert s.hits_for(Packet(SCANNER, HOST, Protocol.UDP, 53, 999, TcpFlag(0), False), 10.2)
    assert s.hits_for(Packet(resolver, HOST, Protocol.UDP, 53, 999, TcpFlag(0), False), 100.0)


def test_a_source_equal_to_our_subnet_broadcast_is_forged_and_counted():
    s = sensor([Watch(Mode.STCP, ports=frozenset({1}))])
    assert s.hits_for(tcp(1, source=ip_address("198.18.0.255")), 0.0) == []
    assert s.drops.as_dict() == {"source broadcast": 1}


def test_watched_ports_with_a_live_service_are_reported_to_the_capture_when_they_change():
    s = sensor([Watch(Mode.ATCP, below=1024), Watch(Mode.AUDP, below=1024)],
               tcp_listening=[22, 8080], udp_listening=[161, 5353])
    capture = s._capture
    assert isinstance(capture, NullCapture)
    # at open: only watched ports count (8080 and 5353 are above the limit)
    assert capture.live == [{Protocol.TCP: frozenset({22}), Protocol.UDP: frozenset({161})}]
    s._report_live_ports()
    assert len(capture.live) == 1  # nothing changed: nothing said
    listeners = s.listeners[Protocol.TCP]
    assert isinstance(listeners, FixedListeners)
    listeners.fixed.add(80)
    s._report_live_ports()
    assert capture.live[-1] == {Protocol.TCP: frozenset({22, 80}), Protocol.UDP: frozenset({161})}


def test_tick_keeps_the_hosts_addresses_and_listeners_current_for_the_packet_path():
    own = [HOST]
    addresses = HostAddresses(lambda: list(own), lambda: [])
    refreshed: list[float] = []

    class Counted(FixedListeners):
        def refresh(self, now: float) -> None:
            refreshed.append(now)

    listeners = Counted(Protocol.TCP, set())
    s = StealthSensor([Watch(Mode.ATCP, below=1024)], lambda _t: None, lambda: 0.0, addresses,
                      {Protocol.TCP: listeners, Protocol.UDP: FixedListeners(Protocol.UDP, set())},
                      capture_factory=lambda _max, _protocols: NullCapture())  # type: ignore[arg-type,return-value]
    s.open()
    added = ip_address("198.18.0.7")
    own.append(added)
    assert s.hits_for(tcp(25, destination=added), 0.0) == []  # not ours yet: passing through
    s.tick(5.0)
    assert s.hits_for(tcp(25, destination=added), 5.0)
    assert refreshed[-1] == 5.0


def test_modes_by_port_lists_every_mode_watching_each_port_below_the_highest():
    from portsentry.sensors.stealth import modes_by_port

    table = modes_by_port([Watch(Mode.STCP, ports=frozenset({22, 79})),
                           Watch(Mode.ATCP, below=80, exclude=frozenset({22}))])
    assert len(table) == 80
    assert table[79] == (Mode.STCP, Mode.ATCP)
    assert table[22] == (Mode.STCP,)
    assert table[1] == (Mode.ATCP,)
    assert table[1] is table[2]  # one tuple per combination
    assert modes_by_port([]) == []


def test_a_capture_that_refuses_an_update_is_said_and_detection_goes_on():
    lines: list[str] = []

    class Refusing(NullCapture):
        def quiet_udp(self, ports: frozenset[int]) -> None:
            raise OSError("filter refused")

        def skip_sources(self, networks: object) -> None:
            raise ValueError("too many networks")

    s = StealthSensor([Watch(Mode.AUDP, below=1024)], lines.append, lambda: 0.0,
                      HostAddresses(lambda: [HOST], lambda: []),
                      {Protocol.TCP: FixedListeners(Protocol.TCP, set()),
                       Protocol.UDP: FixedListeners(Protocol.UDP, {53})},
                      capture_factory=lambda _max, _protocols: Refusing())  # type: ignore[arg-type,return-value]
    s.open()
    s.tick(1.0)
    s.skip_sources([ip_network("198.18.5.0/24")])
    assert "adminalert: WARNING: cannot update the capture filter: filter refused" in lines
    assert "adminalert: WARNING: cannot update the capture filter: too many networks" in lines
    assert s.hits_for(udp(137), 1.0)


def test_the_filter_keeps_inbound_packets_from_our_own_addresses_away_verbose_or_not():
    # Read here, a frame from the link with our address as its source was taken for our own
    # outgoing UDP, and the forger's probes from that port then for replies (system test in
    # test_forged_sources.py). Own addresses come first, as the filter holds only a few dozen.
    own = [HOST, ip_address("fd00::1"), ip_address("127.0.0.1")]
    addresses = HostAddresses(lambda: list(own), lambda: [])
    capture = NullCapture()
    s = StealthSensor([Watch(Mode.AUDP, below=1024)], lambda _t: None, lambda: 0.0, addresses,
                      {p: FixedListeners(p, set()) for p in Protocol},
                      capture_factory=lambda _max, _protocols: capture)  # type: ignore[arg-type,return-value]
    s.open()
    s.skip_sources([])  # verbose: no ignore list in the filter
    assert list(capture.skipped[-1]) == [ip_network("198.18.0.1/32"), ip_network("fd00::1/128")]
    ignored = ip_network("198.18.64.0/24")
    s.skip_sources([ignored, ip_network("198.18.0.1/32")])
    assert list(capture.skipped[-1]) == [ip_network("198.18.0.1/32"), ip_network("fd00::1/128"), ignored]
    own.append(ip_address("198.18.0.7"))
    s.tick(5.0)
    assert ip_network("198.18.0.7/32") in capture.skipped[-1]
    count = len(capture.skipped)
    s.tick(10.0)  # unchanged: no new filter
    assert len(capture.skipped) == count


def test_bridge_and_bond_ports_are_kept_out_of_the_capture_as_they_come_and_go():
    ports = [3]
    addresses = HostAddresses(lambda: [HOST], lambda: [], relaying=lambda: list(ports))
    capture = NullCapture()
    s = StealthSensor([Watch(Mode.STCP, ports=frozenset({79}))], lambda _t: None, lambda: 0.0, addresses,
                      {p: FixedListeners(p, set()) for p in Protocol},
                      capture_factory=lambda _max, _protocols: capture)  # type: ignore[arg-type,return-value]
    s.open()
    s.tick(1.0)
    assert capture.interfaces == [frozenset({3})]
    s.tick(2.0)  # unchanged: no new filter
    assert capture.interfaces == [frozenset({3})]
    ports.append(9)
    s.tick(3.0)  # links are read less often than addresses
    assert capture.interfaces == [frozenset({3})]
    s.tick(11.0)
    assert capture.interfaces[-1] == frozenset({3, 9})
