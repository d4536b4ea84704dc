"""One real run of each ban backend that works here, inside throwaway namespaces: a banned scanner
cannot complete a TCP connect to the target, an unbanned or expired one can, IPv6 too, and
teardown leaves nothing behind. Every command runs via `ip netns exec <target>`; the nftables
netlink socket is opened inside the target namespace and checked to be there before use."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import ip_address

import pytest

from portsentry.responders.backend import BackendError, BanBackend, RunResult, run_argv
from portsentry.responders.iproute import RouteBackend
from portsentry.responders.ipset import IpsetBackend
from portsentry.responders.nft_elements import open_netlink
from portsentry.responders.nftables import NftablesBackend
from tests.system.rig import Listener, Namespaces, eventually, namespaces_up, ns_argv, run_in, tcp_connect

pytestmark = pytest.mark.system

PORT = 8080
CLONE_NEWNET = 0x40000000


def ns_runner(ns: str) -> Callable[[Sequence[str], str | None], RunResult]:
    def run(argv: Sequence[str], stdin: str | None = None) -> RunResult:
        return run_argv(ns_argv(ns, argv), stdin)
    return run


def netns_socket_factory(ns: str) -> Callable[[], socket.socket]:
    """Opens the netlink socket from a short-lived thread that has joined namespace `ns`; the
    socket stays bound to that namespace, the test process's own threads never leave theirs."""

    def factory() -> socket.socket:
        outcome: list[socket.socket | BaseException] = []

        def work() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
                    # Refuse to hand out a socket unless this thread really is in `ns`.
                    if os.stat("/proc/thread-self/ns/net").st_ino != os.fstat(fd).st_ino:
                        raise RuntimeError(f"thread is not in namespace {ns} after setns")
                    outcome.append(open_netlink())
                finally:
                    os.close(fd)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=work, name=f"setns-{ns}")
        thread.start()
        thread.join()
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    return factory


BACKENDS = ["nftables-netlink", "nftables-cli", "ipset", "route"]


def make_backend(kind: str, ns: str) -> BanBackend:
    runner = ns_runner(ns)
    if kind == "nftables-netlink":
        return NftablesBackend(runner=runner, socket_factory=netns_socket_factory(ns))
    if kind == "nftables-cli":
        return NftablesBackend(runner=runner, mechanism="cli")
    if kind == "ipset":
        return IpsetBackend(runner=runner)
    return RouteBackend(runner=runner)


@pytest.fixture
def net() -> Iterator[Namespaces]:
    with namespaces_up() as namespaces:
        yield namespaces


def can_connect(net: Namespaces, target: str, timeout: float = 1.0) -> bool:
    return tcp_connect(net.scanner, target, PORT, timeout=timeout).connected


def leftovers(net: Namespaces) -> dict[str, str]:
    """What any backend might have left in the target namespace."""
    out = {
        "nft": run_in(net.target, ["nft", "list", "tables"]).stdout,
        "ipset": run_in(net.target, ["ipset", "list", "-n"]).stdout,
        "iptables": run_in(net.target, ["iptables", "-S"]).stdout
        + run_in(net.target, ["ip6tables", "-S"]).stdout,
        "routes": run_in(net.target, ["ip", "-4", "route", "show", "type", "blackhole"]).stdout
        + run_in(net.target, ["ip", "-6", "route", "show", "type", "blackhole"]).stdout,
    }
    return out


@pytest.mark.parametrize("kind", BACKENDS)
def test_backend_blocks_unblocks_and_cleans_up(kind: str, net: Namespaces) -> None:
    backend = make_backend(kind, net.target)
    if not backend.is_supported():
        pytest.skip(f"{backend.name} is not supported here")
    scanner4, scanner6 = ip_address(net.scanner_ip4), ip_address(net.scanner_ip6)
    # Someone else's nftables table, which nothing of ours may touch.
    run_in(net.target, ["nft", "add", "table", "inet", "someone_else"], check=True)
    before = leftovers(net)

    with Listener(net.target, "tcp", PORT):
        assert can_connect(net, net.target_ip4, 3) and can_connect(net, net.target_ip6, 3)

        backend.setup()
        backend.setup()
        backend.add(scanner4, None)
        backend.add(scanner6, 3600)
        members = backend.members()
        assert scanner4 in members and scanner6 in members
        assert not can_connect(net, net.target_ip4)
        assert not can_connect(net, net.target_ip6)
        # The second scanner is not banned and still gets in.
        assert tcp_connect(net.scanner2, net.target2_ip4, PORT, timeout=3).connected

        backend.remove(scanner4)
        backend.remove(scanner6)
        backend.remove(scanner6)  # absent is fine
        assert scanner4 not in backend.members()
        assert can_connect(net, net.target_ip4, 3) and can_connect(net, net.target_ip6, 3)

        if kind.startswith("nftables") or kind == "ipset":
            # The kernel lifts the ban by itself.
            backend.add_many([(scanner4, 2.0), (scanner6, 2.0)])
            started = time.monotonic()
            assert not can_connect(net, net.target_ip4, 0.5)
            assert not can_connect(net, net.target_ip6, 0.5)
            eventually(lambda: not backend.members(), timeout=6, what="bans to expire")
            assert time.monotonic() - started >= 1.0
            assert can_connect(net, net.target_ip4, 3) and can_connect(net, net.target_ip6, 3)
        else:
            backend.add_many([(scanner4, None), (scanner6, None)])
            assert not can_connect(net, net.target_ip4)
            assert not can_connect(net, net.target_ip6)

        backend.add(scanner4, None)
        backend.teardown()
        backend.teardown()
        assert can_connect(net, net.target_ip4, 3) and can_connect(net, net.target_ip6, 3)

    after = leftovers(net)
    assert "someone_else" in after["nft"]
    assert "portsentry" not in after["nft"] and "portsentry" not in after["ipset"]
    assert "match-set" not in after["iptables"]
    assert after["routes"] == ""
    if kind != "ipset":
        assert after == before


@pytest.mark.parametrize("kind", ["nftables-netlink", "nftables-cli", "ipset"])
def test_a_ban_longer_than_the_kernel_can_time_is_held_with_the_others(kind: str, net: Namespaces) -> None:
    # nf_tables refused a timeout of 2**64 ns or more with ERANGE, and with it the whole batch;
    # ipset cut anything over 24.8 days short. Such a ban is held without a kernel timeout (the
    # daemon lifts it at its end), and the bans sent with it are held too.
    backend = make_backend(kind, net.target)
    if not backend.is_supported():
        pytest.skip(f"{backend.name} is not supported here")
    scanner4, scanner6 = ip_address(net.scanner_ip4), ip_address(net.scanner_ip6)
    other4 = ip_address(net.scanner2_ip4)
    backend.setup()
    try:
        backend.add_many([(scanner4, 99999999 * 7 * 86400.0), (scanner6, 40 * 86400.0), (other4, 3600.0)])
        members = backend.members()
        assert members[scanner4] is None
        forty_days, hour = members[scanner6], members[other4]
        if kind == "ipset":  # more than it can time
            assert forty_days is None
        else:
            assert forty_days is not None and forty_days > 39 * 86400
        assert hour is not None and 3500 < hour <= 3600
        backend.remove(scanner4)
        backend.restore_many([(scanner4.packed, 1e11), (other4.packed, 60.0)])
        members = backend.members()
        assert members[scanner4] is None and members[other4] is not None
        backend.add(scanner6, 1e12)
        assert backend.members()[scanner6] is None
    finally:
        backend.teardown()


def test_the_route_backend_never_takes_over_a_route_somebody_else_made(net: Namespaces) -> None:
    """`ip route replace` took over any route with the ban's key: 1.2's reject route for a host it
    blocked, or an admin's route to a host, which the ban's lift then deleted. Another's ban route
    is left as it is (the host stays blocked by it, and our lift leaves it); another's route of any
    other kind is a ban that cannot be made, said as such, never replaced."""
    target = net.target
    theirs_ban, theirs_route, free = "198.18.0.77", "198.18.0.78", ip_address("198.18.0.79")
    run_in(target, ["ip", "route", "add", "unreachable", theirs_ban], check=True)
    run_in(target, ["ip", "route", "add", theirs_route, "via", net.scanner_ip4], check=True)

    def route_of(address: str) -> list[dict[str, object]]:
        out = run_in(target, ["ip", "-j", "route", "show", "exact", address], check=True).stdout
        routes: list[dict[str, object]] = json.loads(out or "[]")
        return routes

    before = {address: route_of(address) for address in (theirs_ban, theirs_route)}
    backend = RouteBackend(runner=ns_runner(target))
    backend.add(ip_address(theirs_ban), None)  # blocked already, by their route
    with pytest.raises(BackendError, match="not ours"):
        backend.add(ip_address(theirs_route), None)
    backend.add(free, None)
    backend.add(free, None)  # ours already: fine
    assert free in backend.members() and ip_address(theirs_ban) not in backend.members()
    with pytest.raises(BackendError, match=r"1 of 3 routes not made: 198\.18\.0\.78 has a route that is not"):
        backend.add_many([(ip_address(theirs_ban), None), (ip_address(theirs_route), None), (free, None)])
    # The minute's repair puts back none of them: theirs block, or refused the ban.
    stored = [ip_address(a).packed for a in (theirs_ban, theirs_route)] + [free.packed]
    assert backend.restore_lost(lambda: stored) == 0
    assert {address: route_of(address) for address in before} == before
    backend.remove(ip_address(theirs_ban))
    backend.remove(ip_address(theirs_route))
    backend.remove(free)
    assert {address: route_of(address) for address in before} == before
    assert route_of(str(free)) == []
