"""A recorded ban is in force after a restart in a new network namespace (issue 9.2).

A container restart gives the daemon a new namespace whose routes and firewall are empty, while
its state directory (and so the ban store) survives. The kernel reuses the inode numbers of
namespaces, so the test re-creates the target until the new namespace has the old one's inode
(usually the first try), which is the case where an inode-based identity was fooled.
"""

from __future__ import annotations

import time

from tests.system.rig import namespace_inode, recreate_target, run_in, tcp_connect

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
