"""`portsentry status` output for a running and a stopped daemon (the socket path is system-tested)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from portsentry.service.status import format_status


def test_running_status_shows_what_an_admin_asks_first():
    text = format_status({
        "running": True, "pid": 4242, "uptime": 3725.0, "config": "/etc/portsentry/portsentry.conf",
        "modes": ["tcp", "atcp"], "backend": "nftables", "ignore_entries": 5, "active_bans": 2,
        "probes_seen": 40, "probes_last_hour": 12, "hosts_blocked": 3, "hosts_blocked_last_hour": 1,
        "watching": ["-tcp: TCP ports 1,11 bound (IPv4+IPv6)"],
        "recent_events": [{"at": 0.0, "message": "attackalert: Connect from host: a/a to TCP port: 1"}],
    })
    assert "running, pid 4242, up 01:02:05" in text
    assert "-tcp -atcp" in text and "nftables" in text and "2\n" in text
    assert "40 since start, 12 in the last hour" in text
    assert "  -tcp: TCP ports 1,11 bound (IPv4+IPv6)" in text
    assert "attackalert: Connect from host" in text


def test_stopped_status_says_so_and_counts_stored_bans():
    assert format_status({"running": False, "active_bans": 7}).splitlines() == [
        "portsentry is not running",
        "active bans in the store: 7 (still enforced by the kernel backend if one is configured)",
    ]


def test_stopped_status_says_when_the_store_cannot_be_read(tmp_path, capsys):
    # A store from a newer portsentry (or damaged, or locked) was in `status --json` only: the
    # text said "not running" and nothing else, as if there were no bans to worry about.
    import sqlite3

    from portsentry.bans.schema import SCHEMA_VERSION
    from portsentry.config.settings import Config
    from portsentry.service.status import NOT_RUNNING, show_status

    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / "bans.sqlite3")
    db.execute("PRAGMA user_version = 999")
    db.close()
    config = Config(source="t", state_dir=str(tmp_path / "state"),
                    control_socket=str(tmp_path / "run" / "control.sock"))
    assert show_status(config, False, 1000.0) == NOT_RUNNING
    assert capsys.readouterr().out.splitlines() == [
        "portsentry is not running",
        f"ban store: cannot be read: {tmp_path}/state/bans.sqlite3: ban store schema version 999 is newer "
        f"than this portsentry understands ({SCHEMA_VERSION}); run the newer portsentry or move the file "
        "away",
    ]


def test_records_not_written_and_packets_dropped_are_shown():
    # issue 9.5 and 9.1: lost evidence and forged sources show in the first screen an admin reads.
    text = format_status({
        "running": True, "pid": 1, "uptime": 1.0, "config": "c", "modes": ["stcp"], "backend": None,
        "ignore_entries": 1, "active_bans": 0, "probes_seen": 0, "probes_last_hour": 0,
        "hosts_blocked": 0, "hosts_blocked_last_hour": 0, "watching": [], "recent_events": [],
        "write_failures": [{"file": "history", "path": "/var/lib/portsentry/portsentry.history",
                            "failures": 3, "last_error": "No space left on device", "last_at": 0.0}],
        "packets_dropped": {"source multicast": 2, "truncated": 1},
    })
    assert ("3 records to history /var/lib/portsentry/portsentry.history, last at "
            in text) and text.rstrip().count("No space left on device") == 1
    assert "NOT WRITTEN:" in text
    assert "dropped:       2 source multicast, 1 truncated" in text


def test_a_daemon_that_answers_with_an_error_is_not_called_stopped(tmp_path, capsys):
    # A running daemon that refused the request (all 64 control connections busy, or a peer it
    # does not serve) was reported as "portsentry is not running", exit 3: monitoring and
    # scripts that start it when status says 3 were told a lie.
    import socket
    import threading

    from portsentry.config.settings import Config
    from portsentry.service.status import show_status

    control = tmp_path / "ctl.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(control))
    server.listen(1)

    def refuse() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b'{"ok": false, "error": "busy: too many control connections at once"}\n')

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        status = show_status(Config(source="t", state_dir=str(tmp_path / "state"),
                                    control_socket=str(control)), False, 1000.0)
    finally:
        thread.join(timeout=5)
        server.close()
    out, err = capsys.readouterr()
    assert "not running" not in out
    assert err.strip() == "portsentry: busy: too many control connections at once"
    assert status == 4  # LSB: status unknown, as when the socket is root's only


def _listener_that(tmp_path: Any, handle: Callable[[socket.socket], object]) -> tuple[Any, Any, Any]:
    """A control socket whose peer takes the request and then does `handle(connection)`."""
    import threading

    path = tmp_path / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(4096)
            handle(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return path, server, thread


def test_status_of_a_daemon_that_takes_the_request_and_never_answers_is_unknown(tmp_path, capsys,
                                                                               monkeypatch):
    # The man page and the README: 0 running, 3 not running, 4 cannot tell. A daemon that hangs
    # up without an answer, or does not answer in time, gave exit 1, which LSB's status codes
    # (and so monitoring scripts) read as "dead, pid file exists".
    import threading

    from portsentry.config.settings import Config
    from portsentry.service import status

    monkeypatch.setattr(status, "STATUS_TIMEOUT", 0.5, raising=False)
    for hangs in (False, True):
        released = threading.Event()

        def handle(connection, hangs=hangs, released=released):
            if hangs:
                released.wait(10)

        (tmp_path / "control.sock").unlink(missing_ok=True)
        path, server, thread = _listener_that(tmp_path, handle)
        config = Config(source="t", state_dir=str(tmp_path), control_socket=str(path))
        try:
            assert status.show_status(config, False, 1000.0) == status.UNKNOWN
        finally:
            released.set()
            thread.join(5)
            server.close()
        error = capsys.readouterr().err
        assert error.startswith(f"portsentry: {path}: ") and "not running" not in error
        assert ("no answer in time" in error) == hangs


def test_stopped_status_over_a_store_damaged_past_its_opening_is_not_running_with_the_error(tmp_path, capsys):
    # The store opened, and reading its bans failed (pages damaged after the schema's): `status`
    # ended with "portsentry: ... malformed" and exit 1, which LSB reads as "dead, pid file left".
    import sqlite3

    from portsentry.bans.store import BanStore
    from portsentry.config.settings import Config
    from portsentry.service.status import NOT_RUNNING, show_status

    (tmp_path / "state").mkdir()
    path = tmp_path / "state" / "bans.sqlite3"
    BanStore(str(path)).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE bans RENAME TO lost")
    db.close()
    config = Config(source="t", state_dir=str(tmp_path / "state"),
                    control_socket=str(tmp_path / "run" / "control.sock"))
    assert show_status(config, False, 1000.0) == NOT_RUNNING
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "portsentry is not running"
    assert out[1].startswith(f"ban store: cannot be read: {path}: ") and "no such table: bans" in out[1]
