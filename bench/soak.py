"""Soak: the daemon under churn for a while (bans of a few seconds from thousands of sources of
both families, legitimate clients, reloads, admin commands, metrics scrapes, control clients that
hang up), sampled every 10 s for what grows: memory, fds, threads, children, the store's rows and
WAL, our nftables sets, blackhole routes, hosts.deny, the event log; then, once every ban has
ended, whether all of that is back to empty and the daemon idles. One JSON line per sample.

usage: python -m bench.soak {connect,kernel,resolve} --seconds N [--out FILE]

connect: -atcp -audp -tcp -udp, KERNEL_BAN off; kernel: -stcp -sudp on ports 1-1023 with the
kernel's first-probe ban; resolve: -atcp -audp with RESOLVE_HOST and a name server that never
answers. tests/system/test_soak.py is the short version the test suite runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.system import rig, soakrig
from tests.system.teardown import run_tempdir

from bench import harness


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class Soak:
    def __init__(self, kind: str, seconds: float, out: Path) -> None:
        self.kind, self.seconds, self.out = kind, seconds, out
        self.stop = threading.Event()
        self.counters: dict[str, int] = {"cli_fail": 0, "legit_ok": 0, "legit_fail": 0,
                                         "scrapes": 0, "scrape_fail": 0, "ctl_clients": 0}
        self.samples: list[dict[str, object]] = []

    def config(self, workdir: Path) -> dict[str, str | None]:
        common: dict[str, str | None] = {
            "BAN_BACKEND": "nftables", "BLOCK_TCP": "1", "BLOCK_UDP": "1",
            "BLOCK_TIME": "4", "BLOCK_TIME_MAX": "8", "BAN_RATE_LIMIT": "900",
            "BAN_RATE_LIMIT_NET": "30",
            "KILL_HOSTS_DENY": "ALL: $TARGET$ : DENY",
            "KILL_ROUTE": "/sbin/ip route add blackhole $TARGET$",
            "KILL_ROUTE_UNDO": "/sbin/ip route del blackhole $TARGET$",
            # Fails for one address in ten: the failure path runs all along.
            "KILL_RUN_CMD": "case $TARGET$ in *7) exit 3;; esac",
            "HISTORY_MAX_ROWS": "2000", "HISTORY_RETENTION": "600",
            "EVENT_LOG": str(workdir / "events.jsonl"),
            "METRICS_LISTEN": "127.0.0.1:9470",
            "LOG_REPEAT_LIMIT": "5", "LOG_REPEAT_WINDOW": "10",
        }
        if self.kind == "connect":
            common["KERNEL_BAN"] = "off"
        elif self.kind == "resolve":
            common["KERNEL_BAN"] = "off"
            common["RESOLVE_HOST"] = "1"
        else:
            common["KERNEL_BAN"] = "auto"
            common["BAN_RATE_LIMIT_NET"] = None  # a per-network cap keeps the kernel from banning
            common["TCP_PORTS"] = "1-1023"
            common["UDP_PORTS"] = "1-1023"
        return common

    def modes(self) -> tuple[str, ...]:
        if self.kind == "connect":
            return ("-atcp", "-audp", "-tcp", "-udp")
        return ("-atcp", "-audp") if self.kind == "resolve" else ("-stcp", "-sudp")

    def run(self) -> int:
        net = rig.create_namespaces(rig.new_prefix())
        sock_dir = rig.short_socket_dir()
        workdir = run_tempdir("soak")
        # Created in the target namespace, with its queue as systemd sets it (the host's own
        # setting untouched): 2,000 start lines otherwise trickle out at the daemon's tick.
        rig.run_in(net.target, ["sysctl", "-qw", "net.unix.max_dgram_qlen=512"], check=True)
        syslog = harness.in_namespace(net.target, lambda: rig.SyslogReceiver(sock_dir / "log"))
        procs: list[subprocess.Popen[bytes]] = []
        listener = None
        daemon = None
        threads: list[threading.Thread] = []
        try:
            soakrig.route_churn(net, real=500 if self.kind == "connect" else 0)
            listener = rig.Listener(net.target, "tcp", 2525, b"220 hi\r\n")
            command: tuple[str, ...] = rig.DAEMON_COMMAND
            if self.kind == "resolve":
                # A name server that never answers (no such neighbour), in a private mount
                # namespace: the host's own /etc/resolv.conf is not touched.
                resolv = workdir / "resolv.conf"
                resolv.write_text("nameserver 198.18.0.99\noptions timeout:3 attempts:1\n")
                command = ("unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount --bind {resolv} /etc/resolv.conf && exec \"$@\"", "sh",
                           *rig.DAEMON_COMMAND)
            daemon = rig.Daemon(net, workdir / "d", syslog, self.modes(), command=command,
                                ignore=("127.0.0.1/32",), config=self.config(workdir))
            daemon.start(timeout=60)
            pid = daemon.pid
            ctl = Path(str(daemon.config["CONTROL_SOCKET"]))
            store = workdir / "d" / "state" / "bans.sqlite3"
            t0 = time.monotonic()
            threads = [
                threading.Thread(target=self.legit, args=(net,), daemon=True),
                threading.Thread(target=self.scrape, args=(net,), daemon=True),
                threading.Thread(target=self.clients, args=(ctl,), daemon=True),
                threading.Thread(target=self.cli, args=(net, daemon), daemon=True),
            ]
            for t in threads:
                t.start()
            tcp_ports = "1,11,15,79,111,119,143,540,635,1080,1524,2000" if self.kind == "connect" else ""
            udp_ports = "1,7,9,69,161,162,513,635,640,641,700" if self.kind == "connect" else ""
            load = soakrig.start_churn(
                net, self.seconds, "--rate", "25", "--sources", "6000", "--v6-share", "0.2",
                "--skip", "113,139,520,138,137,67",
                "--real", "500" if self.kind == "connect" else "0", "--real-rate", "6",
                "--tcp-ports", tcp_ports, "--udp-ports", udp_ports)
            procs.append(load)
            next_hup = t0 + 200
            while load.poll() is None:
                self.sample(daemon, net, store, ctl, t0, "churn")
                if time.monotonic() > next_hup:
                    os.kill(pid, signal.SIGHUP)
                    next_hup += 200
                self.stop.wait(10)
            out, err = load.communicate(timeout=10)
            print("load:", out.decode().strip(), err.decode().strip()[-500:], flush=True)
            self.stop.set()
            for t in threads:
                t.join(timeout=30)
            # Every ban ends within BLOCK_TIME_MAX; then the daemon should idle.
            for _ in range(6):
                time.sleep(5)
                self.sample(daemon, net, store, ctl, t0, "drain")
            cpu0, w0 = harness.cpu_seconds(pid), time.monotonic()
            time.sleep(30)
            idle = (harness.cpu_seconds(pid) - cpu0) / (time.monotonic() - w0)
            self.sample(daemon, net, store, ctl, t0, "idle")
            print(f"idle cpu {idle * 100:.2f}% counters {self.counters}", flush=True)
            errs = [r.message for r in syslog.records() if "internal error" in r.message
                    or "Traceback" in r.message]
            print("internal errors:", len(errs), errs[:5], flush=True)
            print("stderr lines:", daemon.stderr_text().count("\n"), flush=True)
            daemon.stop(timeout=20)
            print("exit", daemon.returncode, "hung", daemon.hung, flush=True)
            return 0
        finally:
            self.stop.set()
            for p in procs:
                rig.stop_process(p)
            if daemon is not None and daemon.running:
                daemon.stop()
            if listener is not None:
                listener.close()
            syslog.close()
            harness.remove_rig(net, None, workdir)
            shutil.rmtree(sock_dir, ignore_errors=True)

    def sample(self, daemon: rig.Daemon, net: rig.Namespaces, store: Path, ctl: Path,
               t0: float, phase: str) -> None:
        now = time.time()
        row: dict[str, object] = {"t": round(time.monotonic() - t0), "phase": phase}
        row.update(soakrig.process(daemon.pid))
        row["cpu"] = harness.cpu_seconds(daemon.pid)
        row["children"], row["zombies"] = soakrig.children(daemon.pid)
        with contextlib.suppress(sqlite3.Error):
            row.update(soakrig.store_counts(store, now))
        row["db"] = file_size(store)
        row["wal"] = file_size(Path(f"{store}-wal"))
        row["nft"] = soakrig.nft_elements(net.target)
        row["routes"] = soakrig.blackhole_routes(net.target)
        row["hosts_deny"] = soakrig.lines(daemon.hosts_deny_path)
        snmp = rig.run_in(net.target, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
        udp = [ln.split() for ln in snmp if ln.startswith("Udp:")]
        row["udp_out"] = int(udp[1][udp[0].index("OutDatagrams")])
        row["events"] = file_size(Path(str(daemon.config["EVENT_LOG"])))
        row["history_file"] = file_size(daemon.history_path)
        try:
            st = harness.daemon_status(ctl, timeout=10)
            row["status_active"] = st.get("active_bans")
            row["recent_events"] = len(st.get("recent_events") or [])  # type: ignore[arg-type]
        except harness.BenchError as error:
            row["status_error"] = str(error)
        try:
            text = harness.in_namespace(net.target, lambda: urllib.request.urlopen(
                "http://127.0.0.1:9470/metrics", timeout=5).read().decode())
            row["state"] = {m[1]: int(float(m[2])) for m in re.finditer(
                r'^portsentry_state_entries\{table="([^"]+)"\} (\S+)', text, re.M)}
            row["metric_lines"] = text.count("\n")
        except OSError as error:
            row["metrics_error"] = str(error)
        self.samples.append(row)
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def legit(self, net: rig.Namespaces) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    with socket.create_connection((net.target2_ip4, 2525), timeout=2) as s:
                        s.recv(100)
                    self.counters["legit_ok"] += 1
                except OSError:
                    self.counters["legit_fail"] += 1
                self.stop.wait(0.2)
        harness.in_namespace(net.scanner2, loop)

    def scrape(self, net: rig.Namespaces) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    urllib.request.urlopen("http://127.0.0.1:9470/metrics", timeout=5).read()
                    self.counters["scrapes"] += 1
                except OSError:
                    self.counters["scrape_fail"] += 1
                self.stop.wait(3)
        harness.in_namespace(net.target, loop)

    def clients(self, ctl: Path) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            with contextlib.suppress(OSError):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(os.fspath(ctl))
                if n % 4 == 1:
                    s.sendall(b'{"command": "sta')  # half a request, then gone
                elif n % 4 == 2:
                    s.sendall(b"garbage\n")
                elif n % 4 == 3:
                    s.sendall(b'{"command": "list"}\n')  # asks, leaves before the answer
                s.close()
                self.counters["ctl_clients"] += 1
            self.stop.wait(0.5)

    def cli(self, net: rig.Namespaces, daemon: rig.Daemon) -> None:
        conf = str(daemon.conf_path)
        cmds = [["list"], ["status"], ["report", "--since", "10m"], ["unblock", "198.18.250.9"],
                ["block", "198.18.251.7", "--for", "3s"], ["list", "--json"],
                ["status", "--json"], ["block", "127.0.0.1"]]
        n = 0
        while not self.stop.is_set():
            argv = [sys.executable, "-m", "portsentry", *cmds[n % len(cmds)], "-c", conf]
            n += 1
            try:
                out = rig.run_in(net.target, argv, timeout=60, env=rig.daemon_env())
                if out.returncode not in (0, 1):
                    self.counters["cli_fail"] += 1
                    print("cli", argv[3:], out.returncode, out.stderr[-300:], flush=True)
            except subprocess.TimeoutExpired:
                self.counters["cli_fail"] += 1
            self.stop.wait(4)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("connect", "kernel", "resolve"))
    parser.add_argument("--seconds", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("/tmp/soak.jsonl"))
    args = parser.parse_args()
    harness.require_root("soak")
    return Soak(args.kind, min(args.seconds, 1800), args.out).run()


if __name__ == "__main__":
    raise SystemExit(main())
