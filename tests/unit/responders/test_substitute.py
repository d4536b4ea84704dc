"""Token substitution for KILL_ROUTE / KILL_HOSTS_DENY / KILL_RUN_CMD templates."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.core.probe import Mode
from portsentry.responders.substitute import hosts_deny_entry, substitute, target_text

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "200")), deadline=None)

V4 = IPv4Address("198.18.0.7")
V6 = IPv6Address("fd00::2")


def test_all_tokens_every_occurrence() -> None:
    got = substitute("/bin/x $TARGET$ $PORT$ $MODE$ again $TARGET$/$PORT$", V4, 23, Mode.STCP)
    assert got == "/bin/x 198.18.0.7 23 stcp again 198.18.0.7/23"


@pytest.mark.parametrize("mode", list(Mode))
def test_mode_is_the_12_flag_name(mode: Mode) -> None:
    assert substitute("$MODE$", V4, 1, mode) == mode.value
    assert substitute("$MODE$", V4, 1, mode) in {"tcp", "udp", "stcp", "sudp", "atcp", "audp"}


def test_shipped_examples() -> None:
    assert substitute("/sbin/route add -host $TARGET$ reject", V4, 80, Mode.TCP) == (
        "/sbin/route add -host 198.18.0.7 reject"
    )
    assert hosts_deny_entry("ALL: $TARGET$ : DENY", V4, 80, Mode.TCP) == "ALL: 198.18.0.7 : DENY"
    assert hosts_deny_entry("ALL: $TARGET$", V4, 80, Mode.TCP) == "ALL: 198.18.0.7"


def test_ipv6_bare_for_commands_bracketed_for_hosts_deny() -> None:
    full = IPv6Address("fd00:0000:0000:0000:0000:0000:0000:0002")
    assert substitute("ip6tables -I INPUT -s $TARGET$ -j DROP", full, 1, Mode.TCP) == (
        "ip6tables -I INPUT -s fd00::2 -j DROP"
    )
    assert hosts_deny_entry("ALL: $TARGET$", full, 1, Mode.TCP) == "ALL: [fd00::2]"


def test_order_target_port_mode_like_12() -> None:
    # "$TARGET$PORT$": TARGET is taken first, leaving "PORT$" behind as plain text.
    assert substitute("$TARGET$PORT$", V4, 5, Mode.TCP) == "198.18.0.7PORT$"
    assert substitute("$PORT$MODE$", V4, 5, Mode.TCP) == "5MODE$"


def test_no_tokens_is_identity() -> None:
    assert substitute("echo hi; $HOME $TARGET", V4, 1, Mode.UDP) == "echo hi; $HOME $TARGET"


def test_scope_id_dropped() -> None:
    # An interface name may contain shell metacharacters; it must never reach the shell.
    scoped = IPv6Address("fe80::1%eth0;rm")
    assert substitute("$TARGET$", scoped, 1, Mode.TCP) == "fe80::1"
    assert hosts_deny_entry("$TARGET$", scoped, 1, Mode.TCP) == "[fe80::1]"


def test_subclass_cannot_inject_text() -> None:
    class Evil(IPv4Address):
        def __str__(self) -> str:
            return "1.2.3.4; rm -rf /"

    assert substitute("$TARGET$", Evil("198.18.0.1"), 1, Mode.TCP) == "198.18.0.1"


@pytest.mark.parametrize("bad", ["198.18.0.7", "1.2.3.4; reboot", b"1.2.3.4", 3232235777, None])
def test_target_must_be_an_address_object(bad: Any) -> None:
    with pytest.raises(TypeError, match="IPv4Address or IPv6Address"):
        substitute("$TARGET$", bad, 1, Mode.TCP)
    with pytest.raises(TypeError):
        hosts_deny_entry("$TARGET$", bad, 1, Mode.TCP)


@pytest.mark.parametrize("bad", ["80", 80.0, True, None])
def test_port_must_be_int(bad: Any) -> None:
    with pytest.raises(TypeError, match="port"):
        substitute("$PORT$", V4, bad, Mode.TCP)


@pytest.mark.parametrize("bad", [-1, 65536])
def test_port_range(bad: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        substitute("$PORT$", V4, bad, Mode.TCP)


def test_mode_must_be_mode() -> None:
    with pytest.raises(TypeError, match="Mode"):
        substitute("$MODE$", V4, 1, "tcp; reboot")  # type: ignore[arg-type]


def test_target_text() -> None:
    assert target_text(IPv4Address("10.0.0.1")) == "10.0.0.1"
    # Python 3.13 writes mapped addresses dotted, 3.11 in hex; either parses back to the same.
    mapped = IPv6Address("::ffff:10.0.0.1")
    assert target_text(mapped) == str(mapped)
    assert ip_address(target_text(mapped)) == mapped
    assert target_text(IPv6Address("2001:db8::1")) == "2001:db8::1"


# A template is a sequence of tokens and token-free text; the expected output maps each piece.
_piece = st.one_of(
    st.sampled_from(["$TARGET$", "$PORT$", "$MODE$"]),
    st.text(alphabet=st.characters(blacklist_characters="$"), max_size=12),
)
_address = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**128 - 1).map(IPv6Address)
)


@FUZZ
@given(
    pieces=st.lists(_piece, max_size=12),
    target=_address,
    port=st.integers(0, 65535),
    mode=st.sampled_from(list(Mode)),
)
def test_fuzz_substitution_matches_piecewise_model(
    pieces: list[str], target: IPv4Address | IPv6Address, port: int, mode: Mode
) -> None:
    template = "".join(pieces)
    for bracket, fn in ((False, substitute), (True, hosts_deny_entry)):
        text = str(target)
        if bracket and target.version == 6:
            text = f"[{text}]"
        values = {"$TARGET$": text, "$PORT$": str(port), "$MODE$": mode.value}
        expected = "".join(values.get(p, p) for p in pieces)
        got = fn(template, target, port, mode)
        assert got == expected
        assert "$TARGET$" not in got and "$PORT$" not in got and "$MODE$" not in got


@FUZZ
@given(target=_address)
def test_fuzz_target_text_is_a_plain_literal(target: IPv4Address | IPv6Address) -> None:
    text = substitute("$TARGET$", target, 0, Mode.TCP)
    assert set(text) <= set("0123456789abcdef.:")
    assert ip_address(text) == target
