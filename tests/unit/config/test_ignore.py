"""Tests for the never-block list: parsing, matching, and live reloading of the ignore file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from portsentry.config.ignore import (
    IgnoreEntry,
    IgnoreFileError,
    IgnoreList,
    IgnoreSource,
    load_ignore,
    parse_ignore,
)
from portsentry.core.probe import IPAddress

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "150")), deadline=None)


def networks(text: str) -> list[IPv4Network | IPv6Network]:
    entries, _ = parse_ignore(text, "test.ignore")
    return [entry.network for entry in entries]


def ignore_list(text: str, always: Iterable[IPAddress] = ()) -> IgnoreList:
    return IgnoreList(parse_ignore(text, "test.ignore")[0], always)


# --- parsing ---


def test_shipped_debian_file_parses() -> None:
    text = (
        "# /etc/portsentry/portsentry.ignore.static\n#\n# 192.168.2.0/24\n#\n"
        "127.0.0.1/32\n0.0.0.0\n"
    )
    entries, warnings = parse_ignore(text, "portsentry.ignore")
    assert entries == [
        IgnoreEntry(ip_network("127.0.0.1/32"), 5, "127.0.0.1/32"),
        IgnoreEntry(ip_network("0.0.0.0/32"), 6, "0.0.0.0"),
    ]
    assert warnings == []


def test_comments_blank_lines_crlf_and_indentation() -> None:
    text = "  # indented comment\r\n\r\n\t\r\n10.0.0.1\r\n   10.0.0.2\t\r\n#10.0.0.3\n"
    assert networks(text) == [ip_network("10.0.0.1/32"), ip_network("10.0.0.2/32")]


def test_trailing_text_and_inline_comments_are_tolerated() -> None:
    text = "10.0.0.1 gateway\n10.0.0.2# dns\n10.0.0.0/8   # lab\n"
    assert networks(text) == [
        ip_network("10.0.0.1/32"),
        ip_network("10.0.0.2/32"),
        ip_network("10.0.0.0/8"),
    ]


def test_last_line_without_newline_is_complete() -> None:
    # 1.2 glued such a line to leftovers of the previous one (Debian 1.2-2 changelog).
    assert networks("10.1.1.1\n10.2.2.2") == [ip_network("10.1.1.1/32"), ip_network("10.2.2.2/32")]


def test_line_numbers_count_every_line() -> None:
    entries, _ = parse_ignore("# a\n\n10.0.0.1\r\n\n10.0.0.2\n", "x")
    assert [entry.line for entry in entries] == [3, 5]
    assert [entry.text for entry in entries] == ["10.0.0.1", "10.0.0.2"]


def test_byte_order_mark_is_skipped() -> None:
    assert networks("\ufeff10.0.0.1\n") == [ip_network("10.0.0.1/32")]


def test_ipv6_forms() -> None:
    assert networks("FD00::1\nfd00:abcd::/32\n::1/128\n") == [
        ip_network("fd00::1/128"),
        ip_network("fd00:abcd::/32"),
        ip_network("::1/128"),
    ]


def test_host_bits_are_masked_off() -> None:
    assert networks("192.168.1.5/24\nfd00::5/64\n") == [
        ip_network("192.168.1.0/24"),
        ip_network("fd00::/64"),
    ]


def test_ipv4_mapped_entries_become_ipv4() -> None:
    assert networks("::ffff:10.1.2.3\n::ffff:10.1.0.0/112\n") == [
        ip_network("10.1.2.3/32"),
        ip_network("10.1.0.0/16"),
    ]


def test_ipv4_mapped_entry_shorter_than_96_stays_ipv6() -> None:
    assert networks("::ffff:0:0/80\n") == [IPv6Network("::/80")]


@pytest.mark.parametrize(("token", "version"), [("0.0.0.0/0", 4), ("10.0.0.0/0", 4), ("::/0", 6)])
def test_zero_prefix_is_allowed_with_a_warning(token: str, version: int) -> None:
    entries, warnings = parse_ignore(f"# c\n{token}\n", "p.ignore")
    assert entries[0].network.prefixlen == 0
    assert warnings == [
        f"p.ignore:2: '{token}' matches every IPv{version} address; "
        f"no IPv{version} host will ever be blocked"
    ]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("gateway.example.com", "'gateway.example.com' is not an IP address or network"),
        ("999.1.1.1", "'999.1.1.1' is not an IP address"),
        ("10.0.0.1/33", "'/33' is not a prefix length (0-32)"),
        ("fd00::/129", "'/129' is not a prefix length (0-128)"),
        ("10.0.0.0/255.255.255.0", "write /24, not /255.255.255.0"),
        ("10.0.0.0/", "'/' is not a prefix length"),
        ("10.0.0.0/+8", "'/+8' is not a prefix length"),
        ("10.0.0.0/0x8", "'/0x8' is not a prefix length"),
        ("10.0.0.0/8/8", "is not a prefix length"),
        ("fe80::1%eth0", "zone id"),
        ("010.0.0.1", "is not an IP address"),
        ("1.2.3", "is not an IP address"),
        ("/24", "is not an IP address"),
    ],
)
def test_junk_is_an_error_naming_file_and_line(line: str, fragment: str) -> None:
    with pytest.raises(IgnoreFileError) as caught:
        parse_ignore(f"127.0.0.1\n# fine\n{line}  # trailing\n10.0.0.1\n", "/etc/ps.ignore")
    error = caught.value
    assert (error.source, error.line) == ("/etc/ps.ignore", 3)
    assert fragment in error.message
    assert str(error) == f"/etc/ps.ignore:3: {error.message}"


def test_load_ignore_reads_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "portsentry.ignore"
    path.write_bytes(b"# caf\xe9 latin-1 comment\n10.0.0.1\nbogus\n")
    with pytest.raises(IgnoreFileError, match=rf"^{path}:3: 'bogus' is not"):
        load_ignore(str(path))
    path.write_text("10.0.0.1\n")
    assert load_ignore(str(path)) == ([IgnoreEntry(ip_network("10.0.0.1/32"), 1, "10.0.0.1")], [])


def test_load_ignore_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_ignore(str(tmp_path / "absent"))


# --- matching ---


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.168.1.77", True),  # 192.168.1.5/24 matches its whole network (1.2 semantics)
        ("192.168.1.5", True),
        ("192.168.2.1", False),
        ("10.9.8.7", True),  # inside 10.0.0.0/8
        ("11.0.0.0", False),
        ("127.0.0.1", True),
        ("127.0.0.2", False),  # /32, not the whole loopback net
        ("fd00:1::99", True),
        ("fd00:2::1", False),
        ("2001:db8::1", True),
        ("2001:db8::2", False),
        ("::ffff:10.1.1.1", True),  # mapped lookups are IPv4 lookups
        ("::ffff:11.1.1.1", False),
        ("::ffff:127.0.0.1", True),
    ],
)
def test_membership(address: str, expected: bool) -> None:
    entries = "127.0.0.1\n192.168.1.5/24\n10.0.0.0/8\nfd00:1::/64\n2001:DB8::1\n"
    assert (ip_address(address) in ignore_list(entries)) is expected


def test_families_do_not_mix() -> None:
    everything4 = ignore_list("0.0.0.0/0\n")
    assert ip_address("1.2.3.4") in everything4
    assert ip_address("2001:db8::1") not in everything4
    everything6 = ignore_list("::/0\n")
    assert ip_address("2001:db8::1") in everything6
    assert ip_address("1.2.3.4") not in everything6


def test_always_addresses_are_ignored_whatever_the_file_says() -> None:
    always = [ip_address("198.18.0.1"), ip_address("fd00::1"), ip_address("::ffff:198.18.9.9")]
    ignored = ignore_list("", always)
    assert ip_address("198.18.0.1") in ignored
    assert ip_address("fd00::1") in ignored
    assert ip_address("198.18.9.9") in ignored
    assert ip_address("::ffff:198.18.0.1") in ignored
    assert ip_address("198.18.0.2") not in ignored


def test_zone_ids_do_not_defeat_matching() -> None:
    ignored = ignore_list("fe80::1\n", [ip_address("fe80::2%eth0")])
    assert ip_address("fe80::1%eth0") in ignored
    assert ip_address("fe80::2") in ignored


def test_non_addresses_are_not_members() -> None:
    ignored = ignore_list("0.0.0.0/0\n")
    assert "1.2.3.4" not in ignored
    assert None not in ignored


def test_len_counts_distinct_networks() -> None:
    ignored = ignore_list("10.0.0.1\n10.0.0.1/32\n10.0.0.0/8\n10.1.2.3/8\n", [ip_address("::1")])
    assert len(ignored) == 3
    assert len(IgnoreList([])) == 0


ipv4_networks = st.builds(
    lambda value, bits: IPv4Network((value, bits), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
ipv6_networks = st.builds(
    lambda value, bits: IPv6Network((value, bits), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
any_address = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


def _as_written(net: IPv4Network | IPv6Network) -> IPv4Network | IPv6Network:
    """The network an entry means: `::ffff:a.b.c.d/N` from /96 on is IPv4's a.b.c.d/(N-96)."""
    mapped = net.network_address.ipv4_mapped if isinstance(net, IPv6Network) else None
    if mapped is None or net.prefixlen < 96:
        return net
    return IPv4Network((mapped, net.prefixlen - 96))


@FUZZ
@given(st.lists(st.one_of(ipv4_networks, ipv6_networks), max_size=20), any_address)
@example([IPv6Network("::ffff:0:0/96")], IPv4Address("0.0.0.0"))  # all of IPv4, written mapped
def test_membership_agrees_with_ipaddress(
    nets: list[IPv4Network | IPv6Network], address: IPAddress
) -> None:
    text = "".join(f"{net}\n" for net in nets)
    nets = [_as_written(net) for net in nets]
    expected = any(address in net for net in nets if net.version == address.version)
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        expected = any(mapped in net for net in nets if net.version == 4)
    assert (address in ignore_list(text)) is expected


# What load_ignore hands the parser: any bytes, decoded with surrogateescape (st.text() never
# draws the lone surrogates that undecodable bytes become).
_FILE_TEXT = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda data: data.decode("utf-8", "surrogateescape")),
)


@FUZZ
@given(_FILE_TEXT)
def test_parser_only_ever_raises_ignorefileerror(text: str) -> None:
    try:
        entries, warnings = parse_ignore(text, "fuzz")
    except IgnoreFileError as error:
        assert error.source == "fuzz"
        assert 1 <= error.line <= text.count("\n") + 1
        return
    assert all(entry.line >= 1 for entry in entries)
    assert len(warnings) <= len(entries)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            ["10.0.0.1", "fd00::/8", "# x", "", "  ", "\r", "1.2.3.4/24 x", "::ffff:1.2.3.4"]
        ),
        max_size=12,
    )
)
def test_valid_lines_in_any_order_parse(lines: list[str]) -> None:
    entries, _ = parse_ignore("\n".join(lines), "f")
    assert len(entries) == sum(1 for line in lines if line.strip() and not line.startswith("#"))


# --- live reloading ---


class FakeHost:
    """Stands in for hostinfo.local_addresses; can be told to fail."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = {ip_address(a) for a in addresses}
        self.calls = 0
        self.fail = False

    def __call__(self) -> set[IPAddress]:
        self.calls += 1
        if self.fail:
            raise OSError(105, "No buffer space available")
        return set(self.addresses)


def rewrite(path: Path, text: str) -> None:
    """Write and make sure the file's identity changes even on coarse-mtime filesystems."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_source_first_load_and_unchanged_file(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    host = FakeHost("198.18.0.1")
    source = IgnoreSource(str(path), host, min_interval=1.0)
    first = source.load()
    assert ip_address("10.0.0.1") in first and ip_address("198.18.0.1") in first
    assert source.current(100.0) is first  # nothing changed: the same object, no rebuild
    assert source.last_error is None


def test_an_edit_counts_for_the_very_next_packet(tmp_path: Path) -> None:
    # issue 9.7: the file was looked at at most once a second, so an address added and probing
    # at once was still blocked; 1.2 re-read it at every event.
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    source = IgnoreSource(str(path), FakeHost(), min_interval=1.0)
    first = source.current(10.0)
    assert source.current(10.0) is first  # unchanged: no re-read, no rebuild
    rewrite(path, "10.0.0.2\n")
    updated = source.current(10.0)
    assert ip_address("10.0.0.2") in updated
    assert ip_address("10.0.0.1") not in updated


def test_own_addresses_are_asked_for_at_most_once_an_interval(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    asked: list[int] = []

    def host() -> list[IPv4Address]:
        asked.append(1)
        return [IPv4Address("198.18.0.1")]

    source = IgnoreSource(str(path), host, min_interval=1.0)
    source.current(10.0)
    for now in (10.1, 10.5, 10.9):
        source.current(now)
    assert len(asked) == 1
    source.current(11.0)
    assert len(asked) == 2


def test_source_detects_same_size_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    source = IgnoreSource(str(path), FakeHost(), min_interval=0.0)
    source.load()
    rewrite(path, "10.0.0.9\n")
    assert ip_address("10.0.0.9") in source.current(1.0)


def test_source_detects_replacement_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    source = IgnoreSource(str(path), FakeHost(), min_interval=0.0)
    source.load()
    replacement = tmp_path / "ps.ignore.new"
    replacement.write_text("10.0.0.3\n")
    os.replace(replacement, path)
    assert ip_address("10.0.0.3") in source.current(1.0)


def test_source_keeps_previous_list_on_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    source = IgnoreSource(str(path), FakeHost(), min_interval=0.0)
    good = source.load()
    rewrite(path, "10.0.0.1\nnot-an-address\n")
    assert source.current(1.0) is good
    assert source.last_error is not None
    assert source.last_error.startswith(f"{path}:2: 'not-an-address' is not an IP address")
    assert source.last_error.endswith("keeping the previous list")
    assert source.current(2.0) is good  # still broken, still the old list, no exception
    rewrite(path, "10.0.0.5\n")
    fixed = source.current(3.0)
    assert ip_address("10.0.0.5") in fixed
    assert source.last_error is None


def test_source_survives_file_removal_and_reappearance(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    source = IgnoreSource(str(path), FakeHost(), min_interval=0.0)
    good = source.load()
    path.unlink()
    assert source.current(1.0) is good
    assert source.last_error is not None and "No such file" in source.last_error
    path.write_text("10.0.0.1\n")  # identical content: still must be read again
    assert ip_address("10.0.0.1") in source.current(2.0)
    assert source.last_error is None


def test_source_first_load_raises(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    with pytest.raises(FileNotFoundError):
        IgnoreSource(str(path), FakeHost()).load()
    path.write_text("# ok\nbad/8\n")
    with pytest.raises(IgnoreFileError, match=":2: "):
        IgnoreSource(str(path), FakeHost()).current(0.0)


def test_source_follows_local_address_changes(tmp_path: Path) -> None:
    host = FakeHost("198.18.0.1")
    source = IgnoreSource(None, host, min_interval=5.0)
    assert ip_address("198.18.0.1") in source.load()
    host.addresses = {ip_address("198.18.0.2")}
    assert ip_address("198.18.0.2") in source.current(0.0)  # first check after load() is due
    assert host.calls == 2
    host.addresses = {ip_address("198.18.0.3")}
    assert ip_address("198.18.0.3") not in source.current(4.9)  # not due yet
    assert host.calls == 2
    updated = source.current(5.0)
    assert ip_address("198.18.0.3") in updated
    assert ip_address("198.18.0.2") not in updated


def test_source_keeps_addresses_when_query_fails() -> None:
    host = FakeHost("198.18.0.1")
    source = IgnoreSource(None, host, min_interval=0.0)
    good = source.load()
    host.fail = True
    assert source.current(1.0) is good
    assert (
        source.last_error
        == "cannot read this host's addresses: [Errno 105] No buffer space available"
    )
    host.fail = False
    source.current(2.0)
    assert source.last_error is None


def test_source_rechecks_when_clock_goes_backwards(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("10.0.0.1\n")
    source = IgnoreSource(str(path), FakeHost(), min_interval=60.0)
    source.current(1000.0)
    rewrite(path, "10.0.0.2\n")
    assert ip_address("10.0.0.2") in source.current(5.0)


def test_source_reports_warnings_of_latest_load(tmp_path: Path) -> None:
    path = tmp_path / "ps.ignore"
    path.write_text("0.0.0.0/0\n")
    source = IgnoreSource(str(path), FakeHost(), min_interval=0.0)
    source.load()
    assert len(source.warnings) == 1 and ":1: '0.0.0.0/0' matches every IPv4" in source.warnings[0]
    rewrite(path, "10.0.0.1\n")
    source.current(1.0)
    assert source.warnings == []


@pytest.mark.parametrize(("token", "warned"), [
    ("198.18.7.9/16", "all of 198.18.0.0/16"), ("fd00::5/64", "all of fd00::/64"),
    ("::ffff:198.18.7.9/112", "all of 198.18.0.0/16"),
    ("198.18.0.0/16", None), ("198.18.7.9", None), ("198.18.7.9/32", None),
    ("::ffff:198.18.0.0/112", None), ("fd00::/64", None),
])
def test_a_host_written_with_a_network_s_prefix_is_warned_about(token: str, warned: str | None) -> None:
    # An admin meaning one host wrote 198.18.7.9/16: the whole /16 was silently never blocked.
    entries, warnings = parse_ignore(f"{token}\n", "portsentry.ignore")
    assert len(entries) == 1
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "portsentry.ignore:1:" in warnings[0] and warned in warnings[0]


def test_an_ignore_file_beside_the_configuration_that_is_not_read_is_named(tmp_path: Path) -> None:
    # The shipped template leaves IGNORE_FILE commented out; an admin who copied it to
    # /etc/portsentry/ and wrote the management network into portsentry.ignore next to it, as
    # 1.2's and Debian's files have it, had that network blocked like any other, and neither
    # check-config nor the start said the file was not read.
    from portsentry.config.ignore import open_ignore
    from portsentry.config.settings import parse_config

    conf, ignore = tmp_path / "portsentry.conf", tmp_path / "portsentry.ignore"
    ignore.write_text("198.18.99.0/24\n")
    unset = parse_config('TCP_PORTS="1"\n', str(conf)).config
    source = open_ignore(unset, lambda: [])
    assert source.warnings == [f'IGNORE_FILE is not set, so {ignore} is not read and its hosts can be '
                               f'blocked (IGNORE_FILE="{ignore}" uses it)']
    assert ip_address("198.18.99.7") not in source.current(0.0)
    set_to_it = parse_config(f'TCP_PORTS="1"\nIGNORE_FILE="{ignore}"\n', str(conf)).config
    assert open_ignore(set_to_it, lambda: []).warnings == []
    ignore.unlink()
    assert open_ignore(unset, lambda: []).warnings == []  # no file there: nothing to say


@pytest.mark.parametrize(
    "line", ["10.0.0.0/8,192.168.0.0/16", "10.0.0.1,10.0.0.2", "10.0.0.1, 10.0.0.2",
             "10.0.0.0/8;192.168.0.0/16"])
def test_a_list_on_one_line_is_told_one_entry_per_line(line: str) -> None:
    # "10.0.0.0/8,192.168.0.0/16" was told "'/8,192.168.0.0/16' is not a prefix length (0-32);
    # write /24, not /255.255.255.0": a netmask hint for a list, sending the admin the wrong way.
    with pytest.raises(IgnoreFileError) as caught:
        parse_ignore(f"{line}\n", "portsentry.ignore")
    assert caught.value.message.endswith("; one address or network per line")
    assert "255.255.255.0" not in caught.value.message
