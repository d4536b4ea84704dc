"""Tests for the live listening-port set used by advanced stealth mode."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.core.probe import Protocol
from portsentry.sensors.listeners import ListeningPorts, parse_proc_net

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "150")), deadline=None)

TCP_SAMPLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 2 1 0 100 0 0 10 0
   2: 020012C6:0016 010012C6:D3A4 01 00000000:00000000 02:0008E2A7 00000000     0        0 3 4 0 20 4 30 10 -1
   3: 020012C6:A424 507100CB:0050 06 00000000:00000000 03:00000DC2 00000000     0        0 0 3 0
   4: 020012C6:1F90 010012C6:0050 0A
"""
TCP6_SAMPLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 01 00000000:00000000
"""
UDP_SAMPLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  101: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
  202: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 2 2 0 0
  303: 020012C6:E1F2 08080808:0035 01 00000000:00000000 00:00000000 00000000  1000        0 3 2 0 0
"""  # noqa: E501


def test_tcp_counts_only_listen_sockets() -> None:
    # 0x0016=22 and 0x0CEA=3306 listen; 0x1F90=8080 listens on a truncated line (still valid
    # up to the state); established (01) and time-wait (06) sockets are clients, not services.
    assert parse_proc_net(TCP_SAMPLE, Protocol.TCP) == {22, 3306, 8080}
    assert parse_proc_net(TCP6_SAMPLE, Protocol.TCP) == {443}


def test_udp_counts_every_bound_port() -> None:
    # 1.2's bind test also failed for a client socket that happened to hold the port.
    assert parse_proc_net(UDP_SAMPLE, Protocol.UDP) == {68, 53, 0xE1F2}


def test_lowercase_hex_is_accepted() -> None:
    assert parse_proc_net("   0: 00000000:01bb 00000000:0000 0a 0\n", Protocol.TCP) == {443}


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        "   0: 00000000:0016 00000000:0000",  # no state
        "   0: 00000000:016 00000000:0000 0A",  # port not four hex digits
        "   0: 00000000:00G6 00000000:0000 0A",
        "   0 00000000:0016 00000000:0000 0A",  # slot without colon
        "   0: 00000000:0016 00000000:0000 0A0",  # state not two digits
        "   0: 00000000:0000 00000000:0000 0A",  # port 0 is never a service
        "   x: 00000000:0016 00000000:0000 0A",
    ],
)
def test_malformed_lines_are_skipped(line: str) -> None:
    text = f"{line}\n   1: 00000000:0050 00000000:0000 0A 0\n"
    assert parse_proc_net(text, Protocol.TCP) == {80}
    assert parse_proc_net(text, Protocol.UDP) == {80}


def proc_line(slot: int, port: int, state: int, width: int) -> str:
    return f"{slot:4}: {'0' * width}:{port:04X} {'0' * width}:0000 {state:02X} 00000000:00000000"


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(1, 65535), st.integers(1, 12), st.sampled_from([8, 32])), max_size=30
    )
)
def test_parse_matches_generated_tables(sockets: list[tuple[int, int, int]]) -> None:
    lines = ["  sl  local_address rem_address   st"]
    lines += [proc_line(i, port, state, width) for i, (port, state, width) in enumerate(sockets)]
    text = "\n".join(lines)
    assert parse_proc_net(text, Protocol.TCP) == {p for p, state, _ in sockets if state == 0x0A}
    assert parse_proc_net(text, Protocol.UDP) == {p for p, _, _ in sockets}


@FUZZ
@given(st.text(max_size=400), st.sampled_from(list(Protocol)))
def test_parse_never_raises(text: str, protocol: Protocol) -> None:
    assert all(1 <= port <= 65535 for port in parse_proc_net(text, protocol))


@FUZZ
@given(st.binary(max_size=300))
def test_parse_never_raises_on_decoded_bytes(data: bytes) -> None:
    text = TCP_SAMPLE + data.decode("ascii", "replace")
    assert {22, 3306} <= parse_proc_net(text, Protocol.TCP)


# --- refresh against files and the real kernel ---


def fake_proc(root: Path, **tables: str) -> None:
    (root / "net").mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():
        (root / "net" / name).write_text(text)


def test_refresh_reads_both_families_and_tolerates_missing_file(tmp_path: Path) -> None:
    fake_proc(tmp_path, tcp=TCP_SAMPLE, tcp6=TCP6_SAMPLE, udp=UDP_SAMPLE)  # no udp6
    tcp = ListeningPorts(Protocol.TCP, proc_root=str(tmp_path))
    assert tcp.ports() == frozenset()  # nothing read before the first refresh
    tcp.refresh(0.0)
    assert tcp.ports() == {22, 3306, 8080, 443}
    udp = ListeningPorts(Protocol.UDP, proc_root=str(tmp_path))
    udp.refresh(0.0)
    assert udp.ports() == {68, 53, 0xE1F2}
    assert udp.is_listening(53) and not udp.is_listening(22)


def test_refresh_honours_min_interval(tmp_path: Path) -> None:
    fake_proc(tmp_path, tcp=TCP_SAMPLE)
    ports = ListeningPorts(Protocol.TCP, proc_root=str(tmp_path), min_interval=0.5)
    ports.refresh(100.0)
    fake_proc(tmp_path, tcp="")
    ports.refresh(100.4)
    assert ports.is_listening(22)  # not re-read yet
    ports.refresh(100.5)
    assert not ports.is_listening(22)
    fake_proc(tmp_path, tcp=TCP_SAMPLE)
    ports.refresh(50.0)  # clock stepped back: read again rather than freeze
    assert ports.is_listening(22)


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> Iterator[socket.AddressFamily]:
    if request.param == socket.AF_INET6 and not os.path.exists("/proc/net/tcp6"):
        pytest.skip("IPv6 is disabled on this host")
    yield request.param


def test_refresh_sees_a_real_tcp_listener_come_and_go(family: socket.AddressFamily) -> None:
    ports = ListeningPorts(Protocol.TCP, min_interval=0.5)
    loopback = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((loopback, 0))
        port = server.getsockname()[1]
        ports.refresh(10.0)
        assert not ports.is_listening(port)  # bound but not listening yet
        server.listen(1)
        ports.refresh(10.5)
        assert ports.is_listening(port)
    ports.refresh(10.6)
    assert ports.is_listening(port)  # closed, but the next read is not due yet
    ports.refresh(11.0)
    assert not ports.is_listening(port)


def test_refresh_sees_a_real_udp_socket_come_and_go(family: socket.AddressFamily) -> None:
    ports = ListeningPorts(Protocol.UDP, min_interval=0.5)
    loopback = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_DGRAM) as server:
        server.bind((loopback, 0))
        port = server.getsockname()[1]
        ports.refresh(0.0)
        assert ports.is_listening(port)
        assert port in ports.ports()
    ports.refresh(0.5)
    assert not ports.is_listening(port)


def test_confirm_sees_a_socket_bound_a_moment_ago_and_is_budgeted() -> None:
    import socket as socket_module

    from portsentry.sensors import listeners as module

    tracker = module.ListeningPorts(Protocol.UDP)
    tracker.refresh(100.0)
    sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        # The cached table is from before the bind; confirm asks the kernel again.
        assert not tracker.is_listening(port)
        assert tracker.confirm(port, 100.001)
    finally:
        sock.close()
    for _ in range(module.CONFIRM_BUDGET):
        tracker.confirm(1, 200.5)
    calls = 0
    original = tracker.refresh

    def counting(now: float) -> None:
        nonlocal calls
        calls += 1
        original(now)

    tracker.refresh = counting  # type: ignore[method-assign]
    diag = tracker._diag
    if diag is not None:  # with sock_diag, confirm asks about the one port
        original_holds = diag.holds

        def counting_holds(protocol: Protocol, port: int) -> bool:
            nonlocal calls
            calls += 1
            return original_holds(protocol, port)

        diag.holds = counting_holds  # type: ignore[method-assign]
    tracker.confirm(1, 200.9)
    assert calls == 0  # budget for second 200 spent: the cached table answers
    tracker.confirm(1, 201.0)
    assert calls == 1  # a new second, a new budget


def test_confirm_with_the_packets_flow_asks_the_kernels_lookup_and_caches_no_port() -> None:
    tracker = ListeningPorts(Protocol.TCP)
    tracker.refresh(100.0)
    here, other = socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.2")
    peer = socket.inet_aton("127.0.0.9")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert not tracker.is_listening(port)  # the cached table is from before the listen
        assert tracker.confirm(port, 100.001, (here, peer, 40000))
        # Sent to an address the service is not bound to: the kernel would answer it with a
        # reset, so it is a probe, and the port was not cached as taken by the answer above.
        assert not tracker.confirm(port, 100.002, (other, peer, 40000))
        assert not tracker.is_listening(port)


def test_a_port_cached_as_held_is_read_again_once_the_table_is_due() -> None:
    """A service stopped since the table was read: a lone probe after a quiet spell must not be
    waved through on the old table (the per-batch re-read used to ensure this)."""
    tracker = ListeningPorts(Protocol.TCP, min_interval=0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        tracker.refresh(10.0)
    flow = (socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.9"), 40000)
    assert tracker.confirm(port, 10.1, flow)  # the table is young: it answers
    assert not tracker.confirm(port, 10.6, flow)
