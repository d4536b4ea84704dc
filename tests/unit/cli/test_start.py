"""cli.run: what an admin's first starts of the daemon run into (another user than root, a
control socket it may not look at)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from portsentry.cli.run import daemon_answering
from tests.unit.cli.test_main import _RecordingDaemon


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
    from tests.unit.cli.test_main import one_client, replying

    path = tmp_path / "ctl.sock"
    with one_client(str(path), replying(b"")):
        assert daemon_answering(str(path)) == "another process"


class _NoCapabilities:
    """privileges._Kernel for a user holding no capability at all (a start without sudo)."""

    def get(self) -> object:
        from portsentry.host.privileges import CapabilitySets

        return CapabilitySets(0, 0, 0, (1 << 41) - 1)


def _stand_in_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration in `tmp_path` and a start that goes as far as making the daemon, which
    is a stand-in that opens nothing (and drops no privileges); the configuration's path."""
    from portsentry.host import privileges
    from portsentry.host.privileges import DropResult
    from portsentry.service import daemon

    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="40001"\nSTATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{tmp_path}/ctl.sock"\n'
                    f'HOSTS_DENY_FILE="{tmp_path}/hosts.deny"\n')
    monkeypatch.setattr(daemon, "Daemon", _RecordingDaemon)
    monkeypatch.setattr(privileges, "restrict", lambda keep: DropResult(True, "not dropped in tests"))
    return conf


def _start_as_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: object
) -> tuple[int, list[object]]:
    from portsentry.cli.main import build_parser
    from portsentry.cli.run import run
    from portsentry.config.settings import load_config
    from portsentry.host import privileges

    _RecordingDaemon.seen = {}
    conf = _stand_in_daemon(tmp_path, monkeypatch)
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
    return status, [_RecordingDaemon.seen] if _RecordingDaemon.seen else []


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


_STOPPED_WHILE_STARTING = '''
import os, signal, sys
from portsentry.cli.main import build_parser
from portsentry.cli.run import run
from portsentry.config.settings import load_config
from portsentry.core.probe import Mode
from portsentry.host import privileges
from portsentry.host.privileges import DropResult
from portsentry.service import daemon

class Recording:
    def __init__(self, *args, **kwargs):
        self.stop = False
    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
    def request_stop(self, *args):
        self.stop = True
    def open(self):
        print("stop asked before open:", self.stop, flush=True)
        return False
    def shutdown(self):
        pass

def stopped_now(keep):
    # The admin's Ctrl-C (or an rc script's stop) while the start opens the store and the backend.
    os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    return DropResult(True, "not dropped in tests")

daemon.Daemon = Recording
privileges.restrict = stopped_now
args = build_parser().parse_args(
    ["-c", sys.argv[1], "--no-syslog", "--log-stderr", "--pid-file", sys.argv[2]])
sys.exit(run(load_config(sys.argv[1]).config, [Mode.TCP], args))
'''


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_asked_while_the_daemon_starts_is_a_clean_stop(tmp_path: Path, signame: str) -> None:
    # Between the pid file and the daemon's handlers (capabilities, hosts.deny, the store, the
    # ban backend's nft run): SIGTERM killed it outright, SIGINT raised through the start; the
    # pid file stayed, no shutdown line was written. Now the stop waits for the handlers.
    import subprocess
    import sys

    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="40001"\nSTATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{tmp_path}/ctl.sock"\n'
                    f'HOSTS_DENY_FILE="{tmp_path}/hosts.deny"\n')
    pid_file = tmp_path / "ps.pid"
    src = str(Path(__file__).resolve().parents[3] / "src")
    done = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_STARTING, str(conf), str(pid_file), signame],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": src})
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.returncode, done.stderr)  # the stand-in daemon opens nothing
    assert "stop asked before open: True" in done.stdout
    assert "adminalert: PortSentry is shutting down" in done.stderr
    assert not pid_file.exists()


def test_a_foreground_start_whose_syslog_is_gone_says_so_on_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `portsentry -tcp -udp` in the foreground on a host with no syslog daemon printed nothing at
    # all: every line, "attackalert:" ones and the failure to write them, went to a socket that
    # was not there; only `portsentry status` showed "NOT WRITTEN".
    from portsentry.cli.main import build_parser
    from portsentry.cli.run import run
    from portsentry.config.settings import load_config
    from portsentry.core.probe import Mode
    from portsentry.host import privileges

    conf = _stand_in_daemon(tmp_path, monkeypatch)
    monkeypatch.setattr(privileges, "refusal", lambda: None)
    gone = tmp_path / "no-log-here"
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    try:
        for extra, said in (([], True), (["--log-stderr"], False)):
            args = build_parser().parse_args(["-c", str(conf), "--syslog-socket", str(gone), *extra])
            run(load_config(str(conf)).config, [Mode.TCP], args)
            err = capsys.readouterr().err
            assert (f"portsentry: cannot write syslog {gone}: No such file or directory; its lines are "
                    "lost (--log-stderr shows them here)" in err) is said, err
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf_extra: str, *flags: str) -> int:
    """run() with the stand-in daemon, `conf_extra` added to its configuration."""
    import signal

    from portsentry.cli.main import build_parser
    from portsentry.cli.run import run
    from portsentry.config.settings import load_config
    from portsentry.core.probe import Mode
    from portsentry.host import privileges

    conf = _stand_in_daemon(tmp_path, monkeypatch)
    conf.write_text(conf.read_text() + conf_extra)
    monkeypatch.setattr(privileges, "refusal", lambda: None)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    try:
        args = build_parser().parse_args(["-c", str(conf), "--no-syslog", *flags])
        return run(load_config(str(conf)).config, [Mode.TCP], args)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("flags", [[], ["--log-stderr"]])
@pytest.mark.parametrize("found,said", [
    ("route", 'BAN_BACKEND="auto": nftables and ipset do not work here; bans are route: '),
    (None, 'BAN_BACKEND="auto": none of nftables, ipset, route works here; no native bans: '
           "scanners are blocked only by KILL_ROUTE and KILL_HOSTS_DENY, where set"),
])
def test_auto_falling_back_from_nftables_is_said_once_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    flags: list[str], found: str | None, said: str,
) -> None:
    # On a host without nft (or where it is refused) "auto" took the routes, which drop the
    # replies only, or nothing at all, and only `portsentry status` showed it: not syslog, not
    # the terminal the admin started it from.
    from portsentry.responders.backend import RunResult
    from portsentry.responders.iproute import RouteBackend
    from portsentry.service import admin

    def runner(argv: object, stdin: object) -> RunResult:
        return RunResult(0, "[]", "")

    chosen = RouteBackend(runner=runner) if found == "route" else None
    monkeypatch.setattr(admin, "pick_backend", lambda *args, **kwargs: chosen)
    _start(tmp_path, monkeypatch, 'BAN_BACKEND="auto"\n', *flags)
    err = capsys.readouterr().err
    assert err.count(said) == 1, err


def test_auto_that_finds_nftables_says_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from portsentry.responders.backend import RunResult
    from portsentry.responders.nftables import NftablesBackend
    from portsentry.service import admin

    class Ready(NftablesBackend):
        def setup(self) -> None:
            pass

    def runner(argv: object, stdin: object) -> RunResult:
        return RunResult(0, '{"nftables": []}', "")

    monkeypatch.setattr(admin, "pick_backend", lambda *args, **kwargs: Ready(runner=runner, mechanism="cli"))
    _start(tmp_path, monkeypatch, 'BAN_BACKEND="auto"\n', "--log-stderr")
    assert 'BAN_BACKEND="auto"' not in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--log-stderr"]])
def test_a_ban_store_that_cannot_be_opened_is_said_on_the_terminal_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    # In the foreground, the start said "keeping bans in memory" to syslog only.
    (tmp_path / "state").write_text("a file where STATE_DIR should be")
    _start(tmp_path, monkeypatch, "", *flags)
    err = capsys.readouterr().err
    assert err.count(f"ERROR: ban store: {tmp_path}/state/bans.sqlite3: cannot create the ban store: "
                     f"{tmp_path}/state is not a directory (STATE_DIR); keeping bans in memory until "
                     "it can be opened") == 1, err
