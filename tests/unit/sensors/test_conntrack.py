"""Asking whether a probe's port is published by NAT: the ctnetlink request, the replies, the
nat-chain dump, and when the sensor asks at all."""

from __future__ import annotations

import errno
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from portsentry.core.probe import Protocol
from portsentry.netlink.codec import NFGENMSG, attr, attributes, nested, split
from portsentry.sensors import conntrack
from portsentry.sensors.conntrack import (
    CTA_STATUS,
    IPS_DST_NAT,
    NFTA_CHAIN_HOOK,
    NFTA_CHAIN_TYPE,
    NFTA_HOOK_HOOKNUM,
    PublishedPorts,
    get_request,
    nat_chain,
    nat_in_use,
    parse_status,
)

SRC, DST = socket.inet_aton("198.18.0.2"), socket.inet_aton("198.18.0.1")


def test_the_request_names_the_flow_as_it_arrived():
    data = get_request(Protocol.TCP, SRC, 40000, DST, 80, seq=7)
    (kind, _flags, seq, _pid, start, end), = split(data)[0]
    assert (kind, seq) == (1 << 8 | 1, 7)  # ctnetlink, IPCTNL_MSG_CT_GET
    assert NFGENMSG.unpack_from(data, start)[0] == socket.AF_INET
    (_orig, tuple_), = attributes(data, start + NFGENMSG.size, end)[0]
    ip, proto = (value for _kind, value in attributes(tuple_)[0])
    assert [value for _k, value in attributes(ip)[0]] == [SRC, DST]
    assert [value for _k, value in attributes(proto)[0]] == [bytes([6]), struct.pack("!H", 40000),
                                                             struct.pack("!H", 80)]
    six = get_request(Protocol.UDP, bytes(15) + b"\2", 53, bytes(15) + b"\1", 53, seq=8)
    (_k, _f, _s, _p, start6, _e), = split(six)[0]
    assert NFGENMSG.unpack_from(six, start6)[0] == socket.AF_INET6


def test_the_status_says_whether_the_destination_was_rewritten():
    body = NFGENMSG.pack(socket.AF_INET, 0, 0) + attr(CTA_STATUS, struct.pack("!I", IPS_DST_NAT | 0x8))
    assert parse_status(body, 0, len(body)) == IPS_DST_NAT | 0x8
    assert parse_status(NFGENMSG.pack(2, 0, 0), 0, 4) is None


def _chain(kind: bytes, hook: int) -> bytes:
    return NFGENMSG.pack(socket.AF_INET, 0, 0) + attr(NFTA_CHAIN_TYPE, kind + b"\0") + nested(
        NFTA_CHAIN_HOOK, attr(NFTA_HOOK_HOOKNUM, struct.pack("!I", hook)))


def test_only_a_nat_chain_at_prerouting_rewrites_what_comes_in():
    assert nat_chain(_chain(b"nat", 0))
    assert not nat_chain(_chain(b"nat", 3))  # output: this host's own connections
    assert not nat_chain(_chain(b"filter", 0))
    assert not nat_chain(NFGENMSG.pack(2, 0, 0))  # a regular chain: no type, no hook


@given(st.binary(max_size=200))
def test_replies_of_any_bytes_never_raise(data):
    parse_status(data, 0, len(data))
    nat_chain(data)


def test_iptables_legacy_nat_table_counts_without_asking_nftables(tmp_path, monkeypatch):
    names = tmp_path / "ip_tables_names"
    names.write_text("filter\nnat\n")

    def no_netlink(_protocol: int) -> socket.socket:
        raise AssertionError("nftables asked although the legacy nat table answers")

    monkeypatch.setattr(conntrack, "open_socket", no_netlink)
    assert nat_in_use((str(names), str(tmp_path / "missing")))


def test_a_kernel_without_nf_tables_has_no_nat_chain(tmp_path, monkeypatch):
    def refused(_protocol: int) -> socket.socket:
        raise OSError(errno.EPROTONOSUPPORT, "no nfnetlink")

    monkeypatch.setattr(conntrack, "open_socket", refused)
    assert not nat_in_use((str(tmp_path / "missing"),))


class Lookup:
    def __init__(self, answer: bool | OSError) -> None:
        self.answer, self.asked, self.closed = answer, 0, 0

    def rewritten(self, *args: object) -> bool:
        self.asked += 1
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer

    def close(self) -> None:
        self.closed += 1


def test_only_a_tap_in_a_namespace_that_nats_asks():
    queries: list[float] = []
    lines: list[str] = []

    def query() -> bool:
        queries.append(0)
        return True

    published = PublishedPorts(lines.append, Lookup(True), query=query)  # type: ignore[arg-type]
    published.refresh(0.0, before_nat=False)
    assert not published.active and queries == []  # NFLOG sees packets after NAT
    published.refresh(0.0, before_nat=True)
    assert published.active and len(queries) == 1
    published.refresh(1.0, before_nat=True)
    assert len(queries) == 1  # looked for every NAT_INTERVAL, not every tick
    published.refresh(0.0 + conntrack.NAT_INTERVAL, before_nat=True)
    assert len(queries) == 2
    assert published.rewritten(Protocol.TCP, SRC, 1, DST, 80, 5.0)


def test_a_kernel_that_cannot_be_asked_is_said_once_and_then_left_alone():
    lines: list[str] = []
    lookup = Lookup(OSError(errno.EPERM, "Operation not permitted"))
    published = PublishedPorts(lines.append, lookup, query=lambda: True)  # type: ignore[arg-type]
    published.refresh(0.0, before_nat=True)
    assert not published.rewritten(Protocol.TCP, SRC, 1, DST, 80, 0.0)
    assert not published.rewritten(Protocol.TCP, SRC, 2, DST, 80, 0.0)
    assert lookup.asked == 1 and lookup.closed == 1 and not published.active
    assert len(lines) == 1 and "DNAT may be taken for scanners" in lines[0]


def test_a_flood_asks_at_most_the_budget_a_second(monkeypatch):
    lookup = conntrack.NatLookup(budget=3)
    sent: list[bytes] = []

    class Sock:
        def send(self, data: bytes) -> None:
            sent.append(data)

        def recv(self, _size: int) -> bytes:
            seq = split(sent[-1])[0][0][2]
            # ENOENT: conntrack holds no such flow
            return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -errno.ENOENT) + sent[-1][:16]

        def close(self) -> None:
            pass

    lookup._sock = Sock()  # type: ignore[assignment]
    answers = [lookup.rewritten(Protocol.TCP, SRC, port, DST, 80, 10.5) for port in range(5)]
    assert answers == [False] * 3 + [None] * 2 and len(sent) == 3  # None: not asked
    lookup.rewritten(Protocol.TCP, SRC, 9, DST, 80, 11.0)
    assert len(sent) == 4


class PublishingKernel:
    """A ctnetlink socket whose conntrack holds every flow to `published` as DNATed, and no other."""

    def __init__(self, published: int) -> None:
        self.published = published
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def recv(self, _size: int) -> bytes:
        request = self.sent[-1]
        seq = split(request)[0][0][2]
        port = struct.unpack("!H", request[-4:-2])[0]  # CTA_PROTO_DST_PORT comes last, padded
        if port != self.published:
            return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -errno.ENOENT) + request[:16]
        body = NFGENMSG.pack(socket.AF_INET, 0, 0) + attr(CTA_STATUS, struct.pack("!I", IPS_DST_NAT))
        return struct.pack("=IHHII", 16 + len(body), 1 << 8, 0, seq, 0) + body

    def close(self) -> None:
        pass


def test_past_the_budget_a_port_seen_published_stays_served():
    # A flood of probes to unserved ports (a scanner, or forged sources) used up the second's
    # questions, and every client of a published port after them was answered "not rewritten":
    # taken for a scanner and banned, as before NAT was asked at all. The listener check falls
    # back to its table past its budget; this falls back to the ports it saw published.
    kernel = PublishingKernel(published=80)
    lookup = conntrack.NatLookup(budget=3)
    lookup._sock = kernel  # type: ignore[assignment]
    lines: list[str] = []
    published = PublishedPorts(lines.append, lookup, query=lambda: True)
    published.refresh(10.0, before_nat=True)
    assert published.rewritten(Protocol.TCP, SRC, 40000, DST, 80, 10.1)
    assert not published.rewritten(Protocol.TCP, SRC, 40001, DST, 1, 10.2)
    assert not published.rewritten(Protocol.TCP, SRC, 40002, DST, 2, 10.3)
    assert len(kernel.sent) == 3  # the budget is spent
    client = socket.inet_aton("198.18.0.9")
    assert published.rewritten(Protocol.TCP, client, 50000, DST, 80, 10.4)
    assert not published.rewritten(Protocol.TCP, client, 50001, DST, 3, 10.5)  # never seen published
    assert not published.rewritten(Protocol.UDP, client, 50002, DST, 80, 10.6)  # only TCP was
    assert len(kernel.sent) == 3
