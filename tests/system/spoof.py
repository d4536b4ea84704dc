"""Forged TCP SYNs for the spoofing tests: run inside the scanner namespace.

usage: python spoof.py DESTINATION PORT FIRST_SOURCE COUNT [RATE_PER_SECOND]
Sends COUNT SYNs from COUNT consecutive IPv4 source addresses starting at FIRST_SOURCE (the
caller keeps them inside 198.18.0.0/15), paced to RATE_PER_SECOND, then prints how many it sent.

usage: python spoof.py frame IFACE DESTINATION_MAC DESTINATION PORT SOURCE [SOURCE ...]
Sends one SYN per SOURCE (IPv4 or IPv6, any address, 0.0.0.0 and ::ffff:a.b.c.d included) as a
whole Ethernet frame on IFACE, so no IP stack rewrites or refuses the source on the way out, then
prints how many it sent. DESTINATION's family must match each SOURCE's.

usage: python spoof.py udpframe IFACE DESTINATION_MAC SOURCE DESTINATION SPORT DPORT
Sends one empty IPv4 UDP datagram SOURCE:SPORT -> DESTINATION:DPORT as a whole Ethernet frame to
DESTINATION_MAC, whatever host DESTINATION names, then prints 1.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
import time

IP = struct.Struct("!BBHHHBBH4s4s")
TCP = struct.Struct("!HHIIBBHHH")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn(source: bytes, destination: bytes, sport: int, dport: int) -> bytes:
    tcp = TCP.pack(sport, dport, 1, 0, 5 << 4, 0x02, 1024, 0, 0)
    pseudo = source + destination + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = IP.pack(0x45, 0, 20 + len(tcp), 1, 0x4000, 64, socket.IPPROTO_TCP, 0, source, destination)
    # A raw IP socket fills the header checksum in; a frame sent on AF_PACKET must carry it.
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


IP6 = struct.Struct("!IHBB16s16s")
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD


def syn6(source: bytes, destination: bytes, sport: int, dport: int) -> bytes:
    tcp = TCP.pack(sport, dport, 1, 0, 5 << 4, 0x02, 1024, 0, 0)
    pseudo = source + destination + struct.pack("!IxxxB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    return IP6.pack(0x60000000, len(tcp), socket.IPPROTO_TCP, 64, source, destination) + tcp


def main_frame(argv: list[str]) -> int:
    iface, mac_text, destination, port = argv[0], argv[1], argv[2], int(argv[3])
    sources = argv[4:]
    if len(sources) > 1000:
        raise SystemExit("refusing more than 1,000 frames")
    mac = bytes.fromhex(mac_text.replace(":", ""))
    target = ipaddress.ip_address(destination)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM)
    for n, text in enumerate(sources):
        source = ipaddress.ip_address(text)
        sport = 41000 + n
        if target.version == 4:
            frame, proto = syn(source.packed, target.packed, sport, port), ETH_P_IP
        else:
            frame, proto = syn6(source.packed, target.packed, sport, port), ETH_P_IPV6
        sock.sendto(frame, (iface, proto, 0, 0, mac))
    print(len(sources))
    return 0


UDP = struct.Struct("!HHHH")


def udp(source: bytes, destination: bytes, sport: int, dport: int) -> bytes:
    datagram = UDP.pack(sport, dport, UDP.size, 0)
    pseudo = source + destination + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(datagram))
    datagram = datagram[:6] + struct.pack("!H", checksum(pseudo + datagram) or 0xFFFF)
    ip = IP.pack(0x45, 0, 20 + len(datagram), 1, 0x4000, 64, socket.IPPROTO_UDP, 0, source, destination)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + datagram


def main_udp_frame(argv: list[str]) -> int:
    iface, mac_text, source, destination = argv[0], argv[1], argv[2], argv[3]
    sport, dport = int(argv[4]), int(argv[5])
    mac = bytes.fromhex(mac_text.replace(":", ""))
    frame = udp(ipaddress.IPv4Address(source).packed, ipaddress.IPv4Address(destination).packed, sport, dport)
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM) as sock:
        sock.sendto(frame, (iface, ETH_P_IP, 0, 0, mac))
    print(1)
    return 0


def main() -> int:
    if sys.argv[1] == "frame":
        return main_frame(sys.argv[2:])
    if sys.argv[1] == "udpframe":
        return main_udp_frame(sys.argv[2:])
    destination, port, first, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    rate = float(sys.argv[5]) if len(sys.argv) > 5 else 5000.0
    if count > 2_000_000:
        raise SystemExit("refusing more than 2,000,000 packets")
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    target = socket.inet_aton(destination)
    start_address = int(ipaddress.IPv4Address(first))
    started = time.monotonic()
    for n in range(count):
        source = ipaddress.IPv4Address(start_address + n).packed
        sock.sendto(syn(source, target, 40000 + n % 20000, port), (destination, 0))
        if n % 100 == 99:
            ahead = (n + 1) / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    print(count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
