"""The fleet's state file: read back as written, and a damaged or foreign one never stops a host."""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from portsentry.fleet.cursor import just_before, lost_past, trimmed_past
from portsentry.fleet.link import parse_mark
from portsentry.fleet.state import FleetState, StateFile, load_state


def test_written_state_reads_back(tmp_path):
    path = str(tmp_path / "fleet.json")
    state = FleetState(1700000000000, 42, b"1700000000000-3", {"h1": (1, 9), "h2": (2, 1)})
    assert StateFile(path, "dmz").write(state) is None
    assert load_state(path, "dmz") == (state, None)
    # Another fleet's cursors mean nothing here; no file is a first start.
    assert load_state(path, "other") == (FleetState(), None)
    assert load_state(str(tmp_path / "none.json"), "dmz") == (FleetState(), None)


def test_damaged_state_is_set_aside_field_by_field(tmp_path):
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"fleet": "dmz", "epoch": -1, "published": "7", "stream": "1-2; DROP",
                                "seen": {"h1": [1, 2], "h2": "x", "h3": [1, True], "h4": [1]}}))
    state, problem = load_state(str(path), "dmz")
    assert problem is None and state == FleetState(None, None, None, {"h1": (1, 2)})
    path.write_text("{not json")
    state, problem = load_state(str(path), "dmz")
    assert state == FleetState() and problem is not None and "starting afresh" in problem


def test_a_reader_knows_when_the_stream_was_trimmed_past_it():
    """Stream ids are (milliseconds, sequence); an oldest entry beyond the one right after the
    cursor means entries may be gone (trimmed, or a Redis that restarted empty): load the set."""
    assert not trimmed_past(b"10-0", b"99-5")  # older entries still kept
    assert not trimmed_past(b"99-5", b"99-5") and not trimmed_past(b"99-6", b"99-5")
    assert trimmed_past(b"99-7", b"99-5")
    assert trimmed_past(b"100-0", b"99-5")  # 99-6... may have existed: taken as missed, harmlessly


def test_where_a_reader_that_missed_entries_goes_on_from():
    top = 2**64 - 1
    # Reading after just_before(first) returns first, and the cursor it gives is never "missed".
    for first in (b"99-7", b"100-0", b"0-1"):
        cursor = just_before(first)
        assert not trimmed_past(first, cursor), (first, cursor)
    assert just_before(b"99-7") == b"99-6" and just_before(b"100-0") == f"99-{top}".encode()
    assert just_before(b"0-1") == b"0-0"
    assert not trimmed_past(b"100-0", f"99-{top}".encode()) and trimmed_past(b"100-1", f"99-{top}".encode())
    # No cursor: load. A stream emptied or gone under a cursor that had read entries: load.
    assert lost_past(None, None) and lost_past(b"5-0", None)
    assert lost_past(None, b"99-5") and lost_past(b"100-0", b"99-5") and not lost_past(b"99-6", b"99-5")
    # The cursor of a reader that loaded an empty fleet misses nothing, whatever comes first.
    assert not lost_past(None, b"0-0") and not lost_past(b"100-0", b"0-0")
    # A stream that ends before the cursor was made again (Redis back empty, its clock behind);
    # one that ends at or after it was only read up to there.
    assert lost_past(b"50-0", b"99-5", b"60-0") and lost_past(b"50-0", b"99-5", b"99-4")
    assert not lost_past(b"50-0", b"99-5", b"99-5") and not lost_past(b"50-0", b"99-5", b"120-0")


def test_marks_read_back_or_are_no_mark():
    assert parse_mark(b"1700000000000:42") == (1700000000000, 42)
    for value in (None, b"", b"42", b"x:1", b"1:-2", b"1:2:3", "١:٢".encode()):
        assert parse_mark(value) is None, value


def test_a_mark_too_long_for_64_bits_is_no_mark():
    assert parse_mark(f"{2**64 - 1}:{2**64 - 1}".encode()) == (2**64 - 1, 2**64 - 1)
    # Before: int() of 5,000 digits raised, and the publisher failed on every round after.
    for foreign in (b"1" * 5000 + b":1", b"1:" + b"9" * 21):
        assert parse_mark(foreign) is None, foreign


@given(st.binary(max_size=60))
def test_parse_mark_never_raises(value):
    found = parse_mark(value)
    assert found is None or all(0 <= part < 10**20 for part in found)


@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["fleet", "epoch", "published", "stream", "seen", "h1"]), inner, max_size=4),
    max_leaves=15).map(lambda shape: json.dumps(shape).replace('"fleet": "x"', '"fleet": "dmz"').encode()))
@example(b"[" * 100_000)
@example(b'{"fleet": "dmz", "epoch": 1' + b"0" * 5000 + b"}")
def test_any_state_file_is_read_or_set_aside(tmp_path_factory, data):
    """A state file that cannot be read or makes no sense is set aside (module docstring);
    100,000 '[' raised RecursionError out of the fleet's start."""
    path = tmp_path_factory.mktemp("state") / "fleet.json"
    path.write_bytes(data)
    state, problem = load_state(str(path), "dmz")
    assert isinstance(state, FleetState) and (problem is None or "starting afresh" in problem)
    assert state.stream is None or isinstance(state.stream, bytes)
    assert all(isinstance(h, str) and len(order) == 2 for h, order in state.seen.items())
