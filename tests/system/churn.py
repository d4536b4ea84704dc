"""Scan churn from many sources, for the soak test and bench/soak.py: run inside the scanner
namespace, bounded by --seconds (at most 30 minutes) and --rate (at most 500 packets a second).

Forged SYNs and UDP datagrams (the IP header ours) from a cycle of --sources addresses of
198.19.0.0/16 and, with --v6-share, of fd00:19::/48; with --real, also completed TCP connects and
datagrams from that many addresses of 198.18.64.0/18 this namespace holds on lo. The caller routes
those networks to this namespace. Prints one line of totals at the end.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import threading
import time
from ipaddress import IPv4Address, IPv6Address

IP4 = struct.Struct("!BBHHHBBH4s4s")
IP6 = struct.Struct("!IHBB16s16s")
TCP = struct.Struct("!HHIIBBHHH")
UDP = struct.Struct("!HHHH")
FORGED4 = int(IPv4Address("198.19.0.0"))
FORGED6 = int(IPv6Address("fd00:19::"))
REAL4 = int(IPv4Address("198.18.64.1"))
MAX_SECONDS, MAX_RATE = 1800.0, 500.0


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def segment(pseudo: bytes, proto: int, dport: int, sport: int) -> bytes:
    if proto == socket.IPPROTO_TCP:
        body, at = TCP.pack(sport, dport, 1, 0, 5 << 4, 0x02, 1024, 0, 0), 16
    else:
        body, at = UDP.pack(sport, dport, 8 + 5, 0) + b"churn", 6
    total = checksum(pseudo + body) or 0xFFFF
    return body[:at] + struct.pack("!H", total) + body[at + 2:]


def packet4(source: bytes, destination: bytes, proto: int, dport: int, sport: int) -> bytes:
    probe_len = 20 if proto == socket.IPPROTO_TCP else 13
    body = segment(source + destination + struct.pack("!BBH", 0, proto, probe_len), proto, dport, sport)
    return IP4.pack(0x45, 0, 20 + len(body), 1, 0x4000, 64, proto, 0, source, destination) + body


def packet6(source: bytes, destination: bytes, proto: int, dport: int, sport: int) -> bytes:
    probe_len = 20 if proto == socket.IPPROTO_TCP else 13
    body = segment(source + destination + struct.pack("!IxxxB", probe_len, proto), proto, dport, sport)
    return IP6.pack(0x60000000, len(body), proto, 64, source, destination) + body


def source4(i: int) -> bytes:
    # Neighbours in turn are in different /24s, so no per-network cap is what limits.
    return IPv4Address(FORGED4 + ((i % 256) << 8) + 1 + (i // 256) % 254).packed


def source6(i: int) -> bytes:
    # One /64 each, as source4 spreads over /24s.
    return IPv6Address(FORGED6 + ((i % 65536) << 64) + 1 + i // 65536).packed


def forged(args: argparse.Namespace, stop: float, totals: dict[str, int]) -> None:
    sock4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    dst4, dst6 = IPv4Address(args.target).packed, IPv6Address(args.target6).packed
    ports = [p for p in range(1, 1024) if p not in args.skip]
    rng = random.Random(7)
    pause, n = 1.0 / args.rate, 0
    while time.monotonic() < stop:
        i = n % args.sources
        n += 1
        proto = socket.IPPROTO_UDP if rng.random() < args.udp_share else socket.IPPROTO_TCP
        totals["udp" if proto == socket.IPPROTO_UDP else "syn"] += 1
        sport = 40000 + n % 20000
        try:
            if rng.random() < args.v6_share:
                sock6.sendto(packet6(source6(i), dst6, proto, rng.choice(ports), sport), (args.target6, 0))
                totals["v6"] += 1
            else:
                sock4.sendto(packet4(source4(i), dst4, proto, rng.choice(ports), sport), (args.target, 0))
        except OSError:
            totals["send_errors"] += 1
        time.sleep(pause)


def real(args: argparse.Namespace, stop: float, totals: dict[str, int]) -> None:
    rng = random.Random(11)
    pause, n = 1.0 / args.real_rate, 0
    while time.monotonic() < stop:
        src = str(IPv4Address(REAL4 + n % args.real))
        n += 1
        tcp = bool(n % 3 and args.tcp_ports) or not args.udp_ports
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        try:
            s.bind((src, 0))
            if tcp:
                s.settimeout(0.3)
                s.connect((args.target, rng.choice(args.tcp_ports)))
            else:
                s.sendto(b"x", (args.target, rng.choice(args.udp_ports)))
            totals["connects" if tcp else "datagrams"] += 1
        except OSError:
            totals["real_fail"] += 1
        finally:
            s.close()
        time.sleep(pause)


def real_addresses(count: int) -> list[str]:
    """The addresses --real uses, for the caller to put on the scanner's lo."""
    return [str(IPv4Address(REAL4 + n)) for n in range(count)]


def ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("target6")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--sources", type=int, default=4000)
    parser.add_argument("--udp-share", type=float, default=0.3)
    parser.add_argument("--v6-share", type=float, default=0.0)
    parser.add_argument("--skip", type=ports, default=[])
    parser.add_argument("--real", type=int, default=0)
    parser.add_argument("--real-rate", type=float, default=4.0)
    parser.add_argument("--tcp-ports", type=ports, default=[])
    parser.add_argument("--udp-ports", type=ports, default=[])
    args = parser.parse_args()
    args.seconds = min(args.seconds, MAX_SECONDS)
    args.rate = min(args.rate, MAX_RATE)
    args.real_rate = min(args.real_rate, MAX_RATE)
    stop = time.monotonic() + args.seconds
    totals = dict.fromkeys(("syn", "udp", "v6", "send_errors", "connects", "datagrams", "real_fail"), 0)
    threads = [threading.Thread(target=forged, args=(args, stop, totals))]
    if args.real and (args.tcp_ports or args.udp_ports):
        threads.append(threading.Thread(target=real, args=(args, stop, totals)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(" ".join(f"{k}={v}" for k, v in totals.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
