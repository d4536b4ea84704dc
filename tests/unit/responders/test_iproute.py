"""Golden tests for the route backend: the exact `ip route` argv and batch text it emits, and how it
reads `ip -j route show`; no root needed."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from portsentry.responders.backend import BackendError, RunResult
from portsentry.responders.iproute import RouteBackend, packed_routes, parse_routes
from tests.unit.responders.test_backend import Recorder

V4 = ip_address("198.18.0.9")
V6 = ip_address("fd00::9")


def test_add_remove_golden() -> None:
    rec = Recorder()
    backend = RouteBackend(runner=rec)
    backend.setup()
    backend.add(V4, 3600)
    backend.add(V6, None)
    backend.remove(V4)
    backend.remove(V6)
    assert rec.calls == [
        (["ip", "-4", "route", "add", "blackhole", "198.18.0.9", "proto", "213"], None),
        (["ip", "-6", "route", "add", "blackhole", "fd00::9", "proto", "213"], None),
        (["ip", "-4", "route", "del", "blackhole", "198.18.0.9", "proto", "213"], None),
        (["ip", "-6", "route", "del", "blackhole", "fd00::9", "proto", "213"], None),
    ]


def test_kind_and_proto_options() -> None:
    rec = Recorder()
    RouteBackend("unreachable", rec, proto=99).add(V4, None)
    assert rec.argvs == [["ip", "-4", "route", "add", "unreachable", "198.18.0.9", "proto", "99"]]


def test_remove_of_absent_route_is_fine_other_errors_are_not() -> None:
    absent = RunResult(2, "", "RTNETLINK answers: No such process\n")
    RouteBackend(runner=Recorder({("ip",): absent})).remove(V4)
    denied = RunResult(2, "", "RTNETLINK answers: Operation not permitted\n")
    with pytest.raises(BackendError, match="Operation not permitted"):
        RouteBackend(runner=Recorder({("ip",): denied})).remove(V4)


def test_add_many_is_one_batch() -> None:
    rec = Recorder()
    RouteBackend(runner=rec).add_many([(V4, 60), (V6, None)])
    assert rec.calls == [(["ip", "-force", "-batch", "-"],
                          "route add blackhole 198.18.0.9 proto 213\n"
                          "route add blackhole fd00::9 proto 213\n")]


def test_teardown_flushes_only_our_routes() -> None:
    # The listings are new (what was there is said, and a family without routes of ours is not
    # flushed); the flushes are as before.
    v4 = json.dumps([{"type": "blackhole", "dst": "198.18.0.9", "protocol": "213"},
                     {"type": "blackhole", "dst": "198.18.7.0/24", "protocol": "213"}])
    v6 = json.dumps([{"type": "blackhole", "dst": "fd00::9", "dev": "lo", "protocol": "213"}])
    rec = Recorder({("ip", "-j", "-4"): RunResult(0, v4, ""), ("ip", "-j", "-6"): RunResult(0, v6, "")})
    assert RouteBackend(runner=rec).teardown() == "3 blackhole routes (proto 213)"
    assert rec.argvs == [["ip", "-j", "-4", "route", "show", "proto", "213", "type", "blackhole"],
                         ["ip", "-4", "route", "flush", "proto", "213", "type", "blackhole"],
                         ["ip", "-j", "-6", "route", "show", "proto", "213", "type", "blackhole"],
                         ["ip", "-6", "route", "flush", "proto", "213", "type", "blackhole"]]


def test_teardown_without_our_routes_flushes_nothing_and_says_so() -> None:
    # `portsentry flush` said "removed route: blackhole host routes" when there were none (and
    # where the main table does not exist yet, `ip route flush` fails: "FIB table does not exist").
    v4 = json.dumps([])
    v6 = json.dumps([{"type": "blackhole", "dst": "fd00::9", "dev": "lo", "protocol": "213"}])
    rec = Recorder({("ip", "-j", "-4"): RunResult(0, v4, ""), ("ip", "-j", "-6"): RunResult(0, v6, "")})
    assert RouteBackend(runner=rec).teardown() == "1 blackhole route (proto 213)"
    assert rec.argvs == [["ip", "-j", "-4", "route", "show", "proto", "213", "type", "blackhole"],
                         ["ip", "-j", "-6", "route", "show", "proto", "213", "type", "blackhole"],
                         ["ip", "-6", "route", "flush", "proto", "213", "type", "blackhole"]]
    rec = Recorder()
    assert RouteBackend(runner=rec).teardown() is None
    assert [argv[3] for argv in rec.argvs] == ["route", "route"]


def test_members_lists_host_routes_without_expiry() -> None:
    v4 = json.dumps([{"type": "blackhole", "dst": "198.18.0.9", "protocol": "213", "flags": []},
                     {"type": "blackhole", "dst": "198.18.7.0/24", "protocol": "213"}])
    v6 = json.dumps([{"type": "blackhole", "dst": "fd00::9", "dev": "lo", "protocol": "213"}])
    rec = Recorder({("ip", "-j", "-4"): RunResult(0, v4, ""), ("ip", "-j", "-6"): RunResult(0, v6, "")})
    assert RouteBackend(runner=rec).members() == {V4: None, V6: None}
    assert rec.argvs == [["ip", "-j", "-4", "route", "show", "proto", "213", "type", "blackhole"],
                         ["ip", "-j", "-6", "route", "show", "proto", "213", "type", "blackhole"]]


def test_parse_routes_rejects_garbage() -> None:
    assert parse_routes("") == {}
    with pytest.raises(BackendError):
        parse_routes("Error: ...")
    with pytest.raises(BackendError):
        parse_routes('{"dst": "198.18.0.1"}')


def test_only_address_objects_reach_any_command() -> None:
    rec = Recorder()
    backend = RouteBackend(runner=rec)
    for bad in ("198.18.0.9", "default", 7):
        with pytest.raises(TypeError):
            backend.add(bad, None)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            backend.remove(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            backend.add_many([(bad, None)])  # type: ignore[list-item]
    assert rec.calls == []


@pytest.mark.parametrize(("args", "kw"), [(("drop",), {}), ((), {"proto": 2}), ((), {"proto": 256})])
def test_constructor_refuses_bad_options(args: tuple[str, ...], kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RouteBackend(*args, **kw)  # type: ignore[arg-type]


def test_describe_says_it_is_asymmetric() -> None:
    assert "scanner's packets still arrive" in RouteBackend().describe()


def test_restore_lost_adds_back_only_the_stored_routes_that_are_gone() -> None:
    listed = json.dumps([{"type": "blackhole", "dst": "198.18.0.9", "protocol": "213"}])
    rec = Recorder({("ip", "-j", "-4"): RunResult(0, listed, ""), ("ip", "-j", "-6"): RunResult(0, "[]", "")})
    asked: list[bool] = []

    def active() -> list[bytes]:
        asked.append(True)
        return [V4.packed, V6.packed]

    assert RouteBackend(runner=rec).restore_lost(active) == 1
    assert rec.calls[-1] == (["ip", "-force", "-batch", "-"], "route add blackhole fd00::9 proto 213\n")
    # Anyone's ban routes are read (1.2's unreachable routes block their hosts too).
    assert [argv[2:] for argv in rec.argvs[:-1]] == [
        [family, "route", "show", "type", kind] for family in ("-4", "-6")
        for kind in ("blackhole", "prohibit", "unreachable")]
    assert asked == [True]
    rec = Recorder({("ip", "-j"): RunResult(0, listed, "")})
    assert RouteBackend(runner=rec).restore_lost(lambda: [V4.packed]) == 0
    assert all(argv[:2] == ["ip", "-j"] for argv in rec.argvs)  # nothing to add, nothing run


def test_replace_all_deletes_the_routes_the_store_does_not_know() -> None:
    listed = json.dumps([{"type": "blackhole", "dst": "198.18.0.9", "protocol": "213"},
                         {"type": "blackhole", "dst": "198.18.0.99", "protocol": "213"}])
    rec = Recorder({("ip", "-j", "-4"): RunResult(0, listed, ""), ("ip", "-j", "-6"): RunResult(0, "[]", "")})
    RouteBackend(runner=rec).replace_all([(V4.packed, 60.0), (V6.packed, None)])
    assert rec.calls[2:] == [
        (["ip", "-batch", "-"], "route del blackhole 198.18.0.99 proto 213\n"),
        (["ip", "-force", "-batch", "-"], "route add blackhole fd00::9 proto 213\n")]  # 198.18.0.9 is ours


def test_packed_routes_keeps_host_routes_only() -> None:
    import socket

    from portsentry.responders.iproute import packed_routes

    text = json.dumps([{"dst": "198.18.0.9"}, {"dst": "198.18.0.10/32"}, {"dst": "198.18.7.0/24"},
                       {"dst": "not an address"}, {"dst": 7}, "junk", {}])
    assert packed_routes(text, socket.AF_INET) == {V4.packed, ip_address("198.18.0.10").packed}
    assert packed_routes("", socket.AF_INET6) == set()
    with pytest.raises(BackendError):
        packed_routes("{", socket.AF_INET)


def test_holds_any_is_whether_a_route_of_ours_is_there() -> None:
    # Always "maybe" before: a first start (or a reboot) replaced nothing, yet said the sets were
    # replaced because "the last stop was not clean, or the store changed since".
    empty = Recorder({("ip", "-j"): RunResult(0, "[]", "")})
    assert not RouteBackend(runner=empty).holds_any()
    listed = json.dumps([{"type": "blackhole", "dst": "198.18.0.9", "protocol": "213"}])
    held = Recorder({("ip", "-j", "-4"): RunResult(0, listed, ""),
                     ("ip", "-j", "-6"): RunResult(0, "[]", "")})
    assert RouteBackend(runner=held).holds_any()


FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "100")), deadline=None)
ROUTE_SHAPES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.sampled_from(["198.18.0.1", "198.18.0.0/24", "198.18.0.1/32", "fd00::1", "fd00::1/128", "default",
                       "fe80::1%eth0", "::ffff:198.18.0.1", "1.2.3.4/33", "/32", "198.18.0.1/"])
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["dst", "type", "protocol", "dev", "gateway"]), inner, max_size=4),
    max_leaves=20)


@given(st.lists(ROUTE_SHAPES, max_size=6))
@example([{"dst": "\x00"}])  # inet_pton raises ValueError for a NUL, not OSError
@FUZZ
def test_the_route_parsers_take_any_json_shape(routes: list[object]) -> None:
    """What `ip -j route show` printed is parsed into host addresses only, whatever its shape;
    both parsers agree on which those are."""
    text = json.dumps(routes)
    found = parse_routes(text)
    assert all(isinstance(a, IPv4Address | IPv6Address) for a in found)
    packed = packed_routes(text, socket.AF_INET) | packed_routes(text, socket.AF_INET6)
    # A scope (fe80::1%eth0), which ip never writes in "dst", is an address to ip_network only.
    assert {a.packed for a in found if getattr(a, "scope_id", None) is None} <= packed


@given(st.text(max_size=300))
@FUZZ
def test_the_route_parsers_never_raise_anything_but_backend_error(text: str) -> None:
    for parse in (parse_routes, lambda t: packed_routes(t, socket.AF_INET6)):
        with contextlib.suppress(BackendError):
            parse(text)
