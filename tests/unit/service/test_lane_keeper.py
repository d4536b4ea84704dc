"""The keeper (service.lane) with the real C lane (sensors/lane.c over a socket pair, as
tests/unit/sensors/lane_rig.py): what the daemon does around the lane's life, with no stand-in
that would hide a call into C."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import engine_settings
from portsentry.core.actions import Block
from portsentry.core.engine import Engine
from portsentry.core.probe import KIND_CONNECT, KIND_SYN, Mode, Probe
from portsentry.responders.shell import wait_shell
from portsentry.sensors.lane import Act
from portsentry.service.lane import LaneKeeper
from tests.unit.sensors.lane_rig import HERE4, SCANNER4, Rig, syn
from tests.unit.service.test_lane import config, fake_sensor, lane_of_fake, syslog_journal

__all__ = ["lane_of_fake"]  # the fixture that lets fake_sensor carry the real lane


def keeper_on(tmp_path: Path, rig: Rig, route: str, **changes: Any) -> tuple[LaneKeeper, Engine, Any]:
    conf = config(state_dir=str(tmp_path), kill_route=route, **changes)
    engine = Engine(engine_settings(conf), frozenset())
    sensor = fake_sensor(rig.lane)  # type: ignore[arg-type]
    keeper = LaneKeeper(lambda _line: None, str(tmp_path))
    keeper.compile([sensor], conf, engine, syslog_journal(tmp_path), IgnoreSource(None, lambda: []),
                   frozenset(), 1000.0)
    assert keeper.reason is None, keeper.reason
    return keeper, engine, sensor


def in_child(work: Any) -> int:
    """`work` in a forked child (a crash there fails the test instead of ending the run); its
    exit status as os.waitstatus_to_exitcode gives it (-SIGSEGV for a crash)."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        except BaseException:
            os._exit(3)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_lane_block_that_ends_after_its_lane_closed_does_not_crash_the_daemon(tmp_path: Path) -> None:
    # A reload that rebinds the sensors, or the stop, closes the capture and frees its lane
    # while the blocks it began still run on the workers: each one then reports to it (the
    # shell reaped, the record settled, the source let go of or pinned).
    rig = Rig(tmp_path)
    out = tmp_path / "route.out"
    keeper, engine, _sensor = keeper_on(tmp_path, rig, f"sleep 0.2; echo $TARGET$ >> {out}")
    try:
        rig.send(syn(SCANNER4, HERE4, 80))
        [item] = rig.items()
        assert isinstance(item, Act) and item.pid >= 0
        started = keeper.started(item)
        probe = Probe(item.source, item.port, item.mode, KIND_SYN, item.destination)
        outcome = engine.observe(probe, item.at, made=True)
        block = next(a for a in outcome.actions if isinstance(a, Block))
        rig.capture.stop()
        rig.capture.close()  # what StealthSensor.close does, before the block is over
        result = wait_shell("KILL_ROUTE", started.pid, started.pipe, started.at, 10.0)  # the worker
        assert result.ok and out.read_text() == f"{SCANNER4}\n"

        def block_ends() -> None:
            started.reaped()  # the worker, done with the lane's shell
            keeper.block_done(started.line)  # the main loop, told the block is over
            engine.finished(block, False, 1001.0)  # failed: its source let go of
            engine.apply_ban_changes([(SCANNER4, True)])  # a ban made meanwhile: held

        status = in_child(block_ends)
        assert status == 0, f"the daemon died ({signal.Signals(-status).name if status < 0 else status})"
    finally:
        keeper.close()
        rig.log.close()
        os.close(rig.record)
        rig.pair.close()


def test_a_resync_never_lets_the_lane_act_for_a_source_the_engine_holds(tmp_path: Path) -> None:
    # The ban store's feed was pruned past the daemon's cursor: the engine takes the whole set
    # of bans again (sync_bans) and the lane is pinned to it anew. With a million bans that
    # takes a while; a banned source's SYN meanwhile must go to the daemon, which says "already
    # blocked", not get a second detection line and KILL_ROUTE from the lane.
    rig = Rig(tmp_path)
    out = tmp_path / "route.out"
    keeper, engine, _sensor = keeper_on(tmp_path, rig, f"echo $TARGET$ >> {out}")
    try:
        engine.sync_bans([SCANNER4.packed])
        assert rig.lane.pinned(SCANNER4)
        seen: list[bytes | Act] = []
        held = engine.held

        def held_while_a_banned_source_scans() -> Any:
            for packed in held():
                if not seen:
                    rig.send(syn(SCANNER4, HERE4, 80))
                    seen.extend(rig.items())
                yield packed

        engine.held = held_while_a_banned_source_scans  # type: ignore[method-assign]
        engine.sync_bans([SCANNER4.packed, ip_address("198.18.0.11").packed])
        assert len(seen) == 1 and isinstance(seen[0], bytes), seen  # handed on, not acted on
        assert rig.lane.pinned(SCANNER4) and rig.lane.pinned(ip_address("198.18.0.11"))
        rig.capture.handled()
        rig.send(syn(ip_address("198.18.0.12"), HERE4, 80))
        [item] = rig.items()
        assert isinstance(item, Act)  # on again once pinned
    finally:
        keeper.close()
        rig.close()


def test_the_record_is_emptied_once_the_blocks_of_a_stopped_lane_are_over(tmp_path: Path) -> None:
    # The stop (and a reload that rebinds) takes in the lane's reports and frees the lane while
    # their blocks still run. Once they are over and recorded, the record must be empty: lines
    # left there are replayed at the next start, and a ban lifted meanwhile (`unblock` while the
    # daemon was down) came back "recorded now".
    rig = Rig(tmp_path)
    keeper, _engine, _sensor = keeper_on(tmp_path, rig, f"echo $TARGET$ >> {tmp_path / 'route.out'}")
    record = Path(keeper.path)
    try:
        rig.send(syn(SCANNER4, HERE4, 80))
        [item] = rig.items()
        assert isinstance(item, Act)
        started = keeper.started(item)
        assert record.read_bytes().decode().split()[2] == str(SCANNER4)
        keeper.unbind()  # Daemon._stop_lane, its reports taken in
        rig.capture.close()
        wait_shell("KILL_ROUTE", started.pid, started.pipe, started.at, 10.0)
        started.reaped()
        keeper.block_done(started.line)  # recorded
        assert record.read_bytes().strip(b"\0") == b""
    finally:
        keeper.close()
        rig.log.close()
        os.close(rig.record)
        rig.pair.close()


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[tuple[Rig, LaneKeeper, Engine]]:
    """The lane on with BAN_RATE_LIMIT=1 (its share set at 1000.0: the minute's one ban)."""
    rig = Rig(tmp_path)
    keeper, engine, _sensor = keeper_on(tmp_path, rig, f"echo $TARGET$ >> {tmp_path / 'route.out'}",
                                        ban_rate_limit=1)
    try:
        yield rig, keeper, engine
    finally:
        keeper.close()
        rig.close()


def connect_banned(engine: Engine, at: float) -> bool:
    """Whether a connect-mode hit from a fresh source (-tcp beside -stcp) starts a ban at `at`."""
    probe = Probe(ip_address("198.18.0.20"), 1080, Mode.TCP, KIND_CONNECT, HERE4)
    return any(isinstance(a, Block) for a in engine.observe(probe, at).actions)


def lane_ban(rig: Rig) -> Act:
    """The scanner's SYN, banned by the lane (its report)."""
    rig.send(syn(SCANNER4, HERE4, 80))
    [item] = rig.items()
    assert isinstance(item, Act)
    return item


def test_a_connect_mode_ban_takes_its_slot_of_the_rate_cap_from_the_lane_at_once(
        capped: tuple[Rig, LaneKeeper, Engine]) -> None:
    # BAN_RATE_LIMIT=1 with -tcp beside -stcp: the lane was given the minute's one free ban.
    # A connect-mode ban then takes it; a SYN from another scanner before the next stealth read
    # or tick (when the lane's share is set again) must not make a second ban in the minute.
    rig, _keeper, engine = capped
    assert connect_banned(engine, 1000.5)
    rig.send(syn(SCANNER4, HERE4, 80))
    [item] = rig.items()
    assert isinstance(item, bytes), "the lane made a second ban in a minute capped at one"
    # Handed on, the daemon refuses it: the cap holds on both paths.
    probe = Probe(SCANNER4, 80, Mode.STCP, KIND_SYN, HERE4)
    assert not any(isinstance(a, Block) for a in engine.observe(probe, 1000.6).actions)


def test_a_connect_mode_ban_is_refused_when_the_lane_used_the_last_slot_unreported(
        capped: tuple[Rig, LaneKeeper, Engine]) -> None:
    # The other way round: the lane made the minute's one ban and its report is not taken in
    # yet (the guard's window does not hold it): a connect-mode ban meanwhile is over the cap.
    rig, _keeper, engine = capped
    lane_ban(rig)
    assert not connect_banned(engine, 1000.5)


def test_a_slot_the_minute_freed_is_the_daemons_before_the_next_tick(
        capped: tuple[Rig, LaneKeeper, Engine]) -> None:
    # The lane's share is set at each stealth read and tick; a slot the window let go of since
    # then is free, and a connect-mode ban must get it, not be refused as over the cap.
    rig, keeper, engine = capped
    item = lane_ban(rig)
    keeper.started(item)
    probe = Probe(SCANNER4, 80, Mode.STCP, KIND_SYN, HERE4)
    assert any(isinstance(a, Block) for a in engine.observe(probe, 1000.1, made=True).actions)
    keeper.handled(engine, 1000.2)  # the lane's share: none left this minute
    assert connect_banned(engine, 1061.0)
