"""The command line: mode flags, check-config, and one clear error per broken configuration."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from portsentry import __version__
from portsentry.cli.main import main, split_modes
from portsentry.cli.run import PidFile, PidFileError
from portsentry.core.probe import Mode


def test_classic_flags_and_aliases_are_taken_out_before_argparse():
    assert split_modes(["-tcp", "-c", "x.conf", "-sudp"]) == ([Mode.TCP, Mode.SUDP], ["-c", "x.conf"])
    assert split_modes(["--connect"]) == ([Mode.TCP, Mode.UDP], [])
    assert split_modes(["--stealth", "-v"]) == ([Mode.STCP, Mode.SUDP], ["-v"])


def test_unknown_mode_is_one_clear_error(capsys):
    assert main(["-tpc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "portsentry: unknown mode -tpc (modes: -tcp -udp -stcp -sudp -atcp -audp)"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_mode_prints_usage(tmp_path, capsys):
    conf = tmp_path / "ps.conf"
    conf.write_text('TCP_PORTS="1"\n')
    assert main(["-c", str(conf)]) == 2
    assert "usage: portsentry [-tcp]" in capsys.readouterr().err


def test_check_config_warns_about_a_world_writable_ignore_file(tmp_path, capsys):
    # issue 9.8: the config file was warned about; the ignore file, which decides who is never
    # blocked, was not.
    ignore = tmp_path / "ps.ignore"
    ignore.write_text("198.18.0.0/24\n")
    ignore.chmod(0o666)
    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nIGNORE_FILE="{ignore}"\n')
    assert main(["check-config", "-c", str(conf)]) == 0
    assert (f"portsentry: warning: {ignore}: is writable by every user, who could then exempt any "
            "address from blocking") in capsys.readouterr().err
    ignore.chmod(0o644)
    assert main(["check-config", "-c", str(conf)]) == 0
    assert "writable by every user" not in capsys.readouterr().err


def test_check_config_prints_effective_settings(tmp_path, capsys):
    conf = tmp_path / "ps.conf"
    conf.write_text('TCP_PORTS="1,512-515"\nBLOCK_TCP="1"\nKILL_HOSTS_DENY="ALL: $TARGET$"\n')
    assert main(["check-config", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "512-515" in out and "configuration OK" in out


def test_debian_defaults_choose_the_modes_and_check_config_says_so(tmp_path, capsys):
    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nUDP_PORTS="7"\nIGNORE_FILE="{tmp_path}/portsentry.ignore"\n')
    (tmp_path / "portsentry.ignore.static").write_text("127.0.0.1/32\n0.0.0.0\n")
    defaults = tmp_path / "default"
    base = ["check-config", "-c", str(conf), "--debian-defaults", str(defaults), "-tcp", "-udp"]
    assert main(base) == 0  # no defaults file: the flags
    captured = capsys.readouterr()
    assert "modes: -tcp -udp (command line)" in captured.out
    assert f"using {tmp_path}/portsentry.ignore.static" in captured.err
    defaults.write_text('TCP_MODE="stcp"\nUDP_MODE=""\n')
    assert main(base) == 0
    assert f"modes: -stcp (TCP_MODE, UDP_MODE in {defaults})" in capsys.readouterr().out
    defaults.write_text('TCP_MODE=""\nUDP_MODE=""\n')
    assert main(base) == 1
    assert "TCP_MODE and UDP_MODE are both empty: nothing to watch" in capsys.readouterr().err
    defaults.write_text('TCP_MODE="tcp"\nUDP_MODE="xudp"\n')
    assert main(base) == 1
    assert f"{defaults}:2: UDP_MODE: 'xudp' is not one of udp, sudp, audp" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,line,key,what",
    [
        ('TCP_PORTS="1,70000"\n', 1, "TCP_PORTS", "'70000' is not a port"),
        ('# c\nTCP_PORTS="1,2\n', 2, "TCP_PORTS", "quote"),
        ('TCP_PORTS="1"\nKILL_ROUTE="/sbin/route add -host reject"\n', 2, "KILL_ROUTE", "$TARGET$"),
        ('TCP_PORTS="1"\n\nIGNORE_FILE="/nonexistent/portsentry.ignore"\n', 3, "IGNORE_FILE",
         "cannot read /nonexistent/portsentry.ignore"),
        ('TCP_PORTS="1"\nHISTORY_FILE="portsentry.history"\n', 2, "HISTORY_FILE",
         "'portsentry.history' is not an absolute path"),
    ],
)
def test_invalid_configs_give_one_error_naming_file_line_and_key(tmp_path, capsys, text, line, key, what):
    conf = tmp_path / "ps.conf"
    conf.write_text(text)
    assert main(["check-config", "-c", str(conf), "-tcp"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"portsentry: {conf}:{line}: {key}: ")
    assert what in err[0]


def test_daemon_refuses_to_start_on_an_unreadable_ignore_file(tmp_path, capsys):
    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nIGNORE_FILE="{tmp_path}/missing"\n')
    assert main(["-c", str(conf), "--no-syslog", "-tcp"]) == 1
    assert f"{conf}:2: IGNORE_FILE: cannot read" in capsys.readouterr().err


def test_mode_needs_its_port_list(tmp_path, capsys):
    conf = tmp_path / "ps.conf"
    conf.write_text('UDP_PORTS="1"\n')
    assert main(["check-config", "-c", str(conf), "-stcp"]) == 1
    assert "TCP_PORTS: is required by -stcp" in capsys.readouterr().err


def test_ignore_file_error_names_the_ignore_file_and_line(tmp_path, capsys):
    ignore = tmp_path / "portsentry.ignore"
    ignore.write_text("127.0.0.1\nnot-an-address\n")
    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nIGNORE_FILE="{ignore}"\n')
    assert main(["check-config", "-c", str(conf)]) == 1
    assert capsys.readouterr().err.startswith(f"portsentry: {ignore}:2: ")


def test_hosts_deny_tidy_command_dry_run_then_real(tmp_path, capsys):
    deny = tmp_path / "hosts.deny"
    original = "# managed by hand\nALL: 198.18.0.2\nsshd: 198.18.9.9\nALL: 198.18.0.2\n"
    deny.write_text(original)
    conf = tmp_path / "ps.conf"
    # CONTROL_SOCKET too: the hosts.deny lock lives beside it (by default in the host's /run).
    conf.write_text(f'TCP_PORTS="1"\nHOSTS_DENY_FILE="{deny}"\nSTATE_DIR="{tmp_path}/state"\n'
                    f'CONTROL_SOCKET="{tmp_path}/run/control.sock"\n')
    assert main(["hosts-deny", "tidy", "--dry-run", "-c", str(conf)]) == 0
    assert "ALL: 198.18.0.2" in capsys.readouterr().out
    assert deny.read_text() == original
    assert not (tmp_path / "state").exists()  # a dry run made an empty ban store (and its directory)
    assert main(["hosts-deny", "tidy", "-c", str(conf)]) == 0
    assert deny.read_text() == "# managed by hand\nALL: 198.18.0.2\nsshd: 198.18.9.9\n"
    before = deny.stat().st_mtime_ns
    assert main(["hosts-deny", "tidy", "-c", str(conf)]) == 0
    assert deny.stat().st_mtime_ns == before  # a clean file is not rewritten


def test_hosts_deny_tidy_of_an_unusable_file_is_one_clear_error(tmp_path, capsys):
    # A symlinked hosts.deny, which HostsDeny refuses, ended `hosts-deny tidy` in a traceback.
    (tmp_path / "real").write_text("ALL: 198.18.0.2\nALL: 198.18.0.2\n")
    deny = tmp_path / "hosts.deny"
    deny.symlink_to(tmp_path / "real")
    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nHOSTS_DENY_FILE="{deny}"\nSTATE_DIR="{tmp_path}/state"\n'
                    f'CONTROL_SOCKET="{tmp_path}/run/control.sock"\n')
    for dry_run in (["--dry-run"], []):
        assert main(["hosts-deny", "tidy", *dry_run, "-c", str(conf)]) == 1
        err = capsys.readouterr().err
        assert err == (f"portsentry: {deny}: refusing to write hosts.deny through a symlink; "
                       "point the configuration at the real file\n")
    assert (tmp_path / "real").read_text() == "ALL: 198.18.0.2\nALL: 198.18.0.2\n"


def test_check_warns_about_an_allow_all_hosts_allow(tmp_path, capsys, monkeypatch):
    import portsentry.host.wrappers_check as wrappers

    allow = tmp_path / "hosts.allow"
    allow.write_text("ALL : ALL : allow\n")
    monkeypatch.setattr(wrappers, "DEFAULT_HOSTS_ALLOW", str(allow))
    real = wrappers.check_wrappers
    monkeypatch.setattr(wrappers, "check_wrappers", lambda hosts_allow=str(allow): real(hosts_allow))
    conf = tmp_path / "ps.conf"
    conf.write_text('TCP_PORTS="1"\n')
    assert main(["check", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "hosts.allow" in out


def test_check_shows_the_configuration_warnings_check_config_shows(tmp_path, capsys, monkeypatch):
    # `portsentry check` printed the effective settings and "configuration OK" but dropped the
    # parser's warnings (unknown keys, BLOCK_TCP=1 with nothing to block with).
    import portsentry.host.wrappers_check as wrappers

    monkeypatch.setattr(wrappers, "check_wrappers", lambda: [])
    conf = tmp_path / "ps.conf"
    conf.write_text('TCP_PORTS="1"\nFOO="x"\nBLOCK_TCP="1"\n')
    assert main(["check", "-c", str(conf)]) == 0
    err = capsys.readouterr().err
    assert f"portsentry: warning: {conf}:2: unknown key FOO ignored" in err
    assert f"portsentry: warning: {conf}:3: BLOCK_TCP: is 1 (block)" in err

def test_help_says_usage_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: portsentry [-tcp] [-udp]")
    assert "usage: usage:" not in out
    assert "Port scan detector." in out and "options:" in out


def test_a_bad_option_shows_the_synopsis_once(capsys):
    with pytest.raises(SystemExit):
        main(["--mode", "nope"])
    err = capsys.readouterr().err
    assert err.startswith("usage: portsentry [-tcp]") and err.count("usage:") == 1


def test_keep_capabilities_is_checked_by_check_config(tmp_path, capsys):
    conf = tmp_path / "ps.conf"
    conf.write_text('TCP_PORTS="1"\nKEEP_CAPABILITIES="CAP_DAC_OVERRIDE, cap_nope"\n')
    assert main(["check-config", "-c", str(conf)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"portsentry: {conf}:2: KEEP_CAPABILITIES: 'cap_nope' is not a capability")
    conf.write_text('TCP_PORTS="1"\nKEEP_CAPABILITIES="CAP_DAC_OVERRIDE, setuid"\n')
    assert main(["check-config", "-c", str(conf)]) == 0



def test_fleet_settings_the_start_refuses_are_refused_by_check_config(tmp_path, capsys):
    # check-config said "configuration OK" and the start then stopped on FLEET_KEY_FILE.
    key = tmp_path / "fleet.key"
    conf = tmp_path / "ps.conf"
    conf.write_text('TCP_PORTS="1"\nFLEET_REDIS_URL="redis://127.0.0.1:6379"\n')
    assert main(["check-config", "-c", str(conf)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"portsentry: {conf}: FLEET_KEY_FILE: is required with FLEET_REDIS_URL: every decision is signed")
    key.write_text("k" * 32)
    key.chmod(0o644)
    conf.write_text(f'TCP_PORTS="1"\nFLEET_REDIS_URL="redis://127.0.0.1:6379"\nFLEET_KEY_FILE="{key}"\n')
    assert main(["check-config", "-c", str(conf)]) == 1
    assert f"{conf}:3: FLEET_KEY_FILE: {key} may be read by others" in capsys.readouterr().err
    key.chmod(0o600)
    assert main(["check-config", "-c", str(conf)]) == 0

# --- --pid-file ---------------------------------------------------------------------------------


def test_pid_file_is_created_written_locked_and_removed(tmp_path):
    path = tmp_path / "portsentry.pid"
    held = PidFile.acquire(str(path))
    held.write(4242)
    assert path.read_text() == "4242\n"
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(PidFileError) as refused:
        PidFile.acquire(str(path))
    assert str(refused.value) == (f"{path}: another portsentry (pid 4242) holds this pid file; "
                                  "refusing to start a second daemon with it")
    assert path.read_text() == "4242\n"  # the refused one wrote nothing
    held.release()
    assert not path.exists()


def test_a_stale_pid_file_is_taken_over(tmp_path):
    path = tmp_path / "portsentry.pid"
    path.write_text("99999999\n")  # a daemon that died without cleaning up holds no lock
    held = PidFile.acquire(str(path))
    held.write(7)
    assert path.read_text() == "7\n"
    held.release()


def test_a_symlinked_pid_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "portsentry.pid"
    link.symlink_to(target)
    with pytest.raises(PidFileError) as refused:
        PidFile.acquire(str(link))
    assert str(refused.value) == f"{link}: refusing to use a symlink as the pid file"
    assert target.read_text() == "keep me\n"
    dangling = tmp_path / "dangling.pid"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(PidFileError):
        PidFile.acquire(str(dangling))
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_hard_linked_pid_file_is_refused(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "portsentry.pid"
    os.link(target, link)
    with pytest.raises(PidFileError, match="2 hard links"):
        PidFile.acquire(str(link))
    assert target.read_text() == "keep me\n"


def test_release_leaves_a_pid_file_that_is_no_longer_ours(tmp_path):
    path = tmp_path / "portsentry.pid"
    held = PidFile.acquire(str(path))
    path.unlink()
    path.write_text("123\n")  # someone else's now
    held.release()
    assert path.read_text() == "123\n"


def test_daemon_refuses_to_start_on_a_held_pid_file(tmp_path, capsys):
    """The whole start path: refused before anything is opened, with the holder's pid."""
    path = tmp_path / "portsentry.pid"
    held = PidFile.acquire(str(path))
    held.write(31337)
    conf = tmp_path / "ps.conf"
    ignore = tmp_path / "ignore"
    ignore.write_text("")
    conf.write_text(f'TCP_PORTS="1"\nIGNORE_FILE="{ignore}"\nSTATE_DIR="{tmp_path}/state"\n')
    try:
        assert main(["-c", str(conf), "--no-syslog", "--pid-file", str(path), "-tcp"]) == 1
    finally:
        held.release()
    err = capsys.readouterr().err
    assert f"{path}: another portsentry (pid 31337) holds this pid file" in err
    assert not (tmp_path / "state").exists()  # nothing was opened


def test_list_answered_by_the_daemon_imports_neither_the_lifecycle_nor_the_backends(tmp_path):
    """`portsentry list` is mostly Python starting up; it must not also load the ban lifecycle,
    the store and the backends when the daemon answers (issue 10: list under 100 ms)."""
    import socket
    import subprocess
    import sys
    import threading

    sock_path = tmp_path / "control.sock"
    conf = tmp_path / "c.conf"
    conf.write_text(f'STATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{sock_path}"\n')
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen()

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(1000)
        conn.sendall(b'{"ok": true, "bans": []}\n')
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        argv = [sys.executable, "-X", "importtime", "-m", "portsentry", "list", "-c", str(conf)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert "no active bans" in done.stdout and "(via the running daemon)" in done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    heavy = {"portsentry.bans.lifecycle", "portsentry.bans.store", "portsentry.responders.nftables",
             "portsentry.service.daemon", "portsentry.core.engine"}
    assert imported & heavy == set()
    assert "portsentry.service.control" in imported  # the check can fail: it sees what is imported


# --- a second daemon on the same control socket ---------------------------------------------------


class _RecordingDaemon:
    """Stands in for service.daemon.Daemon: records what run() hands it and opens nothing."""

    seen: ClassVar[dict[str, object]] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        _RecordingDaemon.seen = kwargs

    def install_signal_handlers(self) -> None:
        pass

    def open(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass


@contextlib.contextmanager
def one_client(path: str, handle: Callable[[socket.socket, threading.Event], object]) -> Iterator[None]:
    """A control socket at `path` whose first client `handle` serves (given an event set when the
    block ends, for a handler that holds the client till then); closed at the end, on failure too."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            handle(conn, done)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()


def replying(reply: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """A handler that reads the request and sends `reply` (b"": hangs up unanswered)."""
    def handle(conn: socket.socket, _done: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(reply)
    return handle


def status_reply(pid: int) -> bytes:
    return json.dumps({"ok": True, "status": {"running": True, "pid": pid}}).encode() + b"\n"


def test_a_second_daemon_leaves_the_first_ones_control_socket_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1.2's rc scripts start `portsentry -tcp` and `portsentry -udp` as two processes. The second
    # took the control socket over; once it stopped, `portsentry status` said the first, still
    # running, was "not running" (exit 3), and reload could no longer reach it.
    from portsentry.cli.main import build_parser
    from portsentry.cli.run import run
    from portsentry.config.settings import load_config
    from portsentry.host import privileges
    from portsentry.host.privileges import DropResult
    from portsentry.service import daemon

    control = tmp_path / "ctl.sock"
    conf = tmp_path / "ps.conf"
    conf.write_text(f'UDP_PORTS="40002"\nSTATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{control}"\n'
                    f'HOSTS_DENY_FILE="{tmp_path}/hosts.deny"\n')
    monkeypatch.setattr(daemon, "Daemon", _RecordingDaemon)
    # run() drops capabilities; here that would be the test process's own.
    monkeypatch.setattr(privileges, "restrict", lambda keep: DropResult(True, "not dropped in tests"))
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    with one_client(str(control), replying(status_reply(4242))):
        try:
            args = build_parser().parse_args(["-c", str(conf), "--no-syslog"])
            run(load_config(str(conf)).config, [Mode.UDP], args)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    assert _RecordingDaemon.seen["control_path"] is None
    assert (f"another portsentry (pid 4242) answers on the control socket {control}; this one runs "
            "without it") in capsys.readouterr().err


def test_relative_paths_on_the_command_line_survive_the_daemon_s_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --daemon changes to / (as 1.2 did): `-c portsentry.conf` then named /portsentry.conf at
    # the first reload, which was refused, and a relative --pid-file was never removed.
    from portsentry.cli import run as run_module

    seen: list[argparse.Namespace] = []

    def record(config: object, modes: object, args: argparse.Namespace, warnings: object = ()) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(run_module, "run", record)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ps.conf").write_text('UDP_PORTS="7"\n')
    assert main(["-c", "ps.conf", "--pid-file", "run/ps.pid", "--syslog-socket", "log", "--daemon",
                 "-udp"]) == 0
    assert (seen[0].config, seen[0].pid_file, seen[0].syslog_socket) == (
        str(tmp_path / "ps.conf"), str(tmp_path / "run/ps.pid"), str(tmp_path / "log"))


@pytest.mark.parametrize("command", [["list"], ["status"], ["reload"], ["block", "192.0.2.7"]])
@pytest.mark.parametrize("reply", [b"", b"not json\n", b"\xff\n"])
def test_a_daemon_that_hangs_up_without_an_answer_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], reply: bytes
) -> None:
    # A daemon that is stopping closes its clients unanswered; list, status and reload then
    # died with "ValueError: the daemon sent no answer" and a traceback.
    control = tmp_path / "ctl.sock"
    conf = tmp_path / "ps.conf"
    conf.write_text(f'STATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{control}"\n')
    # status says "cannot tell" the LSB way (4, as the man page lists), the others fail with 1.
    with one_client(str(control), replying(reply)):
        assert main([*command, "-c", str(conf)]) == (4 if command == ["status"] else 1)
    assert capsys.readouterr().err.strip().endswith(f"portsentry: {control}: the daemon sent no answer")


@pytest.mark.parametrize("command", [["check-config"], ["list"], ["status"], ["report"], ["check"],
                                     ["hosts-deny", "tidy", "--dry-run"]])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, command):
    # `portsentry check-config | head` printed a BrokenPipeError traceback once head had exited;
    # `portsentry list | head` (and the other admin commands) said "portsentry: [Errno 32]
    # Broken pipe" and exited 1, which `set -o pipefail` scripts took for a failure of theirs.
    import subprocess
    import sys

    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nBAN_BACKEND="none"\nSTATE_DIR="{tmp_path}/state"\n'
                    f'CONTROL_SOCKET="{tmp_path}/control.sock"\nHOSTS_DENY_FILE="{tmp_path}/hosts.deny"\n')
    if command != ["check-config"]:  # that one reads /etc's or the built-in default, as it did
        command = [*command, "-c", str(conf)]
    if command[0] == "report":  # it reads an existing store only
        from portsentry.bans.store import BanStore

        BanStore(str(tmp_path / "state" / "bans.sqlite3")).close()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        proc = subprocess.run([sys.executable, "-m", "portsentry", *command], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")})
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr
    assert proc.returncode == 141


def test_ctrl_c_ends_an_admin_command_quietly(tmp_path):
    # Ctrl-C while `block --file -` waited for addresses typed at the terminal (or while a long
    # report ran) printed a KeyboardInterrupt traceback.
    import subprocess
    import sys
    import time

    conf = tmp_path / "ps.conf"
    conf.write_text(f'BAN_BACKEND="none"\nSTATE_DIR="{tmp_path}/state"\n'
                    f'CONTROL_SOCKET="{tmp_path}/control.sock"\nHOSTS_DENY_FILE="{tmp_path}/hosts.deny"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "portsentry", "block", "--file", "-", "-c", str(conf)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")},
        # As a terminal's Ctrl-C finds it: SIGINT not ignored (a test runner may ignore it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdin is not None
        proc.stdin.write("198.18.1.5\n")
        proc.stdin.flush()
        time.sleep(2)  # past the imports, reading the feed
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in err
    assert proc.returncode == 130  # what a shell reports for a command ended by SIGINT
    assert not (tmp_path / "hosts.deny").exists()  # nothing half done


@pytest.mark.parametrize("command", [["reload"], ["list"], ["unblock", "198.18.1.5"], ["status"]])
def test_a_control_socket_only_root_may_use_is_named_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # As a user other than root (the socket is 0600 in a 0700 directory) `portsentry reload`
    # said only "portsentry: [Errno 13] Permission denied", naming neither the socket nor the fix.
    from portsentry.service import control

    def refuse(path: str, message: object, timeout: float = 60.0) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(control, "request", refuse)
    conf = tmp_path / "ps.conf"
    conf.write_text(f'STATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{tmp_path}/ctl.sock"\n')
    assert main([*command, "-c", str(conf)]) != 0
    assert capsys.readouterr().err.strip() == (
        f"portsentry: {tmp_path}/ctl.sock: permission denied (run as root)")


@pytest.mark.parametrize("as_json", [False, True])
def test_a_list_the_daemon_could_not_make_is_an_error_not_an_empty_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    # When the daemon's listing failed (the ban store unreadable, say) it answered with an error,
    # and `portsentry list` printed "no active bans" (or []) and exited 0: bans in force, denied.
    control = tmp_path / "ctl.sock"
    conf = tmp_path / "ps.conf"
    conf.write_text(f'STATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{control}"\n')
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(control))
    server.listen(1)

    def fail() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b'{"ok": false, "error": "list failed: database disk image is malformed"}\n')

    thread = threading.Thread(target=fail, daemon=True)
    thread.start()
    try:
        status = main(["list", "-c", str(conf), *(["--json"] if as_json else [])])
    finally:
        thread.join(timeout=5)
        server.close()
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.strip() == "portsentry: list failed: database disk image is malformed"


def test_a_refused_reload_is_an_error_on_standard_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `portsentry reload` printed the daemon's refusal ("the new configuration was refused") on
    # standard output, where `portsentry reload >/dev/null` in a script hid it.
    control = tmp_path / "ctl.sock"
    conf = tmp_path / "ps.conf"
    conf.write_text(f'STATE_DIR="{tmp_path}/state"\nCONTROL_SOCKET="{control}"\n')
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(control))
    server.listen(1)

    def refuse() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b'{"ok": false, "error": "the new configuration was refused; see the log"}\n')

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        assert main(["reload", "-c", str(conf)]) == 1
    finally:
        thread.join(timeout=5)
        server.close()
    out, err = capsys.readouterr()
    assert out == "" and err == "portsentry: the new configuration was refused; see the log\n"


@pytest.mark.parametrize(("journal_stderr", "log_stderr", "printed"),
                         [(False, False, True), (True, False, False), (False, True, False)])
def test_a_daemons_config_warnings_are_printed_once_where_its_journal_says_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    journal_stderr: bool, log_stderr: bool, printed: bool,
) -> None:
    # Under systemd stderr is the journal, and the daemon logs its warnings there itself (and with
    # --log-stderr echoes them to stderr): main()'s own print made each one appear twice.
    from portsentry.cli import main as main_module
    from portsentry.cli import run as run_module

    handed: list[object] = []

    def record(config: object, modes: object, args: argparse.Namespace, warnings: object = ()) -> int:
        handed.append(warnings)
        return 0

    monkeypatch.setattr(run_module, "run", record)
    monkeypatch.setattr(main_module, "stderr_is_journal", lambda: journal_stderr)
    conf = tmp_path / "ps.conf"
    conf.write_text('UDP_PORTS="7"\nFOO="1"\n')
    assert main(["-c", str(conf), *(["--log-stderr"] if log_stderr else []), "-udp"]) == 0
    assert ("unknown key FOO ignored" in capsys.readouterr().err) == printed
    assert handed and any("unknown key FOO" in str(w) for w in handed[0])  # type: ignore[attr-defined]
