"""The stealth sensor's capture with the fast lane in front (sensors/lane.c through
sensors.lane): the lane's C thread reads the AF_PACKET socket; the main loop reads the lane's
channel here, packets and the lane's reports (`Act`) in the order the lane saw them, and tells
the lane what it has decided (`handled`). Filters and counts stay the AF_PACKET socket's.
Everything here runs on the main loop; stop() and close() also at a reload and the stop.
"""

from __future__ import annotations

import os
import select
from collections.abc import Collection

from portsentry.core.probe import Protocol as ProbeProtocol
from portsentry.sensors.capture import CaptureSocket, Network
from portsentry.sensors.lane import ACT, BATCH_BYTES, BATCH_ENTRY, PACKET_HEAD, STOP_POLL, Act, Lane


class LaneCapture:
    """The stealth sensor's capture with the lane in front: the AF_PACKET socket's filters and
    counts as before, its packets (and the lane's reports) read from the lane's channel."""

    before_nat = True

    def __init__(self, capture: CaptureSocket, lane: Lane) -> None:
        self.capture = capture
        self.lane = lane
        self._channel = lane.start(capture.fileno())
        self.last_seq = 0  # of the newest packet handed out; the daemon marks it processed
        self.unreadable = 0  # channel messages of neither kind (a bug: status shows the count)
        self._buffer = bytearray(BATCH_BYTES + PACKET_HEAD.size)  # the largest message, 'M'

    def fileno(self) -> int:
        return self._channel.fileno()

    def read_items(self, limit: int = 256) -> list[bytes | Act]:
        """Up to `limit` packets and reports, in the order the lane saw them."""
        items: list[bytes | Act] = []
        recv_into, buffer = self._channel.recv_into, self._buffer
        try:
            while len(items) < limit:
                size = recv_into(buffer)
                if not size:
                    break
                kind = buffer[0]
                if kind == ord("A") and size == ACT.size:
                    act = Act.unpack(bytes(buffer[:size]))
                    self.last_seq = act.seq
                    items.append(act)
                elif kind == ord("P") and size >= PACKET_HEAD.size:
                    self.last_seq = PACKET_HEAD.unpack_from(buffer)[1]
                    items.append(bytes(buffer[PACKET_HEAD.size:size]))
                elif kind == ord("M") and size >= PACKET_HEAD.size:
                    self._unbatch(memoryview(buffer)[:size], items)
                else:
                    self.unreadable += 1
        except BlockingIOError:
            pass
        return items

    def _unbatch(self, data: memoryview, items: list[bytes | Act]) -> None:
        """Packets of known sources the lane sent together, each with its seq."""
        count = PACKET_HEAD.unpack_from(data)[1]
        at = PACKET_HEAD.size
        for _ in range(count):
            if at + BATCH_ENTRY.size > len(data):
                self.unreadable += 1
                return
            seq, length = BATCH_ENTRY.unpack_from(data, at)
            at += BATCH_ENTRY.size
            items.append(bytes(data[at:at + length]))
            at += length
            self.last_seq = seq

    def read_batch(self, limit: int = 256) -> list[bytes]:
        return [item for item in self.read_items(limit) if isinstance(item, bytes)]

    def handled(self) -> None:
        """The daemon has decided everything read so far: the lane may act again."""
        self.lane.processed(self.last_seq)

    def stop(self) -> list[bytes | Act]:
        """Stop the thread and return what it had queued: reports of bans it began are the
        daemon's to take in before this capture goes (a reload, the stop)."""
        # Read while it stops: it may be waiting for room on a channel a burst filled, and
        # waiting for it alone then waited for ever.
        self.lane.stop_request()
        items: list[bytes | Act] = []
        while not self.lane.stopped():
            if batch := self.read_items():
                items.extend(batch)
            else:
                select.select([self._channel], [], [], STOP_POLL)
        while batch := self.read_items():
            items.extend(batch)
        return items

    def drops(self) -> int:
        return self.capture.drops()

    def quiet_udp(self, ports: frozenset[int]) -> None:
        self.capture.quiet_udp(ports)

    def live_ports(self, live: dict[ProbeProtocol, frozenset[int]]) -> None:
        self.capture.live_ports(live)

    def skip_sources(self, networks: Collection[Network]) -> None:
        self.capture.skip_sources(networks)

    def skip_interfaces(self, indexes: frozenset[int]) -> None:
        self.capture.skip_interfaces(indexes)

    def close(self) -> None:
        # Reports nobody took in (stop() was not called): their bans stay in the lane's record
        # file for the next start; their shells' pipes are closed here.
        for item in self.stop():
            if isinstance(item, Act) and item.pipe >= 0:
                os.close(item.pipe)
        self.lane.close()
        self.capture.close()
