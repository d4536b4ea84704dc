"""A recorded ban is in force after a restart in a new network namespace (issue 9.2).

A container restart gives the daemon a new namespace whose routes and firewall are empty, while
its state directory (and so the ban store) survives. The kernel reuses the inode numbers of
namespaces, so the test re-creates the target until the new namespace has the old one's inode
(usually the first try), which is the case where an inode-based identity was fooled.
"""

from __future__ import annotations

import time

from tests.system.rig import namespace_inode, recreate_target, run_in, tcp_connect
from tests.system.test_bans import admin

ROUTE = "ip route add blackhole $TARGET$"


def test_kill_route_is_rerun_in_a_recreated_namespace(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", BLOCK_TIME="600", KILL_ROUTE=ROUTE)
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via dropped route")
    daemon.stop()
    before = namespace_inode(net.target)
    for _attempt in range(6):
        recreate_target(net)
        if namespace_inode(net.target) == before:
            break
        time.sleep(1.5)
    assert net.scanner_ip4 not in run_in(net.target, ["ip", "route", "show", "type", "blackhole"]).stdout
    mark = syslog.mark()
    daemon.start()
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via dropped route", since=mark)
    assert net.scanner_ip4 in run_in(net.target, ["ip", "route", "show", "type", "blackhole"]).stdout
    # Really blocked: the handshake's answer goes into the blackhole.
    assert not tcp_connect(net.scanner, net.target_ip4, 1, timeout=2.0).connected
    # The other scanner, never banned, still gets through.
    assert tcp_connect(net.scanner2, net.target2_ip4, 1).connected


def _tables(ns: str) -> list[str]:
    out = run_in(ns, ["nft", "list", "tables", "inet"], check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.startswith("table inet ")]


def test_a_changed_nft_table_takes_the_old_table_and_its_bans_away_at_the_next_start(
        daemon_factory, namespaces, syslog):
    """The table is kept at a stop so bans hold during a restart. A start with another NFT_TABLE
    made a new table and left the old one for good: its drop chain kept dropping the banned host
    (for ever with BLOCK_TIME 0) while `list` and `unblock` knew only the new table."""
    net = namespaces
    keys = {"TCP_PORTS": "1", "BLOCK_TCP": "1", "BAN_BACKEND": "nftables"}
    daemon = daemon_factory("-tcp", NFT_TABLE="psold", **keys)
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")
    daemon.stop()
    assert "psold" in _tables(net.target)
    daemon.config["NFT_TABLE"] = "psnew"
    mark = syslog.mark()
    daemon.start()
    assert _tables(net.target) == ["psnew"]
    syslog.wait_for("adminalert: removed the nftables table inet psold that the last run kept its bans in "
                    "(NFT_TABLE is now psnew)", since=mark)
    held = run_in(net.target, ["nft", "list", "set", "inet", "psnew", "blocked4"], check=True).stdout
    assert net.scanner_ip4 in held  # the stored ban, in the new table
    admin(daemon, "unblock", net.scanner_ip4)
    assert tcp_connect(net.scanner, net.target_ip4, 1, timeout=3.0).connected  # nothing else holds it


HOLD_GROUP = """\
import sys, time
from portsentry.sensors.nflog import NflogCapture
held = NflogCapture(int(sys.argv[1]))
print("held", flush=True)
time.sleep(30)
"""


def test_a_start_that_fails_leaves_the_last_run_s_table_and_its_bans(daemon_factory, namespaces, syslog):
    """The old table was deleted before the sensors opened: a start whose capture then could not
    open (the NFLOG group taken) left no ban in the kernel until the next good start."""
    import subprocess
    import sys

    from tests.system.rig import daemon_env, popen_in

    net = namespaces
    keys = {"TCP_PORTS": "1", "BLOCK_TCP": "1", "BAN_BACKEND": "nftables", "NFLOG_GROUP": "7373"}
    daemon = daemon_factory("-tcp", NFT_TABLE="psold", **keys)
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")
    daemon.stop()
    holder = popen_in(net.target, [sys.executable, "-c", HOLD_GROUP, "7373"], stdout=subprocess.PIPE,
                      env=daemon_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        daemon.config.update(NFT_TABLE="psnew", CAPTURE="nflog")
        daemon.modes = ["-stcp"]
        daemon.start(wait_ready=False)
        assert daemon.wait_exit() == 1
    finally:
        holder.kill()
        holder.wait()
    assert "psold" in _tables(net.target)
    assert not tcp_connect(net.scanner, net.target_ip4, 1, timeout=2.0).connected  # still dropped
    mark = syslog.mark()
    daemon.start()
    syslog.wait_for("adminalert: removed the nftables table inet psold that the last run kept its bans in "
                    "(NFT_TABLE is now psnew)", since=mark)
    assert _tables(net.target) == ["psnew"]
    held = run_in(net.target, ["nft", "list", "set", "inet", "psnew", "blocked4"], check=True).stdout
    assert net.scanner_ip4 in held
