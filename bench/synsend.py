"""Sends single TCP SYNs on request and prints when each left, for the latency benchmark.

Runs inside the scanner namespace. Each stdin line `SOURCE DESTINATION PORT [FLAGS]` sends one
SYN (or the TCP flags FLAGS, in hex: 01 a FIN probe, 00 NULL, 29 XMAS) from SOURCE (an address
of this namespace) and answers with time.time() taken just before sendto(), the clock on which
the kernel stamps the daemon's syslog datagrams.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

_TCP = struct.Struct("!HHIIBBHHH")
_SYN = 0x02


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn_segment(source: str, destination: str, sport: int, dport: int, seq: int, flags: int = _SYN) -> bytes:
    header = _TCP.pack(sport, dport, seq, 0, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack(
        "!BBH", 0, socket.IPPROTO_TCP, len(header)
    )
    csum = checksum(pseudo + header)
    return header[:16] + struct.pack("!H", csum) + header[18:]


def main() -> int:
    sockets: dict[str, socket.socket] = {}
    sport = 40000
    for line in sys.stdin:
        fields = line.split()
        if not fields:
            continue
        source, destination, dport = fields[0], fields[1], int(fields[2])
        flags = int(fields[3], 16) if len(fields) > 3 else _SYN
        sock = sockets.get(source)
        if sock is None:
            # The kernel adds the IP header; binding picks the source address.
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
            sock.bind((source, 0))
            sockets[source] = sock
        sport += 1
        segment = syn_segment(source, destination, sport, dport, sport * 7919, flags)
        sent = time.time()
        sock.sendto(segment, (destination, 0))
        print(repr(sent), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
