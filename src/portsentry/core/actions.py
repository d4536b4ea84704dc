"""What the engine asks the daemon to do: typed records, so the engine itself never touches I/O."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from portsentry.core.probe import Probe


@dataclass(frozen=True, slots=True)
class Log:
    """A journal line (syslog, and stderr when asked). Verbose lines appear only with -v."""

    text: str
    verbose: bool = False


@dataclass(frozen=True, slots=True)
class SendBanner:
    """Connect modes: write PORT_BANNER to the client that tripped the sensor."""

    text: str


class StepKind(enum.StrEnum):
    NATIVE = "native"  # the nftables/ipset/route ban backend; template unused
    HOSTS_DENY = "hosts_deny"
    ROUTE = "route"
    RUN_CMD = "run_cmd"


@dataclass(frozen=True, slots=True)
class Step:
    """One blocking step; `template` still holds the $TARGET$/$PORT$/$MODE$ tokens."""

    kind: StepKind
    template: str


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Started:
    """A block the fast lane (sensors.lane) began before the engine saw its probe: the detection
    line is written and, with `pid` >= 0, KILL_ROUTE's shell is running (output on `pipe`, started
    at `at`, time.monotonic()). The ROUTE step waits for that shell instead of starting one, and
    calls `reaped` once it has."""

    pid: int = -1
    pipe: int = -1
    at: float = 0.0
    reaped: Callable[[], None] = _nothing
    line: int = -1  # the lane's line in its record file, freed when the block is over


@dataclass(frozen=True, slots=True)
class Block:
    """Carry out `steps` in order for the probe's source, then report back with Engine.finished()."""

    probe: Probe
    steps: tuple[Step, ...]
    started: Started | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """The host counts as blocked for this mode: write the history line and the blocked-file line.
    `blocked`: a step did block it; 1.2 records a host it only logged (BLOCK_x=0, or no step to
    run) the same way, and `status` must not count that as a host blocked."""

    probe: Probe
    at: float
    blocked: bool = True


Action = Log | SendBanner | Block | Record


class Decision(enum.StrEnum):
    """What the engine made of one probe (the event log's and the metrics' `decision`)."""

    IGNORED = "ignored"  # the source is on the ignore list
    BELOW_TRIGGER = "below_trigger"  # counted, SCAN_TRIGGER not reached yet
    ALREADY_BLOCKED = "already_blocked"  # banned already, or its block is under way
    REFUSED = "refused"  # detected, but a guard kept it from blocking (see the reason)
    BLOCK = "block"  # detected; blocking steps were started
    LOG = "log"  # detected and recorded; blocking is off for this protocol


@dataclass(frozen=True, slots=True)
class Outcome:
    """Engine.observe's answer: the actions to carry out, the decision, why a block was refused,
    and, below SCAN_TRIGGER, the source's hits so far in this mode (the event log's `count`)."""

    actions: list[Action]
    decision: Decision
    reason: str | None = None
    count: int | None = None
