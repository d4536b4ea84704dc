"""Operating the daemon: status, the control socket, reload, and what survives a stop."""

from __future__ import annotations

import json
import os
import re
import signal
import sys

from tests.system.rig import Daemon, cli_argv, daemon_env, run_in, tcp_connect


def cli(daemon: Daemon, *args: str):
    return run_in(daemon.net.target, cli_argv(daemon.conf_path, *args), env=daemon_env())


def test_status_running_and_stopped(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", "-udp", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$")
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for("has been blocked via wrappers")
    result = cli(daemon, "status")
    assert result.returncode == 0, result.stderr
    assert f"running, pid {daemon.pid}" in result.stdout
    assert "-tcp: TCP ports" in result.stdout and "-udp: UDP ports" in result.stdout
    assert f"Connect from host: {net.scanner_ip4}" in result.stdout
    state = json.loads(cli(daemon, "status", "--json").stdout)
    assert state["running"] and state["pid"] == daemon.pid
    assert state["probes_seen"] == 1 and state["hosts_blocked"] == 1 and state["active_bans"] == 1
    assert state["modes"] == ["tcp", "udp"]
    daemon.stop()
    stopped = cli(daemon, "status")
    assert stopped.returncode == 3
    assert "portsentry is not running" in stopped.stdout
    assert "active bans in the store: 1" in stopped.stdout
    assert json.loads(cli(daemon, "status", "--json").stdout)["running"] is False


def test_block_unblock_and_list_through_the_socket(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$")
    blocked = cli(daemon, "block", net.scanner2_ip4, "--for", "5m")
    assert blocked.returncode == 0, blocked.stderr
    assert "via the running daemon" in blocked.stdout
    listing = cli(daemon, "list", "--json")
    assert [row["address"] for row in json.loads(listing.stdout)] == [net.scanner2_ip4]
    assert "via the running daemon" in listing.stderr
    # The daemon now treats it as blocked.
    assert tcp_connect(net.scanner2, net.target2_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host: {net.scanner2_ip4} is already blocked. Ignoring")
    unblocked = cli(daemon, "unblock", net.scanner2_ip4)
    assert unblocked.returncode == 0, unblocked.stderr
    assert daemon.hosts_deny_text() == ""
    assert json.loads(cli(daemon, "list", "--json").stdout) == []


def test_reload_valid_and_invalid_config(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1,11")
    good = daemon.conf_path.read_text().replace('TCP_PORTS="1,11"', 'TCP_PORTS="1,11,2222"')
    daemon.conf_path.write_text(good)
    result = cli(daemon, "reload")
    assert result.returncode == 0, result.stderr
    syslog.wait_for("adminalert: PortSentry reloaded its configuration from")
    syslog.wait_for("adminalert: Going into listen mode on TCP port: 2222")
    assert tcp_connect(net.scanner, net.target_ip4, 2222).connected
    syslog.wait_for(f"attackalert: Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to TCP port: 2222")
    # A broken config is refused and the running one stays (port 2222 still watched).
    daemon.conf_path.write_text(good.replace('TCP_PORTS="1,11,2222"', 'TCP_PORTS="1,99999"'))
    os.kill(daemon.pid, signal.SIGHUP)
    refused = syslog.wait_for("adminalert: ERROR: reload refused, the running configuration stays in force")
    assert "TCP_PORTS" in refused.message and "99999" in refused.message
    assert cli(daemon, "reload").returncode == 1
    assert tcp_connect(net.scanner2, net.target2_ip4, 2222).connected
    syslog.wait_for(f"Connect from host: {net.scanner2_ip4}/{net.scanner2_ip4} to TCP port: 2222")
    assert daemon.running


def test_control_socket_refuses_non_root(daemon_factory, namespaces):
    daemon = daemon_factory("-tcp")
    sock_path = daemon.config["CONTROL_SOCKET"]
    assert oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
    client = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({sock_path!r})\nexcept PermissionError:\n    print('refused')\n"
        "else:\n    try:\n        s.sendall(b'{\"command\": \"status\"}\\n')\n"
        "    except OSError:\n        pass\n"
        "    print(s.recv(4096).decode())\n"
    )
    result = run_in(namespaces.target, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                        "/usr/bin/python3", "-c", client])
    assert result.stdout.strip() == "refused", (result.stdout, result.stderr)
    # Even with the file opened up, the peer's uid is checked.
    os.chmod(sock_path, 0o666)
    os.chmod(os.path.dirname(sock_path), 0o755)
    os.chmod(os.path.dirname(os.path.dirname(sock_path)), 0o755)
    result = run_in(namespaces.target, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                        "/usr/bin/python3", "-c", client])
    assert "permission denied" in result.stdout, (result.stdout, result.stderr)


def test_daemon_flag_forks_like_1_2_and_writes_a_pid_file(daemon_factory, namespaces, syslog, tmp_path):
    daemon = daemon_factory("-tcp", start=False)
    daemon.write_files()
    pid_file = tmp_path / "portsentry.pid"
    argv = [sys.executable, "-m", "portsentry", "-c", str(daemon.conf_path), "--syslog-socket",
            str(syslog.path), "--daemon", "--pid-file", str(pid_file), "-tcp"]
    launcher = run_in(namespaces.target, argv, env=daemon_env(), timeout=20)
    assert launcher.returncode == 0, launcher.stderr  # the parent returns at once, like 1.2
    syslog.wait_for("adminalert: PortSentry is now active and listening.")
    pid = int(pid_file.read_text())
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert tcp_connect(namespaces.scanner, namespaces.target_ip4, 1).connected
        syslog.wait_for(f"attackalert: Connect from host: {namespaces.scanner_ip4}")
    finally:
        os.kill(pid, signal.SIGTERM)
    syslog.wait_for("adminalert: PortSentry is shutting down")
    run_in(namespaces.target, ["sleep", "0.5"])
    assert not pid_file.exists()


def test_a_slow_or_hostile_control_client_neither_delays_detection_nor_stops_the_daemon(
        daemon_factory, namespaces, syslog):
    # issue 10.5: the control socket was read on the detection loop with a per-recv timeout.
    import socket
    import time

    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1")
    path = daemon.config["CONTROL_SOCKET"]
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(path)  # the socket file is visible here: the rig keeps it in a host temp dir
    try:
        slow.send(b"{")
        sent = time.monotonic()
        assert tcp_connect(net.scanner, net.target_ip4, 1).connected
        record = syslog.wait_for(f"attackalert: Connect from host: {net.scanner_ip4}", timeout=3.0)
        assert record is not None and time.monotonic() - sent < 3.0
        slow.send(b'"')
    finally:
        slow.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hostile:
        hostile.settimeout(10)
        hostile.connect(path)
        hostile.sendall(b"[" * 60_000 + b"\n")
        answer = json.loads(hostile.recv(65536))
    assert answer["ok"] is False and "bad request" in answer["error"]
    assert daemon.running
    assert json.loads(cli(daemon, "status", "--json").stdout)["running"]


def test_a_reload_whose_capture_cannot_open_is_refused_and_detection_goes_on(
        daemon_factory, namespaces, syslog):
    # CAPTURE="nflog" without the nftables backend passes the configuration checks but its
    # capture cannot open; the SIGHUP that asked for it used to raise out of the main loop,
    # and the daemon stopped with its sensors closed.
    from tests.system.rig import nmap

    net = namespaces
    daemon = daemon_factory("-stcp", TCP_PORTS="1,79", BAN_BACKEND="none")
    syslog.wait_for("adminalert: PortSentry is now active and listening.")
    daemon.conf_path.write_text(daemon.conf_path.read_text() + 'CAPTURE="nflog"\n')
    os.kill(daemon.pid, signal.SIGHUP)
    refused = syslog.wait_for("adminalert: ERROR: reload refused, the running configuration stays in force")
    assert "CAPTURE" in refused.message
    nmap(net.scanner, ["-sS", "-p", "79", "--max-retries", "0", net.target_ip4])
    syslog.wait_for(f"attackalert: TCP SYN/Normal scan from host: {net.scanner_ip4}/{net.scanner_ip4} "
                    "to TCP port: 79")
    assert daemon.running


def test_a_reload_that_changes_the_ban_backend_says_it_waits_for_the_next_start(
        daemon_factory, namespaces, syslog):
    # Taken as read, BAN_BACKEND none -> nftables had the engine ask for a native ban in every
    # block, from a backend the daemon never made: "attackalert: ERROR: Could not block host".
    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", BAN_BACKEND="none")
    text = daemon.conf_path.read_text()
    assert 'BAN_BACKEND="none"' in text
    daemon.conf_path.write_text(text.replace('BAN_BACKEND="none"', 'BAN_BACKEND="nftables"'))
    mark = syslog.mark()
    assert cli(daemon, "reload").returncode == 0
    syslog.wait_for("adminalert: BAN_BACKEND changed: it takes effect at the next start")
    tcp_connect(net.scanner, net.target_ip4, 1)
    syslog.wait_for(f"attackalert: Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to TCP port: 1")
    syslog.assert_absent("Could not block", wait=1.0, since=mark)  # as it did for each block
    assert run_in(net.target, ["nft", "list", "tables"]).stdout.strip() == ""  # still none


def test_a_reload_s_ban_rate_limit_is_the_one_the_daemon_bans_by(daemon_factory, namespaces, syslog):
    # The engine took the new settings but its guard kept the old caps: after 1 -> 60 the second
    # ban of the minute was refused, in a line that named the new cap of 60.
    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$",
                            BAN_RATE_LIMIT="1")
    text = daemon.conf_path.read_text()
    daemon.conf_path.write_text(text.replace('BAN_RATE_LIMIT="1"', 'BAN_RATE_LIMIT="60"'))
    mark = syslog.mark()
    assert cli(daemon, "reload").returncode == 0
    for ns, address in ((net.scanner, net.target_ip4), (net.scanner2, net.target2_ip4)):
        assert tcp_connect(ns, address, 1).connected
    for scanner in (net.scanner_ip4, net.scanner2_ip4):
        syslog.wait_for(f"attackalert: Host {scanner} has been blocked via wrappers", since=mark)
    syslog.assert_absent("ban rate limit", since=mark)


def test_a_reload_that_changes_the_nftables_table_or_hosts_deny_file_says_they_wait(
        daemon_factory, namespaces, syslog):
    # Both are opened once, at start: the reload took the new values as read and said nothing,
    # while the chain kept its hook and the lines went on to the old file.
    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", BAN_BACKEND="nftables",
                            KILL_HOSTS_DENY="ALL: $TARGET$")
    elsewhere = daemon.workdir / "hosts.deny.new"
    daemon.conf_path.write_text(daemon.conf_path.read_text().replace(
        f'HOSTS_DENY_FILE="{daemon.hosts_deny_path}"', f'HOSTS_DENY_FILE="{elsewhere}"')
        + 'NFT_HOOK="forward"\n')
    mark = syslog.mark()
    assert cli(daemon, "reload").returncode == 0
    syslog.wait_for("adminalert: NFT_HOOK, HOSTS_DENY_FILE changed: they take effect at the next start",
                    since=mark)
    tcp_connect(net.scanner, net.target_ip4, 1)
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via wrappers", since=mark)
    assert daemon.hosts_deny_text() == f"ALL: {net.scanner_ip4}\n" and not elsewhere.exists()
    chain = run_in(net.target, ["nft", "list", "chain", "inet", "portsentry", "filter"]).stdout
    assert "hook input" in chain


def test_a_reload_says_the_new_files_warnings_as_a_start_does(daemon_factory, namespaces, syslog):
    # The reload kept the warnings of the files it read to itself: a misspelled key was ignored
    # with only "reloaded its configuration" in the log, and an ignore entry with host bits set,
    # which means a whole network, passed unmentioned.
    daemon = daemon_factory("-tcp", TCP_PORTS="1")
    daemon.conf_path.write_text(daemon.conf_path.read_text() + 'BLOCK_TIMEE="3600"\n')
    daemon.ignore_path.write_text("127.0.0.1/32\n198.18.7.5/24\n")
    mark = syslog.mark()
    assert cli(daemon, "reload").returncode == 0
    unknown = syslog.wait_for("unknown key BLOCK_TIMEE ignored", since=mark)
    assert unknown.message.startswith(f"adminalert: WARNING: {daemon.conf_path}:")
    syslog.wait_for(f"adminalert: WARNING: {daemon.ignore_path}:2: '198.18.7.5/24' has host bits set",
                    since=mark)
    syslog.wait_for("adminalert: PortSentry reloaded its configuration from", since=mark)


def test_a_reload_leaves_the_connect_modes_sockets_open_when_their_ports_stay(
        daemon_factory, namespaces, syslog):
    # The first-probe ban's settings (BLOCK_TCP, BLOCK_TIME, SCAN_TRIGGER, BAN_RATE_LIMIT...)
    # belong to the stealth capture, but any change to them closed and bound again every port of
    # -tcp and -udp: connections waiting to be accepted were reset and never logged (4 of 1,500
    # connects during 10 reloads), and each port was announced again.
    net = namespaces
    daemon = daemon_factory("-tcp", "-udp", TCP_PORTS="1", UDP_PORTS="1")
    text = daemon.conf_path.read_text()
    daemon.conf_path.write_text(text.replace('SCAN_TRIGGER="0"', 'SCAN_TRIGGER="2"')
                                + 'BLOCK_TIME="600"\nBAN_RATE_LIMIT="5"\n')
    mark = syslog.mark()
    assert cli(daemon, "reload").returncode == 0
    syslog.wait_for("adminalert: PortSentry reloaded its configuration from", since=mark)
    syslog.assert_absent("Going into listen mode", wait=0.5, since=mark)
    for _ in range(2):  # SCAN_TRIGGER 2 is in force: the second hit acts
        assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to TCP port: 1",
                    since=mark)
    # A change of their ports does bind them again.
    daemon.conf_path.write_text(daemon.conf_path.read_text().replace('TCP_PORTS="1"', 'TCP_PORTS="1,2"'))
    assert cli(daemon, "reload").returncode == 0
    syslog.wait_for("adminalert: Going into listen mode on TCP port: 2", since=mark)
    assert tcp_connect(net.scanner2, net.target2_ip4, 2).connected


def test_what_the_config_does_not_honour_is_said_in_syslog_at_start_and_at_each_reload(
        daemon_factory, syslog):
    # Config warnings went to standard error only: at boot under the SysV script (--daemon) they
    # reached nobody, and a reload (systemctl reload sends SIGHUP, no check-config) said nothing
    # at all of a misspelt key in the new file, which was silently not honoured.
    daemon = daemon_factory("-tcp", TCP_PORTS="1", SCAN_TRIGGER="0", start=False)
    path = daemon.conf_path
    write_files = daemon.write_files

    def with_a_second_trigger() -> None:
        write_files()
        path.write_text(path.read_text() + 'SCAN_TRIGGER="3"\n')

    daemon.write_files = with_a_second_trigger
    daemon.start()
    doubled = len(path.read_text().splitlines())
    first = path.read_text().splitlines().index('SCAN_TRIGGER="0"') + 1
    syslog.wait_for(f"adminalert: WARNING: {path}:{doubled}: SCAN_TRIGGER: already set on line "
                    f"{first}; this later value is ignored")
    path.write_text(path.read_text() + 'BLOCK_UPD="1"\n')
    mark = syslog.mark()
    os.kill(daemon.pid, signal.SIGHUP)
    syslog.wait_for("adminalert: PortSentry reloaded its configuration from", since=mark)
    syslog.wait_for(f"adminalert: WARNING: {path}:{doubled + 1}: unknown key BLOCK_UPD ignored",
                    since=mark)


def test_every_ban_change_by_an_admin_says_in_syslog_what_it_did_and_who(daemon_factory, namespaces, syslog):
    # Through the daemon, an admin's block and unblock named nobody, and a refused one left no
    # line; with the daemon stopped, block, unblock, --file and flush left nothing in syslog.
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$")
    me = r"by root \(uid 0, pid \d+(, login [^)]+)?\)"
    assert cli(daemon, "block", net.scanner2_ip4, "--for", "5m").returncode == 0
    syslog.wait_for(re.compile(rf"^adminalert: block {net.scanner2_ip4} for 300 seconds {me}: done$"))
    assert cli(daemon, "unblock", net.scanner2_ip4).returncode == 0
    syslog.wait_for(re.compile(rf"^adminalert: unblock {net.scanner2_ip4} {me}: done$"))
    refused = cli(daemon, "unblock", net.scanner2_ip4)
    assert refused.returncode == 1 and f"{net.scanner2_ip4} is not blocked" in refused.stderr
    syslog.wait_for(re.compile(rf"^adminalert: ERROR: unblock {net.scanner2_ip4} {me} failed: "
                               rf"{net.scanner2_ip4} is not blocked$"))
    daemon.stop()
    mark = syslog.mark()
    to_log = ("--syslog-socket", str(syslog.path))
    assert cli(daemon, "block", net.scanner_ip4, *to_log).returncode == 0
    assert cli(daemon, "unblock", net.scanner_ip4, *to_log).returncode == 0
    assert cli(daemon, "flush", *to_log).returncode == 0
    said = syslog.messages(mark)
    assert said[0] == f'attackalert: Host {net.scanner_ip4} has been blocked via wrappers with string: ' \
                      f'"ALL: {net.scanner_ip4}"'
    assert re.fullmatch(rf"adminalert: block {net.scanner_ip4} {me}: done", said[1])
    assert said[2] == f"attackalert: Host {net.scanner_ip4} has been unblocked: unblocked by admin"
    assert re.fullmatch(rf"adminalert: unblock {net.scanner_ip4} {me}: done", said[3])
    assert re.fullmatch(rf"adminalert: flush {me}: no native ban backend configured \(BAN_BACKEND\)", said[4])
    assert len(said) == 5
    # Each once, in the daemon's ident; the history file, which fail2ban bans from, has none.
    assert all(record.ident == "portsentry" for record in syslog.records(mark))
    assert daemon.history_text() == ""
    assert daemon.hosts_deny_text() == ""


def test_a_block_or_unblock_with_a_failed_step_says_which_and_exits_1(daemon_factory, namespaces, syslog):
    # It said "done" and exited 0: through the daemon the failure lines reached syslog only, and
    # with the daemon stopped they were printed, but the exit was 0 (`block --file` exits 1).
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", BAN_BACKEND="nftables", KILL_HOSTS_DENY="ALL: $TARGET$",
                            KILL_ROUTE="false $TARGET$")
    route_failed = (f"adminalert: ERROR: There was an error trying to block host (system fail) "
                    f'{net.scanner2_ip4}: "false {net.scanner2_ip4}" exit status 1')
    blocked = cli(daemon, "block", net.scanner2_ip4)
    assert blocked.returncode == 1, (blocked.stdout, blocked.stderr)
    assert route_failed in blocked.stdout.splitlines() and "done" not in blocked.stdout
    assert (f"portsentry: {net.scanner2_ip4} is blocked, but not everywhere: KILL_ROUTE failed (never run "
            "again for this ban") in blocked.stderr
    syslog.wait_for(re.compile(rf"adminalert: ERROR: block {re.escape(net.scanner2_ip4)} by root \(.*\) "
                               "failed: .* KILL_ROUTE failed"))
    # Recorded, and held by what worked.
    [row] = json.loads(cli(daemon, "list", "--json").stdout)
    assert row["address"] == net.scanner2_ip4 and row["backends"] == ["nftables"]
    assert daemon.hosts_deny_text() == f"ALL: {net.scanner2_ip4}\n"
    # A flushed ruleset (the daemon's repair puts the table back within a minute).
    run_in(net.target, ["nft", "delete", "table", "inet", "portsentry"], check=True)
    unblocked = cli(daemon, "unblock", net.scanner2_ip4)
    assert unblocked.returncode == 1, (unblocked.stdout, unblocked.stderr)
    assert (f"adminalert: ERROR: There was an error trying to unblock host {net.scanner2_ip4}: "
            in unblocked.stdout)
    assert "its removal from BAN_BACKEND" in unblocked.stderr
    syslog.wait_for(re.compile(rf"adminalert: ERROR: unblock {re.escape(net.scanner2_ip4)} by root"))
    assert json.loads(cli(daemon, "list", "--json").stdout) == [] and daemon.hosts_deny_text() == ""
    daemon.stop()
    # The daemon stopped: the same words, and the same exit.
    blocked = cli(daemon, "block", net.scanner_ip4)
    assert blocked.returncode == 1, (blocked.stdout, blocked.stderr)
    assert f'"false {net.scanner_ip4}" exit status 1' in blocked.stdout and "done" not in blocked.stdout
    assert "KILL_ROUTE failed" in blocked.stderr
    os.chmod(daemon.hosts_deny_path, 0o666)  # refused: world-writable
    unblocked = cli(daemon, "unblock", net.scanner_ip4)
    assert unblocked.returncode == 1, (unblocked.stdout, unblocked.stderr)
    assert f"adminalert: ERROR: cannot remove 'ALL: {net.scanner_ip4}' from" in unblocked.stdout
    assert "its hosts.deny line could not be removed" in unblocked.stderr


def test_block_for_of_a_banned_address_changes_its_end_and_nothing_else(daemon_factory, namespaces, syslog,
                                                                       tmp_path):
    # It said "has been blocked via wrappers" again (no line was written), ran KILL_ROUTE again
    # and counted a second ban in portsentry_bans_total.
    from tests.system.test_telemetry import scrape, total

    net = namespaces
    routes = tmp_path / "routes"
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", BAN_BACKEND="nftables", KILL_HOSTS_DENY="ALL: $TARGET$",
                            KILL_ROUTE=f"echo $TARGET$ >> {routes}", METRICS_LISTEN="127.0.0.1:9476")
    address = net.scanner2_ip4
    assert cli(daemon, "block", address, "--for", "1h").returncode == 0
    mark = syslog.mark()
    changed = cli(daemon, "block", address, "--for", "2h")
    assert changed.returncode == 0, changed.stderr
    assert re.search(rf"adminalert: {re.escape(address)} was already blocked: its ban now lasts until .* "
                     "instead of until ", changed.stdout)
    syslog.wait_for(re.compile(rf"adminalert: block {re.escape(address)} for 7200 seconds by root"),
                    since=mark)
    said = syslog.messages(mark)
    assert [line for line in said if "was already blocked" in line] == [changed.stdout.splitlines()[0]]
    assert not [line for line in said if "has been blocked" in line], said
    assert routes.read_text() == f"{address}\n"  # KILL_ROUTE ran once
    assert daemon.hosts_deny_text() == f"ALL: {address}\n"
    [row] = json.loads(cli(daemon, "list", "--json").stdout)
    assert 7100 < row["remaining"] <= 7200 and row["count"] == 1
    listed = run_in(net.target, ["nft", "-j", "list", "set", "inet", "portsentry", "blocked4"], check=True)
    [entry] = [item for item in json.loads(listed.stdout)["nftables"] if "set" in item]
    [element] = entry["set"]["elem"]
    assert 7100 < element["elem"]["timeout"] <= 7200, element  # the kernel's entry got the new end
    assert total(scrape(net.target, 9476), "portsentry_bans_total") == 1
