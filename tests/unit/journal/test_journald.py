"""journald's native protocol: entries reach a datagram socket we bind, in the documented
encoding (plain and length-prefixed fields), oversized ones through a sealed memfd."""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.journal import events, journald


def parse_entry(data: bytes) -> dict[str, bytes]:
    """The reverse of the native encoding, written from the protocol description."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = newline + 1
        else:
            name = line
            (length,) = struct.unpack_from("<Q", data, newline + 1)
            start = newline + 9
            value = data[start:start + length]
            assert data[start + length:start + length + 1] == b"\n", "value not followed by newline"
            pos = start + length + 1
        fields[name.decode()] = value
    return fields


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(2.0)

    def receive(self) -> tuple[bytes, list[int]]:
        data, ancillary, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds += list(got)
        return data, fds


@pytest.fixture
def journal() -> Iterator[Journal]:
    directory = Path(tempfile.mkdtemp(prefix="ps-journal-", dir="/tmp"))
    receiver = Journal(directory / "socket")
    try:
        yield receiver
    finally:
        receiver.sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_entry_reaches_the_socket_with_our_fields(journal: Journal) -> None:
    writer = journald.JournaldWriter(str(journal.path))
    event = events.unban_event("198.18.0.2", "expired", 0)
    event.update(port=31337, mode="stcp")
    assert writer.send("attackalert: Host 198.18.0.2 unbanned", 6, **journald.event_fields(event))
    data, fds = journal.receive()
    assert fds == []
    assert parse_entry(data) == {
        "MESSAGE": b"attackalert: Host 198.18.0.2 unbanned",
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"portsentry",
        "SYSLOG_FACILITY": b"3",
        "PORTSENTRY_EVENT": b"unban",
        "PORTSENTRY_SRC": b"198.18.0.2",
        "PORTSENTRY_PORT": b"31337",
        "PORTSENTRY_MODE": b"stcp",
        "PORTSENTRY_REASON": b"expired",
    }
    writer.close()


def test_newlines_use_the_length_prefixed_form(journal: Journal) -> None:
    writer = journald.JournaldWriter(str(journal.path), facility=None)
    assert writer.send("first line\nsecond line", 5, portsentry_kind="a=b")
    data, _ = journal.receive()
    assert data.startswith(b"MESSAGE\n" + struct.pack("<Q", 22) + b"first line\nsecond line\n")
    fields = parse_entry(data)
    assert fields["MESSAGE"] == b"first line\nsecond line"
    assert fields["PORTSENTRY_KIND"] == b"a=b"
    assert "SYSLOG_FACILITY" not in fields


def test_oversized_entry_goes_through_a_sealed_memfd(journal: Journal) -> None:
    writer = journald.JournaldWriter(str(journal.path))
    big = "x" * (4 << 20)  # far beyond any datagram limit
    assert writer.send(big, 5)
    data, fds = journal.receive()
    assert data == b""
    assert len(fds) == 1
    try:
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        size = os.fstat(fds[0]).st_size
        content = os.pread(fds[0], size, 0)
    finally:
        for fd in fds:
            os.close(fd)
    assert parse_entry(content)["MESSAGE"] == big.encode()


def test_send_never_raises_and_recovers(tmp_path: Path) -> None:
    writer = journald.JournaldWriter(str(tmp_path / "absent"))
    assert writer.send("lost", 5) is False
    assert writer.failures == 1
    # The socket appears (journald restarted): the next entry gets through.
    short = Path(tempfile.mkdtemp(prefix="ps-journal-", dir="/tmp"))
    try:
        writer.path = str(short / "socket")
        receiver = Journal(short / "socket")
        assert writer.send("back", 5)
        assert parse_entry(receiver.receive()[0])["MESSAGE"] == b"back"
        receiver.sock.close()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    writer.close()


def test_bad_field_names_are_refused() -> None:
    writer = journald.JournaldWriter("/nonexistent")
    for name in ("_PID", "1ABC", "PORT-SENTRY", "X" * 65):
        with pytest.raises(ValueError, match="not a journal field name"):
            writer.entry("m", 5, **{name: "v"})


def test_event_fields_cover_the_documented_names() -> None:
    ban = events.ban_event("198.18.0.2", "nftables", None, "scan", 0)
    fields = journald.event_fields(ban)
    assert fields["PORTSENTRY_EVENT"] == "ban"
    assert fields["PORTSENTRY_SRC"] == "198.18.0.2"
    assert fields["PORTSENTRY_DURATION"] == "forever"
    assert "PORTSENTRY_TS" not in fields


def test_stderr_is_journal_matches_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    path.touch()
    with path.open("w") as handle:
        info = os.fstat(handle.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert journald.stderr_is_journal(env, handle.fileno())
        assert not journald.stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"},
                                              handle.fileno())
    for bad in ("", "12", "a:b", "1:"):
        assert not journald.stderr_is_journal({"JOURNAL_STREAM": bad}, 2)


def test_journald_available(journal: Journal, tmp_path: Path) -> None:
    assert journald.journald_available(True, str(journal.path), {})
    assert not journald.journald_available(False, str(journal.path), {})  # not started by systemd
    assert not journald.journald_available(True, str(tmp_path / "absent"), {})
    plain = tmp_path / "plain"
    plain.touch()
    assert not journald.journald_available(True, str(plain), {})


field_names = st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True)
values = st.one_of(st.text(max_size=50), st.binary(max_size=50), st.integers())


@given(st.dictionaries(field_names, values, max_size=8))
def test_encoding_round_trips(fields: dict[str, object]) -> None:
    decoded = parse_entry(journald.encode_entry(fields))
    expected = {
        name: value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        for name, value in fields.items()
    }
    assert decoded == expected
