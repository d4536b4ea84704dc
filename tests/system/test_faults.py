"""Faults a real daemon must survive: kill -9 in the middle of a burst of bans, a full or
read-only state directory, a hanging KILL_ROUTE, another process appending to hosts.deny at the
same time, and a hostile reverse DNS name. Each runs the real daemon in throwaway namespaces; the
tmpfs and resolv.conf substitutes live in private mount namespaces the host never sees."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.faults_helpers import (
    DnsResponder,
    MountNamespace,
    add_addresses,
    connect_from,
    daemon_running,
    finish_burst,
    nft_set,
    pids_named,
    process_alive,
    reverse_name,
    start_burst,
    store_addresses,
)
from tests.system.rig import (
    Daemon,
    DaemonFactory,
    Namespaces,
    SyslogReceiver,
    eventually,
    popen_in,
    stop_process,
)

pytestmark = pytest.mark.system

PORT = 1
NFT_BANS: dict[str, str | None] = {
    "BAN_BACKEND": "nftables", "BLOCK_TCP": "1", "KILL_HOSTS_DENY": "ALL: $TARGET$", "BLOCK_TIME": "600",
    "TCP_PORTS": "1,11",
}
BLOCKED = re.compile(r"attackalert: Host (\S+) has been blocked via ")
ADMIN_ERROR = "adminalert: ERROR"


def scanner_addresses(first: int, count: int) -> list[str]:
    """Extra IPv4 addresses for the scanner namespace, from 198.18.0.`first` on."""
    return [f"198.18.0.{n}" for n in range(first, first + count)]


def blocked_in_log(syslog: SyslogReceiver, since: int, until: int | None = None) -> list[str]:
    records = syslog.records(since)
    if until is not None:
        records = records[: until - since]
    return [m.group(1) for r in records if (m := BLOCKED.search(r.message))]


def hosts_deny_addresses(text: str) -> list[str]:
    return [line.removeprefix("ALL: ") for line in text.splitlines() if line.startswith("ALL: ")]


def duplicates(items: list[str]) -> list[str]:
    return sorted(item for item, n in Counter(items).items() if n > 1)


# -- 1. kill -9 during a burst of bans ------------------------------------------------------------


def test_kill_9_mid_burst_loses_and_duplicates_no_ban(
    daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: SyslogReceiver
) -> None:
    net = namespaces
    sources = scanner_addresses(10, 50)
    add_addresses(net.scanner, sources)
    daemon = daemon_factory("-tcp", BAN_BACKEND="nftables", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$",
                            BLOCK_TIME="600", TCP_PORTS="1,11")
    burst = start_burst(net.scanner, net.target_ip4, PORT, sources, gap=0.02)
    try:
        syslog.wait_count("has been blocked via nftables", 15, timeout=20, since=daemon.start_mark)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait_exit()
    finally:
        finish_burst(burst)
    # Everything the daemon sent before it died is in the receiver's socket buffer by now.
    time.sleep(0.3)
    killed_at = syslog.mark()
    logged = set(blocked_in_log(syslog, daemon.start_mark, killed_at))
    assert 15 <= len(logged) < len(sources), f"the kill was not mid-burst: {sorted(logged)}"

    daemon.start()
    store = store_addresses(daemon)
    in_nft = nft_set(net.target)
    deny_lines = daemon.hosts_deny_text().splitlines()
    in_deny = hosts_deny_addresses(daemon.hosts_deny_text())
    problems = []
    for name, items in (("store", store), ("nft set", in_nft), ("hosts.deny", deny_lines)):
        if duplicates(items):
            problems.append(f"duplicated in the {name}: {duplicates(items)}")
    for address in store:
        if address not in in_nft:
            problems.append(f"{address} is in the store but not in the nft set")
        if in_deny.count(address) != 1:
            problems.append(f"{address} is in the store but {in_deny.count(address)}x in hosts.deny")
    for address in sorted(logged - set(store)):
        problems.append(f"{address}: 'has been blocked' logged before the kill, but not in the store "
                        f"after the restart (nft: {address in in_nft}, hosts.deny: {address in in_deny})")
    for address in sorted((set(in_nft) | set(in_deny)) - set(store)):
        if address not in logged:
            problems.append(f"{address}: blocked (nft: {address in in_nft}, hosts.deny: "
                            f"{address in in_deny}) but unknown to the store")
    assert not problems, (
        "\n".join(problems) + f"\nlogged before kill ({len(logged)}): {sorted(logged)}\n"
        f"store ({len(store)}): {sorted(store)}\nnft ({len(in_nft)}): {sorted(in_nft)}\n"
        f"hosts.deny ({len(deny_lines)} lines)"
    )


# -- 2. full and read-only state directory --------------------------------------------------------


@pytest.fixture
def state_tmpfs(namespaces: Namespaces, tmp_path: Path) -> Iterator[tuple[MountNamespace, Path]]:
    """A 512 KiB tmpfs on the daemon's STATE_DIR, in a private mount namespace. The store takes
    about 150 KiB from the start (22 tables and indexes, the WAL index, one ban in the WAL): at
    256 KiB, schema 5 left the filler so little that the disk was full again right after it went."""
    state = tmp_path / "daemon0" / "state"
    state.mkdir(parents=True)
    with MountNamespace(namespaces.target, f"mount -t tmpfs -o size=512k,mode=0700 tmpfs {state}") as mounts:
        yield mounts, state


def tmpfs_daemon(
    net: Namespaces, syslog: SyslogReceiver, tmp_path: Path, mounts: MountNamespace
) -> Daemon:
    return Daemon(net, tmp_path / "daemon0", syslog, ("-tcp",), command=mounts.command,
                  config=NFT_BANS)


def assert_blocked_despite_store_failure(
    net: Namespaces, syslog: SyslogReceiver, source: str, since: int
) -> None:
    """The ban works and is logged as such, and the store failure is reported as an error."""
    syslog.wait_for(f"attackalert: Host {source} has been blocked via nftables", since=since)
    syslog.wait_for(f'Host {source} has been blocked via wrappers with string: "ALL: {source}"',
                    since=since)
    syslog.wait_for(ADMIN_ERROR, since=since)
    eventually(lambda: source in nft_set(net.target), what=f"{source} in the nft set")
    # The block did work, so the daemon must not claim it failed.
    syslog.assert_absent(f"Could not block host {source}", wait=0.5, since=since)


def test_full_state_disk_keeps_blocking_reports_and_recovers(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path,
    state_tmpfs: tuple[MountNamespace, Path],
) -> None:
    net = namespaces
    mounts, state = state_tmpfs
    first, during, after = scanner_addresses(10, 3)
    add_addresses(net.scanner, [first, during, after])
    with daemon_running(tmpfs_daemon(net, syslog, tmp_path, mounts)) as daemon:
        connect_from(net.scanner, first, net.target_ip4, PORT)
        syslog.wait_for(f"attackalert: Host {first} has been blocked via nftables")
        eventually(lambda: store_addresses(daemon) == [first], what="the first ban stored")

        # dd stops with "No space left on device": that is the point.
        mounts.run(["dd", "if=/dev/zero", f"of={state}/filler", "bs=4096"], check=False)
        df = mounts.run(["df", "--output=avail", str(state)]).stdout.split()
        assert df[-1] == "0", f"tmpfs not full: {df}"
        mark = syslog.mark()
        connect_from(net.scanner, during, net.target_ip4, PORT)
        assert_blocked_despite_store_failure(net, syslog, during, mark)

        mounts.run(["rm", f"{state}/filler"])
        mark = syslog.mark()
        connect_from(net.scanner, after, net.target_ip4, PORT)
        syslog.wait_for(f"attackalert: Host {after} has been blocked via nftables", since=mark)
        eventually(lambda: after in store_addresses(daemon), what=f"{after} stored once there is room")
        assert syslog.find(ADMIN_ERROR, since=mark) is None, syslog.describe(mark)
        assert daemon.running


def test_read_only_state_dir_keeps_blocking_reports_and_recovers(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path,
    state_tmpfs: tuple[MountNamespace, Path],
) -> None:
    # A mount with files open for writing cannot be remounted read-only (EBUSY), and the daemon
    # keeps its store open; so the directory goes read-only while the daemon is stopped, and
    # becomes writable again while the new one runs.
    net = namespaces
    mounts, state = state_tmpfs
    first, during, after = scanner_addresses(10, 3)
    add_addresses(net.scanner, [first, during, after])
    daemon = tmpfs_daemon(net, syslog, tmp_path, mounts)
    with daemon_running(daemon):
        connect_from(net.scanner, first, net.target_ip4, PORT)
        eventually(lambda: store_addresses(daemon) == [first], what="the first ban stored")
    mounts.run(["mount", "-o", "remount,ro", str(state)])
    # The store cannot be opened read-write: the daemon says so at start and keeps bans in
    # memory meanwhile.
    mark = syslog.mark()
    with daemon_running(daemon):
        connect_from(net.scanner, during, net.target_ip4, PORT)
        assert_blocked_despite_store_failure(net, syslog, during, mark)

        mounts.run(["mount", "-o", "remount,rw", str(state)])
        mark = syslog.mark()
        connect_from(net.scanner, after, net.target_ip4, PORT)
        syslog.wait_for(f"attackalert: Host {after} has been blocked via nftables", since=mark)
        eventually(lambda: after in store_addresses(daemon), what=f"{after} stored once writable")
        assert {first, during} <= set(store_addresses(daemon))
        syslog.wait_for("is usable again; bans kept in memory were saved")


# -- 3. a hanging KILL_ROUTE ----------------------------------------------------------------------


def test_hanging_kill_route_is_killed_at_its_timeout_and_detection_goes_on(
    daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: SyslogReceiver
) -> None:
    net = namespaces
    daemon_factory("-tcp", BLOCK_TCP="1", KILL_ROUTE="sleep 600 # $TARGET$", COMMAND_TIMEOUT="2",
                   TCP_PORTS="1,11")
    hung_at, _ = connect_from(net.scanner, net.scanner_ip4, net.target_ip4, PORT)
    syslog.wait_for(f"Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to TCP port: {PORT}")
    sleep_argv = ["sleep", "600"]
    eventually(lambda: pids_named(net.target, sleep_argv), timeout=2, what="the KILL_ROUTE sleep")
    first_sleep = pids_named(net.target, sleep_argv)

    # While the route command hangs, a second scanner is noticed at once.
    seen_at, _ = connect_from(net.scanner2, net.scanner2_ip4, net.target2_ip4, 11)
    syslog.wait_for(f"Connect from host: {net.scanner2_ip4}/{net.scanner2_ip4} to TCP port: 11",
                    timeout=1.0)
    assert time.time() - seen_at < 1.0
    timeout_line = (f'There was an error trying to block host (system fail) {net.scanner_ip4}: '
                    f'"sleep 600 # {net.scanner_ip4}" timed out after 2.')
    assert syslog.find(timeout_line) is None, "the second scanner was only seen after the timeout"

    syslog.wait_for(timeout_line, timeout=5.0)
    elapsed = time.time() - hung_at
    assert 1.5 <= elapsed <= 5.0, f"timeout line after {elapsed:.1f}s"
    eventually(lambda: not any(process_alive(pid) for pid in first_sleep), timeout=1.0,
               what=f"the hung sleep {first_sleep} gone")
    syslog.wait_for(f'"sleep 600 # {net.scanner2_ip4}" timed out after 2.', timeout=5.0)
    syslog.wait_for(f"attackalert: ERROR: Could not block host {net.scanner_ip4}", timeout=2.0)
    eventually(lambda: not pids_named(net.target, sleep_argv), timeout=1.0, what="every sleep gone")


# -- 4. hosts.deny appended to by someone else at the same time ------------------------------------


def test_hosts_deny_written_concurrently_keeps_every_line_once(
    daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: SyslogReceiver
) -> None:
    net = namespaces
    sources = scanner_addresses(10, 30)
    add_addresses(net.scanner, sources)
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$", BAN_BACKEND="none",
                            TCP_PORTS="1,11")
    foreign = [f"ALL: 198.19.{n // 250}.{n % 250 + 1}" for n in range(300)]
    script = "for n in $(seq 0 299); do echo \"ALL: 198.19.$((n / 250)).$((n % 250 + 1))\" >> \"$1\"; " \
             "sleep 0.005; done"
    appender = popen_in(net.target, ["sh", "-c", script, "sh", str(daemon.hosts_deny_path)],
                        stderr=subprocess.PIPE)
    try:
        burst = start_burst(net.scanner, net.target_ip4, PORT, sources, gap=0.05)
        finish_burst(burst)
        syslog.wait_count("has been blocked via wrappers", len(sources), timeout=20)
        assert appender.wait(30) == 0
    finally:
        stop_process(appender)
        if appender.stderr is not None:
            appender.stderr.close()
    lines = daemon.hosts_deny_text().splitlines()
    mine = [f"ALL: {source}" for source in sources]
    counts = Counter(lines)
    problems = [f"{line!r} {counts[line]}x" for line in foreign + mine if counts[line] != 1]
    stray = sorted(set(lines) - set(foreign) - set(mine))
    assert not problems and not stray, (
        f"wrong counts: {problems}\nunexpected lines: {stray}\n{len(lines)} lines in all"
    )


# -- 5. RESOLVE_HOST with hostile PTR records -----------------------------------------------------


def test_hostile_ptr_names_never_reach_commands_or_logs(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path
) -> None:
    net = namespaces
    marker = Path(f"/tmp/pwned-{secrets.token_hex(4)}")
    # glibc itself drops PTR answers that are not host names, so the DNS names only show that
    # path is safe; names from /etc/hosts come back raw and reach the daemon's own check.
    from_dns = {
        net.scanner_ip4: f"$(touch {marker});x.example",
        "198.18.0.21": "a`id`b.example",
        "198.18.0.22": "x;reboot",
        # A valid DNS name that reads as another address: fail2ban's `Host: <HOST>` filter
        # (portsentry's 1.2.x branch) would ban 10.9.8.7 for it.
        "198.18.0.26": "10.9.8.7.static.example",
    }
    from_hosts_file = {
        "198.18.0.24": f"$(touch${{IFS}}{marker});x",
        "198.18.0.25": f"a`touch${{IFS}}{marker}`b;reboot",
    }
    hostile = {**from_dns, **from_hosts_file}
    benign = "198.18.0.23"
    # Not a scanner address: the daemon rightly refuses to block its own DNS resolver.
    nameserver = "198.18.0.53"
    add_addresses(net.scanner, [a for a in hostile if a != net.scanner_ip4] + [benign, nameserver])
    everyone = [*hostile, benign]
    out = tmp_path / "out"
    out.mkdir()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n"
                     + "".join(f"{a} {name}\n" for a, name in from_hosts_file.items()))
    setup = f"mount --bind {resolv} /etc/resolv.conf\nmount --bind {hosts} /etc/hosts"
    dns = DnsResponder(net.scanner, nameserver, {**from_dns, benign: "benign-host.example"},
                       default="unexpected.example")
    queries: list[str] = []
    try:
        with MountNamespace(net.target, setup) as mounts:
            daemon = Daemon(net, tmp_path / "daemon0", syslog, ("-tcp",), command=mounts.command,
                            config={"RESOLVE_HOST": "1", "BLOCK_TCP": "1", "TCP_PORTS": "1,11",
                                    "KILL_ROUTE": f"touch {out}/route-$TARGET$",
                                    "KILL_RUN_CMD": f"echo $TARGET$ >> {out}/ran"})
            with daemon_running(daemon):
                finish_burst(start_burst(net.scanner, net.target_ip4, PORT, everyone))
                for address in hostile:
                    syslog.wait_for(f"Connect from host: {address}/{address} to TCP port: {PORT}")
                syslog.wait_for(f"Connect from host: benign-host.example/{benign} to TCP port: {PORT}")
                syslog.wait_count("has been blocked via dropped route", len(everyone))
                eventually(lambda: len(daemon.history_text().splitlines()) == len(everyone),
                           what="a history line per scanner")
                eventually(lambda: (out / "ran").exists()
                           and len((out / "ran").read_text().splitlines()) == len(everyone),
                           what="KILL_RUN_CMD for every scanner")
    finally:
        queries = dns.close()
        pwned = marker.exists()
        marker.unlink(missing_ok=True)
    assert not pwned, f"a PTR name was run by a shell: {marker} was created"
    asked = {query.split()[-1] for query in queries}
    assert {reverse_name(a) for a in [*from_dns, benign]} <= asked, f"queries seen: {queries}"
    assert sorted(p.name for p in out.iterdir()) == sorted(["ran", *(f"route-{a}" for a in everyone)])
    assert sorted((out / "ran").read_text().splitlines()) == sorted(everyone)
    history = daemon.history_text()
    for address in hostile:
        assert f"Host: {address}/{address} Port: {PORT} TCP Blocked" in history, history
    assert f"Host: benign-host.example/{benign} Port: {PORT} TCP Blocked" in history, history
    text = "\n".join(syslog.messages()) + daemon.stderr_text()
    for fragment in ("pwned", "`", ";x", "reboot", "unexpected.example", "10.9.8.7"):
        assert fragment not in text, f"{fragment!r} reached the log:\n{text}"
