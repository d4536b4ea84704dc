"""Fleet decisions: the wire form, the signature, and the decoder of untrusted stream entries."""

from __future__ import annotations

import contextlib
from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.fleet.decision import (
    FIELD_DATA,
    FIELD_SIGNATURE,
    BadDecision,
    Decision,
    decode,
    encode,
    pack,
    parse,
    sign,
    unpack,
)

KEY = b"0123456789abcdef0123456789abcdef"
BAN = Decision("h1", 1700000000000, 42, "ban", ip_address("198.18.0.2"), 1700003600.5, 1700000000.25,
               "tcp port 1: TCP SYN scan")
LIFT = Decision("h1", 1700000000000, 43, "lift", ip_address("fd00::2"), None, 1700000001.0,
                "unblocked by admin")


def test_the_wire_form_is_one_signed_line():
    fields = encode(BAN, KEY, "fleet")
    assert fields[FIELD_DATA] == (b"1|h1|1700000000000|42|ban|198.18.0.2|1700003600.500000|1700000000.250000|"
                                  b"tcp port 1: TCP SYN scan")
    assert fields[FIELD_SIGNATURE] == sign(KEY, "fleet", fields[FIELD_DATA])
    assert len(fields[FIELD_SIGNATURE]) == 64
    assert decode(fields, KEY, "fleet") == BAN
    assert decode(encode(LIFT, KEY, "fleet"), KEY, "fleet") == LIFT
    assert unpack(pack(BAN, KEY, "fleet"), KEY, "fleet") == BAN


def test_forever_and_odd_reasons_round_trip():
    forever = Decision("h-2.x", 1, 1, "ban", ip_address("198.18.0.3"), None, 5.0, "a|b\n\xe9")
    back = decode(encode(forever, KEY, "f"), KEY, "f")
    assert back.expires is None and back.reason == "a?b??"


@pytest.mark.parametrize(("fields", "reason"), [
    ({FIELD_DATA: BAN.payload()}, "unsigned"),
    ({FIELD_DATA: BAN.payload(), FIELD_SIGNATURE: b""}, "unsigned"),
    ({FIELD_DATA: BAN.payload(), FIELD_SIGNATURE: sign(b"another key entirely!", "fleet", BAN.payload())},
     "bad_signature"),
    # Signed for another fleet that shares the key: means nothing here.
    ({FIELD_DATA: BAN.payload(), FIELD_SIGNATURE: sign(KEY, "other", BAN.payload())}, "bad_signature"),
    # The text changed after signing.
    ({FIELD_DATA: BAN.payload().replace(b"198.18.0.2", b"198.18.0.1"),
      FIELD_SIGNATURE: sign(KEY, "fleet", BAN.payload())}, "bad_signature"),
    ({}, "malformed"),
    ({FIELD_DATA: "text", FIELD_SIGNATURE: b"x"}, "malformed"),
    ("not a dict", "malformed"),
])
def test_what_is_refused_and_why(fields, reason):
    with pytest.raises(BadDecision) as caught:
        decode(fields, KEY, "fleet")
    assert caught.value.reason == reason


@pytest.mark.parametrize("payload", [
    b"2|h1|1|1|ban|198.18.0.2|-|1.000000|",  # another version
    b"1|h1|1|1|ban|198.18.0.2|-|1.000000",  # a field short
    b"1|h1|01|1|ban|198.18.0.2|-|1.000000|",  # leading zero
    b"1|h1|1|1|block|198.18.0.2|-|1.000000|",
    b"1|h1|1|1|ban|::ffff:198.18.0.2|-|1.000000|",  # not canonical: one address, one text
    b"1|h1|1|1|ban|fd00:0::2|-|1.000000|",
    b"1|h1|1|1|ban|fe80::1%eth0|-|1.000000|",
    b"1|h1|1|1|ban|198.18.0.2|1e9|1.000000|",
    b"1|h1|1|1|lift|198.18.0.2|5.000000|1.000000|",  # a lift has no expiry
    b"1|h1|1|1|ban|198.18.0.2|-|1.0|",
    b"1|-h|1|1|ban|198.18.0.2|-|1.000000|",
    b"1|h1|1|1|ban|198.18.0.2|-|1.000000|\x7f",
    "1|h1|1|1|ban|198.18.0.2|-|1.000000|\xe9".encode(),
])
def test_the_parser_takes_one_spelling_only(payload):
    with pytest.raises(BadDecision) as caught:
        decode({FIELD_DATA: payload, FIELD_SIGNATURE: sign(KEY, "fleet", payload)}, KEY, "fleet")
    assert caught.value.reason == "malformed"


@given(st.dictionaries(st.sampled_from([FIELD_DATA, FIELD_SIGNATURE, b"x", "d"]),
                       st.one_of(st.binary(max_size=600), st.text(max_size=50), st.integers())))
def test_untrusted_entries_only_ever_raise_bad_decision(fields):
    with contextlib.suppress(BadDecision):
        decode(fields, KEY, "fleet")


_FIELD = st.one_of(st.sampled_from(["1", "h1", "0", "ban", "lift", "-", "198.18.0.2", "fd00::2",
                                    "1.000000", "99999999999.999999", ""]),
                   st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=20))


@given(st.lists(_FIELD, min_size=0, max_size=11))
def test_signed_payloads_parse_or_raise_malformed(parts):
    """Even a payload signed with the key is parsed strictly: another version's spelling is refused,
    never half-understood, and nothing but BadDecision comes out."""
    payload = "|".join(parts).encode("ascii", "replace")
    try:
        decision = parse(payload)
    except BadDecision as error:
        assert error.reason == "malformed"
    else:
        assert decision.payload() == payload  # what is accepted is exactly what we would write


def _ipv6_of_its_own(address: object) -> bool:
    return (int(address) >> 32) not in (0, 0xFFFF)  # type: ignore[call-overload]


@given(st.builds(
    Decision,
    host=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    epoch=st.integers(0, 10**18), seq=st.integers(0, 10**18), kind=st.just("ban"),
    address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(_ipv6_of_its_own)),
    expires=st.one_of(st.none(), st.integers(0, 10**11).map(lambda n: n / 1000)),
    at=st.integers(0, 10**11).map(lambda n: n / 1000),
    reason=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126).filter(lambda c: c != "|"),
                   max_size=40)))
def test_every_decision_round_trips(decision):
    assert decode(encode(decision, KEY, "f"), KEY, "f") == decision
