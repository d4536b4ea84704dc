"""What the kernel holds against what the ban store says, across restarts in one boot: at start
the native sets hold the store's bans with the time the store leaves them, and nothing the store
does not know, except a kernel first-probe ban still waiting to be recorded late."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from typing import Any

import pytest

from tests.system.rig import DaemonFactory, Namespaces, eventually, run_in, tcp_connect
from tests.system.test_bans import admin

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

STORE = ("state", "bans.sqlite3")


def nft_elements(ns: str, name: str = "blocked4") -> dict[str, float | None]:
    """Elements of one of our nftables sets: value -> seconds left (None: no timeout)."""
    out = run_in(ns, ["nft", "-j", "list", "set", "inet", "portsentry", name], check=True).stdout
    found: dict[str, float | None] = {}
    for item in json.loads(out)["nftables"]:
        for element in item.get("set", {}).get("elem", []):
            elem = element["elem"] if isinstance(element, dict) and "elem" in element else {"val": element}
            value = elem["val"]
            key = " . ".join(map(str, value["concat"])) if isinstance(value, dict) else str(value)
            found[key] = elem.get("expires")
    return found


def ipset_members(ns: str, name: str = "portsentry4") -> list[str]:
    out = run_in(ns, ["ipset", "save", name], check=True).stdout
    return [line.split()[2] for line in out.splitlines() if line.startswith(f"add {name} ")]


def routes(ns: str) -> list[str]:
    out = run_in(ns, ["ip", "-4", "route", "show", "proto", "213", "type", "blackhole"], check=True).stdout
    return [line.split()[1] for line in out.splitlines()]


def members(ns: str, backend: str) -> list[str]:
    if backend == "route":
        return routes(ns)
    return sorted(nft_elements(ns)) if backend == "nftables" else ipset_members(ns)


@pytest.mark.parametrize("backend", ["nftables", "ipset", "route"])
def test_a_kernel_ban_the_store_does_not_know_is_gone_after_a_start(
        backend: str, daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: Any) -> None:
    # bans.sqlite3 deleted (or replaced by a backup) while the daemon was stopped: the kernel
    # still held the old bans, for ever with BLOCK_TIME 0, while `list` showed none of them.
    if backend == "ipset" and shutil.which("ipset") is None:
        pytest.skip("needs ipset")
    net = namespaces
    factory: Any = daemon_factory
    daemon = factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", BLOCK_TIME="0", BAN_BACKEND=backend)
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via {backend}")
    assert members(net.target, backend) == [net.scanner_ip4]
    daemon.stop()
    os.unlink(daemon.workdir.joinpath(*STORE))
    daemon.start()
    assert "no active bans" in admin(daemon, "list")
    assert members(net.target, backend) == []
    # The scanner is a stranger again: its next probe is a new ban, said so.
    mark = syslog.mark()
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via {backend}", since=mark)
    assert members(net.target, backend) == [net.scanner_ip4]


def test_a_ban_the_store_holds_longer_than_the_kernel_gets_its_time_back_at_start(
        daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: Any) -> None:
    # As after the wall clock was set back while the daemon was stopped: the store (wall clock)
    # leaves the ban more time than the kernel's timer (a clock that did not jump).
    net = namespaces
    factory: Any = daemon_factory
    daemon = factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", BLOCK_TIME="600", BAN_BACKEND="nftables")
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")
    daemon.stop()
    with sqlite3.connect(daemon.workdir.joinpath(*STORE)) as db:
        db.execute("UPDATE bans SET expires = ?", (time.time() + 5000,))
    db.close()
    daemon.start()
    left = nft_elements(net.target)[net.scanner_ip4]
    assert left is not None and 4900 < left <= 5000, left


def test_a_kernel_ban_made_while_the_daemon_was_down_survives_the_start_and_is_recorded(
        daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: Any) -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    net = namespaces
    factory: Any = daemon_factory
    daemon = factory("-stcp", BAN_BACKEND="nftables", BLOCK_TCP="1", TCP_PORTS="1,79",
                     BLOCK_TIME="3600")
    eventually(lambda: "79" in " ".join(nft_elements(net.target, "kports_tcp")), timeout=5)
    caught, stray = "198.18.7.7", "198.18.7.8"
    admin(daemon, "block", stray)
    daemon.stop()
    os.unlink(daemon.workdir.joinpath(*STORE))  # the stray's record goes with the file
    # As the kernel's first-probe rule does while no daemon reads NFLOG: the ban and its caught
    # entry, which the daemon records late.
    script = (f"add element inet portsentry blocked4 {{ {caught} timeout 3600s }}\n"
              f"add element inet portsentry caught4 {{ {caught} . tcp . 79 timeout 3600s }}\n")
    run_in(net.target, ["nft", "-f", "-"], input_text=script, check=True)
    daemon.start()
    kernel = nft_elements(net.target)
    assert stray not in kernel and caught in kernel, kernel
    assert 3500 < (kernel[caught] or 0) <= 3600
    syslog.wait_for(f"attackalert: Host {caught} was blocked by the kernel on its first probe to TCP port 79",
                    timeout=15)
    listing = json.loads(admin(daemon, "list", "--json"))
    assert [ban["address"] for ban in listing] == [caught]
    assert caught in nft_elements(net.target)


def test_a_clean_restart_keeps_the_sets_and_a_crash_has_them_replaced(
        daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: Any) -> None:
    net = namespaces
    factory: Any = daemon_factory
    daemon = factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", BLOCK_TIME="0", BAN_BACKEND="nftables")
    admin(daemon, "block", "198.18.7.9")
    replaced = "the ban sets now hold the"
    daemon.stop()
    # Added by hand while stopped: a clean stop vouches for the sets, so the start leaves them.
    run_in(net.target, ["nft", "add", "element", "inet", "portsentry", "blocked4", "{ 198.18.7.10 }"],
           check=True)
    mark = syslog.mark()
    daemon.start()
    syslog.assert_absent(replaced, wait=0.5, since=mark)
    assert sorted(nft_elements(net.target)) == ["198.18.7.10", "198.18.7.9"]
    # After a crash nothing vouches for them.
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait_exit()
    mark = syslog.mark()
    daemon.start()
    syslog.wait_for(f"adminalert: nftables: {replaced} 1 bans of the ban store and no other", since=mark)
    assert sorted(nft_elements(net.target)) == ["198.18.7.9"]


# Runs in the target namespace: a daemon's ban lifecycle with BAN_BACKEND="route", two bans and
# a lifted one, then a network restart's `ip route flush`, then the minute's repair.
ROUTE_CHILD = r"""
import json, subprocess, sys, time
from ipaddress import ip_address
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.iproute import RouteBackend

backend = RouteBackend()
lines = []
bans = BanManager(BanStore(MEMORY), backend, HostsDeny(sys.argv[1]), BanPolicy(), lines.append)
now = time.time()
for text in ("198.18.0.2", "fd00::2", "198.18.0.3"):
    bans.remember(ip_address(text), reason="scan", mode="tcp", port=1, now=now, duration=None,
                  hosts_deny_line=None, native=True)
    bans.ban_native(ip_address(text), None)
bans.lift(ip_address("198.18.0.3"), now, "unblocked by admin")
report = {"before": sorted(map(str, backend.members()))}
for family in ("-4", "-6"):
    subprocess.run(["ip", family, "route", "flush", "table", "main"], check=True)
report["after_flush"] = sorted(map(str, backend.members()))
bans.repair(now + 60)
report["after_repair"] = sorted(map(str, backend.members()))
mark = len(lines)
bans.repair(now + 120)
report["said"] = lines[:mark]
report["said_again"] = lines[mark:]
print(json.dumps(report), flush=True)
"""


def test_routes_a_network_restart_took_are_put_back(namespaces: Namespaces, tmp_path: Any) -> None:
    # BAN_BACKEND="route" had no repair: after `ip route flush` (a network restart) the bans were
    # listed, and taken as "already blocked" by the engine, while nothing blocked them.
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    argv = [sys.executable, "-c", ROUTE_CHILD, str(tmp_path / "hosts.deny")]
    result = run_in(namespaces.target, argv, timeout=60, check=True, env={**os.environ, "PYTHONPATH": src})
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["before"] == ["198.18.0.2", "fd00::2"]
    assert report["after_flush"] == []
    assert report["after_repair"] == ["198.18.0.2", "fd00::2"]  # not the lifted one
    assert report["said"][-1].startswith("adminalert: 2 bans were missing from route:")
    assert report["said_again"] == []
