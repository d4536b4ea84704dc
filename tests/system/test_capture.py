"""System tests for the packet capture socket and its BPF filter, on a veth pair between two
network namespaces made for the test: probes sent from one side must reach Python on the other,
parsed correctly, while an established connection's traffic stays in the kernel.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

SRC_DIR = str(Path(__file__).resolve().parents[2] / "src")
A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "fd00:5053::1", "fd00:5053::2"
SERVER_PORT = 8080
TIMEOUT = 10.0

# Runs inside the target namespace: opens the capture socket, then on each "mark" line from
# stdin drains it until quiet and prints every parsed packet, then the kernel counters.
CAPTURE_CHILD = r"""
import json, select, sys
from portsentry.core.probe import Protocol
from portsentry.sensors.bpf import build_probe_filter
from portsentry.sensors.capture import CaptureSocket
from portsentry.sensors.packet import DropCounter, parse_packet

options = json.loads(sys.argv[1])
protocols = [Protocol(p) for p in options.get("protocols", ["TCP", "UDP"])]
cap = CaptureSocket(build_probe_filter(protocols, options.get("max_port")))
drops = DropCounter()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    while select.select([cap], [], [], 0.3)[0]:
        for data in cap.read_batch():
            packet = parse_packet(data, drops)
            if packet is None:
                continue
            print(json.dumps({"packet": [
                str(packet.source), str(packet.destination), str(packet.protocol),
                packet.source_port, packet.destination_port, int(packet.tcp_flags),
            ]}), flush=True)
    stats = cap.stats()
    print(json.dumps({"mark": line.strip(), "packets": stats.packets, "drops": stats.drops,
                      "parse_drops": drops.as_dict()}), flush=True)
"""

# Runs inside the sending namespace: each action is a plain-socket probe or a real transfer.
SENDER = r"""
import json, socket, sys
for kind, host, port, *rest in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if kind == "syn":
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            pass
        else:
            sys.exit(f"connect to {host} port {port} unexpectedly succeeded")
        s.close()
    elif kind == "udp":
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.sendto(b"probe", (host, port))
        s.close()
    elif kind == "transfer":
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"x" * rest[0])
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()
"""

# A dual-stack listener in the target namespace for the established-connection case.
SERVER = r"""
import socket, sys
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", int(sys.argv[1])))
srv.listen(8)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    while conn.recv(65536):
        pass
    conn.sendall(b"done")
    conn.close()
"""


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Namespaces:
    sender: str
    target: str


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    tag = secrets.token_hex(3)
    ns = Namespaces(f"ps-cap-{tag}-a", f"ps-cap-{tag}-b")
    created: list[str] = []
    try:
        for name in (ns.sender, ns.target):
            run("ip", "netns", "add", name)
            created.append(name)
        # Both ends are created inside the namespaces: nothing appears in the host's.
        veth = ["link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns"]
        run("ip", "-n", ns.sender, *veth, ns.target)
        for name, v4, v6 in ((ns.sender, A4, A6), (ns.target, B4, B6)):
            run("ip", "-n", name, "addr", "add", f"{v4}/30", "dev", "v0")
            run("ip", "-n", name, "addr", "add", f"{v6}/64", "dev", "v0", "nodad")
            run("ip", "-n", name, "link", "set", "lo", "up")
            # One MSS per packet, as on a real link, rather than 64 KB TSO super-packets.
            run("ip", "-n", name, "link", "set", "v0", "gso_max_segs", "1", "up")
        yield ns
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class Child:
    """A python process in a namespace whose stdout lines are read by a thread."""

    def __init__(self, namespace: str, script: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": SRC_DIR}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def readline(self) -> str:
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError("child process went quiet") from None
        if line is None:
            assert self.proc.stderr is not None
            raise AssertionError(f"child process exited: {self.proc.stderr.read()}")
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Capture(Child):
    def __init__(self, namespace: str, **options: Any) -> None:
        super().__init__(namespace, CAPTURE_CHILD, json.dumps(options))
        assert json.loads(self.readline()) == {"ready": True}

    def collect(self, mark: str) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
        """Packets parsed since the last call, and the socket's counters so far."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(mark + "\n")
        self.proc.stdin.flush()
        packets: list[tuple[Any, ...]] = []
        while True:
            record = json.loads(self.readline())
            if "mark" in record:
                assert record["mark"] == mark
                return packets, record
            packets.append(tuple(record["packet"]))


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def send(ns: Namespaces, *actions: tuple[Any, ...]) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", ns.sender, sys.executable, "-c", SENDER, json.dumps(actions)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def rx_packets(namespace: str) -> int:
    [link] = json.loads(run("ip", "-n", namespace, "-s", "-j", "link", "show", "v0").stdout)
    return int(link["stats64"]["rx"]["packets"])


SYN, UDP_FLAGS = 0x02, 0


def test_probes_reach_python_parsed(namespaces, children):
    capture = Capture(namespaces.target)
    children.append(capture)
    send(
        namespaces,
        ("syn", B4, 2222),
        ("udp", B4, 5353),
        ("syn", B6, 2223),
        ("udp", B6, 5354),
    )
    packets, counters = capture.collect("probes")
    # Ports chosen by the sender's kernel vary; everything else is fixed.
    seen = sorted((src, dst, proto, dport, flags) for src, dst, proto, _, dport, flags in packets)
    assert seen == sorted(
        [
            (A4, B4, "TCP", 2222, SYN),
            (A4, B4, "UDP", 5353, UDP_FLAGS),
            (A6, B6, "TCP", 2223, SYN),
            (A6, B6, "UDP", 5354, UDP_FLAGS),
        ]
    )
    assert all(1024 <= sport <= 65535 for *_, sport, _, _ in packets)
    # The target's RST and ICMP replies are outgoing; neighbour discovery is not TCP/UDP.
    assert counters["packets"] == 4 and counters["drops"] == 0
    assert counters["parse_drops"] == {}


def test_established_connection_stays_in_kernel(namespaces, children, record_property):
    server = Child(namespaces.target, SERVER, str(SERVER_PORT))
    children.append(server)
    assert server.readline().strip() == "ready"
    capture = Capture(namespaces.target)
    children.append(capture)

    before = rx_packets(namespaces.target)
    send(namespaces, ("transfer", B4, SERVER_PORT, 2_000_000), ("transfer", B6, SERVER_PORT, 2_000_000))
    packets, counters = capture.collect("transfer")
    received = rx_packets(namespaces.target) - before

    # Only each connection's opening SYN: every later segment carries ACK.
    assert sorted((p[0], p[4], p[5]) for p in packets) == [(A4, SERVER_PORT, SYN), (A6, SERVER_PORT, SYN)]
    assert counters["packets"] == 2
    assert received > 2_000
    record_property("transfer_rx_packets", received)
    record_property("transfer_filter_passed", counters["packets"])
    print(f"\ntransfer of 2x2 MB: {received} packets received on v0, {counters['packets']} passed the filter")


def test_syn_scan_all_pass(namespaces, children, record_property):
    capture = Capture(namespaces.target)
    children.append(capture)
    ports = range(1000, 1200)
    before = rx_packets(namespaces.target)
    if shutil.which("nmap"):
        result = subprocess.run(
            ["ip", "netns", "exec", namespaces.sender, "nmap", "-sS", "-Pn", "-n", "-T5", "-p",
             f"{ports.start}-{ports.stop - 1}", B4],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    else:
        send(namespaces, *(("syn", B4, port) for port in ports))
    packets, counters = capture.collect("scan")
    received = rx_packets(namespaces.target) - before
    scanned = {p[4] for p in packets if p[5] == SYN}
    assert scanned == set(ports)
    assert counters["drops"] == 0
    record_property("scan_rx_packets", received)
    record_property("scan_filter_passed", counters["packets"])
    print(f"\nSYN scan of {len(ports)} ports: {received} received, {counters['packets']} passed the filter")


def test_port_and_protocol_options_in_the_kernel(namespaces, children):
    capture = Capture(namespaces.target, protocols=["TCP"], max_port=1024)
    children.append(capture)
    send(
        namespaces,
        ("syn", B4, 80),
        ("syn", B4, 1024),
        ("syn", B6, 1023),
        ("syn", B6, 40000),
        ("udp", B4, 53),
    )
    packets, counters = capture.collect("options")
    assert sorted((p[0], p[4]) for p in packets) == [(A4, 80), (A6, 1023)]
    assert counters["packets"] == 2
