"""The stealth sensor on NFLOG, in throwaway namespaces: with the nftables backend a blocked
scanner's packets never reach the daemon (no CPU, no lines), fragmented nmap scans are seen, ACK
scans are not; without it the AF_PACKET capture still detects. Also the backend's capture rules
against the real nft: idempotent, repaired after `nft flush ruleset`, gone with teardown."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system.rig import (
    Daemon,
    DaemonFactory,
    Namespaces,
    SyslogReceiver,
    eventually,
    nmap,
    ns_argv,
    popen_in,
    run_in,
    stop_process,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft"),
]

GROUP = 7373
BURST = 2000
# One clock tick is 0.01 s; the daemon's own timers (1 s refreshes) fit well inside this.
IDLE_CPU = 0.05
SRC_DIR = str(Path(__file__).resolve().parents[2] / "src")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, from /proc (fields 14 and 15, after the parenthesised name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nflog_groups(ns: str) -> set[int]:
    """nfnetlink_log groups bound in namespace `ns`."""
    text = run_in(ns, ["cat", "/proc/net/netfilter/nfnetlink_log"]).stdout
    return {int(line.split()[0]) for line in text.splitlines() if line.strip()}


def syn_burst(ns: str, target: str, count: int) -> None:
    if shutil.which("hping3") is None:
        pytest.skip("needs hping3")
    # Bounded: count packets at 5k pps, and a timeout in case hping3 ever hangs.
    run_in(ns, ["hping3", "-q", "-S", "-p", "1", "-c", str(count), "-i", "u200", target],
           timeout=60)


def scan_and_block(daemon: Daemon, net: Namespaces, syslog: SyslogReceiver) -> None:
    nmap(net.scanner, ["-sS", "-p", "1,111", "--max-retries", "0", net.target_ip4])
    who = re.escape(net.scanner_ip4)
    syslog.wait_for(re.compile(
        rf"^attackalert: TCP SYN/Normal scan from host: {who}/{who} to TCP port: (1|111)$"))
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")


def test_nflog_blocked_scanner_costs_nothing_and_fragments_are_seen(
    daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: SyslogReceiver
) -> None:
    net = namespaces
    daemon = daemon_factory("-stcp", BAN_BACKEND="nftables", BLOCK_TCP="1", TCP_PORTS="1,111")
    assert GROUP in nflog_groups(net.target), daemon.report()
    chain = run_in(net.target, ["nft", "list", "chain", "inet", "portsentry", "capture"], check=True)
    assert f"log group {GROUP}" in chain.stdout

    scan_and_block(daemon, net, syslog)
    time.sleep(0.5)  # let nmap's packets that raced the ban drain before measuring
    mark = syslog.mark()
    before = cpu_seconds(daemon.pid)
    syn_burst(net.scanner, net.target_ip4, BURST)
    after = cpu_seconds(daemon.pid)
    dropped = run_in(net.target, ["nft", "list", "chain", "inet", "portsentry", "filter"]).stdout
    match = re.search(r"ip saddr @blocked4 counter packets (\d+)", dropped)
    assert match and int(match.group(1)) >= BURST, dropped  # the burst did reach the host
    assert after - before < IDLE_CPU, f"daemon used {after - before:.2f}s CPU on a blocked host"
    syslog.assert_absent("attackalert:", wait=0.5, since=mark)

    # ACK scans are not 1.2 hits; a fragmented SYN scan is (reassembled before the input hook).
    mark = syslog.mark()
    nmap(net.scanner2, ["-sA", "-p", "1,111", "--max-retries", "0", net.target2_ip4])
    syslog.assert_absent("attackalert:", wait=1.0, since=mark)
    nmap(net.scanner2, ["-f", "-sS", "-p", "1,111", "--max-retries", "0", net.target2_ip4])
    who = re.escape(net.scanner2_ip4)
    syslog.wait_for(re.compile(
        rf"^attackalert: TCP SYN/Normal scan from host: {who}/{who} to TCP port: (1|111)$"),
        since=mark)
    syslog.wait_for(f"attackalert: Host {net.scanner2_ip4} has been blocked via nftables",
                    since=mark)

    # IPv6 goes through the same rules (the scanner's IPv6 address is not banned yet).
    mark = syslog.mark()
    nmap(net.scanner, ["-6", "-sS", "-p", "1,111", "--max-retries", "0", net.target_ip6])
    who = re.escape(net.scanner_ip6)
    syslog.wait_for(re.compile(
        rf"^attackalert: TCP SYN/Normal scan from host: {who}/{who} to TCP port: (1|111)$"),
        since=mark)


def test_without_nftables_the_af_packet_capture_detects(
    daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: SyslogReceiver
) -> None:
    net = namespaces
    daemon = daemon_factory("-stcp", BAN_BACKEND="none", TCP_PORTS="1,111")
    assert GROUP not in nflog_groups(net.target), daemon.report()
    nmap(net.scanner, ["-sS", "-p", "1,111", "--max-retries", "0", net.target_ip4])
    who = re.escape(net.scanner_ip4)
    syslog.wait_for(re.compile(
        rf"^attackalert: TCP SYN/Normal scan from host: {who}/{who} to TCP port: (1|111)$"))


def test_explicit_nflog_refuses_a_group_in_use(
    daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: SyslogReceiver
) -> None:
    net = namespaces
    holder = popen_in(net.target, [sys.executable, "-c", HOLD_GROUP, str(GROUP)],
                      stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC_DIR})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"bound"
        daemon = daemon_factory("-stcp", start=False, CAPTURE="nflog", BAN_BACKEND="nftables",
                                BLOCK_TCP="1", TCP_PORTS="1,111")
        daemon.start(wait_ready=False)
        assert daemon.wait_exit(20) != 0
        assert re.search(r"NFLOG_GROUP: NFLOG group 7373 is already in use", daemon.stderr_text()), \
            daemon.report()
    finally:
        stop_process(holder)


HOLD_GROUP = r"""
import sys, time
from portsentry.sensors.nflog import NflogCapture
capture = NflogCapture(int(sys.argv[1]))
print("bound", flush=True)
time.sleep(60)
"""

# Runs in the target namespace: the backend's capture rules against the real nft and kernel.
RULES_CHILD = r"""
import json, select, subprocess, sys, time
from portsentry.core.probe import Protocol
from portsentry.responders.nft_capture import CaptureSpec, KernelBan
from portsentry.responders.nftables import NftablesBackend
from portsentry.sensors.nflog import NflogCapture

def rules():
    out = subprocess.run(["nft", "-j", "list", "chain", "inet", "portsentry", "capture"],
                         capture_output=True, text=True).stdout
    return sum(1 for o in json.loads(out or '{"nftables": []}')["nftables"] if "rule" in o)

def wait_packets(capture, seconds=3.0):
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end and not got:
        select.select([capture], [], [], 0.2)
        got += capture.read_batch()
    return len(got)

backend = NftablesBackend(mechanism="cli")
backend.setup()
capture = NflogCapture(int(sys.argv[1]))
report = {}
# With the first-probe ban (kports empty: nothing is banned, every probe is logged).
kernel = KernelBan(frozenset(Protocol), 3600) if sys.argv[2] == "kernel" else None
for _ in range(2):
    backend.capture_rules(int(sys.argv[1]), 1024, {Protocol.TCP, Protocol.UDP}, kernel=kernel)
report["expected_rules"] = len(CaptureSpec.of(int(sys.argv[1]), 1024, set(Protocol), kernel=kernel).rules())
report["rules_after_two_installs"] = rules()
report["intact"] = backend.capture_intact()
print(json.dumps(report), flush=True)
sys.stdin.readline()  # a probe is sent now
report["seen_before_flush"] = wait_packets(capture)
subprocess.run(["nft", "flush", "ruleset"], check=True)
report["intact_after_flush"] = backend.capture_intact()
report["repaired"] = backend.repair_capture()
report["repaired_again"] = backend.repair_capture()
report["rules_after_repair"] = rules()
print(json.dumps(report), flush=True)
sys.stdin.readline()  # a second probe
report["seen_after_repair"] = wait_packets(capture)
backend.teardown()
report["rules_after_teardown"] = rules()
report["repair_after_teardown"] = backend.repair_capture()
print(json.dumps(report), flush=True)
"""


@pytest.mark.parametrize("kernel", ["kernel", "log-only"])
def test_capture_rules_are_idempotent_repaired_and_torn_down(namespaces: Namespaces, kernel: str) -> None:
    net = namespaces
    if shutil.which("hping3") is None:
        pytest.skip("needs hping3")
    proc = subprocess.Popen(ns_argv(net.target, [sys.executable, "-c", RULES_CHILD, "7374", kernel]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC_DIR})
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    try:
        def step() -> dict[str, object]:
            line = stdout.readline()
            assert line, stderr.read().decode()
            result: dict[str, object] = json.loads(line)
            return result

        first = step()
        rules = 10 if kernel == "kernel" else 2
        assert first == {"expected_rules": rules, "rules_after_two_installs": rules, "intact": True}
        probe = ["hping3", "-q", "-S", "-p", "22", "-c", "1", net.target_ip4]
        run_in(net.scanner, probe, timeout=10)
        stdin.write(b"\n")
        stdin.flush()
        second = step()
        assert second["seen_before_flush"] == 1
        assert (second["intact_after_flush"], second["repaired"], second["repaired_again"]) == \
            (False, True, False)
        assert second["rules_after_repair"] == rules
        run_in(net.scanner, probe, timeout=10)
        stdin.write(b"\n")
        stdin.flush()
        third = step()
        assert third["seen_after_repair"] == 1
        assert third["rules_after_teardown"] == 0
        assert third["repair_after_teardown"] is False
        eventually(lambda: proc.poll() is not None, what="rules child exits")
    finally:
        stop_process(proc)
