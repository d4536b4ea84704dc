"""Normal traffic for the `normal` benchmark part: a sink with real TCP and UDP listeners (run in
the target namespace, started before the daemon so both daemons see the ports as in use) and a
sender (run in the scanner namespace) streaming one bulk TCP transfer and a paced UDP stream to it.

    normal_traffic.py sink --tcp-port 80 --udp-port 514 --max-seconds 60
        prints "ready", counts until stdin closes (or max-seconds), prints one JSON line
    normal_traffic.py send --dst 198.18.0.1 --tcp-port 80 --udp-port 514 --seconds 10 --udp-pps 2000
        prints one JSON line with what it sent
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time

CHUNK = 256 * 1024


def sink(tcp_port: int, udp_port: int, max_seconds: float) -> int:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", tcp_port))
    tcp.listen(4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp.bind(("0.0.0.0", udp_port))
    counts = {"tcp_bytes": 0, "tcp_connections": 0, "udp_datagrams": 0, "udp_bytes": 0}
    stop = threading.Event()

    def tcp_loop() -> None:
        tcp.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except TimeoutError:
                continue
            counts["tcp_connections"] += 1
            conn.settimeout(0.2)
            with conn:
                while not stop.is_set():
                    try:
                        data = conn.recv(CHUNK)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    counts["tcp_bytes"] += len(data)

    def udp_loop() -> None:
        udp.settimeout(0.2)
        while not stop.is_set():
            try:
                data = udp.recv(65536)
            except TimeoutError:
                continue
            counts["udp_datagrams"] += 1
            counts["udp_bytes"] += len(data)

    threads = [threading.Thread(target=tcp_loop, daemon=True), threading.Thread(target=udp_loop, daemon=True)]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sys.stdin], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if ready and not sys.stdin.readline():
            break
    stop.set()
    for thread in threads:
        thread.join(2.0)
    print(json.dumps(counts), flush=True)
    return 0


def send(dst: str, tcp_port: int, udp_port: int, seconds: float, udp_pps: float, udp_size: int) -> int:
    result = {"tcp_bytes": 0, "udp_datagrams": 0, "udp_bytes": 0, "seconds": 0.0}
    end = time.monotonic() + seconds

    def tcp_loop() -> None:
        payload = b"\0" * CHUNK
        with socket.create_connection((dst, tcp_port), timeout=5) as conn:
            while time.monotonic() < end:
                conn.sendall(payload)
                result["tcp_bytes"] += len(payload)

    def udp_loop() -> None:
        payload = b"\0" * udp_size
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((dst, udp_port))
            started = time.monotonic()
            sent = 0
            while (now := time.monotonic()) < end:
                # Paced by the clock, in small bursts, so a late wake-up does not lower the rate.
                due = int((now - started) * udp_pps) + 1
                while sent < due:
                    sock.send(payload)
                    sent += 1
                time.sleep(0.001)
            result["udp_datagrams"] = sent
            result["udp_bytes"] = sent * udp_size

    started = time.monotonic()
    threads = [threading.Thread(target=tcp_loop), threading.Thread(target=udp_loop)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    result["seconds"] = time.monotonic() - started
    print(json.dumps(result), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--tcp-port", type=int, required=True)
    s.add_argument("--udp-port", type=int, required=True)
    s.add_argument("--max-seconds", type=float, default=120.0)
    t = sub.add_parser("send")
    t.add_argument("--dst", required=True)
    t.add_argument("--tcp-port", type=int, required=True)
    t.add_argument("--udp-port", type=int, required=True)
    t.add_argument("--seconds", type=float, required=True)
    t.add_argument("--udp-pps", type=float, default=2000.0)
    t.add_argument("--udp-size", type=int, default=512)
    args = parser.parse_args()
    if args.role == "sink":
        return sink(args.tcp_port, args.udp_port, args.max_seconds)
    if not 0 < args.seconds <= 60 or not 0 < args.udp_pps <= 100_000:
        parser.error("--seconds must be in (0, 60] and --udp-pps in (0, 100000]")
    return send(args.dst, args.tcp_port, args.udp_port, args.seconds, args.udp_pps, args.udp_size)


if __name__ == "__main__":
    sys.exit(main())
