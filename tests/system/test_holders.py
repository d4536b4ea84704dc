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
from portsentry.responders.nftables import NftablesBackend

backend = NftablesBackend(mechanism=sys.argv[2])
backend.setup()
bans = BanManager(BanStore(MEMORY), backend, HostsDeny(sys.argv[1]), BanPolicy(base=3600), print)
A = ip_address("198.18.0.2")
now = time.time()
bans.remember(A, reason="scan", mode="tcp", port=1, now=now, duration=3600.0, hosts_deny_line=None,
              native=True)
bans.ban_native(A, 3600.0)
report = {"before": [str(a) for a in backend.members()]}
subprocess.run(["nft", "flush", "ruleset"], check=True)
bans.repair(now + 60)
report["after_repair"] = {str(a): t for a, t in backend.members().items()}
bans.repair(now + 120)
report["listed_after_second_repair"] = [str(a) for a in backend.members()]
backend.teardown()
bans.repair(now + 180)
out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
report["tables_after_teardown"] = out.split()
print(json.dumps(report), flush=True)
"""


@pytest.mark.parametrize("mechanism", ["netlink", "cli"])
def test_a_flushed_ruleset_is_repaired_without_the_nflog_capture(namespaces: Namespaces, tmp_path: Path,
                                                                  mechanism: str) -> None:
    # Debian's /etc/nftables.conf starts with `flush ruleset`: `systemctl reload nftables` took
    # the table and every ban with it. Only the NFLOG capture's chain was watched, so with
    # -tcp/-udp (or CAPTURE="packet") the bans stayed listed and out of force until restart.
    argv = [sys.executable, "-c", FLUSHED_CHILD, str(tmp_path / "hosts.deny"), mechanism]
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    result = run_in(namespaces.target, argv, timeout=60, check=True, env=env)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["before"] == ["198.18.0.2"]
    after = report["after_repair"]
    assert list(after) == ["198.18.0.2"]
    assert 3400 < after["198.18.0.2"] <= 3540  # the time left, not a new hour
    assert report["listed_after_second_repair"] == ["198.18.0.2"]
    assert report["tables_after_teardown"] == []  # torn down on purpose: not brought back
