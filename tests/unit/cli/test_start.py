"""cli.run: what an admin's first starts of the daemon run into (another user than root, a
control socket it may not look at)."""

from __future__ import annotations

from pathlib import Path

import pytest

from portsentry.cli.run import daemon_answering


def test_a_control_socket_it_may_not_open_is_not_another_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    # Started without sudo, the daemon met root's 0700 /run/portsentry and said "another process
    # answers on the control socket ...; this one runs without it", with no daemon running at
    # all; the admin went looking for a process that was not there.
    from portsentry.service import control

    def refuse(path: str, message: object, timeout: float = 60.0) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(control, "request", refuse)
    assert daemon_answering("/run/portsentry/control.sock") is None


def test_a_control_socket_that_takes_the_request_and_says_nothing_is_another_process(
    tmp_path: Path,
) -> None:
    import socket
    import threading

    path = tmp_path / "ctl.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(1000)
        conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        assert daemon_answering(str(path)) == "another process"
    finally:
        thread.join(timeout=5)
        server.close()
