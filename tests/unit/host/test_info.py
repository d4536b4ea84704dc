"""Tests for host facts: rtnetlink parsing of crafted bytes, resolv.conf, real dumps in a netns."""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.core.addresses import canonical
from portsentry.host import info as hostinfo
from portsentry.host.info import (
    IFA_ADDRESS,
    IFA_BROADCAST,
    IFA_LOCAL,
    IFADDRMSG,
    IFINFOMSG,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MASTER,
    NLMSG_DONE,
    NLMSGHDR,
    RT_TABLE_MAIN,
    RTA_DST,
    RTA_GATEWAY,
    RTA_MULTIPATH,
    RTA_TABLE,
    RTA_VIA,
    RTATTR,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMSG,
    RTN_UNICAST,
    RTNEXTHOP,
    InterfaceAddress,
    Link,
    Route,
    parse_addr_messages,
    parse_link_messages,
    parse_messages,
    parse_resolv_conf,
    parse_route_messages,
    relaying_ports,
)

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "150")), deadline=None)
AF4, AF6 = socket.AF_INET, socket.AF_INET6
REPO = Path(__file__).resolve().parents[3]

# --- builders for the kernel's side of the conversation ---


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def rtattr(kind: int, value: bytes) -> bytes:
    return pad(RTATTR.pack(RTATTR.size + len(value), kind) + value)


def message(kind: int, body: bytes, seq: int = 1, flags: int = 2) -> bytes:
    return pad(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body)


def addr_message(family: int, prefixlen: int, index: int, *attrs: bytes) -> bytes:
    return message(RTM_NEWADDR, IFADDRMSG.pack(family, prefixlen, 0, 0, index) + b"".join(attrs))


def route_message(
    family: int, dst_len: int, *attrs: bytes, table: int = RT_TABLE_MAIN, kind: int = RTN_UNICAST
) -> bytes:
    body = RTMSG.pack(family, dst_len, 0, 0, table, 3, 0, kind, 0) + b"".join(attrs)
    return message(RTM_NEWROUTE, body)


def link_message(index: int, *attrs: bytes) -> bytes:
    return message(RTM_NEWLINK, IFINFOMSG.pack(0, 1, index, 0, 0) + b"".join(attrs))


def linkinfo(kind: str) -> bytes:
    return rtattr(IFLA_LINKINFO | 0x8000, rtattr(IFLA_INFO_KIND, kind.encode() + b"\0"))


def master(index: int) -> bytes:
    return rtattr(IFLA_MASTER, struct.pack("=I", index))


def nexthop(*attrs: bytes, ifindex: int = 2) -> bytes:
    nested = b"".join(attrs)
    return RTNEXTHOP.pack(RTNEXTHOP.size + len(nested), 0, 0, ifindex) + nested


def packed(text: str) -> bytes:
    return ip_address(text).packed


def via(text: str) -> bytes:
    address = ip_address(text)
    return struct.pack("=H", AF4 if address.version == 4 else AF6) + address.packed


DONE = message(NLMSG_DONE, struct.pack("=i", 0))

# A dump as `ip addr` would see it: lo, an Ethernet with broadcast, a point-to-point link.
ADDR_DUMP = b"".join(
    [
        addr_message(
            AF4,
            8,
            1,
            rtattr(IFA_ADDRESS, packed("127.0.0.1")),
            rtattr(IFA_LOCAL, packed("127.0.0.1")),
        ),
        addr_message(
            AF4,
            24,
            2,
            rtattr(IFA_ADDRESS, packed("198.18.1.1")),
            rtattr(IFA_LOCAL, packed("198.18.1.1")),
            rtattr(IFA_BROADCAST, packed("198.18.1.255")),
            rtattr(3, b"eth0\0"),  # IFA_LABEL: not an address, must not confuse the parser
        ),
        addr_message(
            AF4,
            32,
            3,
            rtattr(IFA_ADDRESS, packed("198.18.9.2")),  # the peer
            rtattr(IFA_LOCAL, packed("198.18.9.1")),
        ),
        addr_message(AF6, 64, 2, rtattr(IFA_ADDRESS, packed("fd00::1"))),
        addr_message(AF6, 128, 1, rtattr(IFA_ADDRESS, packed("::1"))),
        DONE,
    ]
)


def test_parse_messages_splits_headers_and_payloads() -> None:
    messages = parse_messages(ADDR_DUMP)
    assert [m.type for m in messages] == [RTM_NEWADDR] * 5 + [NLMSG_DONE]
    assert all(m.seq == 1 for m in messages)
    assert messages[-1].payload == b"\0\0\0\0"


def test_parse_addr_messages() -> None:
    assert parse_addr_messages(ADDR_DUMP) == [
        InterfaceAddress(AF4, 8, 1, IPv4Address("127.0.0.1"), None),
        InterfaceAddress(AF4, 24, 2, IPv4Address("198.18.1.1"), IPv4Address("198.18.1.255")),
        InterfaceAddress(AF4, 32, 3, IPv4Address("198.18.9.1"), None),  # IFA_LOCAL, not the peer
        InterfaceAddress(AF6, 64, 2, IPv6Address("fd00::1"), None),
        InterfaceAddress(AF6, 128, 1, IPv6Address("::1"), None),
    ]


def test_parse_addr_skips_other_families_and_short_bodies() -> None:
    data = (
        addr_message(17, 0, 1, rtattr(IFA_ADDRESS, b"\1\2\3\4\5\6"))  # AF_PACKET
        + message(RTM_NEWADDR, b"\2\0")  # body shorter than ifaddrmsg
        + addr_message(AF6, 64, 2, rtattr(IFA_ADDRESS, b"\xfd\0"))  # truncated address
        + addr_message(AF4, 24, 2, rtattr(IFA_LOCAL, packed("198.18.0.7")))
    )
    assert parse_addr_messages(data) == [
        InterfaceAddress(AF6, 64, 2, None, None),
        InterfaceAddress(AF4, 24, 2, IPv4Address("198.18.0.7"), None),
    ]


def test_attribute_type_flags_are_masked_as_the_kernel_does() -> None:
    # nla_type(): NLA_F_NESTED and NLA_F_NET_BYTEORDER are not part of the type.
    data = addr_message(AF4, 24, 2, rtattr(IFA_LOCAL | 0x4000, packed("198.18.0.7")))
    assert parse_addr_messages(data)[0].local == IPv4Address("198.18.0.7")
    hop = pad(nexthop(rtattr(RTA_GATEWAY | 0x8000, packed("198.18.0.1"))))
    route = route_message(AF4, 0, rtattr(RTA_MULTIPATH | 0x8000, hop))
    assert parse_route_messages(route)[0].gateways == (IPv4Address("198.18.0.1"),)


def test_parse_stops_at_a_header_that_overruns() -> None:
    good = addr_message(AF4, 24, 2, rtattr(IFA_LOCAL, packed("198.18.0.7")))
    overrun = NLMSGHDR.pack(4096, RTM_NEWADDR, 2, 1, 0) + IFADDRMSG.pack(AF4, 24, 0, 0, 2)
    assert len(parse_addr_messages(good + overrun + good)) == 1
    tiny = NLMSGHDR.pack(3, RTM_NEWADDR, 2, 1, 0)  # length below the header size
    assert parse_messages(tiny + good) == []


def test_parse_route_default_routes() -> None:
    data = b"".join(
        [
            route_message(
                AF4,
                0,
                rtattr(RTA_TABLE, struct.pack("=I", 254)),
                rtattr(RTA_GATEWAY, packed("198.18.0.254")),
            ),
            route_message(AF4, 24, rtattr(RTA_DST, packed("198.18.0.0"))),
            route_message(AF4, 0, rtattr(RTA_GATEWAY, packed("198.18.7.1")), table=100),
            route_message(AF4, 8, rtattr(RTA_DST, packed("127.0.0.0")), table=255, kind=2),
            route_message(
                AF6,
                0,
                rtattr(
                    RTA_MULTIPATH,
                    pad(nexthop(rtattr(RTA_GATEWAY, packed("fd00::fe"))))
                    + pad(nexthop(rtattr(RTA_GATEWAY, packed("fe80::1")), ifindex=3)),
                ),
            ),
            route_message(AF4, 0, rtattr(RTA_VIA, via("fd00::99")), table=1),
            DONE,
        ]
    )
    routes = parse_route_messages(data)
    assert routes[0] == Route(AF4, 0, RT_TABLE_MAIN, RTN_UNICAST, (IPv4Address("198.18.0.254"),))
    assert routes[1].gateways == ()
    assert routes[2].table == 100
    assert routes[4].gateways == (IPv6Address("fd00::fe"), IPv6Address("fe80::1"))
    assert routes[5].gateways == (IPv6Address("fd00::99"),)
    assert [r.is_default for r in routes] == [True, False, False, False, True, False]


def test_rta_table_overrides_rtm_table() -> None:
    # Table ids above 255 only appear in RTA_TABLE; rtm_table then holds RT_TABLE_COMPAT (252).
    data = route_message(AF4, 0, rtattr(RTA_TABLE, struct.pack("=I", 1000)), table=252)
    assert parse_route_messages(data)[0].table == 1000


def test_multipath_with_broken_nexthop_keeps_the_good_ones() -> None:
    good = pad(nexthop(rtattr(RTA_GATEWAY, packed("198.18.0.1"))))
    broken = RTNEXTHOP.pack(200, 0, 0, 2)  # claims more bytes than there are
    data = route_message(AF4, 0, rtattr(RTA_MULTIPATH, good + broken))
    assert parse_route_messages(data)[0].gateways == (IPv4Address("198.18.0.1"),)


LINK_DUMP = b"".join([
    link_message(1),
    link_message(2, rtattr(3, b"eth0\0"), master(5), linkinfo("veth")),
    link_message(3, master(6)),
    link_message(4, master(7)),  # its master is not in the dump
    link_message(5, linkinfo("bridge")),
    link_message(6, linkinfo("vrf")),
    link_message(8, master(9)),
    link_message(9, linkinfo("bond")),
])


def test_links_and_the_ports_a_tap_sees_twice() -> None:
    found = parse_link_messages(LINK_DUMP)
    assert found[:2] == [Link(1, 0, ""), Link(2, 5, "veth")]
    assert [(link.index, link.kind) for link in found[4:6]] == [(5, "bridge"), (6, "vrf")]
    # Bridge and bond ports, and one of an unknown master; not a VRF's (an L3 master).
    assert relaying_ports(found) == {2, 4, 8}


@FUZZ
@given(st.binary(max_size=600))
def test_parsers_never_raise_on_random_bytes(data: bytes) -> None:
    parse_messages(data)
    for link in parse_link_messages(data):
        assert -(2**31) <= link.index < 2**31 and 0 <= link.master < 2**32
    for address in parse_addr_messages(data):
        assert address.family in (AF4, AF6)
    for route in parse_route_messages(data):
        assert route.family in (AF4, AF6)


ROUTE_DUMP = b"".join(
    [
        route_message(
            AF4,
            0,
            rtattr(RTA_GATEWAY, packed("198.18.0.254")),
            rtattr(RTA_MULTIPATH, pad(nexthop(rtattr(RTA_VIA, via("fd00::1"))))),
        ),
        route_message(AF6, 0, rtattr(RTA_GATEWAY, packed("fd00::fe"))),
    ]
)


@FUZZ
@given(
    st.sampled_from([ADDR_DUMP, ROUTE_DUMP, LINK_DUMP]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 10_000),
)
def test_parsers_never_raise_on_mutated_dumps(
    base: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(base)
    for position, value in flips:
        data[position % len(data)] = value
    mutated = bytes(data[: max(0, len(data) - cut % 64)])
    for address in parse_addr_messages(mutated):
        assert address.local is None or address.local.version in (4, 6)
    for route in parse_route_messages(mutated):
        assert all(gw.version in (4, 6) for gw in route.gateways)
    links = parse_link_messages(mutated)
    assert relaying_ports(links) <= {link.index for link in links if link.master}


# --- resolv.conf ---


def test_parse_resolv_conf() -> None:
    text = (
        "# generated\n"
        "nameserver 198.18.0.53\n"
        "nameserver   fd00::53   # trailing\n"
        "nameserver fe80::1%eth0\n"
        "nameserver dns.example\n"
        "nameserver\n"
        "nameserver 999.0.0.1\n"
        "nameservers 198.18.0.99\n"
        ";nameserver 198.18.0.98\n"
        "search example\n"
        "\tnameserver 198.18.0.54\r\n"
    )
    assert parse_resolv_conf(text) == {
        ip_address("198.18.0.53"),
        ip_address("fd00::53"),
        ip_address("fe80::1"),
        ip_address("198.18.0.54"),
    }


@FUZZ
@given(st.ip_addresses(v=4), st.sampled_from(["::ffff:{}", "::{}", "{}"]))
def test_resolvers_come_out_canonical(resolver: IPv4Address, form: str) -> None:
    # Sources are compared in canonical form everywhere (guard, fleet gate, kernel protect
    # sets): a resolver written IPv4-mapped must come out as the IPv4 host it is.
    [found] = parse_resolv_conf(f"nameserver {form.format(resolver)}\n")
    assert found == canonical(ip_address(form.format(resolver)))
    assert canonical(found) == found


@FUZZ
@given(st.text(max_size=400))
def test_parse_resolv_conf_never_raises(text: str) -> None:
    for address in parse_resolv_conf(text):
        assert address.version in (4, 6)


def test_dns_resolvers_reads_file_and_tolerates_absence(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 198.18.0.53\n")
    assert hostinfo.dns_resolvers(str(path)) == {ip_address("198.18.0.53")}
    assert hostinfo.dns_resolvers(str(tmp_path / "absent")) == frozenset()


# --- the real kernel ---


def test_local_addresses_on_this_host_include_loopback() -> None:
    found = hostinfo.local_addresses()
    assert ip_address("127.0.0.1") in found and ip_address("::1") in found
    assert IPv4Address("255.255.255.255") in hostinfo.broadcast_addresses()
    hostinfo.default_gateways()  # must simply work unprivileged


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, int]]:
    """Two fresh namespaces joined by a veth pair; removed even when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    tag = secrets.token_hex(3)
    inner, outer = f"ps-hi-{tag}-a", f"ps-hi-{tag}-b"
    subnet = secrets.randbelow(250) + 1
    created: list[str] = []
    try:
        for name in (inner, outer):
            _ip("netns", "add", name)
            created.append(name)
        _ip("-n", inner, "link", "add", "veth0", "type", "veth", "peer", "veth1", "netns", outer)
        yield inner, outer, subnet
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


SNIPPET = """
import json
from portsentry.host import info as hostinfo
print(json.dumps({
    "local": sorted(map(str, hostinfo.local_addresses())),
    "broadcast": sorted(map(str, hostinfo.broadcast_addresses())),
    "gateways": sorted(map(str, hostinfo.default_gateways())),
    "relaying": sorted(hostinfo.relaying_interfaces()),
    "veths": [link.index for link in hostinfo.links() if link.kind == "veth"],
}))
"""


@pytest.mark.system
def test_real_dumps_inside_a_namespace(namespaces: tuple[str, str, int]) -> None:
    inner, outer, n = namespaces
    net4, net6 = f"198.18.{n}", f"fd00:{n:x}"
    for ns, dev, host in ((inner, "veth0", 1), (outer, "veth1", 2)):
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{net4}.{host}/24", "brd", "+", "dev", dev)
        _ip("-n", ns, "-6", "addr", "add", f"{net6}::{host}/64", "dev", dev, "nodad")
        _ip("-n", ns, "link", "set", dev, "up")
    _ip("-n", inner, "addr", "add", f"198.19.{n}.1/32", "peer", f"198.19.{n}.2", "dev", "veth0")
    _ip("-n", inner, "route", "add", "default", "via", f"{net4}.2")
    _ip(
        "-n",
        inner,
        "-6",
        "route",
        "add",
        "default",
        "nexthop",
        "via",
        f"{net6}::2",
        "dev",
        "veth0",
        "nexthop",
        "via",
        f"{net6}::3",
        "dev",
        "veth0",
    )
    _ip("-n", inner, "route", "add", "default", "via", f"{net4}.9", "table", "100")
    _ip("-n", inner, "link", "add", "port0", "type", "veth", "peer", "port1")
    _ip("-n", inner, "link", "add", "br-test", "type", "bridge")
    _ip("-n", inner, "link", "set", "port0", "master", "br-test")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        ["ip", "netns", "exec", inner, sys.executable, "-c", SNIPPET],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    facts = json.loads(result.stdout)
    local = {ip_address(a) for a in facts["local"]}
    expected = {
        ip_address(a) for a in ("127.0.0.1", "::1", f"{net4}.1", f"{net6}::1", f"198.19.{n}.1")
    }
    assert expected <= local
    extra = local - expected
    assert all(a.version == 6 and a.is_link_local for a in extra), extra  # veth0's fe80:: address
    assert ip_address(f"198.19.{n}.2") not in local  # the point-to-point peer is not ours
    assert ip_address(f"{net4}.2") not in local
    # 127.0.0.1/8 on lo has no IFA_BROADCAST; its all-ones address is computed like any subnet's.
    assert set(facts["broadcast"]) == {"255.255.255.255", f"{net4}.255", "127.255.255.255"}
    assert set(facts["gateways"]) == {f"{net4}.2", f"{net6}::2", f"{net6}::3"}
    # veth0, port0, port1; only port0 is enslaved (to br-test), so only it is seen twice.
    assert len(facts["veths"]) == 3 and len(facts["relaying"]) == 1
    assert set(facts["relaying"]) < set(facts["veths"])


def test_subnet_broadcasts_are_computed_when_no_brd_was_set():
    from ipaddress import IPv4Address, IPv6Address

    from portsentry.host.info import InterfaceAddress, subnet_broadcasts

    found = subnet_broadcasts([
        InterfaceAddress(socket.AF_INET, 24, 2, IPv4Address("198.18.0.1"), None),
        InterfaceAddress(socket.AF_INET, 16, 3, IPv4Address("198.19.4.1"), IPv4Address("198.19.255.255")),
        InterfaceAddress(socket.AF_INET, 31, 4, IPv4Address("198.18.9.0"), None),  # RFC 3021: none
        InterfaceAddress(socket.AF_INET6, 64, 2, IPv6Address("fd00::1"), None),
    ])
    assert found == {IPv4Address("255.255.255.255"), IPv4Address("198.18.0.255"),
                     IPv4Address("198.19.255.255")}
