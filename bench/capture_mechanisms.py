"""Measure which capture mechanism the stealth sensor should use: raw IP sockets, AF_PACKET with one
recv() per packet, AF_PACKET with a TPACKET_V3 memory-mapped ring, or NFLOG from an nftables rule.

Run as root from the repository root: `python bench/capture_mechanisms.py` (about 6 minutes). It
builds throwaway namespaces (198.18.0.0/15, fd00::/8) with tests/system/rig.py, checks what each
mechanism can see, then times each one against bounded, paced floods; docs/capture.md has results.
The same file is also the receiver, sender and sink run inside the namespaces (subcommands).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT)]

from portsentry.core.probe import Protocol as IpProtocol  # noqa: E402
from portsentry.sensors.bpf import (  # noqa: E402
    ACCEPT_ALL_BYTES,
    BPF_ABS,
    BPF_B,
    BPF_JMP,
    BPF_JSET,
    BPF_K,
    BPF_LD,
    BPF_RET,
    Insn,
    build_probe_filter,
    reject_all_filter,
)
from portsentry.sensors.capture import (  # noqa: E402
    ETH_P_ALL,
    PACKET_IGNORE_OUTGOING,
    PACKET_STATISTICS,
    SO_RCVBUFFORCE,
    SOL_PACKET,
    CaptureSocket,
    attach_filter,
)
from portsentry.sensors.packet import (  # noqa: E402
    DropCounter,
    TcpFlag,
    classify_tcp,
    parse_packet,
)

RCVBUF = 4 << 20  # every mechanism gets the same 4 MiB of kernel buffer
BATCH = 256  # packets per readiness event, as CaptureSocket.read_batch
NFLOG_GROUP = 7
NFT_TABLE = "cmbench"
# "none" opens nothing: the baseline for the sender's CPU, which includes the target's kernel
# receive path (veth delivers in the sender's context and softirq time is charged to it).
MECHANISMS = ("none", "raw", "raw+bpf", "packet", "packet+bpf", "ring+bpf", "nflog")

# ---------------------------------------------------------------------------------------------
# Capture sources (run inside the target namespace)


class Source(Protocol):
    def fds(self) -> list[int]: ...

    def read(self, fd: int, out: list[bytes]) -> int:
        """Append whole IP packets to `out`; return the number of receive syscalls made."""
        ...

    def kernel_drops(self) -> int | None: ...


_ACCEPT_ALL = [Insn(BPF_RET | BPF_K, 0, 0, ACCEPT_ALL_BYTES)]


def _drain(sock: socket.socket, out: list[bytes]) -> int:
    calls = 0
    recv = sock.recv
    try:
        while calls < BATCH:
            calls += 1
            out.append(recv(2048))
    except BlockingIOError:
        pass
    return calls


def _raw6_probe_filter() -> list[Insn]:
    """Raw IPv6 sockets filter from the transport header (no IPv6 header): reject ACK/RST."""
    return [
        Insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, 13),
        Insn(BPF_JMP | BPF_JSET | BPF_K, 0, 1, int(TcpFlag.ACK | TcpFlag.RST)),
        Insn(BPF_RET | BPF_K, 0, 0, 0),
        Insn(BPF_RET | BPF_K, 0, 0, ACCEPT_ALL_BYTES),
    ]


class RawSource:
    """AF_INET/AF_INET6 SOCK_RAW for TCP and UDP. IPv6 raw sockets deliver no IPv6 header, so
    one is rebuilt from recvfrom()'s source (the destination would need IPV6_RECVPKTINFO)."""

    _V6_HEAD = struct.Struct("!IHBB16s16s")

    def __init__(self, bpf: bool) -> None:
        self._socks: dict[int, tuple[socket.socket, int]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                sock = socket.socket(family, socket.SOCK_RAW, proto)
                attach_filter(sock, reject_all_filter())
                sock.setblocking(False)
                while _drain(sock, []) == BATCH:
                    pass
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                if not bpf:
                    program = _ACCEPT_ALL
                elif family == socket.AF_INET:
                    program = build_probe_filter()
                else:
                    program = _raw6_probe_filter() if proto == socket.IPPROTO_TCP else _ACCEPT_ALL
                attach_filter(sock, program)
                self._socks[sock.fileno()] = (sock, proto if family == socket.AF_INET6 else 0)

    def fds(self) -> list[int]:
        return list(self._socks)

    def read(self, fd: int, out: list[bytes]) -> int:
        sock, v6_proto = self._socks[fd]
        if not v6_proto:
            return _drain(sock, out)
        calls = 0
        try:
            while calls < BATCH:
                calls += 1
                data, addr = sock.recvfrom(2048)
                source = socket.inet_pton(socket.AF_INET6, addr[0])
                out.append(self._V6_HEAD.pack(0x60000000, len(data), v6_proto, 64, source, bytes(16))
                           + data)
        except BlockingIOError:
            pass
        return calls

    def kernel_drops(self) -> int | None:
        return None  # raw sockets count overruns only in /proc/net/raw's drops column


class PacketSource:
    """Ours: portsentry's CaptureSocket, AF_PACKET SOCK_DGRAM, recv() per packet."""

    def __init__(self, bpf: bool) -> None:
        self._capture = CaptureSocket(build_probe_filter() if bpf else _ACCEPT_ALL, rcvbuf=RCVBUF)

    def fds(self) -> list[int]:
        return [self._capture.fileno()]

    def read(self, fd: int, out: list[bytes]) -> int:
        batch = self._capture.read_batch(BATCH)
        out.extend(batch)
        return len(batch) + 1  # the last recv() is the one that found the queue empty

    def kernel_drops(self) -> int | None:
        return self._capture.drops()


PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
_BLOCK_STATUS = 8  # tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1
_BLOCK_PKTS = struct.Struct("=II")  # num_pkts, offset_to_first_pkt at 12
_U32 = struct.Struct("=I")
# tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac, net
_FRAME = struct.Struct("=IIIIIIHH")
_STATS_V3 = struct.Struct("=III")  # tp_packets, tp_drops, tp_freeze_q_cnt


class RingSource:
    """AF_PACKET SOCK_DGRAM with a TPACKET_V3 receive ring: the kernel writes packets into
    blocks of shared memory and wakes us once per filled (or timed-out) block."""

    def __init__(self, block_size: int = 1 << 16, block_nr: int = RCVBUF >> 16,
                 timeout_ms: int = 10) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        attach_filter(sock, reject_all_filter())
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        frame_size = 2048
        request = struct.pack("=7I", block_size, block_nr, frame_size,
                              block_size * block_nr // frame_size, timeout_ms, 0, 0)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, request)
        self._ring = mmap.mmap(sock.fileno(), block_size * block_nr, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3.size)  # zero the counters
        attach_filter(sock, build_probe_filter())
        sock.setblocking(False)
        self._sock = sock
        self._block_size = block_size
        self._block_nr = block_nr
        self._current = 0
        self._drops = 0

    def fds(self) -> list[int]:
        return [self._sock.fileno()]

    def read(self, fd: int, out: list[bytes]) -> int:
        ring = self._ring
        blocks = 0
        while blocks < self._block_nr:
            base = self._current * self._block_size
            if not _U32.unpack_from(ring, base + _BLOCK_STATUS)[0] & TP_STATUS_USER:
                break
            count, offset = _BLOCK_PKTS.unpack_from(ring, base + 12)
            offset += base
            for _ in range(count):
                next_offset, _, _, snaplen, _, _, _, net = _FRAME.unpack_from(ring, offset)
                out.append(ring[offset + net:offset + net + snaplen])
                offset += next_offset
            _U32.pack_into(ring, base + _BLOCK_STATUS, TP_STATUS_KERNEL)
            self._current = (self._current + 1) % self._block_nr
            blocks += 1
        return 0  # no receive syscall at all: poll() is the only one

    def kernel_drops(self) -> int | None:
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3.size)
        self._drops += _STATS_V3.unpack(raw)[1]
        return self._drops


NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLA = struct.Struct("=HH")  # len, type
_PACKET_MSG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET


def _nla(kind: int, payload: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


class NflogSource:
    """A NETLINK_NETFILTER socket bound to nfnetlink_log group `group`; the nftables rule that
    feeds it is set up by the harness. The kernel batches up to `qthresh` packets per message
    buffer, flushed after `timeout_cs` hundredths of a second."""

    def __init__(self, group: int = NFLOG_GROUP, qthresh: int = 64, timeout_cs: int = 1,
                 bufsize: int = 1 << 16) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        sock.bind((0, 0))
        self._sock = sock
        self._seq = 0
        self._group = group
        self._config(_nla(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
        self._config(
            _nla(NFULA_CFG_MODE, struct.pack("!IBB", 256, NFULNL_COPY_PACKET, 0))
            + _nla(NFULA_CFG_NLBUFSIZ, struct.pack("!I", bufsize))
            + _nla(NFULA_CFG_TIMEOUT, struct.pack("!I", timeout_cs))
            + _nla(NFULA_CFG_QTHRESH, struct.pack("!I", qthresh))
        )
        sock.setblocking(False)
        self.overruns = 0

    def _config(self, attributes: bytes) -> None:
        self._seq += 1
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", self._group) + attributes
        kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        self._sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK,
                                    self._seq, 0) + body)
        reply = self._sock.recv(65536)
        _, kind, _, _, _ = _NLMSG.unpack_from(reply)
        code = struct.unpack_from("=i", reply, _NLMSG.size)[0] if kind == NLMSG_ERROR else 0
        if code:
            raise OSError(-code, f"nfnetlink_log config: {os.strerror(-code)}")

    def fds(self) -> list[int]:
        return [self._sock.fileno()]

    def read(self, fd: int, out: list[bytes]) -> int:
        calls = 0
        while calls < BATCH:
            calls += 1
            try:
                buf = self._sock.recv(1 << 18)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1  # the kernel dropped messages; the count is not reported
                continue
            offset = 0
            while offset + _NLMSG.size <= len(buf):
                length, kind, _, _, _ = _NLMSG.unpack_from(buf, offset)
                if length < _NLMSG.size:
                    break
                if kind == _PACKET_MSG:
                    attr, end = offset + _NLMSG.size + 4, offset + length
                    while attr + _NLA.size <= end:
                        attr_len, attr_type = _NLA.unpack_from(buf, attr)
                        if attr_len < _NLA.size:
                            break
                        if attr_type & 0x7FFF == NFULA_PAYLOAD:
                            out.append(buf[attr + _NLA.size:attr + attr_len])
                            break
                        attr += (attr_len + 3) & ~3
                offset += (length + 3) & ~3
        return calls

    def kernel_drops(self) -> int | None:
        return None


class NullSource:
    def fds(self) -> list[int]:
        return []

    def read(self, fd: int, out: list[bytes]) -> int:
        return 0

    def kernel_drops(self) -> int | None:
        return None


def open_source(mechanism: str) -> Source:
    if mechanism == "none":
        return NullSource()
    if mechanism in ("raw", "raw+bpf"):
        return RawSource(bpf=mechanism == "raw+bpf")
    if mechanism in ("packet", "packet+bpf"):
        return PacketSource(bpf=mechanism == "packet+bpf")
    if mechanism == "ring+bpf":
        return RingSource()
    if mechanism == "nflog":
        return NflogSource()
    raise SystemExit(f"unknown mechanism {mechanism!r}; one of {', '.join(MECHANISMS)}")


def receive(mechanism: str) -> None:
    """The daemon's hot loop: poll, drain, parse_packet, classify; report on 'stop' on stdin."""
    source = open_source(mechanism)
    drops = DropCounter()
    probes: Counter[str] = Counter()
    seen = 0
    syscalls = 0
    poller = select.poll()
    for fd in source.fds():
        poller.register(fd, select.POLLIN)
    stdin = sys.stdin.fileno()
    poller.register(stdin, select.POLLIN)
    by_source: Counter[tuple[object, IpProtocol]] = Counter()
    print("ready", flush=True)
    start = os.times()
    stopping = False
    while not stopping:
        events = poller.poll(1000)
        syscalls += 1
        batch: list[bytes] = []
        for fd, _ in events:
            if fd == stdin:
                stopping = True
                for any_fd in source.fds():  # anything queued before 'stop' still counts
                    syscalls += source.read(any_fd, batch)
            else:
                syscalls += source.read(fd, batch)
        seen += len(batch)
        for data in batch:
            packet = parse_packet(data, drops)
            if packet is None:
                continue
            if packet.protocol is IpProtocol.UDP or classify_tcp(packet.tcp_flags) is not None:
                by_source[packet.source, packet.protocol] += 1
    end = os.times()
    for (address, protocol), count in by_source.items():
        probes[f"{address}/{protocol.name.lower()}"] += count
    print(json.dumps({
        "mechanism": mechanism,
        "delivered": seen,
        "unparsed": drops.total,
        "probes": dict(probes),
        "syscalls": syscalls,
        "cpu": (end.user - start.user) + (end.system - start.system),
        "cpu_user": end.user - start.user,
        "cpu_sys": end.system - start.system,
        "kernel_drops": source.kernel_drops(),
        "nflog_overruns": getattr(source, "overruns", None),
    }), flush=True)


# ---------------------------------------------------------------------------------------------
# Traffic (run inside the scanner namespace)


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum(data: bytes) -> int:
    return 0xFFFF - _fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def send_fragmented6(dst: str, count: int) -> None:
    """SYNs with 12 bytes of data to ports 1..count, each in two IPv6 fragments of 24 and 8 bytes
    (nmap cannot fragment IPv6). The first holds the whole TCP header: Linux discards first
    fragments that do not (RFC 7112), so 8-byte fragments as `nmap -f` sends would probe nothing."""
    probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    probe.connect((dst, 9))
    src = socket.inet_pton(socket.AF_INET6, probe.getsockname()[0])
    probe.close()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 44)  # the kernel adds IPv6, we the rest
    pseudo = src + socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!IxxxB", 32, 6)
    for port in range(1, count + 1):
        segment = struct.pack("!HHIIBBHHH", 40001, port, 1, 0, 0x50, int(TcpFlag.SYN), 64240, 0, 0)
        segment += b"fragmented!!"
        segment = segment[:16] + struct.pack("!H", _checksum(pseudo + segment)) + segment[18:]
        ident = 0x5000 + port
        sock.sendto(struct.pack("!BBHI", 6, 0, 0 | 1, ident) + segment[:24], (dst, 0))
        sock.sendto(struct.pack("!BBHI", 6, 0, 3 << 3, ident) + segment[24:], (dst, 0))
        time.sleep(0.001)
    print(json.dumps({"sent": count}), flush=True)


def send(dst: str, proto: str, flags: str, count: int, rate: float) -> None:
    """Send `count` TCP segments (flag letters S, A, F, ...) or UDP datagrams at `rate` a second to
    destination ports 1, 2, 3, ... through a raw socket; prints what was sent and how fast."""
    v6 = ":" in dst
    family = socket.AF_INET6 if v6 else socket.AF_INET
    number = socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP
    sock = socket.socket(family, socket.SOCK_RAW, number)
    bits = sum(int(TcpFlag[{"S": "SYN", "A": "ACK", "F": "FIN", "R": "RST", "P": "PSH", "U": "URG"}[c]])
               for c in flags)
    header = struct.Struct("!HHIIBBHHH") if proto == "tcp" else struct.Struct("!HHHH")
    base = 0
    if v6:
        # The kernel fills in the checksum at this offset for raw IPv6 sockets.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 16 if proto == "tcp" else 6)
    elif proto == "tcp":
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect((dst, 9))
        src = probe.getsockname()[0]
        probe.close()
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, number, 20)
        template = header.pack(40000, 0, 1, 1 if bits & TcpFlag.ACK else 0, 0x50, bits, 64240, 0, 0)
        words = pseudo + template
        base = sum(struct.unpack(f"!{len(words) // 2}H", words))
    sent = 0
    start = time.monotonic()
    cpu_start = os.times()
    while sent < count:
        due = min(count, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            port = sent % 65535 + 1
            if proto == "tcp":
                checksum = 0 if v6 else 0xFFFF - _fold(base + port)
                segment = header.pack(40000, port, 1, 1 if bits & TcpFlag.ACK else 0, 0x50, bits,
                                      64240, checksum, 0)
            else:
                segment = header.pack(40000, port, 8, 0)  # no checksum: legal for UDP over IPv4
            try:
                sock.sendto(segment, (dst, 0))
                sent += 1
            except BlockingIOError:
                break
        if sent < count:
            time.sleep(0.0002)
    elapsed = time.monotonic() - start
    cpu_end = os.times()
    cpu = cpu_end.user - cpu_start.user + cpu_end.system - cpu_start.system
    print(json.dumps({"sent": sent, "elapsed": elapsed, "rate": sent / elapsed, "cpu": cpu}),
          flush=True)


def sink(port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    while conn.recv(1 << 18):
        pass


def bulk(dst: str, port: int, size: int) -> None:
    sock = socket.create_connection((dst, port), timeout=30)
    chunk = bytes(1 << 16)
    start = time.monotonic()
    for _ in range(size // len(chunk)):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    print(json.dumps({"sent": size, "elapsed": time.monotonic() - start}), flush=True)


# ---------------------------------------------------------------------------------------------
# Harness (run in the host namespace as root; everything it touches lives in its namespaces)


def _harness_imports() -> Any:
    from tests.system import rig

    return rig


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])
    return env


def _self(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


class Receiver:
    """One `receive` subprocess in the target namespace, ready when constructed."""

    def __init__(self, rig: Any, ns: str, mechanism: str) -> None:
        self.mechanism = mechanism
        self.proc = subprocess.Popen(rig.ns_argv(ns, _self("receive", mechanism)), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.kill()
            raise RuntimeError(f"{mechanism} receiver did not start: {self.stderr()}")

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(Exception):
            return self.proc.stderr.read().decode(errors="replace")[-2000:]
        return ""

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else b""
        self.kill()
        if not line:
            raise RuntimeError(f"{self.mechanism} receiver gave no result: {self.stderr()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@contextlib.contextmanager
def receivers(rig: Any, ns: str, mechanisms: Sequence[str]) -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    try:
        for mechanism in mechanisms:
            started.append(Receiver(rig, ns, mechanism))
        yield started
    finally:
        for receiver in started:
            receiver.kill()


def nft(rig: Any, ns: str, script: str) -> None:
    rig.run_in(ns, ["nft", "-f", "-"], input_text=script, timeout=10, check=True)


def nflog_table(drop: Sequence[str] = ()) -> str:
    """The nftables rules that feed NFLOG the same packets our BPF filter passes, after a drop
    rule for `drop` (already blocked hosts), as a daemon would install them."""
    drops = "".join(
        f"    {'ip6' if ':' in address else 'ip'} saddr {address} drop\n" for address in drop
    )
    return (
        f"table inet {NFT_TABLE} {{\n  chain input {{\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"{drops}"
        f"    meta pkttype host tcp flags & (ack | rst) == 0 log group {NFLOG_GROUP}\n"
        f"    meta pkttype host meta l4proto udp log group {NFLOG_GROUP}\n"
        "  }\n}\n"
    )


def link_rx(rig: Any, ns: str, dev: str = "eth0") -> int:
    out = rig.run_in(ns, ["ip", "-j", "-s", "link", "show", "dev", dev], check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def send_from(rig: Any, ns: str, dst: str, proto: str, flags: str, count: int, rate: float) -> dict[str, Any]:
    argv = _self("send", dst, proto, flags, str(count), str(rate))
    out = rig.run_in(ns, argv, timeout=count / rate * 3 + 20, check=True, env=_env()).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def seen(result: dict[str, Any], source: str, proto: str = "tcp") -> int:
    return int(result["probes"].get(f"{source}/{proto}", 0))


# Visibility: what each mechanism sees of the same traffic, open and behind drop rules.

VISIBILITY_MECHANISMS = ("raw+bpf", "packet+bpf", "ring+bpf", "nflog")


def visibility(rig: Any, net: Any) -> list[dict[str, Any]]:
    scenarios = (
        ("open", ""),
        ("nft input drop", "input"),
        ("nft netdev ingress drop", "ingress"),
    )
    rows: list[dict[str, Any]] = []
    for name, drop in scenarios:
        nft(rig, net.target, nflog_table((net.scanner_ip4, net.scanner_ip6) if drop == "input" else ()))
        if drop == "ingress":
            nft(rig, net.target, (
                "table netdev cmbench_ingress {\n  chain ingress {\n"
                "    type filter hook ingress device eth0 priority 0; policy accept;\n"
                f"    ip saddr {net.scanner_ip4} drop\n    ip6 saddr {net.scanner_ip6} drop\n  }}\n}}\n"
            ))
        try:
            with receivers(rig, net.target, VISIBILITY_MECHANISMS) as started:
                send_from(rig, net.scanner, net.target_ip4, "tcp", "S", 1000, 10000)
                send_from(rig, net.scanner, net.target_ip6, "tcp", "S", 1000, 10000)
                send_from(rig, net.scanner, net.target_ip4, "udp", "", 500, 10000)
                send_from(rig, net.scanner, net.target_ip6, "udp", "", 500, 10000)
                # 8-byte fragments: the first holds no TCP flags, so only reassembly shows a SYN.
                rig.nmap(net.scanner2, ["-sS", "-f", "--max-retries", "0", "-p", "1-100",
                                        net.target2_ip4], timeout=60)
                send_from(rig, net.scanner2, net.target2_ip6, "tcpfrag", "S", 100, 1000)
                time.sleep(0.5)
                results = {r.mechanism: r.stop() for r in started}
        finally:
            rig.run_in(net.target, ["nft", "delete", "table", "inet", NFT_TABLE], timeout=10)
            if drop == "ingress":
                rig.run_in(net.target, ["nft", "delete", "table", "netdev", "cmbench_ingress"], timeout=10)
        for mechanism, result in results.items():
            rows.append({
                "scenario": name,
                "mechanism": mechanism,
                "syn4 /1000": seen(result, net.scanner_ip4),
                "syn6 /1000": seen(result, net.scanner_ip6),
                "udp4 /500": seen(result, net.scanner_ip4, "udp"),
                "udp6 /500": seen(result, net.scanner_ip6, "udp"),
                "nmap -f SYN4 /100": seen(result, net.scanner2_ip4),
                "fragmented SYN6 /100": seen(result, net.scanner2_ip6),
            })
    return rows


# Cost: CPU of the receiving process and loss, per workload.

WORKLOADS = ("syn20k", "syn50k", "synmax", "stall50k", "ack50k", "bulk")
RATES = {"syn20k": 20_000, "syn50k": 50_000, "synmax": 10_000_000, "stall50k": 50_000,
         "ack50k": 50_000}
PROBES = 100_000
BULK_BYTES = 150 << 20  # ~100k MTU-sized segments with GSO off


def one_run(rig: Any, net: Any, mechanism: str, workload: str) -> dict[str, Any]:
    if mechanism == "nflog":
        nft(rig, net.target, nflog_table())
    sink_proc = None
    try:
        if workload == "bulk":
            sink_proc = rig.popen_in(net.target, _self("sink", "5001"), stdout=subprocess.PIPE,
                                     env=_env())
            assert sink_proc.stdout is not None
            select.select([sink_proc.stdout], [], [], 10)
            sink_proc.stdout.readline()
        with receivers(rig, net.target, (mechanism,)) as (receiver,):
            rx_before = link_rx(rig, net.target)
            if workload == "stall50k":
                # A daemon busy elsewhere (a slow KILL_RUN_CMD): what the kernel buffer holds.
                os.kill(receiver.proc.pid, signal.SIGSTOP)
            if workload == "bulk":
                argv = _self("bulk", net.target_ip4, "5001", str(BULK_BYTES))
                out = rig.run_in(net.scanner, argv, timeout=60, check=True, env=_env()).stdout
                sent = json.loads(out)
            else:
                # synmax: as fast as the Python sender goes, to find where loss starts.
                sent = send_from(rig, net.scanner, net.target_ip4, "tcp",
                                 "A" if workload == "ack50k" else "S", PROBES, RATES[workload])
            if workload == "stall50k":
                os.kill(receiver.proc.pid, signal.SIGCONT)
            time.sleep(0.5)
            rx = link_rx(rig, net.target) - rx_before
            result = receiver.stop()
    finally:
        if sink_proc is not None:
            rig.stop_process(sink_proc)
        if mechanism == "nflog":
            rig.run_in(net.target, ["nft", "delete", "table", "inet", NFT_TABLE], timeout=10)
    probes = seen(result, net.scanner_ip4)
    return {
        "mechanism": mechanism, "workload": workload, "cpu": result["cpu"],
        "cpu_user": result["cpu_user"], "cpu_sys": result["cpu_sys"],
        "sent": sent.get("sent") if workload != "bulk" else None,
        "rate": sent.get("rate"), "sender_cpu": sent.get("cpu"), "link_rx": rx,
        "delivered": result["delivered"],
        "probes": probes, "syscalls": result["syscalls"], "kernel_drops": result["kernel_drops"],
        "nflog_overruns": result["nflog_overruns"],
    }


def costs(rig: Any, net: Any, mechanisms: Sequence[str], workloads: Sequence[str], reps: int,
          log: Any) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    # Round-robin over mechanisms so a burst of load from elsewhere on the machine spreads out.
    for rep in range(reps):
        for workload in workloads:
            for mechanism in mechanisms:
                if mechanism == "none" and workload not in ("syn50k", "ack50k"):
                    continue  # the baseline only matters for the sender+kernel columns
                run = one_run(rig, net, mechanism, workload)
                run["rep"] = rep
                log(json.dumps(run))
                runs.append(run)
    return runs


def summarize(runs: list[dict[str, Any]], mechanisms: Sequence[str], workloads: Sequence[str]) -> str:
    """Two markdown tables of medians: probe traffic, then non-probe traffic and kernel cost."""

    def median(mechanism: str, workload: str, key: str) -> float:
        values = [float(r[key]) for r in runs
                  if r["mechanism"] == mechanism and r["workload"] == workload and r[key] is not None]
        return statistics.median(values) if values else float("nan")

    def per_100k(mechanism: str, workload: str, key: str) -> str:
        if workload not in workloads:
            return "-"
        return f"{median(mechanism, workload, key) * PROBES / median(mechanism, workload, 'sent'):.2f}"

    def loss(mechanism: str, workload: str) -> str:
        if workload not in workloads:
            return "-"
        sent = median(mechanism, workload, "sent")
        text = f"{1 - median(mechanism, workload, 'probes') / sent:.1%}"
        if workload == "synmax":
            text += f" @{median(mechanism, workload, 'rate') / 1000:.0f}k"
        return text

    def cell(workload: str, text: str) -> str:
        return text if workload in workloads else "-"

    probes = [
        "| mechanism | receiver CPU s /100k SYN @20k pps | loss @20k | CPU @50k | loss @50k "
        "| CPU @max | loss @max rate | syscalls /100k SYN @20k | SYNs kept while stalled (of 100k) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    others = [
        "| mechanism | receiver CPU s, 100k ACK @50k | ACKs delivered to Python "
        "| receiver CPU s, bulk TCP (packets) | sender+kernel CPU s /100k ACK | same, /100k SYN @50k |",
        "|---|---|---|---|---|---|",
    ]
    for m in mechanisms:
        if m != "none":
            probes.append("| " + " | ".join([
                m, per_100k(m, "syn20k", "cpu"), loss(m, "syn20k"), per_100k(m, "syn50k", "cpu"),
                loss(m, "syn50k"), per_100k(m, "synmax", "cpu"), loss(m, "synmax"),
                cell("syn20k", f"{median(m, 'syn20k', 'syscalls'):.0f}"),
                cell("stall50k", f"{median(m, 'stall50k', 'probes'):.0f}"),
            ]) + " |")
        others.append("| " + " | ".join([
            m, cell("ack50k", f"{median(m, 'ack50k', 'cpu'):.2f}"),
            cell("ack50k", f"{median(m, 'ack50k', 'delivered'):.0f}"),
            cell("bulk", f"{median(m, 'bulk', 'cpu'):.2f} ({median(m, 'bulk', 'link_rx'):.0f})"),
            per_100k(m, "ack50k", "sender_cpu"), per_100k(m, "syn50k", "sender_cpu"),
        ]) + " |")
    return "\n".join(probes) + "\n\n" + "\n".join(others)


def machine() -> str:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    python = sys.version.split()[0]
    return f"nproc {os.cpu_count()}, CPU {model}, kernel {os.uname().release}, Python {python}"


def run(args: argparse.Namespace) -> None:
    rig = _harness_imports()
    out_path = Path(args.output)
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {"machine": machine()}
    log(report["machine"])
    with rig.namespaces_up(f"cm-{os.getpid()}") as net:
        # GSO off on the sender, so the bulk transfer arrives as MTU-sized packets, one per skb.
        rig.run_in(net.scanner, ["ip", "link", "set", "eth0", "gso_max_segs", "1"], check=True)
        if not args.skip_visibility:
            report["visibility"] = visibility(rig, net)
            for row in report["visibility"]:
                log(json.dumps(row))
        report["runs"] = costs(rig, net, args.mechanisms, args.workloads, args.reps, log)
    report["table"] = summarize(report["runs"], args.mechanisms, args.workloads)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(report["machine"])
    if "visibility" in report:
        keys = [k for k in report["visibility"][0] if k not in ("scenario", "mechanism")]
        print("\n| scenario | mechanism | " + " | ".join(keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for row in report["visibility"]:
            print(f"| {row['scenario']} | {row['mechanism']} | "
                  + " | ".join(str(row[k]) for k in keys) + " |")
    print()
    print(report["table"])
    print(f"\nraw runs in {out_path}; total {time.monotonic() - started:.0f}s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p_run = sub.add_parser("run", help="the whole benchmark (default)")
    for p in (parser, p_run):
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
        p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
        p.add_argument("--skip-visibility", action="store_true")
        p.add_argument("--output", default="/tmp/capture_mechanisms.json")
    p_recv = sub.add_parser("receive")
    p_recv.add_argument("mechanism", choices=MECHANISMS)
    p_send = sub.add_parser("send")
    p_send.add_argument("dst")
    p_send.add_argument("proto", choices=("tcp", "udp", "tcpfrag"))
    p_send.add_argument("flags")
    p_send.add_argument("count", type=int)
    p_send.add_argument("rate", type=float)
    p_sink = sub.add_parser("sink")
    p_sink.add_argument("port", type=int)
    p_bulk = sub.add_parser("bulk")
    p_bulk.add_argument("dst")
    p_bulk.add_argument("port", type=int)
    p_bulk.add_argument("size", type=int)
    args = parser.parse_args(argv)
    if args.command == "receive":
        receive(args.mechanism)
    elif args.command == "send" and args.proto == "tcpfrag":
        send_fragmented6(args.dst, args.count)
    elif args.command == "send":
        send(args.dst, args.proto, args.flags, args.count, args.rate)
    elif args.command == "sink":
        sink(args.port)
    elif args.command == "bulk":
        bulk(args.dst, args.port, args.size)
    else:
        if os.geteuid() != 0:
            raise SystemExit("needs root: it creates network namespaces")
        run(args)


if __name__ == "__main__":
    main()
