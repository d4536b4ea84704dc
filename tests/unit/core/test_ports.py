"""Tests for portsentry.ports: port list parsing and formatting."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.core.ports import PortListError, format_ports, parse_ports

# Modest by default so the unit suite stays fast; raise for long fuzz runs.
FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "100")), deadline=None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,7, 9,512-515", (1, 7, 9, 512, 513, 514, 515)),
        ("9,1,1,2-3,3", (1, 2, 3, 9)),
        ("512 - 515", (512, 513, 514, 515)),
        ("\t80\t,\t443 ", (80, 443)),
        ("5-5", (5,)),
        ("1,2,", (1, 2)),
        ("1, 2 , ", (1, 2)),
        ("080", (80,)),
        ("65535", (65535,)),
        ("65534-65535", (65534, 65535)),
        ("", ()),
        (" \t ", ()),
    ],
)
def test_parse_ports_accepts(text: str, expected: tuple[int, ...]) -> None:
    assert parse_ports(text) == expected


def test_parse_ports_has_no_64_entry_cap() -> None:
    # 1.2 silently dropped everything after the 64th entry.
    text = ",".join(str(port) for port in range(1000, 1200))
    assert parse_ports(text) == tuple(range(1000, 1200))
    assert len(parse_ports("1-65535")) == 65535


@pytest.mark.parametrize(
    ("text", "token", "reason"),
    [
        ("0", "0", "is not a port (1-65535)"),
        ("1,70000", "70000", "is not a port (1-65535)"),
        ("65536", "65536", "is not a port (1-65535)"),
        ("0-10", "0-10", "is not a port (1-65535)"),
        ("10-65536", "10-65536", "is not a port (1-65535)"),
        ("9" * 40, "9" * 40, "is not a port (1-65535)"),
        ("20-10", "20-10", "is not a valid range (the first port is above the last)"),
        ("1, abc", "abc", "is not a port number or a range like 512-515"),
        ("1x", "1x", "is not a port number or a range like 512-515"),
        ("-1", "-1", "is not a port number or a range like 512-515"),
        ("1-", "1-", "is not a port number or a range like 512-515"),
        ("1-2-3", "1-2-3", "is not a port number or a range like 512-515"),
        ("1 2", "1 2", "is not a port number or a range like 512-515"),
        ("\u00b2", "\u00b2", "is not a port number or a range like 512-515"),
        ("1;2", "1;2", "is not a port number or a range like 512-515"),
        ("1,,2", "", "is an empty entry (two commas in a row, or a leading comma)"),
        (",1", "", "is an empty entry (two commas in a row, or a leading comma)"),
        (",", "", "is an empty entry (two commas in a row, or a leading comma)"),
        ("1,2,,", "", "is an empty entry (two commas in a row, or a leading comma)"),
    ],
)
def test_parse_ports_rejects(text: str, token: str, reason: str) -> None:
    with pytest.raises(PortListError) as caught:
        parse_ports(text)
    assert caught.value.token == token
    assert caught.value.reason == reason
    assert str(caught.value) == f"{token!r} {reason}"


def test_port_list_error_is_a_value_error_with_a_readable_text() -> None:
    with pytest.raises(ValueError, match=r"^'70000' is not a port \(1-65535\)$"):
        parse_ports("70000")


@pytest.mark.parametrize(
    ("ports", "text"),
    [
        ((), ""),
        ((1,), "1"),
        ((1, 2), "1-2"),
        ((1, 2, 3, 5, 7, 8), "1-3,5,7-8"),
        ([8, 7, 1, 3, 2, 5, 3, 3], "1-3,5,7-8"),
        ((65535, 1), "1,65535"),
    ],
)
def test_format_ports(ports: tuple[int, ...], text: str) -> None:
    assert format_ports(ports) == text


def test_format_ports_round_trips_the_classic_lists() -> None:
    classic = "1,11,15,79,111,119,143,540,635,1080,1524,2000,5742,6667,12345,12346,20034"
    ports = parse_ports(classic)
    assert "12345-12346" in format_ports(ports)
    assert parse_ports(format_ports(ports)) == ports


@FUZZ
@given(st.text())
def test_parse_ports_only_raises_port_list_error_on_arbitrary_text(text: str) -> None:
    try:
        ports = parse_ports(text)
    except PortListError:
        return
    assert list(ports) == sorted(set(ports))
    assert all(1 <= port <= 65535 for port in ports)


@FUZZ
@given(st.text(alphabet="0123456789,- \t6", max_size=30))
def test_parse_ports_on_port_like_text(text: str) -> None:
    try:
        ports = parse_ports(text)
    except PortListError as error:
        assert isinstance(error.token, str)
        return
    assert all(1 <= port <= 65535 for port in ports)
    assert parse_ports(format_ports(ports)) == ports


@FUZZ
@given(st.sets(st.integers(1, 65535), max_size=80))
def test_format_then_parse_round_trips(ports: set[int]) -> None:
    assert parse_ports(format_ports(ports)) == tuple(sorted(ports))


@st.composite
def _written_lists(draw: st.DrawFn) -> tuple[str, set[int]]:
    """Port lists as an admin might write them, with the set of ports they mean."""
    entries = draw(
        st.lists(
            st.tuples(st.integers(1, 65535), st.integers(0, 40)).map(
                lambda pair: (pair[0], min(pair[0] + pair[1], 65535))
            ),
            min_size=1,
            max_size=20,
        )
    )
    blank = st.sampled_from(["", " ", "\t", "  "])
    parts = []
    expected: set[int] = set()
    for first, last in entries:
        expected.update(range(first, last + 1))
        body = str(first) if first == last else f"{first}{draw(blank)}-{draw(blank)}{last}"
        parts.append(f"{draw(blank)}{body}{draw(blank)}")
    trailing = draw(st.sampled_from(["", ",", ", "]))
    return ",".join(parts) + trailing, expected


@FUZZ
@given(_written_lists())
def test_valid_written_lists_parse_to_what_they_mean(case: tuple[str, set[int]]) -> None:
    text, expected = case
    ports = parse_ports(text)
    assert ports == tuple(sorted(expected))
    assert parse_ports(format_ports(ports)) == ports
