"""Parsing what admins type to block and unblock."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from portsentry.service.admin import AdminError, format_listing, parse_address, parse_duration


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200),
                                          ("7d", 604800), ("1w", 604800), ("1.5h", 5400),
                                          ("5200w", 5200 * 604800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["forever", "0", "FOREVER"])
def test_forever(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize("text", ["", "-5", "5x", "h", "1 day", "9" * 400, "9" * 400 + "w",
                                  "99999999999999w", "101y", "5300000w"])
def test_bad_durations(text):
    with pytest.raises(AdminError):
        parse_duration(text)


def test_addresses_are_validated_and_mapped_ipv6_becomes_ipv4():
    assert parse_address(" 198.18.0.2 ") == ip_address("198.18.0.2")
    assert parse_address("::ffff:198.18.0.2") == ip_address("198.18.0.2")
    assert parse_address("fd00::2") == ip_address("fd00::2")
    with pytest.raises(AdminError):
        parse_address("198.18.0.2; rm -rf /")
    # A zone id names our interface, not the host: the ban is of fe80::1 (as sensors.connect reads it).
    assert str(parse_address("fe80::1%eth0")) == "fe80::1"


def test_listing_table():
    assert format_listing([]) == "no active bans"
    text = format_listing([{"address": "198.18.0.2", "remaining": 5400, "mode": "stcp", "port": 1,
                            "count": 3, "offences": 2, "backends": ["nftables"],
                            "hosts_deny_line": "ALL: 198.18.0.2"}])
    assert "198.18.0.2" in text and "1.5h" in text and "nftables + hosts.deny" in text


def test_an_impossible_source_cannot_be_blocked_by_hand():
    import pytest

    from portsentry.config.settings import Config
    from portsentry.service import admin

    for text in ("0.0.0.0", "224.0.0.1", "::"):
        with pytest.raises(admin.AdminError, match="cannot be the source of a real packet"):
            admin.manual_block(None, None, Config(source="t"),  # type: ignore[arg-type]
                               admin.parse_address(text), None)
