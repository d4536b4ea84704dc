"""Control requests as the daemon answers them: which thread runs each, the replies, the counters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from portsentry.service.control import Command, Request, Response
from portsentry.service.requests import Counters, MinuteCounts, Requests
from tests.unit.service.daemons import bare_daemon


def test_minute_counts_cover_the_last_hour_in_constant_space() -> None:
    counts = MinuteCounts()
    for second in range(0, 2 * 3600, 2):
        counts.add(float(second))
    # The current minute (empty at exactly 2 h) and the 59 before it: one event every two seconds.
    assert counts.total(2 * 3600.0) == 59 * 30
    assert len(counts._buckets) <= 61


def test_counters_count_all_time_and_the_last_hour() -> None:
    counters = Counters()
    counters.probe(0.0)
    counters.probe(3700.0)
    counters.block(3700.0)
    assert counters.as_dict(3700.0) == {"probes_seen": 2, "probes_last_hour": 1,
                                        "hosts_blocked": 1, "hosts_blocked_last_hour": 1}


class _Rig:
    """A daemon with no sensors and no store, whose main loop and admin pool are two lists."""

    def __init__(self, tmp_path: Path) -> None:
        self.daemon, _said = bare_daemon(tmp_path)
        self.main: list[Callable[[], None]] = []
        self.admin: list[Callable[[], None]] = []
        self.changed = 0
        self.requests = Requests(self.daemon, self.main.append, self.admin.append, self._changed)
        self.replies: list[Response] = []

    def _changed(self) -> None:
        self.changed += 1

    def ask(self, command: Command) -> None:
        self.requests.on_request(Request(command), self.replies.append)


def test_state_is_read_on_the_main_loop_and_ban_work_on_an_admin_worker(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    rig.ask("status")
    rig.ask("stats")
    rig.ask("list")
    assert (len(rig.main), len(rig.admin), rig.replies) == (2, 1, [])  # nothing runs on the caller
    for work in rig.main + rig.admin:
        work()
    status, stats, listed = rig.replies
    assert status.ok and status.fields["status"]["running"] is True
    assert status.fields["status"]["modes"] == ["tcp"]
    assert stats.ok and stats.fields["stats"]["probes_seen"] == 0
    assert not listed.ok and "keeps no ban store" in str(listed.error)
    assert rig.changed == 0  # no store, no ban changed: no maintenance round is woken
    rig.daemon.shutdown()


def test_a_failing_request_is_an_error_reply_not_an_exception(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)

    def broken(now: float) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    rig.requests.status = broken  # type: ignore[method-assign]
    rig.ask("status")
    rig.main[0]()
    assert not rig.replies[0].ok
    assert rig.replies[0].error == "status failed: disk on fire"
    rig.daemon.shutdown()


def test_a_block_through_the_daemon_spares_its_own_addresses_and_gateways(
        tmp_path: Path, monkeypatch: Any) -> None:
    # The control socket's block banned the daemon's own address or gateway when asked to.
    from ipaddress import ip_address

    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import MEMORY, BanStore
    from portsentry.host import info as hostinfo
    from portsentry.responders.hostsdeny import HostsDeny

    monkeypatch.setattr(hostinfo, "local_addresses", lambda: frozenset({ip_address("198.51.100.7")}))
    bans = BanManager(BanStore(MEMORY), None, HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(),
                      lambda _line: None)
    daemon, _said = bare_daemon(tmp_path, bans=bans)
    daemon._protected = frozenset({ip_address("198.51.100.1")})
    rig = _Rig.__new__(_Rig)
    rig.daemon, rig.main, rig.admin, rig.changed, rig.replies = daemon, [], [], 0, []
    rig.requests = Requests(daemon, rig.main.append, rig.admin.append, rig._changed)
    for address in ("198.51.100.7", "198.51.100.1", "198.18.1.5"):
        rig.requests.on_request(Request("block", address=address), rig.replies.append)
    for work in rig.admin:
        work()
    own, gateway, other = rig.replies
    assert not own.ok and "198.51.100.7 is one of this host's addresses: not blocked" in str(own.error)
    assert not gateway.ok and "is a default gateway or DNS resolver" in str(gateway.error)
    # This daemon has no backend and no KILL_ command: an address it need not spare is refused
    # all the same, as nothing here could block it.
    assert not other.ok and "198.18.1.5 not blocked: nothing here blocks" in str(other.error)
    daemon.shutdown()


def test_status_with_a_fleet_answers_while_the_ban_store_is_busy(tmp_path: Path) -> None:
    # `status` is answered on the detection loop. With a fleet, its backlog asked the ban store,
    # whose lock another thread may hold for seconds (a fleet batch of 100,000 bans, a write
    # waiting up to 10 s for `portsentry block --file` in another process): a monitoring check
    # polling `portsentry status` stopped detection and blocking for that long.
    import threading

    from portsentry.fleet.node import FleetNode
    from portsentry.fleet.settings import FleetSettings
    from tests.unit.bans.test_lifecycle import manager

    bans, _kernel, _lines, _commands = manager(tmp_path)
    daemon, _said = bare_daemon(tmp_path, bans=bans)
    daemon.fleet = FleetNode(FleetSettings("redis://unused", "unit", "h1", b"s" * 32), bans, str(tmp_path),
                             lambda _line: None)
    daemon.fleet.published = 0
    holding, release = threading.Event(), threading.Event()

    def long_transaction() -> None:
        with bans.store._lock:
            holding.set()
            release.wait(5)

    busy = threading.Thread(target=long_transaction)
    busy.start()
    try:
        assert holding.wait(5)
        answered: list[dict[str, Any]] = []
        status = threading.Thread(target=lambda: answered.append(daemon.requests.status(1000.0)))
        status.start()
        status.join(1.0)
        assert answered and answered[0]["fleet"]["name"] == "unit"
    finally:
        release.set()
        busy.join(5)
    daemon.shutdown()


def test_hosts_blocked_counts_no_host_a_log_only_config_left_alone(tmp_path: Path) -> None:
    # BLOCK_TCP="0" (log only, the default): 1.2 records the host as if blocked, so its next hits
    # say "already blocked"; `status` said "hosts blocked: 2" beside "active bans: 0".
    from dataclasses import replace
    from ipaddress import ip_address

    from portsentry.config.settings import engine_settings
    from portsentry.core.engine import Engine
    from portsentry.core.probe import KIND_CONNECT, Mode, Probe
    from portsentry.sensors.base import Hit

    for block_tcp in (0, 1):  # BLOCK_TCP="1" with no KILL_* step nor backend: recorded, not blocked
        daemon, _said = bare_daemon(tmp_path)
        daemon.config = replace(daemon.config, block_tcp=block_tcp)
        daemon.engine = Engine(engine_settings(daemon.config), daemon.engine.ignore)
        try:
            for source in ("198.18.0.2", "198.18.1.2"):
                daemon.handle(Hit(Probe(ip_address(source), 79, Mode.TCP, KIND_CONNECT)))
            counts = daemon.counters.as_dict(1000.0)
        finally:
            daemon.shutdown()
        assert (counts["probes_seen"], counts["hosts_blocked"]) == (2, 0), block_tcp


def test_status_says_bans_are_kept_in_memory_when_the_store_cannot_be_opened(tmp_path: Path) -> None:
    # STATE_DIR read-only (or full, or a file): the start said "keeping bans in memory until it can
    # be opened" in syslog once, and `portsentry status` said nothing of it, then or ever: bans a
    # stop would lose, and no sign of it on the screen an admin checks.
    from portsentry.bans.lifecycle import BanManager, BanPolicy, open_store
    from portsentry.responders.hostsdeny import HostsDeny
    from portsentry.service.status import format_status

    (tmp_path / "state").write_text("a file where the state directory should be")
    said: list[str] = []
    path = str(tmp_path / "state" / "bans.sqlite3")
    store, retry, error = open_store(path, said.append)
    bans = BanManager(store, None, HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(), said.append)
    bans.fallback_from, bans.fallback_error = retry, error
    daemon, _said = bare_daemon(tmp_path, bans=bans)
    try:
        state = daemon.requests.status(1000.0)
        assert state["ban_store"] == {"path": path, "in_memory": True, "unsaved": 0,
                                      "error": f"{path}: cannot create the ban store: "
                                               f"{tmp_path / 'state'} is not a directory (STATE_DIR)"}
        text = format_status(state)
        assert (f"ban store:     IN MEMORY ONLY, {path}: cannot create the ban store: {tmp_path / 'state'} "
                "is not a directory (STATE_DIR); "
                "a stop loses the bans made since; written there once it can be opened") in text
    finally:
        daemon.shutdown()


def test_status_names_the_ban_store_and_the_records_waiting_to_be_written(tmp_path: Path) -> None:
    from portsentry.service.status import format_status
    from tests.unit.bans.test_lifecycle import manager

    bans, _kernel, _lines, _commands = manager(tmp_path)
    daemon, _said = bare_daemon(tmp_path, bans=bans)
    try:
        state = daemon.requests.status(1000.0)
        assert state["ban_store"] == {"path": ":memory:", "in_memory": False, "unsaved": 0, "error": None}
        assert "ban store:     :memory:\n" in format_status(state)
        state["ban_store"]["unsaved"] = 3
        assert ("ban store:     :memory: (3 records not written yet: kept in memory, retried every "
                "second)") in format_status(state)
    finally:
        daemon.shutdown()


def test_each_ban_change_through_the_control_socket_says_who_asked_and_how_it_ended(
        tmp_path: Path, monkeypatch: Any) -> None:
    # Through the daemon, `portsentry block` left the same syslog lines as a scan's ban and
    # `unblock` "unblocked by admin" without saying who; a refused or failed one left nothing.
    import os
    import pwd
    from ipaddress import ip_address

    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import MEMORY, BanStore
    from portsentry.host import info as hostinfo
    from portsentry.responders.hostsdeny import HostsDeny
    from portsentry.service.control import Peer

    monkeypatch.setattr(hostinfo, "local_addresses", lambda: frozenset({ip_address("198.51.100.7")}))
    deny = HostsDeny(str(tmp_path / "hosts.deny"))
    daemon, said = bare_daemon(tmp_path)
    daemon.bans = BanManager(BanStore(MEMORY), None, deny, BanPolicy(), daemon.journal.log)
    daemon.config = daemon.config.__class__(source="t", kill_hosts_deny="ALL: $TARGET$",
                                            state_dir=str(tmp_path), protect_gateways=False,
                                            protect_resolvers=False)
    replies: list[Response] = []
    admin: list[Callable[[], None]] = []
    requests = Requests(daemon, admin.append, admin.append, lambda: None)
    me = Peer(os.getpid(), os.getuid())
    for request in (Request("block", "198.18.1.5", 7200.0, peer=me),
                    Request("block", "198.51.100.7", peer=me),
                    Request("unblock", "198.18.1.5", local=True, peer=me),
                    Request("unblock", "198.18.1.5", peer=me),
                    Request("list", peer=me)):
        requests.on_request(request, replies.append)
    for work in admin:
        work()
    assert [reply.ok for reply in replies] == [True, False, True, False, True]
    name = pwd.getpwuid(os.getuid()).pw_name
    by = f"by {name} (uid {os.getuid()}, pid {os.getpid()}"
    lines = [line for line in said.getvalue().splitlines() if line.startswith("adminalert:")]
    assert [line.split(by)[0] for line in lines] == [
        "adminalert: block 198.18.1.5 for 7200 seconds ",
        "adminalert: ERROR: block 198.51.100.7 ",
        "adminalert: unblock 198.18.1.5 on this host only ",
        "adminalert: ERROR: unblock 198.18.1.5 ",
    ]
    assert lines[0].endswith("): done") and lines[2].endswith("): done")
    assert lines[1].endswith("failed: 198.51.100.7 is one of this host's addresses: not blocked")
    assert lines[3].endswith("failed: 198.18.1.5 is not blocked")
    # After what the command did, in that order; and no line names the address as a scanner's.
    text = said.getvalue()
    assert text.index('has been blocked via wrappers with string: "ALL: 198.18.1.5"') < text.index(lines[0])
    assert text.index("has been unblocked: unblocked by admin on this host only") < text.index(lines[2])
    daemon.shutdown()
