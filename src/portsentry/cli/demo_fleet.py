"""`portsentry demo --fleet`: three hosts share bans through Redis. One nmap scan of host 1, and
hosts 2 and 3, which were never scanned, block the scanner too.

Everything lives in five throwaway network namespaces (a hub with a bridge and redis-server,
three hosts, a scanner) and one temporary directory, all removed at the end, on failure, on
Ctrl-C or SIGTERM, as in `portsentry demo` (cli.demo); both stand on cli.demokit.
"""

from __future__ import annotations

import os
import queue
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from portsentry.cli import demokit as kit

SUBNET = "198.18.100"
HUB_IP, SCANNER_IP = f"{SUBNET}.254", f"{SUBNET}.200"
HOSTS = 3
PORT = 6390
PORTS = "1,11,79,111"
STEP_TIMEOUT = 20.0


class FleetDemo:
    """One run: owns the namespaces, redis-server, the daemons and the temporary directory."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.run_id = f"psfleet-{os.getpid()}-{secrets.token_hex(2)}"
        self.hub, self.scanner = f"{self.run_id}-hub", f"{self.run_id}-scan"
        self.hosts = [f"{self.run_id}-h{i}" for i in range(1, HOSTS + 1)]
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.syslogs: list[kit.SyslogReceiver] = []
        self.workdir = kit.temp_dir(self.run_id)

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self, argv: list[str], ns: str | None = None, check: bool = True) -> str:
        full = ["ip", "netns", "exec", ns, *argv] if ns else argv
        proc = subprocess.run(full, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise kit.StepFailed(f"`{shlex.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def network(self) -> None:
        for ns in (self.hub, self.scanner, *self.hosts):
            self.namespaces.append(ns)  # before creation: an interrupt must still remove it
            self.run(["ip", "netns", "add", ns])
            self.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        self.run(["ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0"])
        self.run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i, (ns, address) in enumerate([(self.scanner, SCANNER_IP),
                                           *((h, f"{SUBNET}.{n}")
                                             for n, h in enumerate(self.hosts, 1))]):
            port = f"p{i}"
            self.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                      "netns", self.hub])
            self.run(["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"])
            self.run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
            self.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        self.say(f"A bridge in {self.hub} ({HUB_IP}, where Redis runs) joins hosts "
                 f"{SUBNET}.1-{HOSTS} and the scanner {SCANNER_IP}; nothing on this machine is changed.")

    def redis(self) -> tuple[str, Path, Path]:
        password = secrets.token_hex(16)
        (self.workdir / "redis").mkdir()
        conf = self.workdir / "redis" / "redis.conf"
        conf.write_text(f"bind {HUB_IP}\nport {PORT}\ndir {self.workdir / 'redis'}\n"
                        "save \"\"\nappendonly no\nuser default off\n"
                        f"user portsentry on >{password} ~portsentry:* +@read +@write +@stream +@scripting "
                        "+@connection -@dangerous\n")
        key, secret = self.workdir / "fleet.key", self.workdir / "redis.password"
        for path, text in ((key, secrets.token_hex(32)), (secret, password)):
            path.write_text(text + "\n")
            os.chmod(path, 0o600)
        self.processes.append(subprocess.Popen(
            ["ip", "netns", "exec", self.hub, "redis-server", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.say(f"redis-server on {HUB_IP}:{PORT}, ACL user 'portsentry' with a password; every "
                 "decision is signed with a shared key (HMAC-SHA256).")
        return f"redis://portsentry@{HUB_IP}:{PORT}/0", key, secret

    def daemons(self, url: str, key: Path, secret: Path) -> None:
        for n, ns in enumerate(self.hosts, 1):
            home = self.workdir / f"h{n}"
            (home / "state").mkdir(parents=True, mode=0o700)
            settings = {"TCP_PORTS": "1,11,79,111,119,143", "BLOCK_TCP": "1", "BLOCK_TIME": "600",
                        "BAN_BACKEND": "nftables", "STATE_DIR": str(home / "state"),
                        "CONTROL_SOCKET": str(home / "control.sock"),
                        "HOSTS_DENY_FILE": str(home / "hosts.deny"),
                        "HISTORY_FILE": str(home / "history"), "BLOCKED_FILE": str(home / "blocked"),
                        "FLEET_REDIS_URL": url, "FLEET_NAME": "demo", "FLEET_HOST_ID": f"h{n}",
                        "FLEET_KEY_FILE": str(key), "FLEET_PASSWORD_FILE": str(secret)}
            conf = home / "portsentry.conf"
            conf.write_text("".join(f'{k}="{v}"\n' for k, v in settings.items()))
            syslog = kit.SyslogReceiver(home / "log.sock")
            self.syslogs.append(syslog)
            argv = [sys.executable, "-m", "portsentry", "-c", str(conf), "--syslog-socket",
                    str(home / "log.sock"), "-stcp"]
            with (home / "stderr").open("wb") as err:
                self.processes.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=err, env=kit.package_env()))
        for n in range(1, HOSTS + 1):
            self.wait(n, kit.READY_TEXT)
            self.wait(n, "fleet: link to")
        self.say("PortSentry runs on h1, h2 and h3 (-stcp, nftables), each joined to fleet 'demo'.")

    def wait(self, host: int, needle: str) -> str:
        deadline = time.monotonic() + STEP_TIMEOUT
        syslog = self.syslogs[host - 1]
        while time.monotonic() < deadline:
            try:
                line = syslog.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.say(f"    h{host} portsentry[{line.pid}]: {line.message}")
            if needle in line.message:
                return line.message
        raise kit.StepFailed(f"h{host}: no line containing {needle!r} within {STEP_TIMEOUT:.0f}s")

    def scan(self, host: int) -> dict[int, str]:
        argv = ["nmap", "-n", "-Pn", "-sS", "--max-retries", "0", "--host-timeout", "15s", "-p", PORTS,
                f"{SUBNET}.{host}"]
        self.say(f"{SCANNER_IP}$ {shlex.join(argv)}")
        output = self.run(argv, ns=self.scanner)
        for row in kit.nmap_table(output):
            self.say(f"    {row}")
        return kit.nmap_ports(output)

    def story(self) -> int:
        self.say(f"PortSentry fleet demo (run {self.run_id}): one scan, three hosts block the scanner.")
        self.network()
        url, key, secret = self.redis()
        self.daemons(url, key, secret)
        self.say("\n== Step 1: the scanner scans h1 only")
        self.scan(1)
        self.wait(1, f"Host {SCANNER_IP} has been blocked via")
        self.say("\n== Step 2: h2 and h3 hear of it through Redis and block it too")
        for n in (2, 3):
            self.wait(n, f"Host {SCANNER_IP} has been blocked via fleet (from h1)")
        for n, ns in enumerate(self.hosts, 1):
            text = self.run(["nft", "list", "set", "inet", "portsentry", "blocked4"], ns=ns)
            if SCANNER_IP not in text:
                raise kit.StepFailed(f"{SCANNER_IP} is not in h{n}'s set")
            self.say(f"    h{n}: {SCANNER_IP} in table inet portsentry, set blocked4")
        self.say("\n== Step 3: the scanner tries h2 and h3, which it never scanned before")
        for n in (2, 3):
            ports = self.scan(n)
            if not ports or set(ports.values()) != {"filtered"}:
                raise kit.StepFailed(f"expected every port of h{n} filtered, nmap saw {ports}")
        self.say("\nIt works: one detection on h1, and the scanner finds h2 and h3 dark as well.")
        return kit.EXIT_OK

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for proc in reversed(self.processes):
            kit.stop_process(proc)
        for ns in self.namespaces:
            problems += kit.remove_namespace(ns)
        for syslog in self.syslogs:
            syslog.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


def run_fleet_demo(out: TextIO) -> int:
    reason = kit.unavailable_reason()
    if reason is None:
        missing = [tool for tool in ("redis-server", "nft") if shutil.which(tool) is None]
        if missing:
            reason = (f"portsentry demo --fleet needs {', '.join(missing)} "
                      "(Debian: apt install redis-server nftables)")
    if reason is not None:
        out.write(f"portsentry: {reason}\n")
        return kit.EXIT_UNAVAILABLE
    demo = FleetDemo(out)
    status = kit.EXIT_FAILED
    try:
        with kit.signals_raise():
            try:
                status = demo.story()
            except kit.StepFailed as failure:
                demo.say(f"!! FAILED: {failure}")
    except kit.Interrupted as interrupt:
        demo.say(f"\nInterrupted ({interrupt}); cleaning up.")
        status = 128 + interrupt.signum
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT
    finally:
        with kit.signals_ignored():
            problems = demo.cleanup()
        demo.say("Cleanup was incomplete: " + "; ".join(problems) if problems else
                 "Cleaned up: daemons and redis-server stopped, namespaces and temporary directory removed.")
        if problems:
            status = status or kit.EXIT_FAILED
    return status
