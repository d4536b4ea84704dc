"""Build the classic BPF program that lets only possible probes through to the packet sensor.

The program runs in the kernel on an AF_PACKET SOCK_DGRAM socket (offsets count from the IP
header). It passes inbound unicast IPv4/IPv6 TCP segments without ACK or RST and UDP
datagrams, so established traffic never wakes Python; `parse_packet` re-checks everything.
Sources on the ignore list can be rejected here too (`skip_sources`), so an ignored host's
probes cost the daemon nothing, as with the kernel path's protect sets; the engine still checks
the ignore list, so a list longer than the program can hold only costs CPU, never a wrong ban.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from ipaddress import IPv4Network, IPv6Network, collapse_addresses
from typing import NamedTuple

from portsentry.core.probe import Protocol
from portsentry.sensors.packet import (
    IPPROTO_FRAGMENT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_EXTENSION_HEADERS,
    IPv4Header,
    IPv6Header,
    TcpFlag,
    TcpHeader,
    UdpHeader,
)

# Instruction classes, sizes, modes, operations and sources from linux/filter.h / bpf_common.h.
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_MISC = 0x07
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MSH = 0xA0
BPF_AND = 0x50
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_K = 0x00
BPF_X = 0x08
BPF_TAX = 0x00
BPF_TXA = 0x80

# Ancillary data: loads at SKF_AD_OFF + n read skb metadata instead of packet bytes.
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
SKF_AD_VLAN_TAG_PRESENT = 48

QUIET_PORTS_MAX = 64
SKIP_INTERFACES_MAX = 64
# Networks per family the filter rejects by source: a jump reaches at most 255 instructions
# ahead, and an IPv4 network costs up to 3, an IPv6 one up to 9.
SKIP_SOURCES_MAX = {4: 64, 6: 24}
# Networks tried one by one when the list does not fit: each try merges at most SKIP_SOURCES_MAX.
SKIP_SOURCES_SCAN = 1024
PACKET_HOST = 0
PACKET_OUTGOING = 4
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

# Bytes handed to the socket for an accepted packet; headers are all the sensor reads, but an
# IPv6 extension chain can be long, so keep the whole packet and let recv() size decide.
ACCEPT_ALL_BYTES = 0x40000
REJECT = 0

_ACK_OR_RST = int(TcpFlag.ACK | TcpFlag.RST)
_FULL_PROTOCOLS = frozenset(Protocol)


class Insn(NamedTuple):
    """One `struct sock_filter`: opcode, jump-if-true, jump-if-false, constant."""

    code: int
    jt: int
    jf: int
    k: int


class _Assembler:
    """Emit instructions whose jump targets are label names, then resolve them to offsets."""

    def __init__(self) -> None:
        self._items: list[tuple[int, str | int, str | int, int | str]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._items)

    def emit(self, code: int, k: int = 0) -> None:
        self._items.append((code, 0, 0, k & 0xFFFFFFFF))

    def jump(self, op: int, k: int, true: str | int, false: str | int) -> None:
        """Conditional jump; `true`/`false` are labels, or 0 for the next instruction."""
        self._items.append((BPF_JMP | op | BPF_K, true, false, k & 0xFFFFFFFF))

    def goto(self, target: str) -> None:
        """Unconditional jump (its offset is a 32-bit constant, so it reaches any label)."""
        self._items.append((BPF_JMP | BPF_JA, 0, 0, target))

    def assemble(self) -> list[Insn]:
        program = []
        for index, (code, jt, jf, k) in enumerate(self._items):
            if isinstance(k, str):
                k = self._labels[k] - index - 1
            program.append(Insn(code, self._offset(index, jt), self._offset(index, jf), k))
        return program

    def _offset(self, index: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        offset = self._labels[target] - index - 1
        if not 0 <= offset <= 0xFF:
            raise ValueError(f"jump from {index} to {target!r} out of range ({offset})")
        return offset


def build_probe_filter(
    protocols: Collection[Protocol] = _FULL_PROTOCOLS,
    max_port: int | None = None,
    outgoing_udp: bool = False,
    quiet_udp_ports: Collection[int] = (),
    skip_sources: Collection[IPv4Network | IPv6Network] = (),
    skip_interfaces: Collection[int] = (),
) -> list[Insn]:
    """Accept inbound unicast IPv4/IPv6 packets that may be probes; reject everything else.

    Probes are TCP segments without ACK and RST, and UDP datagrams, of the given `protocols`,
    not IPv4 non-first fragments. With `max_port` (advanced mode) only destination ports below
    it pass. IPv6 packets whose first next header is an extension header are passed without
    port or flag checks: walking the chain is left to Python. Inbound packets from
    `skip_sources` (merged; the first SKIP_SOURCES_MAX per family) are rejected, and so are
    inbound packets on `skip_interfaces` (indexes of bridge and bond ports, whose packets come
    again on their master; the lowest SKIP_INTERFACES_MAX).

    A conditional jump reaches at most 255 instructions ahead, so each part (the head, IPv4,
    our outgoing UDP, IPv6) ends in its own accept and reject, and the head reaches the parts
    through unconditional jumps, which reach anywhere.
    """
    if max_port is not None and not 0 <= max_port <= 0x10000:
        raise ValueError(f"max_port {max_port} is not between 0 and 65536")
    want_tcp = Protocol.TCP in protocols
    want_udp = Protocol.UDP in protocols
    # With `outgoing_udp`, our own outgoing UDP datagrams pass too: the sensor remembers them so
    # that the replies (DNS, NTP) are not taken for probes even when the client socket is
    # already closed by the time the reply is read.
    outgoing_udp = outgoing_udp and want_udp
    # At most QUIET_PORTS_MAX ports: the program must stay short (jumps reach 255 instructions).
    quiet = sorted(set(quiet_udp_ports))[:QUIET_PORTS_MAX]
    asm = _Assembler()
    if not (want_tcp or want_udp):
        asm.emit(BPF_RET | BPF_K, REJECT)
        return asm.assemble()

    # Only packets addressed to this host's MAC: not our own outgoing copies (ETH_P_ALL sees
    # them), not broadcast or multicast (1.2 reacted to those; 2.x's pcap filter did not).
    asm.emit(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
    asm.jump(BPF_JEQ, PACKET_HOST, 0, "to_outgoing" if outgoing_udp else "reject")
    # Counted on the master only: the port's copy is the same packet, delivered once.
    interfaces = sorted(set(skip_interfaces))[:SKIP_INTERFACES_MAX]
    if interfaces:
        asm.emit(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_IFINDEX)
        for index in interfaces:
            asm.jump(BPF_JEQ, index, "reject", 0)
    # A tagged frame is seen again, untagged, on its VLAN device; count it there only.
    asm.emit(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT)
    asm.jump(BPF_JEQ, 0, 0, "reject")
    asm.emit(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
    asm.jump(BPF_JEQ, ETH_P_IP, "ipv4", 0)
    asm.jump(BPF_JEQ, ETH_P_IPV6, "to_ipv6", "reject")
    asm.label("to_ipv6")
    asm.goto("ipv6")
    if outgoing_udp:
        asm.label("to_outgoing")
        asm.goto("outgoing")
    asm.label("reject")
    asm.emit(BPF_RET | BPF_K, REJECT)

    asm.label("ipv4")  # right after the head: in reach of its conditional jump
    # The link-layer type alone is not enough: the bytes must agree that this is IPv4.
    asm.emit(BPF_LD | BPF_B | BPF_ABS, IPv4Header.VERSION_IHL)
    asm.emit(BPF_ALU | BPF_AND | BPF_K, 0xF0)
    asm.jump(BPF_JEQ, 0x40, 0, "reject4")
    _skip_sources(asm, 4, skip_sources)
    asm.emit(BPF_LD | BPF_H | BPF_ABS, IPv4Header.FLAGS_FRAGMENT)
    asm.jump(BPF_JSET, IPv4Header.FRAGMENT_OFFSET_MASK, "reject4", 0)
    asm.emit(BPF_LDX | BPF_B | BPF_MSH, IPv4Header.VERSION_IHL)  # X = IHL * 4
    asm.emit(BPF_MISC | BPF_TXA)
    asm.jump(BPF_JGE, IPv4Header.SIZE, 0, "reject4")
    asm.emit(BPF_LD | BPF_B | BPF_ABS, IPv4Header.PROTOCOL)
    asm.jump(BPF_JEQ, IPPROTO_TCP, "tcp4" if want_tcp else "reject4", 0)
    asm.jump(BPF_JEQ, IPPROTO_UDP, "udp4" if want_udp else "reject4", "reject4")
    if want_tcp:
        asm.label("tcp4")
        asm.emit(BPF_LD | BPF_B | BPF_IND, TcpHeader.FLAGS)
        asm.jump(BPF_JSET, _ACK_OR_RST, "reject4", 0)
        _port_check(asm, "4", BPF_LD | BPF_H | BPF_IND, TcpHeader.DESTINATION_PORT, max_port)
    if want_udp:
        asm.label("udp4")
        _port_check(asm, "4", BPF_LD | BPF_H | BPF_IND, UdpHeader.DESTINATION_PORT, max_port, quiet)
    _ends(asm, "4")

    if outgoing_udp:
        asm.label("outgoing")
        asm.jump(BPF_JEQ, PACKET_OUTGOING, 0, "reject_out")
        asm.emit(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
        asm.jump(BPF_JEQ, ETH_P_IP, 0, "outgoing6")
        asm.emit(BPF_LD | BPF_B | BPF_ABS, IPv4Header.PROTOCOL)
        asm.jump(BPF_JEQ, IPPROTO_UDP, 0, "reject_out")
        asm.emit(BPF_LDX | BPF_B | BPF_MSH, IPv4Header.VERSION_IHL)
        # A busy service's own replies (source port quieted) need no remembering either.
        _port_check(asm, "_out", BPF_LD | BPF_H | BPF_IND, UdpHeader.SOURCE_PORT, None, quiet)
        asm.label("outgoing6")
        asm.jump(BPF_JEQ, ETH_P_IPV6, 0, "reject_out")
        asm.emit(BPF_LD | BPF_B | BPF_ABS, IPv6Header.NEXT_HEADER)
        asm.jump(BPF_JEQ, IPPROTO_UDP, 0, "reject_out")
        _port_check(asm, "_out", BPF_LD | BPF_H | BPF_ABS, IPv6Header.SIZE + UdpHeader.SOURCE_PORT, None,
                    quiet)
        _ends(asm, "_out")

    asm.label("ipv6")
    asm.emit(BPF_LD | BPF_B | BPF_ABS, IPv6Header.VERSION_CLASS_FLOW)
    asm.emit(BPF_ALU | BPF_AND | BPF_K, 0xF0)
    asm.jump(BPF_JEQ, 0x60, 0, "reject6")
    _skip_sources(asm, 6, skip_sources)
    asm.emit(BPF_LD | BPF_B | BPF_ABS, IPv6Header.NEXT_HEADER)
    asm.jump(BPF_JEQ, IPPROTO_TCP, "tcp6" if want_tcp else "reject6", 0)
    asm.jump(BPF_JEQ, IPPROTO_UDP, "udp6" if want_udp else "reject6", 0)
    # Fragment headers too: a first fragment holding the TCP header is a probe (Python walks it).
    extensions = sorted(IPV6_EXTENSION_HEADERS | {IPPROTO_FRAGMENT})
    for position, header in enumerate(extensions):
        last = position == len(extensions) - 1
        asm.jump(BPF_JEQ, header, "accept6", "reject6" if last else 0)
    if want_tcp:
        asm.label("tcp6")
        asm.emit(BPF_LD | BPF_B | BPF_ABS, IPv6Header.SIZE + TcpHeader.FLAGS)
        asm.jump(BPF_JSET, _ACK_OR_RST, "reject6", 0)
        _port_check(asm, "6", BPF_LD | BPF_H | BPF_ABS, IPv6Header.SIZE + TcpHeader.DESTINATION_PORT,
                    max_port)
    if want_udp:
        asm.label("udp6")
        _port_check(asm, "6", BPF_LD | BPF_H | BPF_ABS, IPv6Header.SIZE + UdpHeader.DESTINATION_PORT,
                    max_port, quiet)
    _ends(asm, "6")
    return asm.assemble()


def _ends(asm: _Assembler, part: str) -> None:
    """The accept and reject that the jumps of one part of the program lead to."""
    asm.label(f"accept{part}")
    asm.emit(BPF_RET | BPF_K, ACCEPT_ALL_BYTES)
    asm.label(f"reject{part}")
    asm.emit(BPF_RET | BPF_K, REJECT)


def _port_check(
    asm: _Assembler, part: str, load: int, offset: int, max_port: int | None, quiet: Collection[int] = ()
) -> None:
    """Accept if the destination port is below `max_port` (always, without one) and not one of
    `quiet` (ports with a live service, whose traffic must not wake the daemon), else reject."""
    if max_port is None and not quiet:
        asm.emit(BPF_RET | BPF_K, ACCEPT_ALL_BYTES)
        return
    asm.emit(load, offset)
    for port in sorted(quiet):
        asm.jump(BPF_JEQ, port, f"reject{part}", 0)
    if max_port is not None:
        asm.jump(BPF_JGE, max_port, f"reject{part}", f"accept{part}")
    else:
        asm.emit(BPF_RET | BPF_K, ACCEPT_ALL_BYTES)


def skipped_networks(version: int, networks: Collection[IPv4Network | IPv6Network]
                     ) -> list[IPv4Network | IPv6Network]:
    """The networks of one family the filter rejects: merged, at most SKIP_SOURCES_MAX. When
    they do not fit, the first given come first (the sensor puts our own addresses there)."""
    wanted: list[IPv4Network | IPv6Network] = [n for n in networks if n.version == version]
    limit = SKIP_SOURCES_MAX[version]
    merged = _collapse(wanted)
    if len(merged) <= limit:
        return merged
    chosen: list[IPv4Network | IPv6Network] = []
    for network in wanted[:SKIP_SOURCES_SCAN]:
        trial = _collapse([*chosen, network])
        if len(trial) > limit:
            break
        chosen = trial
    return chosen


def _collapse(networks: list[IPv4Network | IPv6Network]) -> list[IPv4Network | IPv6Network]:
    merged: list[IPv4Network | IPv6Network] = []
    merged += collapse_addresses(networks)  # type: ignore[type-var]  # one family, as called
    return merged


def _skip_sources(asm: _Assembler, version: int, networks: Collection[IPv4Network | IPv6Network]) -> None:
    """Reject the packet if its source (A is free here) is in one of `networks`."""
    chosen = skipped_networks(version, networks)
    if not chosen:
        return
    skip, keep = f"skip{version}", f"kept{version}"  # its own reject: reject4/6 are too far
    source = IPv4Header.SOURCE if version == 4 else IPv6Header.SOURCE
    for index, network in enumerate(chosen):
        value = int(network.network_address)
        words = max(1, -(-network.prefixlen // 32))
        total = network.max_prefixlen // 32
        last_network = index == len(chosen) - 1
        following = keep if last_network else f"net{version}_{index + 1}"
        for word in range(words):
            bits = min(32, network.prefixlen - 32 * word)
            mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF if bits > 0 else 0
            expected = (value >> (32 * (total - 1 - word))) & mask
            asm.emit(BPF_LD | BPF_W | BPF_ABS, source + 4 * word)
            if mask != 0xFFFFFFFF:
                asm.emit(BPF_ALU | BPF_AND | BPF_K, mask)
            asm.jump(BPF_JEQ, expected, skip if word == words - 1 else 0, following)
        if not last_network:
            asm.label(f"net{version}_{index + 1}")
    asm.label(skip)
    asm.emit(BPF_RET | BPF_K, REJECT)
    asm.label(keep)


def reject_all_filter() -> list[Insn]:
    """A program that passes nothing; attached first so no packet slips in unfiltered."""
    return [Insn(BPF_RET | BPF_K, 0, 0, REJECT)]


_SOCK_FILTER = struct.Struct("=HBBI")


def pack_filter(insns: list[Insn]) -> bytes:
    """The instructions as the kernel's `struct sock_filter` array, in native byte order.

    SO_ATTACH_FILTER takes a `struct sock_fprog` that points at this array; the socket code
    builds it, since it must keep the array alive across the setsockopt call.
    """
    return b"".join(_SOCK_FILTER.pack(*insn) for insn in insns)


_LOAD_SIZE = {BPF_W: "", BPF_H: "h", BPF_B: "b"}
_JUMP_NAMES = {BPF_JEQ: "jeq", BPF_JGT: "jgt", BPF_JGE: "jge", BPF_JSET: "jset"}
_ANCILLARY_NAMES = {
    SKF_AD_PROTOCOL: "proto",
    SKF_AD_PKTTYPE: "pkttype",
    SKF_AD_IFINDEX: "ifindex",
    SKF_AD_VLAN_TAG_PRESENT: "vlan_avail",
}


def disassemble(insns: list[Insn]) -> str:
    """The program in tcpdump -d style, one instruction per line, jump targets as indexes."""
    return "\n".join(f"({index:03d}) {_describe(index, insn)}" for index, insn in enumerate(insns))


def _describe(index: int, insn: Insn) -> str:
    code, jt, jf, k = insn
    cls = code & 0x07
    if cls == BPF_LD:
        size = _LOAD_SIZE.get(code & 0x18, "?")
        mode = code & 0xE0
        if mode == BPF_ABS:
            signed = k - 0x100000000 if k & 0x80000000 else k
            if signed >= SKF_AD_OFF and signed - SKF_AD_OFF in _ANCILLARY_NAMES:
                return f"{'ld' + size:<8} #{_ANCILLARY_NAMES[signed - SKF_AD_OFF]}"
            return f"{'ld' + size:<8} [{k}]"
        if mode == BPF_IND:
            return f"{'ld' + size:<8} [x + {k}]"
        if mode == BPF_IMM:
            return f"ld       #{k:#x}"
    if cls == BPF_LDX and code & 0xE0 == BPF_MSH:
        return f"ldxb     4*([{k}]&0xf)"
    if cls == BPF_ALU and code & 0xF0 == BPF_AND:
        return f"and      #{k:#x}"
    if cls == BPF_MISC:
        return "txa" if code & 0xF8 == BPF_TXA else "tax"
    if cls == BPF_JMP:
        op = code & 0xF0
        if op == BPF_JA:
            return f"ja       {index + 1 + k}"
        name = _JUMP_NAMES.get(op, "j?")
        operand = "x" if code & BPF_X else f"#{k:#x}"
        return f"{name:<8} {operand:<8} jt {index + 1 + jt}\tjf {index + 1 + jf}"
    if cls == BPF_RET:
        return f"ret      #{k}"
    return f"unknown  code={code:#x} jt={jt} jf={jf} k={k:#x}"
