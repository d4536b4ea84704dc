"""Bans shared across a fleet through a real redis-server (issue 12): hosts in their own
namespaces on one bridge, a real scan, the scanner's address in every host's nftables set."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import rig
from tests.system.fleetrig import (
    FLEET_PORTS,
    HUB_IP,
    SCANNER_IP,
    SECOND_GATEWAY,
    FleetNet,
    Host,
    Redis,
    add_host,
    fleet_config,
    fleet_net,
    host_ip,
    make_key,
)

pytestmark = pytest.mark.system


@contextlib.contextmanager
def fleet(tmp_path: Path, count: int, *, tls: bool = False, gateways: dict[int, str] | None = None,
          **extra: str) -> Iterator[tuple[FleetNet, Redis, list[Host], Path]]:
    hosts: list[Host] = []
    with fleet_net(count, gateways) as net, Redis(net.hub, tmp_path / "redis", tls=tls) as redis:
        key = make_key(tmp_path)
        try:
            for index, ns in enumerate(net.hosts, 1):
                host = Host(net, ns, index, tmp_path / f"h{index}", fleet_config(index, redis, key, **extra))
                hosts.append(host)
                host.start()
            yield net, redis, hosts, key
        finally:
            for host in hosts:
                host.close()


def in_set(host: Host, address: str, timeout: float = 10.0) -> None:
    rig.eventually(lambda: address in host.blocked(), timeout=timeout,
                   what=f"{address} in h{host.index}'s nftables set")


def filtered(net: FleetNet, target: str) -> bool:
    follow_up = rig.nmap(net.scanner, ["-sS", "-p", FLEET_PORTS, "--max-retries", "0", target])
    states = set(rig.nmap_ports(follow_up.stdout).values())
    assert states == {"filtered"}, follow_up.stdout
    return True


def test_a_scan_of_one_host_bans_the_scanner_on_every_host_and_after_a_restart(tmp_path):
    with fleet(tmp_path, 3) as (net, _redis, hosts, _key):
        first, second, third = hosts
        rig.nmap(net.scanner, ["-sS", "-p", FLEET_PORTS, "--max-retries", "0", host_ip(1)])
        first.syslog.wait_for(f"attackalert: Host {SCANNER_IP} has been blocked via nftables")
        for host in (second, third):
            in_set(host, SCANNER_IP)
            host.syslog.wait_for(f"attackalert: Host {SCANNER_IP} has been blocked via fleet (from h1)")
        # Hosts 2 and 3 were never scanned, yet their ports are filtered for the scanner.
        assert filtered(net, host_ip(2)) and filtered(net, host_ip(3))
        listing = second.admin("list", "--json").stdout
        assert '"origin": "h1"' in listing, listing
        # Host 3 restarted (kernel table and all: its namespace's ruleset is flushed) blocks it still.
        third.daemon.stop()
        rig.run_in(third.ns, ["nft", "flush", "ruleset"], check=True)
        assert SCANNER_IP not in third.blocked()
        third.daemon.start()
        assert SCANNER_IP in third.blocked()
        assert filtered(net, host_ip(3))
        status = third.admin("status").stdout
        assert "fleet:" in status and "up to redis://portsentry@" in status, status
        assert third.daemon.history_text() == ""  # never scanned: nothing of 1.2's history here
