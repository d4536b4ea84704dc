"""The fleet on larger Redis set-ups (issue 12): through Sentinel, across a failover of the master,
and on a Redis Cluster, across the move of the fleet's slot to another node. Every server runs in
the test's hub namespace with its own ports and directory and is stopped at the end."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from tests.system import rig
from tests.system.fleetrig import HUB_IP, Host, Redis, close_hosts, fleet_config, fleet_net, make_key
from tests.system.test_fleet import addresses, fleet_status, in_set, joined

pytestmark = pytest.mark.system

SERVICE = "fleetmain"
SENTINEL_PORT = 26390
CLUSTER_PORTS = (7101, 7102, 7103)


class Sentinel(Redis):
    """redis-server --sentinel watching SERVICE; clients ask it without credentials (the default
    of redis-py and of FLEET_REDIS_URL without sentinel_auth=yes); it logs in to the servers as
    their admin user."""

    def __init__(self, ns: str, workdir: Path, master_port: int, password: str) -> None:
        super().__init__(ns, workdir, port=SENTINEL_PORT, password=password)
        self.master_port = master_port

    def argv(self) -> list[str]:
        config = self.dir / "sentinel.conf"
        config.write_text("\n".join([
            f"bind {HUB_IP}", f"port {self.port}", f"dir {self.dir}",
            f"sentinel monitor {SERVICE} {HUB_IP} {self.master_port} 1",
            f"sentinel auth-user {SERVICE} admin", f"sentinel auth-pass {SERVICE} {self.password}",
            f"sentinel down-after-milliseconds {SERVICE} 1000", f"sentinel failover-timeout {SERVICE} 5000",
        ]) + "\n")
        return ["redis-server", str(config), "--sentinel"]

    def replica_ready(self) -> bool:
        """The sentinel has the replica's INFO (it picks no replica it has not heard from)."""
        fields = self.cli("SENTINEL", "replicas", SERVICE).split()
        info = dict(zip(fields[::2], fields[1::2], strict=False))
        assert info.get("port") == "6391" and info.get("flags") == "slave" \
            and info.get("master-link-status") == "ok", fields
        return True

    def cli(self, *args: str) -> str:
        argv = ["redis-cli", "-h", HUB_IP, "-p", str(self.port), *args]
        return rig.run_in(self.ns, argv, timeout=20).stdout


def replication_lines(password: str) -> list[str]:
    return ["masteruser admin", f"masterauth {password}"]


@contextlib.contextmanager
def two_hosts(tmp_path: Path, net_hosts: list[str], net, url: str,
              password_from: Redis) -> Iterator[list[Host]]:
    key = make_key(tmp_path)
    hosts: list[Host] = []
    try:
        for index, ns in enumerate(net_hosts, 1):
            config = fleet_config(index, password_from, key, FLEET_REDIS_URL=url)
            hosts.append(Host(net, ns, index, tmp_path / f"h{index}", config))
            hosts[-1].start()
        for host in hosts:
            joined(host)
        yield hosts
    finally:
        close_hosts(hosts)


def test_a_sentinel_url_follows_the_master_through_a_failover(tmp_path):
    with fleet_net(2) as net, contextlib.ExitStack() as servers:
        password = secrets.token_hex(16)
        master = servers.enter_context(Redis(net.hub, tmp_path / "master", port=6390, password=password,
                                             extra=replication_lines(password)))
        replica = servers.enter_context(Redis(
            net.hub, tmp_path / "replica", port=6391, password=master.password,
            extra=[f"replicaof {HUB_IP} 6390", *replication_lines(master.password)]))
        rig.eventually(lambda: "connected_slaves:1" in master.cli("INFO", "replication"), timeout=15,
                       what="the replica in sync")
        sentinel = Sentinel(net.hub, tmp_path / "sentinel", 6390, master.password)
        servers.enter_context(sentinel)
        rig.eventually(lambda: sentinel.replica_ready(), timeout=30, what="the sentinel knows the replica")
        url = f"redis+sentinel://portsentry@{HUB_IP}:{SENTINEL_PORT}/{SERVICE}/0"
        with two_hosts(tmp_path, net.hosts, net, url, master) as (first, second):
            before, after = addresses(2, third=60)
            first.admin("block", before)
            in_set(second, before)
            master.kill()  # a crash: the sentinel promotes the replica
            rig.eventually(lambda: "6391" in sentinel.cli("SENTINEL", "get-master-addr-by-name", SERVICE),
                           timeout=30, what="the sentinel's failover to the replica")
            first.admin("block", after)
            in_set(second, after, timeout=30)
            rig.eventually(lambda: fleet_status(second)["link"] == "up", timeout=15, what="h2's link up")
            # Both bans are in the new master's active set (replicated, or sent again by host 1 when
            # its mark on the new master is not the last decision it sent).
            active = replica.cli("HKEYS", "portsentry:{test}:bans")
            assert before in active and after in active, active
            assert {before, after} <= first.blocked()


def cluster_node_id(node: Redis) -> str:
    return node.cli("CLUSTER", "MYID").strip()


def move_slot(slot: int, source: Redis, target: Redis, others: list[Redis]) -> None:
    """Move one slot and its keys by hand, as `redis-cli --cluster reshard` does slot by slot."""
    source_id, target_id = cluster_node_id(source), cluster_node_id(target)
    assert target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id).strip() == "OK"
    assert source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id).strip() == "OK"
    keys = source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
    assert keys, "the fleet's keys are on the source node"
    moved = source.cli("MIGRATE", HUB_IP, str(target.port), "", "0", "5000",
                       "AUTH2", "admin", source.password, "KEYS", *keys)
    assert moved.strip() == "OK", moved
    for node in (target, source, *others):
        assert node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id).strip() == "OK"


def test_a_cluster_url_finds_the_fleets_slot_and_follows_it_to_another_node(tmp_path):
    slot = key_slot(b"portsentry:{test}:decisions")
    cluster = ["cluster-enabled yes", "cluster-node-timeout 2000", "cluster-config-file nodes.conf"]
    with fleet_net(2) as net, contextlib.ExitStack() as servers:
        password = secrets.token_hex(16)
        # The fleet's user also asks where its slot is (CLUSTER SLOTS).
        nodes = [servers.enter_context(Redis(net.hub, tmp_path / f"node{port}", port=port, password=password,
                                             extra=cluster, user_rules="+cluster|slots"))
                 for port in CLUSTER_PORTS]
        create = ["redis-cli", "--user", "admin", "--pass", password, "--no-auth-warning",
                  "--cluster", "create", *(f"{HUB_IP}:{p}" for p in CLUSTER_PORTS), "--cluster-yes"]
        created = rig.run_in(net.hub, create, timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        rig.eventually(lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes), timeout=30,
                       what="the cluster up")
        owner = next(n for n in nodes if _served(n, slot))
        others = [n for n in nodes if n is not owner]
        # The first seed does not hold the slot: the host must ask and go where it is.
        seeds = ",".join(f"{HUB_IP}:{n.port}" for n in (*others, owner))
        url = f"redis+cluster://portsentry@{seeds}"
        with two_hosts(tmp_path, net.hosts, net, url, owner) as (first, second):
            before, after = addresses(2, third=70)
            first.admin("block", before)
            in_set(second, before)
            assert int(owner.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) == 4
            move_slot(slot, owner, others[0], others[1:])
            first.admin("block", after)
            in_set(second, after, timeout=30)
            assert int(others[0].cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) == 4
            active = others[0].cli("HKEYS", "portsentry:{test}:bans")
            assert before in active and after in active, active
            rig.eventually(lambda: fleet_status(first)["link"] == fleet_status(second)["link"] == "up",
                           timeout=15, what="both links up")


def _served(node: Redis, slot: int) -> str:
    """`slot` when this node serves it as a master (its CLUSTER SLOTS entry names its own port)."""
    for line in node.cli("CLUSTER", "NODES").splitlines():
        fields = line.split()
        if "myself" in fields[2] and "master" in fields[2]:
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return str(slot)
    return ""
