"""A tiny classic-BPF interpreter for the instructions our filters use, so tests can run a
program on crafted packets without root or a kernel.

Follows the kernel's rules where they matter: a load past the end of the packet ends the
program with 0 (reject), jumps are relative to the next instruction, and ancillary loads at
SKF_AD_OFF + n read socket-buffer metadata given as arguments.
"""

from __future__ import annotations

from portsentry.sensors.bpf import (
    BPF_ABS,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_H,
    BPF_IMM,
    BPF_IND,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JMP,
    BPF_JSET,
    BPF_LD,
    BPF_LDX,
    BPF_MISC,
    BPF_MSH,
    BPF_RET,
    BPF_TXA,
    BPF_W,
    BPF_X,
    PACKET_HOST,
    SKF_AD_IFINDEX,
    SKF_AD_OFF,
    SKF_AD_PKTTYPE,
    SKF_AD_PROTOCOL,
    SKF_AD_VLAN_TAG_PRESENT,
    Insn,
)

_MASK = 0xFFFFFFFF
_SIZES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}


class BpfError(Exception):
    """The program uses something this interpreter does not know, or is malformed."""


def run(
    program: list[Insn],
    packet: bytes,
    *,
    pkttype: int = PACKET_HOST,
    protocol: int | None = None,
    vlan_tag_present: int = 0,
    ifindex: int = 1,
) -> int:
    """The program's return value for `packet`: 0 rejects, otherwise bytes to keep.

    `protocol` is the link-layer type (skb->protocol); by default it is derived from the
    version nibble, as a NIC would for a well-formed frame.
    """
    if protocol is None:
        version = packet[0] >> 4 if packet else 0
        protocol = {4: 0x0800, 6: 0x86DD}.get(version, 0)
    ancillary = {
        SKF_AD_PROTOCOL: protocol,
        SKF_AD_PKTTYPE: pkttype,
        SKF_AD_VLAN_TAG_PRESENT: vlan_tag_present,
        SKF_AD_IFINDEX: ifindex,
    }
    a = x = 0
    pc = 0
    steps = 0
    while True:
        if not 0 <= pc < len(program):
            raise BpfError(f"fell off the program at {pc}")
        steps += 1
        if steps > 4096:
            raise BpfError("too many steps (a classic BPF program cannot loop)")
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == BPF_RET:
            return k
        if cls == BPF_LD:
            mode = code & 0xE0
            if mode == BPF_IMM:
                a = k
                continue
            size = _SIZES[code & 0x18]
            signed_k = k - (1 << 32) if k & 0x80000000 else k
            if mode == BPF_ABS and signed_k < 0:
                if signed_k - SKF_AD_OFF not in ancillary:
                    raise BpfError(f"unsupported ancillary load {signed_k - SKF_AD_OFF}")
                a = ancillary[signed_k - SKF_AD_OFF]
                continue
            if mode == BPF_ABS:
                offset = k
            elif mode == BPF_IND:
                offset = (x + k) & _MASK
            else:
                raise BpfError(f"unsupported load mode {mode:#x}")
            if offset + size > len(packet):
                return 0
            a = int.from_bytes(packet[offset : offset + size], "big")
        elif cls == BPF_LDX:
            if code & 0xE0 != BPF_MSH or code & 0x18 != BPF_B:
                raise BpfError(f"unsupported ldx {code:#x}")
            if k >= len(packet):
                return 0
            x = (packet[k] & 0x0F) * 4
        elif cls == BPF_ALU:
            if code & 0xF0 != BPF_AND:
                raise BpfError(f"unsupported alu {code:#x}")
            a &= x if code & BPF_X else k
        elif cls == BPF_MISC:
            if code & 0xF8 == BPF_TXA:
                a = x
            else:
                x = a
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
                continue
            operand = x if code & BPF_X else k
            if op == BPF_JEQ:
                taken = a == operand
            elif op == BPF_JGT:
                taken = a > operand
            elif op == BPF_JGE:
                taken = a >= operand
            elif op == BPF_JSET:
                taken = bool(a & operand)
            else:
                raise BpfError(f"unsupported jump {code:#x}")
            pc += jt if taken else jf
        else:
            raise BpfError(f"unsupported instruction class {cls:#x}")
