"""Paced SYN flood from spoofed random sources, one SYN per source, for the bench's memory figure.

Runs inside the scanner namespace (bench/perf.py starts it there) and writes whole Ethernet frames
to an AF_PACKET socket, so no route or neighbour entry is needed for the forged sources. Sources
are distinct: for IPv6 random addresses in fd00::/8 (never the rig's fd00:18::/64 and
fd00:18:1::/64 links), for IPv4 a seeded shuffle of 198.18.0.0/15 without the rig's
198.18.0.0/23. Bounded by --count and --max-seconds (not counting pauses).

Protocol on stdout (one line each): `ready`, then `checkpoint SENT` after each --checkpoint
packets (the sender then waits for any line on stdin before going on), then
`done SENT SECONDS` (seconds spent sending, pauses excluded).
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address

ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
SPORT = 40123
SEQ = 0x5EED5EED
BATCH = 64
# The rig's own links; a forged source there would make the target resolve neighbours.
RIG_PREFIXES6 = (bytes.fromhex("fd000018000000000000"), bytes.fromhex("fd000018000100000000"))
IPV4_FIRST = int(IPv4Address("198.18.2.0"))
IPV4_LAST = int(IPv4Address("198.19.255.255"))


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def words(data: bytes) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def tcp_syn(dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", SPORT, dport, SEQ, 0, 5 << 4, 0x02, 64240, 0, 0)


def frames6(dst: IPv6Address, dport: int, eth: bytes, count: int, seed: int) -> Iterator[bytes]:
    """Ethernet + IPv6 + TCP SYN frames, each from a new random fd00::/8 source. Only the source
    changes, so both checksums are the constant part plus the source's 16-bit words."""
    tcp = tcp_syn(dport)
    # Pseudo-header: src, dst, upper-layer length, next header; then the segment itself.
    base = words(dst.packed) + len(tcp) + socket.IPPROTO_TCP + words(tcp)
    ip_head = struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64)
    rng = random.Random(seed)
    unpack8 = struct.Struct("!8H").unpack
    tcp_head, tcp_tail = tcp[:16], tcp[18:]
    made = 0
    while made < count:
        src = b"\xfd" + rng.randbytes(15)
        # 120 random bits: a repeated source among 2M is a ~1e-24 chance, so none is checked for.
        if src[:10] in RIG_PREFIXES6:
            continue
        csum = ~fold(base + sum(unpack8(src))) & 0xFFFF
        yield b"".join((eth, ip_head, src, dst.packed, tcp_head, csum.to_bytes(2, "big"), tcp_tail))
        made += 1


def frames4(dst: IPv4Address, dport: int, eth: bytes, count: int, seed: int) -> Iterator[bytes]:
    """Ethernet + IPv4 + TCP SYN frames from distinct sources of 198.18.2.0-198.19.255.255."""
    span = IPV4_LAST - IPV4_FIRST + 1
    if count > span:
        raise SystemExit(f"spoofsend: at most {span} IPv4 sources (198.18.0.0/15 without the rig's /23)")
    tcp = tcp_syn(dport)
    tcp_base = words(dst.packed) + len(tcp) + socket.IPPROTO_TCP + words(tcp)
    total_len = 20 + len(tcp)
    ip_fixed = struct.pack("!BBHHHBB", 0x45, 0, total_len, 0, 0x4000, 64, socket.IPPROTO_TCP)
    ip_base = words(ip_fixed) + words(dst.packed)
    order = list(range(IPV4_FIRST, IPV4_FIRST + span))
    random.Random(seed).shuffle(order)
    tcp_head, tcp_tail = tcp[:16], tcp[18:]
    for value in order[:count]:
        src = value.to_bytes(4, "big")
        src_sum = (value >> 16) + (value & 0xFFFF)
        ip_csum = ~fold(ip_base + src_sum) & 0xFFFF
        tcp_csum = ~fold(tcp_base + src_sum) & 0xFFFF
        yield b"".join((eth, ip_fixed, ip_csum.to_bytes(2, "big"), src, dst.packed, tcp_head,
                        tcp_csum.to_bytes(2, "big"), tcp_tail))


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def send_paced(sock: socket.socket, frames: Iterator[bytes], pps: float, checkpoint: int,
               deadline: float, report: Callable[[str], None]) -> tuple[int, float]:
    """Send at `pps` in small batches; pause at every `checkpoint` packets until stdin has a line.
    Returns how many frames went out before the frames ran out or `deadline` passed, and the
    seconds spent paused."""
    sent = 0
    paused_total = 0.0
    start = time.perf_counter()
    send = sock.send
    for frame in frames:
        while True:
            try:
                send(frame)
                break
            except BlockingIOError:
                time.sleep(0.0005)
            except OSError as error:
                if error.errno != 105:  # ENOBUFS: the device queue is full, try again shortly
                    raise
                time.sleep(0.0005)
        sent += 1
        if checkpoint and sent % checkpoint == 0:
            report(f"checkpoint {sent}")
            paused = time.perf_counter()
            if not sys.stdin.readline():
                return sent, paused_total
            pause = time.perf_counter() - paused
            paused_total += pause
            start += pause
            deadline += pause
        if sent % BATCH == 0:
            now = time.perf_counter()
            if now > deadline:
                return sent, paused_total
            due = start + sent / pps
            if due > now:
                time.sleep(due - now)
    return sent, paused_total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=int, choices=(4, 6), required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--dst-mac", required=True)
    parser.add_argument("--dev", default="eth0")
    parser.add_argument("--port", type=int, default=79)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--pps", type=float, default=20_000)
    parser.add_argument("--checkpoint", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    if not 0 < args.count <= 2_000_000 or not 0 < args.pps <= 200_000:
        raise SystemExit("spoofsend: --count must be 1-2000000 and --pps 1-200000")
    with open(f"/sys/class/net/{args.dev}/address", encoding="ascii") as handle:
        own_mac = mac(handle.read().strip())
    ethertype = ETH_P_IPV6 if args.family == 6 else ETH_P_IPV4
    eth = mac(args.dst_mac) + own_mac + struct.pack("!H", ethertype)
    frames = (frames6(IPv6Address(args.dst), args.port, eth, args.count, args.seed) if args.family == 6
              else frames4(IPv4Address(args.dst), args.port, eth, args.count, args.seed))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((args.dev, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    def report(line: str) -> None:
        print(line, flush=True)

    report("ready")
    started = time.perf_counter()
    sent, paused = send_paced(sock, frames, args.pps, args.checkpoint, started + args.max_seconds,
                              report)
    # Sending time only: the pauses are the bench's measurements.
    report(f"done {sent} {time.perf_counter() - started - paused:.3f}")
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
