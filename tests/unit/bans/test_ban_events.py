"""Every ban the lifecycle makes is told to the event log and the metrics, whatever holds it: the
native set, hosts.deny or KILL_ROUTE; with the reason the admin would give (a scan of a port, or
a block by hand) and how many bans of the address came before (docs/events.md)."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path

from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import KIND_CONNECT, KIND_SYN, Mode, Probe
from portsentry.journal.events import EventLog
from portsentry.journal.telemetry import NullMetrics, Telemetry
from portsentry.responders.classic import ClassicResponder
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult
from tests.unit.bans.test_lifecycle import Kernel
from tests.unit.journal.test_events import assert_valid

A = ip_address("198.18.0.2")
B = ip_address("198.18.0.3")


class Counted(NullMetrics):
    def __init__(self) -> None:
        self.bans: list[str] = []

    def ban(self, backend: str) -> None:
        self.bans.append(backend)


def lifecycle(tmp_path: Path, kernel: Kernel | None, route_ok: bool = True,
              ) -> tuple[BanManager, ClassicResponder, Path, Counted]:
    def run(command: str, timeout: float) -> CommandResult:
        return CommandResult(command, 0 if route_ok else 1, False, "", 0.0)

    path, metrics = tmp_path / "events.jsonl", Counted()
    telemetry = Telemetry(EventLog(str(path)), metrics)
    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=60), list[str]().append, runner=run, telemetry=telemetry)
    responder = ClassicResponder(bans.hosts_deny, list[str]().append, 1.0, runner=run, clock=lambda: 100.0,
                                 telemetry=telemetry)
    return bans, responder, path, metrics


def ban_events(path: Path) -> list[dict[str, object]]:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for event in events:
        assert_valid(event)
    return [event for event in events if event["event"] == "ban"]


CLASSIC = (Step(StepKind.HOSTS_DENY, "ALL: $TARGET$"), Step(StepKind.ROUTE, "route $TARGET$"))


def test_a_ban_held_by_hosts_deny_and_kill_route_alone_is_an_event_and_counted(tmp_path):
    bans, responder, path, metrics = lifecycle(tmp_path, kernel=None)
    scan = Probe(source=A, port=79, mode=Mode.TCP, kind=KIND_CONNECT)
    assert bans.enforce(Block(scan, CLASSIC), responder, now=100.0)
    (event,) = ban_events(path)
    assert (event["src"], event["backend"], event["duration"], event["reason"], event["count"]) == (
        "198.18.0.2", "hosts_deny", 60, "scan: 79/tcp", 0)
    assert metrics.bans == ["hosts_deny"]


def test_the_event_names_what_holds_the_ban(tmp_path):
    bans, responder, path, _metrics = lifecycle(tmp_path, kernel=None)
    scan = Probe(source=A, port=79, mode=Mode.TCP, kind=KIND_CONNECT)
    assert bans.enforce(Block(scan, (Step(StepKind.ROUTE, "route $TARGET$"),)), responder, now=100.0)
    assert [event["backend"] for event in ban_events(path)] == ["route"]


def test_a_block_by_hand_is_not_called_a_scan_and_counts_earlier_bans(tmp_path):
    bans, responder, path, metrics = lifecycle(tmp_path, kernel=Kernel())
    manual = Probe(source=B, port=0, mode=Mode.TCP, kind="manual block")
    native = (Step(StepKind.NATIVE, ""),)
    assert bans.enforce(Block(manual, native), responder, 3600.0, now=100.0)
    assert bans.lift(B, 200.0, "unblocked by admin")
    assert bans.enforce(Block(manual, native), responder, None, now=300.0)
    scan = Probe(source=A, port=22, mode=Mode.STCP, kind=KIND_SYN)
    assert bans.enforce(Block(scan, native), responder, now=400.0)
    assert [(e["src"], e["backend"], e["duration"], e["reason"], e["count"]) for e in ban_events(path)] == [
        ("198.18.0.3", "fake", 3600, "manual block", 0),
        ("198.18.0.3", "fake", None, "manual block", 1),
        ("198.18.0.2", "fake", 60, "scan: 22/tcp", 0),
    ]
    assert metrics.bans == ["fake", "fake", "fake"]


def test_a_ban_no_step_could_make_is_no_ban_event(tmp_path):
    bans, responder, path, metrics = lifecycle(tmp_path, kernel=None, route_ok=False)
    scan = Probe(source=A, port=79, mode=Mode.TCP, kind=KIND_CONNECT)
    assert not bans.enforce(Block(scan, (Step(StepKind.ROUTE, "route $TARGET$"),)), responder, now=100.0)
    assert ban_events(path) == [] and metrics.bans == []


def test_the_ban_and_unban_lines_of_docs_events_md_are_what_a_ban_and_its_expiry_write(tmp_path):
    # docs/events.md's example lines are what a SIEM rule is written from: they must have the
    # fields and the reasons a real ban and its expiry write.
    import re

    bans, responder, path, _metrics = lifecycle(tmp_path, kernel=Kernel())
    scan = Probe(source=A, port=31337, mode=Mode.STCP, kind=KIND_SYN)
    assert bans.enforce(Block(scan, (Step(StepKind.NATIVE, ""),)), responder, 3600.0, now=1000.0)
    bans.expire(1000.0 + 7200)
    bans.telemetry.close()
    written = {event["event"]: event for event in map(json.loads, path.read_text().splitlines())}
    page = (Path(__file__).resolve().parents[3] / "docs" / "events.md").read_text()
    documented = {event["event"]: event for event in map(json.loads, re.findall(r"^(\{.*\})$", page, re.M))}
    for name in ("ban", "unban"):
        assert set(documented[name]) == set(written[name]), name
        assert documented[name]["reason"] == written[name]["reason"], name


def test_a_fleet_peers_ban_names_what_holds_it_here_as_a_local_ban_does(tmp_path):
    # With no BAN_BACKEND (the default), a local ban's event names hosts.deny; a peer's ban, held
    # here by the same hosts.deny line, said backend "none", a value docs/events.md does not have.
    from portsentry.bans.adopt import RemoteBan, adopt_bans

    bans, _responder, path, metrics = lifecycle(tmp_path, kernel=None)
    assert bans.enforce(Block(Probe(source=A, port=79, mode=Mode.TCP, kind=KIND_CONNECT),
                              (Step(StepKind.HOSTS_DENY, "ALL: $TARGET$"),)), _responder, now=100.0)
    assert bans.lift(A, 150.0, "unblocked by admin")
    adopt_bans(bans, [RemoteBan(A, None, "h2", "fleet: scan")], 200.0, hosts_deny="ALL: $TARGET$")
    adopt_bans(bans, [RemoteBan(B, None, "h2", "fleet: scan")], 200.0)  # nothing here holds it
    assert [(e["src"], e["backend"], e["reason"], e.get("count")) for e in ban_events(path)] == [
        ("198.18.0.2", "hosts_deny", "scan: 79/tcp", 0),
        ("198.18.0.2", "hosts_deny", "fleet", 1),
        ("198.18.0.3", "none", "fleet", 0),
    ]
    assert metrics.bans == ["hosts_deny", "hosts_deny", "none"]
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.2\n"


def test_a_hosts_deny_that_refuses_a_fleet_peers_ban_line_is_said_and_the_ban_is_made(tmp_path):
    # HostsDenyError (a world-writable file, the lock held past its timeout, the file made
    # read-only by fail2ban's rename under the hardened unit) escaped adopt_bans after the store had
    # the ban: the reader logged an internal error and read the batch again, which then found the
    # ban held and never wrote its line nor its event.
    from portsentry.bans.adopt import RemoteBan, adopt_bans

    bans, _responder, path, _metrics = lifecycle(tmp_path, kernel=None)
    lines: list[str] = []
    bans.log = lines.append
    deny = tmp_path / "hosts.deny"
    deny.write_text("")
    deny.chmod(0o666)
    made = adopt_bans(bans, [RemoteBan(A, None, "h2", "fleet: scan")], 200.0, hosts_deny="ALL: $TARGET$")
    assert [ban.address for ban in made] == [A]
    assert any("cannot add 1 lines to" in line and "world-writable" in line for line in lines)
    assert [(e["src"], e["backend"]) for e in ban_events(path)] == [("198.18.0.2", "none")]
