"""Generated packets through the whole decision path: parser, stealth sensor, engine. No exception.

The normal run pushes 100,000 packets (real probes, mutated ones and random bytes, from a fixed
seed so a failure reproduces); PORTSENTRY_FUZZ_PACKETS raises the count for long runs.
"""

from __future__ import annotations

import os
import random
from ipaddress import IPv4Address, IPv6Address, ip_address

from portsentry.core.actions import Block
from portsentry.core.engine import Engine, EngineSettings
from portsentry.core.probe import Mode, Protocol
from portsentry.sensors.listeners import ListeningPorts
from portsentry.sensors.packet import DropCounter, TcpFlag, parse_packet
from portsentry.sensors.stealth import HostAddresses, StealthSensor, Watch
from tests.unit.sensors.test_packet import DST4, DST6, ah, ext, ipv4, ipv6, tcp, udp
from tests.unit.sensors.test_stealth import NullCapture

PACKETS = int(os.environ.get("PORTSENTRY_FUZZ_PACKETS", "100000"))


def seeds(rng: random.Random) -> list[bytes]:
    """Well-formed probes of every kind the sensor reports, plus non-probes."""
    out: list[bytes] = []
    for flags in (TcpFlag.SYN, TcpFlag.FIN, 0, TcpFlag.FIN | TcpFlag.URG | TcpFlag.PSH,
                  TcpFlag.SYN | TcpFlag.FIN, TcpFlag.ACK, TcpFlag.RST, TcpFlag.URG):
        port = rng.randrange(0, 1100)
        src4 = IPv4Address(0xC6120000 | rng.randrange(1, 0xFFFF))
        src6 = IPv6Address((0xFD << 120) | rng.getrandbits(64))
        out.append(ipv4(tcp(dport=port, flags=flags), src=src4))
        out.append(ipv4(tcp(dport=port, flags=flags), ihl=7, src=src4))
        out.append(ipv6(tcp(dport=port, flags=flags), src=src6))
        out.append(ipv6(ext(60) + ah(6) + tcp(dport=port, flags=flags), 0, src=src6))
    out.append(ipv4(udp(dport=rng.randrange(0, 1100)), 17))
    out.append(ipv6(udp(dport=rng.randrange(0, 1100)), 17))
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    buf = bytearray(data)
    if kind == 0 and buf:  # flip a few bits
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del buf[rng.randrange(len(buf) + 1):]
    elif kind == 2:  # random bytes spliced in
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = rng.randbytes(rng.randrange(1, 40))
    elif kind == 3:  # pure noise
        return rng.randbytes(rng.randrange(0, 120))
    return bytes(buf)


class AllFree(ListeningPorts):
    def refresh(self, now: float) -> None:
        pass


def test_100k_generated_packets_pass_parser_sensor_and_engine_without_exception():
    rng = random.Random(20261126)
    sensor = StealthSensor(
        [Watch(Mode.ATCP, below=1024, exclude=frozenset({113})), Watch(Mode.SUDP, ports=frozenset({7, 161})),
         Watch(Mode.STCP, ports=frozenset({1, 111, 1080})), Watch(Mode.AUDP, below=1024)],
        lambda _text: None, lambda: 0.0,
        HostAddresses(lambda: [DST4, DST6], lambda: [ip_address("198.18.255.255")]),
        {p: AllFree(p) for p in Protocol},
        capture_factory=lambda _m, _p: NullCapture(),  # type: ignore[arg-type,return-value]
    )
    sensor.open()
    engine = Engine(EngineSettings(scan_trigger=2, block_tcp=1, block_udp=1,
                                   kill_route="ip route add blackhole $TARGET$",
                                   kill_hosts_deny="ALL: $TARGET$"), set())
    drops = DropCounter()
    corpus = seeds(rng)
    parsed = hits = blocks = 0
    for n in range(PACKETS):
        if n % 1000 == 0:
            corpus = seeds(rng)
        data = rng.choice(corpus)
        if rng.random() < 0.7:
            data = mutate(data, rng)
        packet = parse_packet(data, drops)
        if packet is None:
            continue
        parsed += 1
        for hit in sensor.hits_for(packet, n / 1000):
            hits += 1
            for action in engine.observe(hit.probe, n / 1000).actions:
                if isinstance(action, Block):
                    blocks += 1
                    engine.finished(action, rng.random() < 0.5, n / 1000)
    # The run must have exercised every stage, not only the parser's drop paths.
    assert parsed > PACKETS // 4
    assert hits > PACKETS // 10
    assert blocks > 100
    assert drops.total > PACKETS // 10
