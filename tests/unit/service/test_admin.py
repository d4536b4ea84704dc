"""Parsing what admins type to block and unblock."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from portsentry.service.admin import AdminError, format_listing, parse_address, parse_duration


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200),
                                          ("7d", 604800), ("1w", 604800), ("1.5h", 5400),
                                          ("5200w", 5200 * 604800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["forever", "0", "FOREVER"])
def test_forever(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize("text", ["", "-5", "5x", "h", "1 day", "9" * 400, "9" * 400 + "w",
                                  "99999999999999w", "101y", "5300000w"])
def test_bad_durations(text):
    with pytest.raises(AdminError):
        parse_duration(text)


def test_addresses_are_validated_and_mapped_ipv6_becomes_ipv4():
    assert parse_address(" 198.18.0.2 ") == ip_address("198.18.0.2")
    assert parse_address("::ffff:198.18.0.2") == ip_address("198.18.0.2")
    assert parse_address("fd00::2") == ip_address("fd00::2")
    with pytest.raises(AdminError):
        parse_address("198.18.0.2; rm -rf /")
    # A zone id names our interface, not the host: the ban is of fe80::1 (as sensors.connect reads it).
    assert str(parse_address("fe80::1%eth0")) == "fe80::1"


def test_listing_table():
    assert format_listing([]) == "no active bans"
    text = format_listing([{"address": "198.18.0.2", "remaining": 5400, "mode": "stcp", "port": 1,
                            "count": 3, "offences": 2, "backends": ["nftables"],
                            "hosts_deny_line": "ALL: 198.18.0.2"}])
    assert "198.18.0.2" in text and "1.5h" in text and "nftables + hosts.deny" in text
    # Without a ban backend (Debian's file sets none) the column read "- + hosts.deny".
    text = format_listing([{"address": "198.18.0.2", "remaining": None, "mode": "tcp", "port": 1,
                            "count": 1, "offences": 1, "backends": [],
                            "hosts_deny_line": "ALL: 198.18.0.2"}])
    assert text.splitlines()[1].endswith(" hosts.deny") and "- +" not in text


def test_an_impossible_source_cannot_be_blocked_by_hand():
    import pytest

    from portsentry.config.settings import Config
    from portsentry.service import admin

    for text in ("0.0.0.0", "224.0.0.1", "::"):
        with pytest.raises(admin.AdminError, match="cannot be the source of a real packet"):
            admin.manual_block(None, None, Config(source="t"),  # type: ignore[arg-type]
                               admin.parse_address(text), None)


def _host(tmp_path, monkeypatch, ignore: str = "198.18.0.0/24\n"):
    """A config of tmp_path's own (no daemon), this "host" being 198.51.100.7 behind 198.51.100.1."""
    from portsentry.host import info as hostinfo

    monkeypatch.setattr(hostinfo, "local_addresses", lambda: frozenset({ip_address("198.51.100.7")}))
    monkeypatch.setattr(hostinfo, "default_gateways", lambda: frozenset({ip_address("198.51.100.1")}))
    (tmp_path / "ps.ignore").write_text(ignore)
    (tmp_path / "resolv.conf").write_text("nameserver ::ffff:198.51.100.53\n")
    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nBAN_BACKEND="none"\nSTATE_DIR="{tmp_path}/state"\n'
                    f'CONTROL_SOCKET="{tmp_path}/run/control.sock"\nIGNORE_FILE="{tmp_path}/ps.ignore"\n'
                    f'HOSTS_DENY_FILE="{tmp_path}/hosts.deny"\nKILL_HOSTS_DENY="ALL: $TARGET$"\n'
                    f'RESOLV_CONF="{tmp_path}/resolv.conf"\n')
    return conf


def _stored(tmp_path) -> list[str]:
    from portsentry.bans.store import BanStore

    store = BanStore(str(tmp_path / "state" / "bans.sqlite3"))
    try:
        return [str(ban.address) for ban in store.active(2e9)]
    finally:
        store.close()


@pytest.mark.parametrize("text,why", [
    ("198.18.0.5", "198.18.0.5 is on the ignore list (IGNORE_FILE): not blocked"),
    ("::ffff:198.51.100.7", "198.51.100.7 is one of this host's addresses: not blocked"),
    ("198.51.100.1", "198.51.100.1 is a default gateway or DNS resolver of this host"),
    ("198.51.100.53", "198.51.100.53 is a default gateway or DNS resolver of this host"),
])
def test_block_without_the_daemon_spares_what_the_daemon_spares(tmp_path, monkeypatch, capsys, text, why):
    # `portsentry block` with the daemon stopped banned an address of the ignore list, of this
    # host or its gateway, and wrote its hosts.deny line: the host could cut itself off.
    from portsentry.cli.main import main

    conf = _host(tmp_path, monkeypatch)
    assert main(["block", text, "-c", str(conf)]) == 1
    assert why in capsys.readouterr().err
    assert _stored(tmp_path) == [] and not (tmp_path / "hosts.deny").exists()
    assert main(["block", "198.18.1.5", "-c", str(conf)]) == 0
    assert _stored(tmp_path) == ["198.18.1.5"]


def test_block_file_skips_and_names_what_must_be_spared(tmp_path, monkeypatch, capsys):
    from portsentry.cli.main import main

    conf = _host(tmp_path, monkeypatch)
    feed = tmp_path / "feed"
    feed.write_text("198.18.1.5\n198.18.0.5\n198.51.100.7\n198.51.100.1\n")
    assert main(["block", "--file", str(feed), "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert f"blocked 1 of 4 addresses from {feed}" in out and "; 3 skipped" in out
    assert "skipped 198.18.0.5: on the ignore list (IGNORE_FILE): not blocked" in out
    assert "skipped 198.51.100.7: one of this host's addresses: not blocked" in out
    assert "skipped 198.51.100.1: a default gateway or DNS resolver of this host" in out
    assert _stored(tmp_path) == ["198.18.1.5"]
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.1.5\n"


def test_block_without_the_daemon_and_a_broken_ignore_file_blocks_nothing(tmp_path, monkeypatch, capsys):
    from portsentry.cli.main import main

    conf = _host(tmp_path, monkeypatch, ignore="198.18.0.0/24\nnot-an-address\n")
    assert main(["block", "198.18.1.5", "-c", str(conf)]) == 1
    assert f"{tmp_path}/ps.ignore:2: " in capsys.readouterr().err
    assert _stored(tmp_path) == []


def test_block_through_the_daemon_spares_what_the_daemon_spares(tmp_path):
    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import MEMORY, BanStore
    from portsentry.config.ignore import IgnoreEntry, IgnoreList
    from portsentry.config.settings import Config
    from portsentry.responders.classic import ClassicResponder
    from portsentry.responders.hostsdeny import HostsDeny
    from portsentry.service import admin
    from portsentry.service.control import Request

    said: list[str] = []
    deny = HostsDeny(str(tmp_path / "hosts.deny"))
    bans = BanManager(BanStore(MEMORY), None, deny, BanPolicy(), said.append)
    responder = ClassicResponder(deny, said.append, 1.0)
    config = Config(source="t", kill_hosts_deny="ALL: $TARGET$")
    ignore = IgnoreList([IgnoreEntry(ip_network("198.18.0.0/24"), 1, "198.18.0.0/24")],
                        [ip_address("198.51.100.7")])
    spared = admin.Spared([ip_address("198.51.100.7")], ignore, [ip_address("198.51.100.1")])
    for text in ("198.18.0.5", "198.51.100.7", "198.51.100.1"):
        with pytest.raises(admin.AdminError, match="not blocked"):
            admin.admin_request(bans, responder, config, Request("block", address=text), 1000.0,
                                lambda: spared)
    assert bans.store.active(1000.0) == []
    assert admin.admin_request(bans, responder, config, Request("block", address="198.18.1.5"), 1000.0,
                               lambda: spared).ok
    assert [str(ban.address) for ban in bans.store.active(1000.0)] == ["198.18.1.5"]


def test_block_file_from_stdin_takes_stray_bytes_whatever_the_locale(tmp_path, monkeypatch, capsys):
    # With a strict decoder on standard input (PYTHONIOENCODING=ascii, a non-UTF-8 locale) the
    # first stray byte of `block --file -` was a UnicodeDecodeError traceback.
    import io
    import sys

    from portsentry.cli.main import main

    conf = _host(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"198.18.1.5\r\n\xff\xfe\n"),
                                                       encoding="ascii", errors="strict"))
    assert main(["block", "--file", "-", "-c", str(conf)]) == 1
    assert capsys.readouterr().err == "portsentry: <stdin>:2: '\ufffd\ufffd' is not an IP address\n"
    assert _stored(tmp_path) == []
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"198.18.1.5\r\n# feed\r\n"),
                                                       encoding="ascii", errors="strict"))
    assert main(["block", "--file", "-", "-c", str(conf)]) == 0
    assert _stored(tmp_path) == ["198.18.1.5"]


def test_unblock_of_a_ban_kill_route_never_ran_for_says_nothing_of_a_route(tmp_path, monkeypatch, capsys):
    # A fleet peer's ban ran no KILL_ROUTE here: "what KILL_ROUTE did ... is still in place;
    # undo it by hand" sent the admin looking for a route that was never made.
    from portsentry.bans.store import BanStore
    from portsentry.cli.main import main

    conf = _host(tmp_path, monkeypatch)
    with conf.open("a") as handle:
        handle.write('KILL_ROUTE="true $TARGET$"\n')
    (tmp_path / "state").mkdir()
    with BanStore(str(tmp_path / "state" / "bans.sqlite3")) as store:
        store.ban(ip_address("198.18.1.6"), reason="fleet: scan", mode="tcp", port=0, now=1.0,
                  duration=None, origin="h2")
    assert main(["unblock", "198.18.1.6", "-c", str(conf)]) == 0
    assert "KILL_ROUTE_UNDO is not set" not in capsys.readouterr().out


@pytest.mark.parametrize("undo,warned", [("", True), ('KILL_ROUTE_UNDO="true $TARGET$"\n', False)])
def test_unblock_says_when_kill_route_is_not_undone(tmp_path, monkeypatch, capsys, undo, warned):
    # With Debian's KILL_ROUTE ("route add -host $TARGET$ reject") and no KILL_ROUTE_UNDO,
    # `unblock` said "done" while the reject route stayed: the host was as cut off as before.
    from portsentry.cli.main import main

    conf = _host(tmp_path, monkeypatch)
    with conf.open("a") as handle:
        handle.write('KILL_ROUTE="true $TARGET$"\n' + undo)
    assert main(["block", "198.18.1.5", "-c", str(conf)]) == 0
    capsys.readouterr()
    assert main(["unblock", "198.18.1.5", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert ("KILL_ROUTE_UNDO is not set" in out) == warned


@contextmanager
def _daemon_answering(conf):
    """The daemon's control socket and request handling (service.requests) over the same store,
    ignore list and hosts.deny as the CLI's path without the daemon; no sensors, no engine."""
    from types import SimpleNamespace

    from portsentry.config.settings import load_config
    from portsentry.responders.classic import ClassicResponder
    from portsentry.service import admin
    from portsentry.service.control import ControlServer
    from portsentry.service.requests import Requests

    config = load_config(str(conf)).config
    tool = admin.Admin.open(config)
    daemon = SimpleNamespace(bans=tool.bans, config=config, clock=time.time,
                             responder=ClassicResponder(tool.bans.hosts_deny, tool.log.append, 5.0),
                             spared=lambda: admin.Spared.of_host(config),
                             journal=SimpleNamespace(log=lambda _text: None))
    requests = Requests(daemon, lambda work: work(), lambda work: work(), lambda: None)  # type: ignore[arg-type]
    server = ControlServer(config.control_socket, requests.on_request)
    server.start()
    try:
        yield
    finally:
        server.close()
        tool.close()


def _outcome(conf, capsys, *command: str) -> tuple[int, list[str], list[str]]:
    """Exit code, then standard output's and error's lines without the one naming the path."""
    from portsentry.cli.main import main

    status = main([*command, "-c", str(conf)])
    out, err = capsys.readouterr()
    via = (" (via the running daemon)", "(the daemon is not running: working on the ban store directly)")
    return (status, [line.removesuffix(via[0]) for line in out.splitlines() if "attackalert" not in line],
            [line for line in err.splitlines() if line != via[1]])


def test_block_and_unblock_end_alike_with_and_without_the_daemon(tmp_path, monkeypatch, capsys):
    # Through the daemon a lift said "unblock: A done", without it nothing; a second unblock said
    # "A is not blocked" or "unblock: nothing to do for A"; a refused block came as "block failed:
    # A is on the ignore list" or without "block failed:". Scripts match these; the path must not
    # matter (nor the spelling of the address: ::ffff:198.18.1.5 is 198.18.1.5).
    conf = _host(tmp_path, monkeypatch)
    script = [("block", "198.18.1.5"), ("unblock", "::ffff:198.18.1.5"), ("unblock", "198.18.1.5"),
              ("block", "198.18.0.5"), ("unblock", "nonsense")]
    without = [_outcome(conf, capsys, *command) for command in script]
    with _daemon_answering(conf):
        through = [_outcome(conf, capsys, *command) for command in script]
    assert through == without
    assert without == [
        (0, ["block: 198.18.1.5 done"], []),
        (0, ["unblock: 198.18.1.5 done"], []),
        (1, [], ["portsentry: 198.18.1.5 is not blocked"]),
        (1, [], ["portsentry: 198.18.0.5 is on the ignore list (IGNORE_FILE): not blocked"]),
        (1, [], ["portsentry: 'nonsense' is not an IP address"]),
    ]


def test_a_block_with_nothing_configured_to_block_is_refused_with_and_without_the_daemon(
        tmp_path, monkeypatch, capsys):
    # BAN_BACKEND="none" with no KILL_ROUTE, KILL_HOSTS_DENY or KILL_RUN_CMD (the built-in
    # default's classic keys, or a 1.2 file that only logs): `block A` said "block: A done",
    # exit 0, and neither blocked nor recorded anything; `block --file` said "blocked 2 of 2"
    # and listed bans that nothing held.
    conf = _host(tmp_path, monkeypatch)
    conf.write_text(conf.read_text().replace('KILL_HOSTS_DENY="ALL: $TARGET$"\n', ""))
    refused = ("portsentry: 198.18.1.5 not blocked: nothing here blocks (BAN_BACKEND is none and none of "
               "KILL_ROUTE, KILL_HOSTS_DENY, KILL_RUN_CMD is set)")
    assert _outcome(conf, capsys, "block", "198.18.1.5") == (1, [], [refused])
    with _daemon_answering(conf):
        assert _outcome(conf, capsys, "block", "198.18.1.5") == (1, [], [refused])
    feed = tmp_path / "feed"
    feed.write_text("198.18.1.5\n198.18.1.6\n")
    assert _outcome(conf, capsys, "block", "--file", str(feed)) == (1, [], [
        "portsentry: block --file: nothing here blocks (BAN_BACKEND is none and none of KILL_ROUTE, "
        "KILL_HOSTS_DENY, KILL_RUN_CMD is set): nothing blocked"])
    assert _stored(tmp_path) == []


def _daemon_side(tmp_path: Path, runner: Any) -> tuple[Any, Any, Any, list[str]]:
    """BanManager, responder and config as the daemon has them, with `runner` for the shell."""
    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import MEMORY, BanStore
    from portsentry.config.settings import Config
    from portsentry.responders.classic import ClassicResponder
    from portsentry.responders.hostsdeny import HostsDeny

    said: list[str] = []
    deny = HostsDeny(str(tmp_path / "hosts.deny"))
    bans = BanManager(BanStore(MEMORY), None, deny, BanPolicy(undo="route del $TARGET$"), said.append,
                      runner=runner)
    responder = ClassicResponder(deny, said.append, 1.0, runner=runner)
    config = Config(source="t", kill_hosts_deny="ALL: $TARGET$", kill_route="route add $TARGET$",
                    kill_route_undo="route del $TARGET$")
    return bans, responder, config, said


def test_a_block_or_unblock_through_the_daemon_with_a_failed_step_fails_and_says_it(tmp_path):
    # It answered "ok" (the CLI: "done", exit 0) and the failure lines reached syslog only.
    from portsentry.responders.shell import CommandResult
    from portsentry.service import admin
    from portsentry.service.control import Request

    def failing(command: str, timeout: float) -> CommandResult:
        return CommandResult(command, 7, False, "no route", 0.0)

    bans, responder, config, said = _daemon_side(tmp_path, failing)
    route_line = ('adminalert: ERROR: There was an error trying to block host (system fail) 198.18.1.5: '
                  '"route add 198.18.1.5" exit status 7: no route')
    answer = admin.admin_request(bans, responder, config, Request("block", address="198.18.1.5"), 1000.0,
                                 admin.Spared)
    assert not answer.ok
    assert answer.error == ("198.18.1.5 is blocked, but not everywhere: KILL_ROUTE failed (never run again "
                            "for this ban: fix it, then unblock and block again)")
    assert answer.fields["lines"] == [route_line] and route_line in said
    assert [str(ban.address) for ban in bans.store.active(1000.0)] == ["198.18.1.5"]  # still recorded
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.1.5\n"
    # KILL_ROUTE failed, so no undo runs; the hosts.deny line cannot be removed.
    os.chmod(tmp_path / "hosts.deny", 0o666)
    answer = admin.admin_request(bans, responder, config, Request("unblock", address="198.18.1.5"), 1001.0)
    assert not answer.ok
    assert answer.error == ("198.18.1.5 is unblocked, but not everywhere: its hosts.deny line could not be "
                            "removed (`portsentry hosts-deny tidy` does it)")
    [line] = answer.fields["lines"]
    assert line.startswith("adminalert: ERROR: cannot remove 'ALL: 198.18.1.5' from ")
    assert bans.store.active(1001.0) == []


def test_a_block_without_the_daemon_with_a_failed_step_exits_1_as_block_file_does(
        tmp_path, monkeypatch, capsys, command_syslog):
    from portsentry.cli.main import main

    conf = _host(tmp_path, monkeypatch)
    with conf.open("a") as handle:
        handle.write('KILL_ROUTE="false $TARGET$"\n')
    assert main(["block", "198.18.1.5", "-c", str(conf)]) == 1
    out, err = capsys.readouterr()
    failed = ('adminalert: ERROR: There was an error trying to block host (system fail) 198.18.1.5: '
              '"false 198.18.1.5" exit status 1')
    assert failed in out.splitlines()
    assert "done" not in out
    why = ("198.18.1.5 is blocked, but not everywhere: KILL_ROUTE failed (never run again for this ban: "
           "fix it, then unblock and block again)")
    assert err.splitlines()[-1] == f"portsentry: {why}"
    audit = command_syslog.messages()[-1]
    assert audit.startswith("adminalert: ERROR: block 198.18.1.5 by ") and audit.endswith(f" failed: {why}")
    assert _stored(tmp_path) == ["198.18.1.5"]
