"""cli.run: what an admin's first starts of the daemon run into (another user than root, a
control socket it may not look at)."""

from __future__ import annotations

import os
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


class _NoCapabilities:
    """privileges._Kernel for a user holding no capability at all (a start without sudo)."""

    def get(self) -> object:
        from portsentry.host.privileges import CapabilitySets

        return CapabilitySets(0, 0, 0, (1 << 41) - 1)


def _start_as_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: object
) -> tuple[int, list[object]]:
    from portsentry.cli.main import build_parser
    from portsentry.cli.run import run
    from portsentry.config.settings import load_config
    from portsentry.host import privileges
    from portsentry.host.privileges import DropResult
    from portsentry.service import daemon

    made: list[object] = []

    class Recording:
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(kwargs)

        def install_signal_handlers(self) -> None:
            pass

        def open(self) -> bool:
            return False

        def shutdown(self) -> None:
            pass

    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="40001"\nSTATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{tmp_path}/ctl.sock"\n'
                    f'HOSTS_DENY_FILE="{tmp_path}/hosts.deny"\n')
    monkeypatch.setattr(daemon, "Daemon", Recording)
    monkeypatch.setattr(privileges, "restrict", lambda keep: DropResult(True, "not dropped in tests"))
    monkeypatch.setattr(privileges, "_Kernel", lambda: kernel)
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    try:
        args = build_parser().parse_args(["-c", str(conf), "--no-syslog"])
        from portsentry.core.probe import Mode

        status = run(load_config(str(conf)).config, [Mode.TCP], args)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return status, made


def test_a_user_without_root_or_its_network_capabilities_is_refused_as_1_2_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Started without sudo it said "now active and listening" and ran for good, exit 0 at the
    # end: ports below 1024 unbound, no ban store, no control socket, no kernel ban possible,
    # each said only in syslog. 1.2 refused: "You need to be root to run this."
    status, made = _start_as_nobody(tmp_path, monkeypatch, _NoCapabilities())
    assert status == 1
    assert made == []  # nothing opened
    assert not (tmp_path / "state").exists()
    err = capsys.readouterr().err
    assert ("portsentry: You need to be root to run this (uid 65534 holds none of CAP_NET_BIND_SERVICE "
            "CAP_NET_ADMIN CAP_NET_RAW: run it as root, or give it those capabilities)") in err


def test_a_user_given_the_network_capabilities_may_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from portsentry.host.privileges import KEPT, CapabilitySets, mask

    class Capable:
        def get(self) -> CapabilitySets:
            return CapabilitySets(mask(KEPT), mask(KEPT), 0, mask(KEPT))

    _status, made = _start_as_nobody(tmp_path, monkeypatch, Capable())
    assert len(made) == 1  # a unit's User= with AmbientCapabilities= is a supported way to run it
    assert "You need to be root" not in capsys.readouterr().err
