"""The probe path of the fast lane's reports, on the main loop (part of Daemon, service.daemon).

A report (sensors.lane.Act) is a probe whose detection line the lane has written and whose block
it has begun (its record, and KILL_ROUTE's shell). The engine decides it as any other probe
(Engine.observe with `made`); when it blocks, the block goes on with the lane's shell as its ROUTE
step (core.actions.Started), the detection line is given to every sink but syslog, and the rest
is what any block gets. When it does not (its tables were a moment behind a change), that is
said and the shell is seen through on a worker (service.lane.LaneKeeper.disagreed_with).
"""

from __future__ import annotations

import dataclasses

from portsentry.core import messages
from portsentry.core.actions import Action, Block, Decision
from portsentry.sensors.base import Hit
from portsentry.service.daemon_state import DaemonState


class LanePath(DaemonState):
    def _adopt(self, hit: Hit) -> None:
        act = hit.lane
        assert act is not None
        now = act.at  # the lane's decision: the ban, its record and its lines carry this time
        self.counters.probe(now)
        self._ignore_now(self.clock())
        probe = hit.probe
        outcome = self.engine.observe(probe, now, made=True)
        block = next((a for a in outcome.actions if isinstance(a, Block)), None)
        actions: list[Action] = list(outcome.actions)
        if outcome.decision is not Decision.BLOCK or block is None:
            why = outcome.decision.value + (f": {outcome.reason}" if outcome.reason else "")
            self.lane.disagreed_with(act, why, self._late.submit)
        elif not self.lane.route_agrees(act, block):
            # The block goes on with KILL_ROUTE as it reads now; the lane's shell is seen through.
            self.lane.disagreed_with(act, "KILL_ROUTE changed meanwhile", self._late.submit)
        else:
            started = dataclasses.replace(block, started=self.lane.started(act))
            actions = [started if action is block else action for action in actions]
        fields: dict[str, object] = {
            "PORTSENTRY_EVENT": outcome.decision.value, "PORTSENTRY_SRC": probe.source,
            "PORTSENTRY_PORT": probe.port, "PORTSENTRY_MODE": probe.mode.value,
            "PORTSENTRY_KIND": probe.kind,
        }
        self.perform(actions, hit, fields, sent=messages.detection(probe) if act.sent else None)
        self.telemetry.probe(probe, outcome.decision, outcome.reason, now, outcome.count)
        self.hits.add(probe, outcome.decision, outcome.reason, now)

    def _lane_block_over(self, block: Block, abandoned: bool = False) -> None:
        """A block is over; if the fast lane began it, its count. `abandoned`: it never reached a
        worker (the block queue was full), so the lane's shell is seen through here."""
        if block.started is None:
            return
        if abandoned:
            self.lane.abandoned(block, self._late.submit)
        self.lane.block_done(block.started.line)

    def _stop_lane(self) -> None:
        """Before the sensors close (a reload, the stop): what the lane had queued is taken in,
        so a ban it began is recorded and completed now, not at the next start."""
        sensor = self.lane.sensor
        if sensor is None:
            return
        for hit in sensor.stop_lane():
            self._guarded(self.handle, hit)
        self.lane.unbind()

    def _lane_compile(self) -> None:
        """Start, reload, tick: the lane's tables as of now."""
        self.lane.compile(self.sensors, self.config, self.engine, self.journal, self.ignore,
                          self._protected, self.clock())
