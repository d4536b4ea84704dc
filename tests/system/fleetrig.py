"""The fleet's test rig: N hosts on one bridge, a scanner, and a real redis-server, all inside
namespaces the test creates.

    hub    br0 198.18.100.254/24 (and .253, a second "gateway")   redis-server on .254
    host-i eth0 198.18.100.i/24, default route via .254 (a host may be given .253 instead)
    scan   eth0 198.18.100.200/24

Each veth pair is made inside a host namespace and its other end moved into the hub, so nothing
lands in the machine's own namespace. redis-server runs in the hub with its own port, directory,
ACL user and password; everything is stopped and removed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.system import rig
from tests.system.teardown import Shield

SUBNET = "198.18.100"
HUB_IP = f"{SUBNET}.254"
SECOND_GATEWAY = f"{SUBNET}.253"
SCANNER_IP = f"{SUBNET}.200"
REDIS_USER = "portsentry"


def host_ip(index: int) -> str:
    return f"{SUBNET}.{index}"


@dataclass
class FleetNet:
    prefix: str
    hub: str
    scanner: str
    hosts: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [self.hub, self.scanner, *self.hosts]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode != 0:
        raise rig.RigError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _attach(net: FleetNet, ns: str, address: str, gateway: str | None) -> None:
    """A veth from `ns` to the hub's bridge; `address` on the namespace's end."""
    port = f"p{secrets.token_hex(4)}"
    _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", net.hub)
    _ip("-n", net.hub, "link", "set", port, "master", "br0")
    _ip("-n", net.hub, "link", "set", port, "up")
    _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    if gateway is not None:
        _ip("-n", ns, "route", "add", "default", "via", gateway)
    rig._wait_link_up(ns, "eth0")


def add_host(net: FleetNet, index: int, gateway: str = HUB_IP) -> str:
    """One more host namespace on the bridge (a late joiner is added the same way)."""
    name = f"{net.prefix}-h{index}"
    rig._add_namespace(name)
    net.hosts.append(name)
    _attach(net, name, host_ip(index), gateway)
    return name


@contextlib.contextmanager
def fleet_net(count: int, gateways: dict[int, str] | None = None) -> Iterator[FleetNet]:
    prefix = rig.new_prefix()
    net = FleetNet(prefix, f"{prefix}-hub", f"{prefix}-scan")
    try:
        rig._add_namespace(net.hub)
        _ip("-n", net.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", net.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        _ip("-n", net.hub, "addr", "add", f"{SECOND_GATEWAY}/24", "dev", "br0")
        _ip("-n", net.hub, "link", "set", "br0", "up")
        rig._add_namespace(net.scanner)
        _attach(net, net.scanner, SCANNER_IP, HUB_IP)
        for index in range(1, count + 1):
            add_host(net, index, (gateways or {}).get(index, HUB_IP))
        yield net
    finally:
        rig.destroy_namespaces([name for name in net.names if name])


class Redis:
    """redis-server in the hub namespace: own port, own directory, an ACL user with a password,
    optionally TLS (a certificate made with openssl in its directory)."""

    def __init__(self, ns: str, workdir: Path, *, port: int = 6390, tls: bool = False,
                 extra: Sequence[str] = (), password: str | None = None, user_rules: str = "") -> None:
        self.ns, self.dir, self.port, self.tls, self.extra = ns, workdir, port, tls, list(extra)
        self.user_rules = user_rules
        workdir.mkdir(parents=True, exist_ok=True)
        self.password = password or secrets.token_hex(16)
        self.password_file = workdir / "redis.password"
        self.password_file.write_text(self.password + "\n")
        os.chmod(self.password_file, 0o600)
        self.ca = workdir / "ca.pem"
        self.proc: subprocess.Popen[bytes] | None = None
        if tls:
            self._certificate()

    def _certificate(self) -> None:
        """A self-signed certificate for the hub's address, made here: the test's own CA."""
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(self.dir / "server.key"), "-out", str(self.ca),
             "-subj", "/CN=portsentry-test", "-addext", f"subjectAltName=IP:{HUB_IP}"],
            check=True, capture_output=True, timeout=60)

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        query = f"?ssl_ca_certs={self.ca}" if self.tls else ""
        return f"{scheme}://{REDIS_USER}@{HUB_IP}:{self.port}/0{query}"

    def argv(self) -> list[str]:
        config = self.dir / "redis.conf"
        lines = [
            f"bind {HUB_IP}", f"dir {self.dir}", "save \"\"", "appendonly no", "protected-mode yes",
            "user default off",
            # What the fleet needs and nothing else: its keys, and the commands it sends.
            f"user {REDIS_USER} on >{self.password} ~portsentry:* "
            "+@read +@write +@stream +@scripting +@connection -@dangerous " + self.user_rules,
            "user admin on >" + self.password + " ~* &* +@all",  # &*: a sentinel subscribes
        ]
        if self.tls:
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.dir / 'server.crt'}",
                      f"tls-key-file {self.dir / 'server.key'}", f"tls-ca-cert-file {self.ca}",
                      "tls-auth-clients no"]
            shutil.copy(self.ca, self.dir / "server.crt")
        else:
            lines.append(f"port {self.port}")
        lines += self.extra
        config.write_text("\n".join(lines) + "\n")
        return ["redis-server", str(config)]

    def start(self) -> Redis:
        log = (self.dir / "redis.log").open("ab")
        self.proc = rig.popen_in(self.ns, self.argv(), stdout=log, stderr=log)
        log.close()
        try:
            rig.eventually(lambda: self.cli("PING").strip() == "PONG", timeout=10,
                           what="redis-server answering")
        except BaseException:
            # A with-block whose __enter__ failed never reaches __exit__.
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved (no persistence configured)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            rig.stop_process(self.proc)
            self.proc = None

    def cli(self, *args: str) -> str:
        argv = ["redis-cli", "-h", HUB_IP, "-p", str(self.port), "--user", "admin", "--pass", self.password,
                "--no-auth-warning"]
        if self.tls:
            argv += ["--tls", "--cacert", str(self.ca)]
        result = rig.run_in(self.ns, [*argv, *args], timeout=20)
        return result.stdout

    def __enter__(self) -> Redis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


FLEET_PORTS = "1,11,79,111,119,143"


def fleet_config(index: int, redis: Redis, key_file: Path, **extra: str) -> dict[str, str | None]:
    return {
        "TCP_PORTS": FLEET_PORTS, "BAN_BACKEND": "nftables", "BLOCK_TCP": "1", "BLOCK_TIME": "3600",
        "FLEET_REDIS_URL": redis.url, "FLEET_NAME": "test", "FLEET_HOST_ID": f"h{index}",
        "FLEET_KEY_FILE": str(key_file), "FLEET_PASSWORD_FILE": str(redis.password_file), **extra,
    }


def make_key(workdir: Path) -> Path:
    path = workdir / "fleet.key"
    path.write_text(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    return path


class Host:
    """A daemon in one host namespace, with its own syslog receiver (READY lines are per host)."""

    def __init__(self, net: FleetNet, ns: str, index: int, workdir: Path, config: dict[str, str | None],
                 modes: Sequence[str] = ("-stcp",)) -> None:
        self.index, self.ns = index, ns
        self.sock_dir = rig.short_socket_dir()
        self.syslog = rig.SyslogReceiver(self.sock_dir / "log")
        names = rig.Namespaces(prefix=net.prefix, target=ns, scanner=net.scanner, scanner2=net.scanner)
        self.daemon = rig.Daemon(names, workdir, self.syslog, modes, config=config)

    def start(self) -> Host:
        self.daemon.start()
        return self

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = rig.cli_argv(self.daemon.conf_path, *args)
        result = rig.run_in(self.ns, argv, env=rig.daemon_env(), timeout=60)
        if check and result.returncode != 0:
            raise rig.RigError(f"h{self.index}: {' '.join(args)}: {result.stdout}{result.stderr}")
        return result

    def blocked(self) -> set[str]:
        return set(nft_elements(self.ns))

    def close(self) -> None:
        with Shield():
            if self.daemon.proc is not None and self.daemon.running:
                self.daemon.stop()
            self.syslog.close()
            shutil.rmtree(self.sock_dir, ignore_errors=True)


def close_hosts(hosts: Sequence[Host]) -> None:
    """Close every host, even when a signal comes while the first ones stop."""
    with Shield():
        for host in hosts:
            host.close()


def nft_elements(ns: str, name: str = "blocked4") -> list[str]:
    """Addresses in our nftables set in `ns` (text form: quick, and fine for thousands)."""
    out = rig.run_in(ns, ["nft", "list", "set", "inet", "portsentry", name]).stdout
    start = out.find("elements = {")
    if start < 0:
        return []
    body = out[start + len("elements = {"):out.find("}", start)]
    return [item.split()[0] for item in body.replace("\n", " ").split(",") if item.strip()]


def wait_until(check: object, timeout: float, what: str) -> None:
    rig.eventually(check, timeout=timeout, what=what)  # type: ignore[arg-type]


def settle(seconds: float) -> None:
    time.sleep(seconds)
