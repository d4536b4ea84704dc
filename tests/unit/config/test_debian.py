"""Debian's layout: /etc/default/portsentry chooses the modes; portsentry.ignore.static stands in
for a missing IGNORE_FILE."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.config.debian import DefaultsError, ignore_file_to_use, parse_defaults, read_defaults
from portsentry.core.probe import Mode

# As Debian's postinst writes it (debconf), comments included.
DEBIAN_DEFAULTS = """\
# /etc/default/portsentry
#
# This file is read by /etc/init.d/portsentry. See the portsentry.8
# manpage for details.
#
# The options in this file refer to commandline arguments (all in lowercase)
# of portsentry. Use only one tcp and udp mode at a time.
#
TCP_MODE="atcp"
UDP_MODE="sudp"
"""


def test_debian_s_file_chooses_one_tcp_and_one_udp_mode() -> None:
    assert parse_defaults(DEBIAN_DEFAULTS) == [Mode.ATCP, Mode.SUDP]
    assert parse_defaults("TCP_MODE=tcp\nexport UDP_MODE='udp'  # both\n") == [Mode.TCP, Mode.UDP]
    assert parse_defaults('TCP_MODE=""\nUDP_MODE="audp"\nOTHER="x"\n') == [Mode.AUDP]
    assert parse_defaults('TCP_MODE=""\nUDP_MODE=""\n') == []
    assert parse_defaults("") is None and parse_defaults('PORTSENTRY_MODES="-tcp"\n') is None


@pytest.mark.parametrize(("text", "message"), [
    ('TCP_MODE="udp"\n', "f:1: TCP_MODE: 'udp' is not one of tcp, stcp, atcp"),
    ('\nUDP_MODE="stealth"\n', "f:2: UDP_MODE: 'stealth'"),
    ('TCP_MODE="$(rm -rf /)"\n', "f:1: not a plain assignment"),
    ("TCP_MODE=tcp; reboot\n", "f:1: not a plain assignment"),
])
def test_anything_else_is_an_error_naming_file_and_line(text: str, message: str) -> None:
    with pytest.raises(DefaultsError) as caught:
        parse_defaults(text, "f")
    assert str(caught.value).startswith(message)


@given(st.one_of(
    st.text(max_size=300),
    # read_defaults decodes any bytes with surrogateescape; st.text() draws no lone surrogates.
    st.binary(max_size=300).map(lambda data: data.decode("utf-8", "surrogateescape")),
))
def test_the_parser_never_raises_anything_else(text: str) -> None:
    try:
        modes = parse_defaults(text, "f")
    except DefaultsError:
        return
    assert modes is None or len(modes) <= 2


def test_a_missing_file_means_no_choice_and_the_static_ignore_file_stands_in(tmp_path) -> None:
    assert read_defaults(str(tmp_path / "none")) is None
    ignore = tmp_path / "portsentry.ignore"
    assert ignore_file_to_use(str(ignore)).path == str(ignore)  # neither exists: the error stays
    (tmp_path / "portsentry.ignore.static").write_text("198.18.0.0/24\n")
    choice = ignore_file_to_use(str(ignore))
    assert choice.path == f"{ignore}.static" and choice.note and "does not exist" in choice.note
    ignore.write_text("")
    assert ignore_file_to_use(str(ignore)).note is None  # the real file wins once it exists
