"""Bans shared across a fleet through a real redis-server (issue 12): hosts in their own
namespaces on one bridge, a real scan, the scanner's address in every host's nftables set."""

from __future__ import annotations

import contextlib
import hmac
import json
import subprocess
import sys
import time
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
    close_hosts,
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
            for host in hosts:
                joined(host)
            yield net, redis, hosts, key
        finally:
            close_hosts(hosts)


def joined(host: Host) -> None:
    """The host's fleet threads reach Redis (READY comes first: Redis never delays the start)."""
    rig.eventually(lambda: fleet_status(host)["link"] == "up", timeout=15, what=f"h{host.index} joined")


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


def addresses(count: int, third: int = 0) -> list[str]:
    """Scanners outside the fleet's subnet, in 198.19.0.0/16."""
    return [f"198.19.{third + i // 250}.{i % 250 + 1}" for i in range(count)]


def block_file(host: Host, tmp_path: Path, name: str, items: list[str]) -> None:
    path = tmp_path / name
    path.write_text("\n".join(items) + "\n")
    host.admin("block", "--file", str(path), "--for", "2h")


def fleet_status(host: Host) -> dict[str, object]:
    state = json.loads(host.admin("status", "--json").stdout)
    fleet_state: dict[str, object] = state["fleet"]
    return fleet_state


def test_redis_restarted_empty_while_every_host_sat_idle_is_refilled(tmp_path):
    """No command of host 1 fails: redis-py reconnects its idle connection without a word. Its
    mark in Redis tells it the bans it sent are gone; a host that joins then loads them all."""
    with fleet(tmp_path, 2) as (_net, redis, hosts, _key):
        first, second = hosts
        items = addresses(50, third=20)
        block_file(first, tmp_path, "idle", items)
        rig.eventually(lambda: {*items} <= second.blocked(), timeout=15, what="the bans on h2")
        time.sleep(1.0)  # both publishers idle, their connections in the pool
        redis.kill()
        redis.start()
        first.syslog.wait_for("lost decisions of this host (it holds none", timeout=15)

        def refilled() -> bool:
            return {*items} <= {*redis.cli("HKEYS", "portsentry:{test}:bans").split()}

        rig.eventually(refilled, timeout=15, what="h1's bans back in Redis's active set")
        rig.eventually(lambda: fleet_status(second)["link"] == "up", timeout=15, what="h2's link up")
        assert second.blocked() == {*items} and not fleet_status(second)["refused"]


def test_redis_killed_in_a_burst_loses_no_ban_on_any_host(tmp_path):
    with fleet(tmp_path, 3) as (_net, redis, hosts, _key):
        first, second, third = hosts
        wanted: list[str] = []
        for batch in range(6):
            items = addresses(100, third=batch)
            wanted += items
            block_file(first if batch % 2 == 0 else second, tmp_path, f"burst{batch}", items)
            if batch == 2:
                redis.kill()  # mid-burst: bans keep being made while Redis is away
            if batch == 4:
                redis.start()
        everything = {*wanted}
        for host in hosts:
            try:
                def arrived(current: Host = host) -> bool:
                    return everything <= current.blocked()

                rig.eventually(arrived, timeout=30, what=f"all {len(everything)} bans on h{host.index}")
            except rig.RigError as error:
                raise rig.RigError(f"{error}: has {len(everything & host.blocked())}\n"
                                   + "\n".join(f"h{h.index}: {fleet_status(h)}\n{h.syslog.describe()}"
                                               for h in hosts)) from None
            # Nothing else was banned: no decision was applied wrongly.
            assert host.blocked() == everything
        for host in (first, second, third):
            state = fleet_status(host)
            assert state["link"] == "up" and not state["refused"], state
        assert "is down" in first.syslog.describe() and "is up" in first.syslog.describe()


def test_decisions_without_the_key_are_refused_over_tls(tmp_path):
    with fleet(tmp_path, 2, tls=True) as (_net, redis, hosts, _key):
        first, second = hosts
        stream = "portsentry:{test}:decisions"
        now = f"{time.time():.6f}"
        forged = f"1|h1|1|999999|ban|198.19.9.9|-|{now}|forged".encode()
        # No signature at all, and one made with another key.
        assert redis.cli("XADD", stream, "*", "d", forged.decode()).strip(), redis.cli("PING")
        bad = hmac.new(b"not the fleet key at all", b"portsentry-fleet-v1\0test\0" + forged, "sha256")
        redis.cli("XADD", stream, "*", "d", forged.decode(), "s", bad.hexdigest())
        # A real ban after them, so we know the reader got past both.
        first.admin("block", "198.19.9.10")
        in_set(second, "198.19.9.10")
        assert "198.19.9.9" not in second.blocked() and "198.19.9.9" not in first.blocked()
        for host in hosts:
            refused = fleet_status(host)["refused"]
            assert refused == {"unsigned": 1, "bad_signature": 1}, (refused, host.syslog.describe())
        second.syslog.wait_for("fleet: refused an entry from ?: unsigned")
        assert redis.password not in first.daemon.stderr_text() + first.syslog.describe()
        assert fleet_status(first)["redis"] == redis.url  # no password in it to hide


def test_a_host_never_applies_a_fleet_ban_of_its_gateway_or_itself(tmp_path):
    with fleet(tmp_path, 3, gateways={2: SECOND_GATEWAY}) as (_net, _redis, hosts, _key):
        first, second, third = hosts
        first.admin("block", SECOND_GATEWAY)  # host 2's gateway, nobody else's
        first.admin("block", host_ip(2))  # host 2 itself
        first.admin("block", "198.19.7.7")  # an ordinary scanner, after both
        for host in (second, third):
            in_set(host, "198.19.7.7")
        assert SECOND_GATEWAY in third.blocked() and host_ip(2) in third.blocked()
        assert SECOND_GATEWAY not in second.blocked() and host_ip(2) not in second.blocked()
        refused = fleet_status(second)["refused"]
        assert refused == {"protected": 1, "own_address": 1}, refused
        # Host 2 still hears its gateway (a refused connection, where a ban would drop the reply),
        # while host 3 does not.
        assert "Refused" in rig.tcp_connect(second.ns, SECOND_GATEWAY, 9, timeout=2).error
        assert "timed out" in rig.tcp_connect(third.ns, SECOND_GATEWAY, 9, timeout=2).error
        assert HUB_IP not in second.blocked()


def test_a_late_host_gets_every_active_ban_and_unblock_lifts_fleet_wide(tmp_path):
    with fleet(tmp_path, 3) as (net, redis, hosts, key):
        first, second, third = hosts
        block_file(first, tmp_path, "many", addresses(300))
        second.admin("block", "198.19.200.1")
        first.admin("unblock", "198.19.0.1")  # lifted everywhere
        second.admin("unblock", "198.19.0.2", "--local")  # lifted on host 2 only
        wanted = set(addresses(300)) - {"198.19.0.1"} | {"198.19.200.1"}
        rig.eventually(lambda: third.blocked() == wanted, timeout=20, what="h3 has the fleet's bans")
        rig.eventually(lambda: second.blocked() == wanted - {"198.19.0.2"}, timeout=20,
                       what="h2 has the fleet's bans less its local unblock")
        assert first.blocked() == wanted
        ns = add_host(net, 4)
        late = Host(net, ns, 4, tmp_path / "h4", fleet_config(4, redis, key))
        hosts.append(late)
        late.start()
        joined(late)
        rig.eventually(lambda: late.blocked() == wanted, timeout=20,
                       what="the late host has every active ban")
        late.syslog.wait_for("fleet: loaded the fleet's active set: 300 of 300 bans applied here")


def test_demo_fleet_blocks_the_scanner_on_three_hosts_and_cleans_up():
    from tests.system.rig import REPO_ROOT, daemon_env, list_namespaces

    before = set(list_namespaces("psfleet-"))
    result = subprocess.run([sys.executable, "-m", "portsentry", "demo", "--fleet"], capture_output=True,
                            text=True, timeout=120, env=daemon_env(), cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for host in ("h2", "h3"):
        assert f"{host} portsentry[" in result.stdout
    assert "has been blocked via fleet (from h1)" in result.stdout
    assert "It works: one detection on h1, and the scanner finds h2 and h3 dark as well." in result.stdout
    assert "namespaces and temporary directory removed" in result.stdout
    assert "cannot" not in result.stdout and "FAILED" not in result.stdout, result.stdout
    assert set(list_namespaces("psfleet-")) == before


def test_a_reload_s_kill_hosts_deny_is_the_one_fleet_bans_write(tmp_path):
    # The fleet was handed KILL_HOSTS_DENY once, at start: after a reload that set it, this host's
    # own bans wrote hosts.deny lines and its peers' bans none (and the reverse once unset).
    with fleet(tmp_path, 2) as (_net, _redis, hosts, _key):
        first, second = hosts
        conf = second.daemon.conf_path
        conf.write_text(conf.read_text() + 'KILL_HOSTS_DENY="ALL: $TARGET$"\n')
        mark = second.syslog.mark()
        second.admin("reload")
        second.syslog.wait_for("adminalert: PortSentry reloaded its configuration", since=mark)
        local, peer = addresses(2)
        second.admin("block", local, "--for", "1h")
        first.admin("block", peer, "--for", "1h")
        in_set(second, peer)
        rig.eventually(lambda: second.daemon.hosts_deny_text() == f"ALL: {local}\nALL: {peer}\n",
                       timeout=10, what="both bans' hosts.deny lines")
