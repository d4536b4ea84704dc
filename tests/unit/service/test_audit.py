"""The audit trail of ban changes an admin makes without the daemon (service.audit): what the
command did and who did it, in syslog, as the daemon writes them for its control socket's
requests (tests/unit/service/test_requests.py)."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest

from portsentry.cli.main import main
from portsentry.host.privileges import CAPABILITIES
from portsentry.service import audit
from tests.unit.cli.test_admin_commands import FakeBackend, _capabilities, _conf
from tests.unit.conftest import CommandSyslog
from tests.unit.service.test_admin import _host

ME = f"by {pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()}, pid {os.getpid()}"


def _audit_lines(syslog: CommandSyslog) -> list[str]:
    """The lines that say who, with the "(uid ..., pid ...)" part cut, which `who` pins."""
    return [re.sub(re.escape(ME) + r"[^)]*\)", "by ME", line) for line in syslog.messages()]


def test_who_names_the_user_its_pid_and_the_login_behind_a_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_login_uid", lambda pid: 0)
    assert audit.who(0, 4242) == "root (uid 0, pid 4242)"
    monkeypatch.setattr(audit, "_login_uid", lambda pid: 4_000_000)  # a login with no passwd entry
    assert audit.who(0, 4242) == "root (uid 0, pid 4242, login 4000000)"
    assert audit.who(4_000_001, None) == "user (uid 4000001)"
    assert audit.peer_who(None) == "an unknown control client"


def test_the_command_as_the_line_names_it() -> None:
    assert audit.action("block", "198.18.0.2") == "block 198.18.0.2"
    assert audit.action("block", "198.18.0.2", 7200.0) == "block 198.18.0.2 for 7200 seconds"
    assert audit.action("block", "198.18.0.2", None) == "block 198.18.0.2 forever"
    assert audit.action("unblock", "198.18.0.2", local=True) == "unblock 198.18.0.2 on this host only"
    assert audit.action("unblock", file="feed.txt", local=True) == "unblock --file feed.txt on this host only"
    assert audit.action("flush") == "flush"


def test_block_and_unblock_with_the_daemon_stopped_leave_their_lines_and_who_in_syslog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command_syslog: CommandSyslog) -> None:
    # With the daemon stopped, `block` and `unblock` printed their lines on the terminal and wrote
    # nothing to syslog: the ban's lift left no trace where the admin reads the others.
    conf = _host(tmp_path, monkeypatch)
    assert main(["block", "198.18.1.5", "--for", "2h", "-c", str(conf)]) == 0
    assert main(["unblock", "198.18.1.5", "--local", "-c", str(conf)]) == 0
    assert _audit_lines(command_syslog) == [
        'attackalert: Host 198.18.1.5 has been blocked via wrappers with string: "ALL: 198.18.1.5"',
        "adminalert: block 198.18.1.5 for 7200 seconds by ME: done",
        "attackalert: Host 198.18.1.5 has been unblocked: unblocked by admin on this host only",
        "adminalert: unblock 198.18.1.5 on this host only by ME: done",
    ]


def test_a_refused_or_failed_admin_command_is_an_error_line_in_syslog_and_exit_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command_syslog: CommandSyslog) -> None:
    conf = _host(tmp_path, monkeypatch)
    assert main(["block", "198.18.0.5", "-c", str(conf)]) == 1
    assert main(["unblock", "198.18.1.9", "-c", str(conf)]) == 1
    feed = tmp_path / "feed"
    feed.write_text("198.18.1.5\nnot-an-address\n")
    assert main(["block", "--file", str(feed), "-c", str(conf)]) == 1
    assert _audit_lines(command_syslog) == [
        "adminalert: ERROR: block 198.18.0.5 by ME failed: 198.18.0.5 is on the ignore list (IGNORE_FILE): "
        "not blocked",
        "adminalert: ERROR: unblock 198.18.1.9 by ME failed: 198.18.1.9 is not blocked",
        f"adminalert: ERROR: block --file {feed} by ME failed: {feed}:2: 'not-an-address' is not an "
        "IP address",
    ]


def test_block_and_unblock_file_say_who_and_how_many(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command_syslog: CommandSyslog) -> None:
    # `block --file` and `unblock --file` change the bans without the daemon, running or not:
    # the daemon wrote their events and metrics, and syslog heard nothing of them.
    conf = _host(tmp_path, monkeypatch)
    feed = tmp_path / "feed"
    feed.write_text("198.18.1.5\n198.18.1.6\n198.18.0.5\n")
    assert main(["block", "--file", str(feed), "-c", str(conf)]) == 0
    assert main(["unblock", "--file", str(feed), "-c", str(conf)]) == 0
    assert _audit_lines(command_syslog) == [
        f"adminalert: block --file {feed} by ME: blocked 2 of 3 addresses; 1 skipped",
        f"adminalert: unblock --file {feed} by ME: unblocked 2 of 3 addresses; 1 skipped",
    ]


def test_flush_says_who_and_what_it_removed_or_why_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command_syslog: CommandSyslog) -> None:
    from portsentry.service import admin

    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: FakeBackend())
    _capabilities(monkeypatch, 0)
    assert main(["flush", "-c", str(_conf(tmp_path))]) == 1
    _capabilities(monkeypatch, 1 << CAPABILITIES["CAP_NET_ADMIN"])
    assert main(["flush", "-c", str(_conf(tmp_path))]) == 0
    assert _audit_lines(command_syslog) == [
        "adminalert: ERROR: flush by ME failed: only root (CAP_NET_ADMIN) may remove the ban backend's "
        "table, sets or routes: nothing removed",
        "adminalert: flush by ME: removed route: 2 blackhole routes (proto 213)",
    ]


def test_no_syslog_writes_none_and_a_missing_socket_is_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command_syslog: CommandSyslog,
        capsys: pytest.CaptureFixture[str]) -> None:
    conf = _host(tmp_path, monkeypatch)
    assert main(["block", "198.18.1.5", "--no-syslog", "-c", str(conf)]) == 0
    assert command_syslog.messages() == [] and "syslog" not in capsys.readouterr().err
    assert main(["unblock", "198.18.1.5", "--syslog-socket", str(tmp_path / "none"), "-c", str(conf)]) == 0
    assert (f"portsentry: warning: 2 lines not written to syslog ({tmp_path}/none: No such file or "
            "directory); pass --no-syslog where there is none") in capsys.readouterr().err
