"""A short soak: a minute of bans that expire as fast as they come, from thousands of sources of
both families, with reloads, admin commands and control clients that hang up meanwhile. What
weeks on a real host would show as drift must not appear: once the churn stops and every ban
ends, the kernel set, the blackhole routes (KILL_ROUTE_UNDO) and hosts.deny are empty again, and
the daemon holds no more fds, threads or children than before. bench/soak.py runs the long one."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time

from tests.system import soakrig
from tests.system.rig import cli_argv, daemon_env, eventually, run_in

CHURN_SECONDS = 40
BLOCK_TIME_MAX = 6
CLASSIC_TCP, CLASSIC_UDP = "1,11,15,79,111,119,143", "1,7,9,69,161,162"


def hang_up_on(path: str, n: int) -> None:
    """One control client that leaves early: mid-request, after garbage, or before the answer."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        client.sendall((b'{"command": "sta', b"garbage\n", b'{"command": "list"}\n')[n % 3])


def test_a_minute_of_churn_leaves_nothing_behind(daemon_factory, namespaces, syslog):
    net = namespaces
    soakrig.route_churn(net, real=100)
    daemon = daemon_factory(
        "-atcp", "-audp", "-tcp", "-udp", TCP_PORTS=CLASSIC_TCP, UDP_PORTS=CLASSIC_UDP,
        ADVANCED_PORTS_TCP="200", ADVANCED_PORTS_UDP="200", BAN_BACKEND="nftables",
        BLOCK_TCP="1", BLOCK_UDP="1", BLOCK_TIME="3", BLOCK_TIME_MAX=str(BLOCK_TIME_MAX),
        BAN_RATE_LIMIT="0", KERNEL_BAN="off", LOG_REPEAT_LIMIT="5",
        KILL_HOSTS_DENY="ALL: $TARGET$", KILL_ROUTE="/sbin/ip route add blackhole $TARGET$",
        KILL_ROUTE_UNDO="/sbin/ip route del blackhole $TARGET$",
        KILL_RUN_CMD="case $TARGET$ in *7) exit 3;; esac")  # fails now and then, all along
    store = daemon.workdir / "state" / "bans.sqlite3"
    time.sleep(1)
    before = soakrig.process(daemon.pid)

    churn = soakrig.start_churn(
        net, CHURN_SECONDS, "--rate", "40", "--sources", "3000", "--v6-share", "0.3",
        "--skip", "113,139,138,137,67", "--real", "100", "--real-rate", "5",
        "--tcp-ports", CLASSIC_TCP, "--udp-ports", CLASSIC_UDP)
    try:
        ctl = str(daemon.config["CONTROL_SOCKET"])
        n = 0
        while churn.poll() is None:
            n += 1
            hang_up_on(ctl, n)
            if n % 10 == 0:
                os.kill(daemon.pid, signal.SIGHUP)
            if n % 4 == 0:
                command = (["list"], ["status"], ["unblock", "198.18.250.9"])[n // 4 % 3]
                run_in(net.target, cli_argv(daemon.conf_path, *command), env=daemon_env())
            time.sleep(1)
        out, err = churn.communicate(timeout=10)
    finally:
        if churn.poll() is None:
            churn.kill()
            churn.wait()
    assert churn.returncode == 0, err.decode()
    during = soakrig.store_counts(store, time.time())
    # A ban and its lift are two history rows; both families were banned.
    assert during["history"] > 400, (out, during)
    assert syslog.find(re.compile(r"attackalert: Host 198\.19\.\S+ has been blocked via nftables"))
    assert syslog.find(re.compile(r"attackalert: Host fd00:19:\S+ has been blocked via nftables"))

    def all_ended() -> bool:
        nft = soakrig.nft_elements(net.target)
        left = {"active": soakrig.store_counts(store, time.time())["active"],
                "kernel": nft.get("blocked4", 0) + nft.get("blocked6", 0),
                "routes": soakrig.blackhole_routes(net.target),
                "hosts.deny": soakrig.lines(daemon.hosts_deny_path)}
        assert not any(left.values()), left
        return True

    eventually(all_ended, timeout=BLOCK_TIME_MAX + 15, what="every ban ended everywhere")
    after = soakrig.process(daemon.pid)
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["threads"] <= before["threads"] + 2, (before, after)
    eventually(lambda: soakrig.children(daemon.pid) == (0, 0), timeout=5, what="no children left")
    assert not syslog.find("internal error")
    assert daemon.running
