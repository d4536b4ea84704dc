"""The stealth sensor's AF_PACKET capture, and the fast lane put in front of it.

`open_packet_capture` is the socket with its BPF filter; `lane_capture` wraps an opener so that
the capture it opens is read by the fast lane's C thread (sensors/lane.c) when TCP is watched,
or says why not (status: "fast lane: off: ...").
"""

from __future__ import annotations

from collections.abc import Callable

from portsentry.core.probe import Protocol
from portsentry.sensors.bpf import Insn, build_probe_filter
from portsentry.sensors.capture import Capture, CaptureSocket, Network
from portsentry.sensors.lane import Lane, LaneUnavailable
from portsentry.sensors.lane_capture import LaneCapture

Logger = Callable[[str], None]
CaptureOpener = Callable[[int | None, set[Protocol]], Capture]


def lane_capture(log: Logger, opener: CaptureOpener) -> CaptureOpener:
    """`opener`'s capture with the fast lane in front when it is AF_PACKET and TCP is watched
    (FAST_LANE="auto"); where the compiled lane cannot run, the plain capture, and why said."""

    def open_capture(max_port: int | None, protocols: set[Protocol]) -> Capture:
        capture = opener(max_port, protocols)
        if Protocol.TCP not in protocols or not isinstance(capture, CaptureSocket):
            return capture
        try:
            return LaneCapture(capture, Lane())
        except LaneUnavailable as error:
            log(f"adminalert: WARNING: fast lane unavailable ({error}); every probe goes through "
                "the daemon")
            capture.lane_unavailable = str(error)
            return capture

    return open_capture


def open_packet_capture(max_port: int | None, protocols: set[Protocol]) -> CaptureSocket:
    """The AF_PACKET capture: BPF-filtered probes, plus our own outgoing UDP when UDP is watched."""
    udp = Protocol.UDP in protocols

    def builder(ports: frozenset[int], sources: tuple[Network, ...],
                interfaces: frozenset[int]) -> list[Insn]:
        return build_probe_filter(protocols, max_port=max_port, outgoing_udp=udp, quiet_udp_ports=ports,
                                  skip_sources=sources, skip_interfaces=interfaces)

    return CaptureSocket(build_probe_filter(protocols, max_port=max_port, outgoing_udp=udp),
                         ignore_outgoing=not udp, builder=builder)
