"""Native bans with expiry, kept across restarts and crashes, and the block/unblock/list commands."""

from __future__ import annotations

import json
import os
import signal

from tests.system.rig import Daemon, cli_argv, daemon_env, eventually, nmap, nmap_ports, run_in, tcp_connect

NFT = {"BAN_BACKEND": "nftables", "BLOCK_TCP": "1", "KILL_HOSTS_DENY": "ALL: $TARGET$"}


def nft_set(ns: str, name: str = "blocked4") -> list[str]:
    """Addresses in our nftables set inside namespace `ns`."""
    out = run_in(ns, ["nft", "-j", "list", "set", "inet", "portsentry", name]).stdout
    if not out.strip():
        return []
    elements = []
    for item in json.loads(out)["nftables"]:
        for element in item.get("set", {}).get("elem", []):
            value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
            elements.append(str(value))
    return elements


def admin(daemon: Daemon, *args: str) -> str:
    result = run_in(daemon.net.target, cli_argv(daemon.conf_path, *args), env=daemon_env())
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_scan_bans_in_nftables_until_block_time_passes(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-stcp", BLOCK_TIME="4", **NFT)
    nmap(net.scanner, ["-sS", "-p", "1,111", "--max-retries", "0", net.target_ip4])
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")
    assert nft_set(net.target) == [net.scanner_ip4]
    follow_up = nmap(net.scanner, ["-sS", "-p", "1,111", "--max-retries", "0", net.target_ip4])
    assert set(nmap_ports(follow_up.stdout).values()) == {"filtered"}, follow_up.stdout
    # After BLOCK_TIME the element is gone, the hosts.deny line too, and the scanner gets through.
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been unblocked: ban expired", timeout=15)
    assert nft_set(net.target) == []
    assert daemon.hosts_deny_text() == ""
    # An unwatched port answers again (a watched one would ban the scanner anew, in the kernel,
    # on its first probe).
    again = nmap(net.scanner, ["-sS", "-p", "2", "--max-retries", "0", net.target_ip4])
    assert set(nmap_ports(again.stdout).values()) == {"closed"}, again.stdout


def test_restart_and_kill_9_keep_bans_without_duplicates(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TIME="600", **NFT)
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for("has been blocked via nftables")
    eventually(lambda: "ALL: " in daemon.hosts_deny_text(), what="hosts.deny line")
    daemon.stop()
    assert nft_set(net.target) == [net.scanner_ip4]  # kept on stop: bans protect while we restart
    daemon.start()
    assert nft_set(net.target) == [net.scanner_ip4]
    assert not tcp_connect(net.scanner, net.target_ip4, 11, timeout=2).connected
    # kill -9 while a second scanner is being blocked, then start again.
    assert tcp_connect(net.scanner2, net.target2_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner2_ip4} has been blocked via nftables")
    eventually(lambda: len(daemon.hosts_deny_text().splitlines()) == 2, what="two hosts.deny lines")
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait_exit()
    daemon.start()
    assert sorted(nft_set(net.target)) == sorted([net.scanner_ip4, net.scanner2_ip4])
    assert sorted(daemon.hosts_deny_text().splitlines()) == sorted(
        [f"ALL: {net.scanner_ip4}", f"ALL: {net.scanner2_ip4}"])
    listing = json.loads(admin(daemon, "list", "--json"))
    assert sorted(row["address"] for row in listing) == sorted([net.scanner_ip4, net.scanner2_ip4])


def test_expired_while_down_is_lifted_at_start(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TIME="2", **NFT)
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for("has been blocked via nftables")
    eventually(lambda: "ALL: " in daemon.hosts_deny_text(), what="hosts.deny line")
    daemon.stop()
    run_in(net.target, ["sleep", "2.5"])
    daemon.start()
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been unblocked: ban expired")
    assert daemon.hosts_deny_text() == ""
    assert nft_set(net.target) == []


def test_block_and_unblock_commands_with_and_without_the_daemon(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TIME="600", **NFT)
    out = admin(daemon, "block", net.scanner2_ip4, "--for", "10m")
    assert "via the running daemon" in out
    syslog.wait_for(f"attackalert: Host {net.scanner2_ip4} has been blocked via nftables for 600 seconds")
    assert nft_set(net.target) == [net.scanner2_ip4]
    assert daemon.hosts_deny_text().splitlines() == [f"ALL: {net.scanner2_ip4}"]
    assert not tcp_connect(net.scanner2, net.target2_ip4, 11, timeout=2).connected
    # The running daemon learns about the ban from the store: a hit is "already blocked".
    out = admin(daemon, "unblock", net.scanner2_ip4)
    assert "via the running daemon" in out
    syslog.wait_for(f"attackalert: Host {net.scanner2_ip4} has been unblocked: unblocked by admin")
    assert nft_set(net.target) == []
    assert daemon.hosts_deny_text() == ""
    # Within a second the daemon forgets it too, so a new scan blocks again.
    run_in(net.target, ["sleep", "1.5"])
    assert tcp_connect(net.scanner2, net.target2_ip4, 11).connected
    syslog.wait_for(f"attackalert: Host {net.scanner2_ip4} has been blocked via nftables")
    daemon.stop()
    # Without the daemon the commands work on the store and the kernel directly.
    out = admin(daemon, "unblock", net.scanner2_ip4)
    assert f"Host {net.scanner2_ip4} has been unblocked: unblocked by admin" in out
    assert nft_set(net.target) == []
    assert "no active bans" in admin(daemon, "list")
    out = admin(daemon, "block", net.scanner_ip4, "--for", "1h")
    assert f"Host {net.scanner_ip4} has been blocked via nftables for 3600 seconds" in out
    assert nft_set(net.target) == [net.scanner_ip4]
    assert daemon.hosts_deny_text().splitlines() == [f"ALL: {net.scanner_ip4}"]


def test_kill_route_is_rerun_at_start_only_when_the_kernel_forgot_it(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", BLOCK_TIME="600",
                            KILL_ROUTE="ip route add blackhole $TARGET$")
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for("has been blocked via dropped route")
    daemon.stop()
    # Same boot, same namespace: the route is still there and is not added twice.
    mark = syslog.mark()
    daemon.start()
    syslog.assert_absent("dropped route", wait=1.0, since=mark)
    daemon.stop()
    # As after a reboot: the route is gone and the kernel id differs; the start puts it back.
    run_in(net.target, ["ip", "route", "del", "blackhole", net.scanner_ip4], check=True)
    (daemon.workdir / "state" / "kernel-id").write_text("another boot\n")
    mark = syslog.mark()
    daemon.start()
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via dropped route", since=mark)
    assert net.scanner_ip4 in run_in(net.target, ["ip", "route", "show", "type", "blackhole"]).stdout


def test_expiry_and_unblock_remove_only_the_hosts_deny_lines_we_appended(daemon_factory, namespaces, syslog):
    # issue 9.3: the admin wrote "ALL: <scanner>" before our ban; fail2ban uses the same format.
    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1", BLOCK_TIME="2", start=False, **NFT)
    daemon.write_files()
    daemon.hosts_deny_path.write_text(f"sshd: 198.18.9.9\nALL: {net.scanner_ip4}\n")
    daemon.start()
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    assert tcp_connect(net.scanner2, net.target2_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner2_ip4} has been blocked via wrappers")
    eventually(lambda: admin(daemon, "list", "--json").count('"address"') == 0, timeout=15,
               what="both bans expired")
    # Ours (appended for scanner2) is gone; the admin's identical-format line stays.
    assert daemon.hosts_deny_path.read_text() == f"sshd: 198.18.9.9\nALL: {net.scanner_ip4}\n"
    # The same through unblock.
    mark = syslog.mark()
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables", since=mark)
    eventually(lambda: net.scanner_ip4 in admin(daemon, "list"), what="banned again")
    admin(daemon, "unblock", net.scanner_ip4)
    assert daemon.hosts_deny_path.read_text() == f"sshd: 198.18.9.9\nALL: {net.scanner_ip4}\n"


def test_block_and_unblock_many_from_a_file_while_the_daemon_runs(daemon_factory, namespaces, tmp_path):
    # issue 10.3: one store transaction, one kernel batch; the running daemon follows the store.
    net = namespaces
    daemon = daemon_factory("-stcp", TCP_PORTS="1", BLOCK_TIME="600", BAN_SET_SIZE="65536", **NFT)
    feed = tmp_path / "feed.txt"
    addresses = [f"198.19.{n >> 8}.{n & 255}" for n in range(1, 20_001)]
    feed.write_text("# a threat feed\n" + "\n".join(addresses) + f"\n{net.scanner_ip4}\n224.0.0.9\n")
    out = admin(daemon, "block", "--file", str(feed))
    assert f"blocked 20001 of 20002 addresses from {feed}" in out, out
    assert "skipped 224.0.0.9: a multicast address" in out
    assert len(nft_set(net.target)) == 20_001
    # The daemon heard of it through the store: a probe from the scanner is not a new block.
    eventually(lambda: json.loads(admin(daemon, "status", "--json"))["active_bans"] == 20_001,
               what="the daemon counting the bulk bans")
    lines = daemon.hosts_deny_text().splitlines()
    assert len(lines) == 20_001 and lines[0] == "ALL: 198.19.0.1"
    bad = tmp_path / "bad.txt"
    bad.write_text("198.19.0.1\nnot-an-address\n")
    result = run_in(net.target, cli_argv(daemon.conf_path, "block", "--file", str(bad)), env=daemon_env())
    assert result.returncode == 1 and f"{bad}:2: 'not-an-address' is not an IP address" in result.stderr
    out = admin(daemon, "unblock", "--file", str(feed))
    assert f"unblocked 20001 of 20002 addresses from {feed}" in out, out
    assert nft_set(net.target) == [] and daemon.hosts_deny_text() == ""
    eventually(lambda: json.loads(admin(daemon, "status", "--json"))["active_bans"] == 0,
               what="the daemon hearing of the lifts")
