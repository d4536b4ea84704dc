"""Prometheus metrics: the daemon's calls move the right series, as seen by scraping a real server
on an ephemeral loopback port; the listen-address parser takes what users write."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from portsentry.core.probe import KIND_FIN, KIND_SYN, KIND_UDP
from portsentry.journal.telemetry import NullMetrics
from portsentry.service.metrics import (
    Metrics,
    MetricsError,
    MetricsServer,
    kind_label,
    parse_listen,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: MetricsServer) -> Samples:
    host = f"[{server.host}]" if ":" in server.host else server.host
    with urllib.request.urlopen(f"http://{host}:{server.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics(CollectorRegistry())
    server = metrics.serve("127.0.0.1:0")
    try:
        yield metrics, server
    finally:
        server.close()


def test_counters_move_in_a_scrape(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    before = scrape(server)
    assert ("portsentry_bans_total", ()) in before
    assert before[("portsentry_bans_total", ())] == 0

    metrics.probe("stcp", KIND_SYN)
    metrics.probe("stcp", KIND_SYN)
    metrics.probe("sudp", KIND_UDP)
    metrics.probe("stcp", "Unknown Type: TCP Packet Flags: SYN: 1 FIN: 1 ACK: 0")
    metrics.decision("block")
    metrics.decision("ignored")
    metrics.decision("ignored")
    metrics.ban("nftables")
    metrics.unban("ban expired")
    metrics.set_active("nftables", 3)
    metrics.set_state("trigger_ring", 17)
    metrics.capture_drops(5)
    metrics.action("route", 0.2, ok=True)
    metrics.action("route", 1.5, ok=False)

    after = scrape(server)
    assert after[("portsentry_probes_total", (("kind", "syn"), ("mode", "stcp")))] == 2
    assert after[("portsentry_probes_total", (("kind", "udp"), ("mode", "sudp")))] == 1
    assert after[("portsentry_probes_total", (("kind", "other"), ("mode", "stcp")))] == 1
    assert after[("portsentry_decisions_total", (("decision", "block"),))] == 1
    assert after[("portsentry_decisions_total", (("decision", "ignored"),))] == 2
    assert after[("portsentry_bans_total", ())] == 1
    assert after[("portsentry_unbans_total", (("reason", "expired"),))] == 1
    assert after[("portsentry_bans_active", (("backend", "nftables"),))] == 3
    assert after[("portsentry_state_entries", (("table", "trigger_ring"),))] == 17
    assert after[("portsentry_capture_drops_total", ())] == 5
    assert after[("portsentry_action_failures_total", (("step", "route"),))] == 1
    assert after[("portsentry_action_seconds_count", (("step", "route"),))] == 2
    assert after[("portsentry_action_seconds_sum", (("step", "route"),))] == pytest.approx(1.7)
    assert after[("portsentry_action_seconds_bucket", (("le", "0.25"), ("step", "route")))] == 1
    assert after[("portsentry_action_seconds_bucket", (("le", "2.5"), ("step", "route")))] == 2

    metrics.set_active("nftables", 1)
    assert scrape(server)[("portsentry_bans_active", (("backend", "nftables"),))] == 1


def test_capture_drops_adds_only_growth_and_survives_a_reset() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def drops() -> float | None:
        return registry.get_sample_value("portsentry_capture_drops_total")

    metrics.capture_drops(4)
    metrics.capture_drops(4)
    metrics.capture_drops(10)
    assert drops() == 10
    metrics.capture_drops(3)  # the capture was reopened: its count started again from 0
    assert drops() == 13


def test_packet_drops_per_reason_add_only_growth() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def dropped(reason: str) -> float | None:
        return registry.get_sample_value("portsentry_packets_dropped_total", {"reason": reason})

    metrics.packet_drops({"source multicast": 2, "truncated": 1})
    metrics.packet_drops({"source multicast": 5, "truncated": 1})
    assert dropped("source multicast") == 5 and dropped("truncated") == 1
    metrics.packet_drops({"source multicast": 1})  # sensors re-bound on reload: counts restart
    assert dropped("source multicast") == 6


def test_default_registry_is_private_and_has_process_metrics() -> None:
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" if shared
    first.ban("nftables")
    assert first.registry.get_sample_value("portsentry_bans_total") == 1
    assert second.registry.get_sample_value("portsentry_bans_total") == 0
    names = {family.name for family in first.registry.collect()}
    assert "python_info" in names


def test_serves_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    metrics = Metrics(CollectorRegistry())
    try:
        server = metrics.serve("[::1]:0")
    except MetricsError as error:
        pytest.skip(f"no ::1 here: {error}")
    try:
        metrics.decision("log")
        assert scrape(server)[("portsentry_decisions_total", (("decision", "log"),))] == 1
    finally:
        server.close()


def test_serve_reports_a_busy_port(served: tuple[Metrics, MetricsServer]) -> None:
    _metrics, server = served
    with pytest.raises(MetricsError, match=r"cannot serve metrics on 127\.0\.0\.1:"):
        Metrics(CollectorRegistry()).serve(f"127.0.0.1:{server.port}")


def test_null_metrics_accepts_every_call() -> None:
    null = NullMetrics()
    null.probe("tcp", KIND_FIN)
    null.decision("block")
    null.ban("ipset")
    null.unban("unblock")
    null.set_active("ipset", 1)
    null.set_state("blocked", 1)
    null.capture_drops(1)
    null.action("native", 0.1, ok=False)


def test_kind_labels_are_bounded() -> None:
    assert kind_label(KIND_SYN) == "syn"
    assert kind_label("Unknown Type: TCP Packet Flags: whatever") == "other"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9470", ("127.0.0.1", 9470)),
        ("[::1]:9470", ("::1", 9470)),
        ("localhost:0", ("localhost", 0)),
        (" 0.0.0.0:65535 ", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9470", ":9470", "::1:9470", "[::1]", "host:port", "h:70000", "[]:1", ""])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(MetricsError, match="metrics address"):
        parse_listen(text)


@given(st.text(max_size=40))
def test_parse_listen_never_fails_unexpectedly(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except MetricsError:
        return
    assert host and 0 <= port <= 65535


def _idle_client(server: MetricsServer) -> socket.socket:
    """A client that starts a request and never finishes it (a slowloris)."""
    client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    client.sendall(b"GET /metrics HTTP/1.1\r\n")
    return client


def test_a_client_that_never_finishes_its_request_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each connection held a thread with no time limit: clients that open connections and send
    # nothing piled up threads (and tasks, which KILL_ROUTE's commands need) without bound.
    from portsentry.service import metrics as module

    monkeypatch.setattr(module, "CLIENT_TIMEOUT", 0.2, raising=False)
    server = Metrics(CollectorRegistry()).serve("127.0.0.1:0")
    try:
        with _idle_client(server) as idle:
            assert idle.recv(4096) == b""  # closed by the server; socket.timeout before
        assert ("portsentry_bans_total", ()) in scrape(server)
    finally:
        server.close()


def test_a_scrape_over_the_limit_makes_the_oldest_client_go(monkeypatch: pytest.MonkeyPatch) -> None:
    # A new client over the limit was closed at once: MAX_CLIENTS clients that each send a byte
    # within CLIENT_TIMEOUT (a slowloris, from anywhere METRICS_LISTEN is reachable) held every
    # slot for good, and no scrape was served, 0 of 10 in a run.
    from portsentry.service import metrics as module

    monkeypatch.setattr(module, "MAX_CLIENTS", 2, raising=False)
    monkeypatch.setattr(module, "CLIENT_TIMEOUT", 30.0, raising=False)
    server = Metrics(CollectorRegistry()).serve("127.0.0.1:0")
    held = [_idle_client(server), _idle_client(server)]
    try:
        time.sleep(0.2)  # both have their threads
        for _ in range(3):
            assert ("portsentry_bans_total", ()) in scrape(server)
        assert held[0].recv(4096) == b""  # the oldest made room; socket.timeout before
        held[1].setblocking(False)
        with pytest.raises(BlockingIOError):  # one made room; the next scrapes found it free
            held[1].recv(4096)
    finally:
        for client in held:
            client.close()
        server.close()


def test_unban_reasons_are_a_few_label_values_whatever_the_fleet_size(served):
    # A lift by a fleet peer is "unblocked on HOST (fleet)": as a label value that was one time
    # series per peer (and per peer name ever seen), which a large fleet makes a cardinality problem.
    metrics, server = served
    for reason in ("ban expired", "unblocked by admin", "unblocked by admin on this host only",
                   "unblocked on web-1 (fleet)", "unblocked on web-2 (fleet)", "something new"):
        metrics.unban(reason)
    values = {labels for (name, labels) in scrape(server) if name == "portsentry_unbans_total"}
    assert values == {(("reason", value),) for value in ("expired", "admin", "admin_local", "fleet", "other")}


def test_scrapes_one_after_another_never_make_a_waiting_client_go(monkeypatch: pytest.MonkeyPatch) -> None:
    # A scrape's slot came back after its socket was closed: the scraper, done reading, could
    # come again before that and find every slot taken, and the oldest client was made to go.
    from portsentry.service import metrics as module

    monkeypatch.setattr(module, "MAX_CLIENTS", 2, raising=False)
    monkeypatch.setattr(module, "CLIENT_TIMEOUT", 30.0, raising=False)
    server = Metrics(CollectorRegistry()).serve("127.0.0.1:0")
    waiting = _idle_client(server)
    try:
        time.sleep(0.2)  # it has its thread
        for _ in range(200):
            assert ("portsentry_bans_total", ()) in scrape(server)
        waiting.setblocking(False)
        with pytest.raises(BlockingIOError):  # still connected: nothing to read, no end
            waiting.recv(4096)
    finally:
        waiting.close()
        server.close()
