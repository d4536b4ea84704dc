"""Property tests of every reading of bytes a fleet member (or anyone with write access to the
fleet's keys) writes: the stream entries, active bans and marks as the Lua scripts hand them back
from a real redis-server, an active ban's unpacking, a mark against the ones sent, and stream
ids however a writer picks them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from ipaddress import ip_address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portsentry.core.addresses import canonical, impossible_source
from portsentry.fleet.bounded import MAX_FIELD, MAX_MARK
from portsentry.fleet.cursor import just_before, lost_past, stream_order, trimmed_past
from portsentry.fleet.decision import FIELD_DATA, FIELD_SIGNATURE, BadDecision, Decision, encode, pack, unpack
from portsentry.fleet.link import Link, compare_marks
from portsentry.fleet.settings import FleetSettings

KEY = b"p" * 32
ON_REDIS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
_VALUE = st.binary(max_size=40) | st.sampled_from([b"", b"x" * MAX_FIELD, b"y" * (MAX_FIELD + 1)])
_NAME = st.sampled_from([FIELD_DATA, FIELD_SIGNATURE, b"D", b"x", "\xe9".encode("latin-1")])


@pytest.fixture
def link(redis_url: str) -> Iterator[Link]:
    each = Link(FleetSettings(redis_url, "props", "h1", KEY))
    yield each
    each.close()


@ON_REDIS
@given(st.lists(st.lists(st.tuples(_NAME, _VALUE), min_size=1, max_size=6), min_size=1, max_size=5))
def test_stream_entries_come_back_as_their_two_fields_within_bounds(link, entries):
    link.client.delete(link.stream)
    ids = [link.client.execute_command("XADD", link.stream, "*", *[part for pair in pairs for part in pair])
           for pairs in entries]
    oldest, newest, read = link.follow(b"0-0", 0, 100)
    assert (oldest, newest) == (bytes(ids[0]), bytes(ids[-1]))
    assert [entry_id for entry_id, _fields in read] == [bytes(entry_id) for entry_id in ids]
    for pairs, (_id, fields) in zip(entries, read, strict=True):
        expected: dict[bytes, bytes] = {}
        for name, value in pairs:  # the last of a name within bounds holds
            if name in (FIELD_DATA, FIELD_SIGNATURE) and len(value) <= MAX_FIELD:
                expected[name] = value
        assert fields == {name: value for name, value in expected.items() if value}


@ON_REDIS
@given(st.dictionaries(st.binary(min_size=1, max_size=20), _VALUE, min_size=1, max_size=30))
def test_active_bans_come_back_whole_or_empty(link, values):
    link.client.delete(link.bans_key)
    link.client.hset(link.bans_key, mapping=values)
    read = sorted(value for batch in link.active() for value in batch)
    assert read == sorted(value if len(value) <= MAX_FIELD else b"" for value in values.values())


@ON_REDIS
@given(_VALUE | st.binary(min_size=MAX_MARK - 2, max_size=MAX_MARK + 2))
def test_a_mark_comes_back_cut_to_its_bound(link, value):
    link.client.hset(link.hosts_key, "h1", value)
    assert link.held_mark() == value[:MAX_MARK]
    assert link.publish([Decision("h1", 1, 1, "lift", ip_address("198.18.9.1"),
                                  None, 1.0)]).before == value[:MAX_MARK]


@given(st.binary(max_size=700) | st.builds(lambda head, tail: head + b"\n" + tail,
                                           st.binary(max_size=600), st.binary(max_size=80)))
def test_an_active_ban_unpacks_or_raises_bad_decision(value):
    with contextlib.suppress(BadDecision):
        unpack(value, KEY, "props")


@given(st.binary(max_size=80))
def test_a_signed_value_with_anything_after_it_is_refused_or_the_same(tail):
    decision = Decision("h2", 1, 2, "ban", ip_address("198.18.9.2"), None, 1.0)
    packed = pack(decision, KEY, "props")
    try:
        assert unpack(packed + tail, KEY, "props") == decision
    except BadDecision:
        assert tail


_MARK = st.binary(max_size=MAX_MARK) | st.builds(lambda e, s: f"{e}:{s}".encode(), st.integers(0, 2**64 - 1),
                                                 st.integers(0, 2**64 - 1))
_ORDER = st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))


@given(st.none() | _MARK, _MARK, _ORDER)
def test_any_mark_redis_holds_is_a_loss_a_cut_or_another_host(held, sent, tried):
    assert compare_marks(held, sent, tried) in ("lost", "cut", "other")


_ID = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)).map(lambda p: f"{p[0]}-{p[1]}".encode())


@given(_ID.filter(lambda entry: entry != b"0-0"), _ID, _ID)
def test_stream_ids_however_a_writer_picks_them(first, cursor, newest):
    before = just_before(first)
    assert stream_order(before) < stream_order(first) and not trimmed_past(first, before)
    assert trimmed_past(first, cursor) == (stream_order(first) > _after(stream_order(cursor)))
    assert isinstance(lost_past(first, cursor, newest), bool)


def _after(order: tuple[int, int]) -> tuple[int, int]:
    return (order[0], order[1] + 1) if order[1] < 2**64 - 1 else (order[0] + 1, 0)


_ADDRESS = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).map(canonical)).filter(
    lambda address: address == canonical(address))
_TIME = st.integers(0, 10**12 - 1).map(lambda n: n / 1000) | st.sampled_from([0.0, 1.0, 16e9, 16e9 - 1])
_DECISIONS = st.lists(st.builds(
    lambda host, kind, address, expires, at, seq: Decision(host, 1, seq, kind, address,
                                                           None if kind == "lift" else expires, at, "x"),
    st.sampled_from(["h2", "h3"]), st.sampled_from(["ban", "lift"]), _ADDRESS, st.none() | _TIME, _TIME,
    st.integers(0, 10**6)), min_size=1, max_size=8)
GUARDED = ip_address("198.18.0.1")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_DECISIONS)
def test_whatever_signed_decisions_say_applying_them_neither_raises_nor_bans_a_guarded_address(tmp_path,
                                                                                            decisions):
    """Through the gate and the ban lifecycle, as fleet-read applies them (a real store, a
    recording kernel): an exception here would stop the reader on that entry for good."""
    from portsentry.fleet.apply import Applier
    from portsentry.fleet.gate import Gate, Guards
    from portsentry.fleet.tally import Tally
    from portsentry.journal.telemetry import Telemetry
    from tests.unit.bans.test_lifecycle import manager

    bans, kernel, _lines, _commands = manager(tmp_path)
    fleet = FleetSettings("unix:///nowhere", "props", "h1", KEY)
    gate = Gate("h1")
    gate.set_guards(Guards(own=frozenset({GUARDED})))
    now = 1_800_000_000.0
    tally = Tally(lambda _line: None, Telemetry(), lambda: now, "x")
    applier = Applier(fleet, bans, gate, tally, lambda: now)
    entries = [(f"{n + 1}-0".encode(), encode(each, KEY, "props")) for n, each in enumerate(decisions)]
    applier.apply_entries(entries)
    applier.apply_active([[pack(decision, KEY, "props") for decision in decisions]])
    assert GUARDED not in kernel.held
    for address in kernel.held:
        assert impossible_source(address) is None and not address.is_link_local
    bans.store.close()
