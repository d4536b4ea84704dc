"""The fast lane against Python: KILL_ROUTE rendered as responders.substitute renders it, and any
bytes at all into the lane never crash it nor make it act where the daemon's parser would not see
the same TCP stealth probe (SYN, FIN, NULL or XMAS) from a possible source to that port of ours."""

from __future__ import annotations

import select
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portsentry.core.addresses import impossible_source
from portsentry.core.probe import KIND_FIN, KIND_NULL, KIND_SYN, KIND_XMAS, Mode, Protocol
from portsentry.responders.substitute import substitute
from portsentry.sensors.lane import MODES_BY_CODE, Act, Lane
from portsentry.sensors.packet import DropCounter, classify_tcp, parse_packet
from tests.unit.sensors.lane_rig import ATCP_PORT, DENY, HERE4, HERE6, SCANNER4, SCANNER6, STCP_PORT, Rig, syn

PIECES = st.sampled_from(["$TARGET$", "$PORT$", "$MODE$", "$TARGET$PORT$", "$PORT$MODE$", "$", "$$",
                          "TARGET$", "$TARGET", "PORT", "MODE$", "$MODE", " ", "ip route add ", "é", "%s"])
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)
TEMPLATES = st.lists(st.one_of(PIECES, TEXT), max_size=12).map("".join)
ADDRESSES = st.one_of(st.integers(1, 2**32 - 1).map(IPv4Address),
                      st.integers(2**80, 2**128 - 1).map(IPv6Address))


@pytest.fixture(scope="module")
def lane() -> Iterator[Lane]:
    lane = Lane()
    yield lane
    lane.close()


@given(template=TEMPLATES, address=ADDRESSES, port=st.integers(0, 65535),
       mode=st.sampled_from([Mode.STCP, Mode.ATCP]))
@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_render_is_substitute(lane: Lane, template: str, address: IPv4Address | IPv6Address, port: int,
                              mode: Mode) -> None:
    lane.set_route(template)
    assert lane.render(str(address), port, mode) == substitute(template, address, port, mode)


def test_render_too_long_is_refused_not_cut(lane: Lane) -> None:
    lane.set_route("$TARGET$" * 500)
    assert lane.render("fd00:1:2:3:4:5:6:7", 1, Mode.STCP) is None


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("lane"), route=False)
    rig.lane.allow(0, 1 << 62)
    try:
        yield rig
    finally:
        rig.close()


def through(rig: Rig, packet: bytes) -> bytes | Act:
    """`packet` through the lane, which must answer it alone (and be ready for the next)."""
    rig.send(packet)
    items = rig.items()
    assert len(items) == 1
    select.select([rig.capture], [], [], 0.002)
    assert rig.capture.read_items() == [], "one packet, one message"
    rig.capture.handled()
    rig.lane.clear_pins()  # every example a fresh source
    rig.lines()
    return items[0]


def agrees_with_python(act: Act, packet: bytes) -> None:
    parsed = parse_packet(packet, DropCounter())
    assert parsed is not None, packet.hex()
    assert parsed.protocol is Protocol.TCP and classify_tcp(parsed.tcp_flags) == act.kind
    assert act.kind in (KIND_SYN, KIND_FIN, KIND_NULL, KIND_XMAS)
    assert (parsed.source, parsed.destination, parsed.destination_port, parsed.source_port) == (
        act.source, act.destination, act.port, act.source_port)
    assert not parsed.ip_options
    assert impossible_source(parsed.source) is None
    assert parsed.destination in (HERE4, HERE6)
    assert not any(parsed.source in network for network in DENY)
    assert MODES_BY_CODE[rig_ports()[act.port]] is act.mode


def rig_ports() -> bytes:
    table = bytearray(65536)
    table[ATCP_PORT], table[STCP_PORT] = 2, 1
    return bytes(table)


def check(rig: Rig, packet: bytes) -> None:
    item = through(rig, packet)
    if isinstance(item, Act):
        agrees_with_python(item, packet)
    else:
        assert item == packet


@given(st.binary(max_size=120))
@settings(max_examples=600, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_arbitrary_bytes(rig: Rig, data: bytes) -> None:
    check(rig, data)


SEEDS = [syn(SCANNER4, HERE4, ATCP_PORT), syn(SCANNER6, HERE6, STCP_PORT),
         syn("198.18.0.77", HERE4, STCP_PORT), syn("2001:db8::5", HERE6, ATCP_PORT),
         syn("::ffff:198.18.0.10", HERE6, ATCP_PORT), syn(SCANNER6, "::ffff:198.18.0.1", ATCP_PORT),
         syn(SCANNER4, HERE4, ATCP_PORT, flags=0x01), syn(SCANNER6, HERE6, STCP_PORT, flags=0x29),
         syn("198.18.0.78", HERE4, STCP_PORT, flags=0x00)]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(packet) - 1))
        likely = [0, 0xFF, packet[at] ^ 1, 0x45, 0x60, 0x02, 0x12, 0xC2, 0x50, 0x40, 0x20, 0x01, 0x29, 0x03]
        packet[at] = draw(st.one_of(st.integers(0, 255), st.sampled_from(likely)))
    cut = draw(st.integers(0, len(packet) + 8))
    return bytes(packet[:cut]) + draw(st.binary(max_size=8)) if cut < len(packet) else bytes(packet)


@given(mutated())
@settings(max_examples=1500, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_mutated_syns(rig: Rig, packet: bytes) -> None:
    check(rig, packet)


def test_the_seeds_are_acted_on_where_python_sees_a_syn(rig: Rig) -> None:
    """So the properties above test something: the lane does act on most seeds."""
    acted = [isinstance(through(rig, seed), Act) for seed in SEEDS]
    assert acted == [True, True, True, True, False, False, True, True, True]
