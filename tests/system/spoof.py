"""Forged TCP SYNs for the spoofing tests: run inside the scanner namespace.

usage: python spoof.py DESTINATION PORT FIRST_SOURCE COUNT [RATE_PER_SECOND]
Sends COUNT SYNs from COUNT consecutive IPv4 source addresses starting at FIRST_SOURCE (the
caller keeps them inside 198.18.0.0/15), paced to RATE_PER_SECOND, then prints how many it sent.
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
    return ip + tcp


def main() -> int:
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
