"""A fleet-wide unblock that reaches Redis late, after a newer ban of the address by another host:
every host ends up holding that newer ban."""

from __future__ import annotations

import time
from ipaddress import ip_address

from portsentry.fleet.link import Link
from portsentry.fleet.node import FleetNode
from tests.unit.fleet.test_node import local_ban, node


def publish(sender: FleetNode) -> None:
    """One publisher round: the feed, then the bans a stale lift made it send again."""
    out = Link(sender.settings)
    if sender.published is None:
        sender.connected(out)
    while sender.publish_once(out):
        pass
    sender.resend_bans(out)
    out.close()


def read(receiver: FleetNode) -> None:
    into = Link(receiver.settings)
    if receiver.stream is None:
        receiver._catch_up(into)
    while receiver.read_once(into, block_ms=0):
        pass
    into.close()


def test_a_late_fleet_unblock_does_not_leave_a_newer_ban_on_some_hosts_only(tmp_path, redis_url):
    # Host 1's admin unblocks a scanner fleet-wide while host 1 cannot reach Redis; host 2 then
    # sees the scanner again and bans it; host 1's lift reaches Redis after host 2's ban. Host 2
    # keeps its newer ban (the lift is stale there) and host 1 takes it back from the stream,
    # but host 3, holding the ban as a peer's, took the lift: the scanner stayed banned on two
    # hosts and free on the third until host 2's ban ended.
    hosts = [node(tmp_path, redis_url, f"h{n}") for n in (1, 2, 3)]
    (one, kernel1, _l1), (two, kernel2, _l2), (three, kernel3, _l3) = hosts
    for fleet, _kernel, _log in hosts:
        publish(fleet)
        read(fleet)
    scanner, now = ip_address("198.18.9.1"), time.time()
    local_ban(one, str(scanner), now=now - 200)
    publish(one)
    read(two)
    read(three)
    assert scanner in kernel2.held and scanner in kernel3.held
    one.bans.lift(scanner, now - 100, "unblocked by admin")  # waits in host 1's store
    local_ban(two, str(scanner), now=now)  # host 2's own detection, well after the unblock
    publish(two)
    publish(one)  # host 1 is back: its lift goes out after host 2's ban
    for _round in range(2):  # what a stale lift makes a host send is read at the next round
        for fleet, _kernel, _log in hosts:
            read(fleet)
            publish(fleet)
    assert two.status()["refused"] == {"stale": 1}
    assert [scanner in kernel.held for kernel in (kernel1, kernel2, kernel3)] == [True, True, True]
    for fleet in (one, three):
        held = fleet.bans.store.get(scanner)
        assert held is not None and held.origin == "h2" and held.active(time.time())
