"""The kernel and the ban store agree about which bans are in force, against the real nft in a
throwaway namespace: what the kernel lost behind the daemon's back is put back."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.system.rig import Namespaces, run_in

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft"),
]

SRC_DIR = str(Path(__file__).resolve().parents[2] / "src")

# Runs in the target namespace: a daemon's ban lifecycle without the NFLOG capture (connect
# modes, CAPTURE="packet"), a ban, then the ruleset flushed by someone else.
FLUSHED_CHILD = r"""
import json, subprocess, sys, time
from ipaddress import ip_address
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.ipset import IpsetBackend
from portsentry.responders.nftables import NftablesBackend

kind = sys.argv[2]
backend = IpsetBackend() if kind == "ipset" else NftablesBackend(mechanism=kind)
backend.setup()
bans = BanManager(BanStore(MEMORY), backend, HostsDeny(sys.argv[1]), BanPolicy(base=3600), print)
A = ip_address("198.18.0.2")
now = time.time()
bans.remember(A, reason="scan", mode="tcp", port=1, now=now, duration=3600.0, hosts_deny_line=None,
              native=True)
bans.ban_native(A, 3600.0)

def blocking():
    if kind != "ipset":
        out = subprocess.run(["nft", "-j", "list", "chain", "inet", "portsentry", "filter"],
                             capture_output=True, text=True).stdout
        return sum(1 for o in json.loads(out or '{"nftables": []}')["nftables"] if "rule" in o)
    return sum(subprocess.run([tool, "-w", "-C", "INPUT", "-m", "set", "--match-set", name, "src",
                               "-j", "DROP"], capture_output=True).returncode == 0
               for tool, name in (("iptables", "portsentry4"), ("ip6tables", "portsentry6")))

report = {"before": [str(a) for a in backend.members()], "rules_before": blocking()}
if kind == "ipset":  # netfilter-persistent reload: iptables-restore flushes the chains it loads
    for tool in ("iptables-restore", "ip6tables-restore"):
        subprocess.run([tool], input="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", text=True, check=True)
else:  # systemctl reload nftables: Debian's nftables.conf starts with `flush ruleset`
    subprocess.run(["nft", "flush", "ruleset"], check=True)
report["rules_after_wipe"] = blocking()
bans.repair(now + 60)
report["after_repair"] = {str(a): t for a, t in backend.members().items()}
report["rules_after_repair"] = blocking()
bans.repair(now + 120)
report["rules_after_second_repair"] = blocking()
backend.teardown()
bans.repair(now + 180)
report["rules_after_teardown"] = blocking()
print(json.dumps(report), flush=True)
"""


@pytest.mark.parametrize("kind", ["netlink", "cli", "ipset"])
def test_bans_wiped_from_the_kernel_are_put_back(namespaces: Namespaces, tmp_path: Path, kind: str) -> None:
    # The once-a-minute repair looked only at the NFLOG capture chain: with -tcp/-udp (or
    # CAPTURE="packet"), and always with ipset, a reload of the host's firewall took the bans out
    # of force and they stayed listed, with the engine taking the scanners' probes as "already
    # blocked", until the daemon restarted.
    if kind == "ipset" and shutil.which("ipset") is None:
        pytest.skip("needs ipset")
    argv = [sys.executable, "-c", FLUSHED_CHILD, str(tmp_path / "hosts.deny"), kind]
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    result = run_in(namespaces.target, argv, timeout=60, check=True, env=env)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["before"] == ["198.18.0.2"]
    assert (report["rules_before"], report["rules_after_wipe"]) == (2, 0)
    after = report["after_repair"]
    assert list(after) == ["198.18.0.2"]
    assert 3400 < after["198.18.0.2"] <= 3540  # the time left, not a new hour
    assert report["rules_after_repair"] == report["rules_after_second_repair"] == 2
    assert report["rules_after_teardown"] == 0  # torn down on purpose: not brought back
