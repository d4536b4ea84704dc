"""A capture with the fast lane in front, closed while the lane's reports wait (a reload, the stop):
the reports are handed over, not dropped (their bans would otherwise wait for the next start)."""

from __future__ import annotations

import socket
import time
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from portsentry.core.probe import Mode
from portsentry.sensors.lane import MODE_CODES, Act, Lane
from portsentry.sensors.lane_capture import LaneCapture
from portsentry.sensors.stealth import StealthSensor
from tests.unit.sensors.lane_rig import Pair, syn


def acting_lane(tmp_path: Path) -> tuple[Pair, LaneCapture, socket.socket]:
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(tmp_path / "log"))
    pair = Pair()
    lane = Lane()
    capture = LaneCapture(pair, lane)  # type: ignore[arg-type]
    ports = bytearray(65536)
    ports[80] = MODE_CODES[Mode.ATCP]
    lane.set_ports(bytes(ports))
    lane.set_local([ip_address("198.18.0.1")])
    lane.set_deny([ip_network("127.0.0.0/8")])
    lane.set_syslog(str(tmp_path / "log"), "<29>", " portsentry[1]: ")
    lane.set_record(-1)  # no record file: the lane acts without a shell
    lane.set_route(None)
    lane.allow(0, 10)
    lane.enable(True)
    return pair, capture, log


def test_stop_hands_over_the_reports_and_packets_queued(tmp_path: Path) -> None:
    pair, capture, log = acting_lane(tmp_path)
    record = (tmp_path / "record").open("w+b")
    capture.lane.set_record(record.fileno())
    try:
        pair.theirs.send(syn("198.18.0.10", "198.18.0.1", 80))  # acted on
        pair.theirs.send(syn("198.18.0.10", "198.18.0.1", 81))  # handed on: its source is pinned now
        time.sleep(0.2)  # the lane has read both
        items = capture.stop()
        kinds = [type(item).__name__ for item in items]
        assert kinds == ["Act", "bytes"]
        act: Any = items[0]
        assert isinstance(act, Act) and act.source == ip_address("198.18.0.10") and act.port == 80
        assert capture.stop() == []  # nothing twice
    finally:
        capture.close()
        record.close()
        log.close()


def test_the_stealth_sensor_turns_the_queued_report_into_a_hit_for_the_daemon(tmp_path: Path) -> None:
    pair, capture, log = acting_lane(tmp_path)
    record = (tmp_path / "record").open("w+b")
    capture.lane.set_record(record.fileno())
    sensor = StealthSensor.__new__(StealthSensor)
    sensor._capture = capture
    sensor._clock = time.time
    try:
        pair.theirs.send(syn("198.18.0.10", "198.18.0.1", 80))
        time.sleep(0.2)
        hits = sensor.stop_lane()
        assert len(hits) == 1 and hits[0].lane is not None
        assert hits[0].probe.source == ip_address("198.18.0.10") and hits[0].probe.mode is Mode.ATCP
    finally:
        capture.close()
        record.close()
        log.close()


def test_a_full_channel_neither_holds_the_setters_nor_the_stop(tmp_path: Path) -> None:
    """The main loop behind (not reading): the lane waits for room, but a setter the main loop
    calls meanwhile, and the stop, return at once (the lane held its lock while it waited, and
    the stop joined a thread blocked in send)."""
    import threading

    pair, capture, log = acting_lane(tmp_path)
    lane = capture.lane
    lane.enable(False)  # every packet handed on
    assert lane._writer is not None and lane.channel is not None
    lane._writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    lane.channel.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pair.theirs.setblocking(False)
    sent = 0
    done = threading.Event()
    try:
        for _ in range(2000):
            try:
                pair.theirs.send(syn("198.18.0.10", "198.18.0.1", 80))
                sent += 1
            except BlockingIOError:
                break
        time.sleep(0.3)  # the lane has filled the channel and waits

        def setter_then_stop() -> None:
            lane.pin(ip_address("198.18.0.99"))
            capture.stop()
            done.set()

        worker = threading.Thread(target=setter_then_stop, daemon=True)
        worker.start()
        assert done.wait(5), "the lane held its lock, or the stop, while the channel was full"
        assert sent > 100
    finally:
        if done.is_set():  # else the close would hang as the stop did: the assert above says why
            capture.close()
        log.close()


def test_the_pins_of_a_whole_network_spread_over_the_table() -> None:
    """Bans of sequential addresses (a /16 scanned from a botnet's range, IPv6 from one /64):
    the hash left an IPv4 key's last octet out of the table's index, so 256 addresses shared a
    slot, probes walked long runs, and a million pins took 13 s."""
    lane = Lane()
    try:
        lane.pin_many(ip_address(f"198.18.{i >> 8}.{i & 255}").packed for i in range(65536))
        lane.pin_many((ip_address("fd00::") + i).packed for i in range(65536))
        assert lane.pin_count() == 131072
        # With a good hash at most 3/4 full the longest run is tens of slots; the old one had
        # runs of thousands.
        assert lane.longest_run() < 200
    finally:
        lane.close()


def test_a_channel_message_of_no_known_kind_is_counted(tmp_path: Path) -> None:
    _pair, capture, log = acting_lane(tmp_path)
    try:
        assert capture.lane._writer is not None
        capture.lane._writer.send(b"Z" + bytes(15))
        time.sleep(0.05)
        assert capture.read_items() == [] and capture.unreadable == 1
        assert capture.lane.errors() == 0
    finally:
        capture.close()
        log.close()
