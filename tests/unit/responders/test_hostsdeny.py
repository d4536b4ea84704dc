"""HostsDeny: no duplicates, other lines untouched, safe against symlinks and concurrent appenders."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.core.probe import Mode
from portsentry.responders.hostsdeny import LOCK_SUFFIX, HostsDeny, HostsDenyError
from portsentry.responders.substitute import hosts_deny_entry

SRC = str(Path(__file__).resolve().parents[3] / "src")

ORIGINAL = b"# hosts.deny\n#\nsshd: 198.18.0.9\n\nALL: 198.18.0.1\nin.telnetd: ALL\n"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "hosts.deny"
    p.write_bytes(ORIGINAL)
    p.chmod(0o644)
    return p


def test_add_appends_once(path: Path) -> None:
    hd = HostsDeny(str(path))
    assert hd.add("ALL: 198.18.0.5") is True
    assert hd.add("ALL: 198.18.0.5") is False
    assert path.read_bytes() == ORIGINAL + b"ALL: 198.18.0.5\n"


def test_existing_line_with_trailing_blanks_or_cr_is_a_duplicate(path: Path) -> None:
    path.write_bytes(b"ALL: 198.18.0.5 \t\r\nALL: 198.18.0.6\r\n")
    hd = HostsDeny(str(path))
    assert hd.add("ALL: 198.18.0.5") is False
    assert hd.add("ALL: 198.18.0.6") is False
    assert hd.add("ALL: 198.18.0.6 ") is False


def test_only_exact_whole_lines_count(path: Path) -> None:
    hd = HostsDeny(str(path))
    # Prefixes, suffixes and leading blanks are different lines (198.18.0.1 is in ORIGINAL).
    for line in ("ALL: 198.18.0.10", "ALL: 198.18.0", " ALL: 198.18.0.1", "all: 198.18.0.1"):
        assert hd.add(line) is True, line
    assert hd.add("ALL: 198.18.0.1") is False


def test_trailing_blanks_are_not_written(path: Path) -> None:
    HostsDeny(str(path)).add("ALL: 198.18.0.5  ")
    assert path.read_bytes().endswith(b"\nALL: 198.18.0.5\n")


def test_add_to_file_without_trailing_newline(path: Path) -> None:
    path.write_bytes(b"# comment\nsshd: 198.18.0.9")
    assert HostsDeny(str(path)).add("ALL: 198.18.0.5")
    assert path.read_bytes() == b"# comment\nsshd: 198.18.0.9\nALL: 198.18.0.5\n"


def test_add_to_empty_file(path: Path) -> None:
    path.write_bytes(b"")
    assert HostsDeny(str(path)).add("ALL: 198.18.0.5")
    assert path.read_bytes() == b"ALL: 198.18.0.5\n"


def test_ipv6_entry_is_bracketed(path: Path) -> None:
    hd = HostsDeny(str(path))
    line = hosts_deny_entry("ALL: $TARGET$", IPv6Address("fd00::2"), 22, Mode.STCP)
    assert hd.add(line)
    assert path.read_bytes().endswith(b"\nALL: [fd00::2]\n")
    v4 = hosts_deny_entry("ALL: $TARGET$ : DENY", IPv4Address("198.18.0.2"), 22, Mode.TCP)
    assert hd.add(v4)
    assert hd.lines()[-2:] == ["ALL: [fd00::2]", "ALL: 198.18.0.2 : DENY"]


def test_missing_file_is_created_0644(tmp_path: Path) -> None:
    p = tmp_path / "hosts.deny"
    old = os.umask(0o077)
    try:
        hd = HostsDeny(str(p))
        assert hd.lines() == []
        assert hd.remove("ALL: 198.18.0.5") is False
        assert not p.exists()
        assert hd.add("ALL: 198.18.0.5")
    finally:
        os.umask(old)
    assert p.read_bytes() == b"ALL: 198.18.0.5\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert stat.S_IMODE(Path(str(p) + LOCK_SUFFIX).stat().st_mode) == 0o600


def test_remove_takes_one_copy_and_keeps_everything_else_in_place(path: Path) -> None:
    path.write_bytes(
        b"# keep me\nALL: 198.18.0.5\nsshd: 198.18.0.5\nALL: 198.18.0.5 \r\n"
        b"\n# ALL: 198.18.0.5\nALL: 198.18.0.50\nALL: [fd00::5]\nALL: 198.18.0.5"
    )
    path.chmod(0o640)
    inode = path.stat().st_ino
    hd = HostsDeny(str(path))
    # One copy per call: the one we own. Identical copies someone else wrote stay (issue 9.3).
    assert hd.remove("ALL: 198.18.0.5") is True
    assert path.read_bytes() == (
        b"# keep me\nsshd: 198.18.0.5\nALL: 198.18.0.5 \r\n"
        b"\n# ALL: 198.18.0.5\nALL: 198.18.0.50\nALL: [fd00::5]\nALL: 198.18.0.5"
    )
    assert hd.remove("ALL: 198.18.0.5") is True
    assert hd.remove("ALL: 198.18.0.5") is True
    assert path.read_bytes() == (
        b"# keep me\nsshd: 198.18.0.5\n\n# ALL: 198.18.0.5\nALL: 198.18.0.50\nALL: [fd00::5]\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino == inode  # rewritten in place
    assert hd.remove("ALL: 198.18.0.5") is False
    assert hd.remove("ALL: [fd00::5]") is True
    assert hd.lines() == ["# keep me", "sshd: 198.18.0.5", "", "# ALL: 198.18.0.5", "ALL: 198.18.0.50"]


def test_remove_without_match_does_not_rewrite(path: Path) -> None:
    inode = path.stat().st_ino
    assert HostsDeny(str(path)).remove("ALL: 198.18.0.77") is False
    assert path.stat().st_ino == inode
    assert path.read_bytes() == ORIGINAL


def test_remove_leaves_no_temp_files(path: Path) -> None:
    hd = HostsDeny(str(path))
    hd.remove("ALL: 198.18.0.1")
    assert sorted(p.name for p in path.parent.iterdir()) == ["hosts.deny", "hosts.deny" + LOCK_SUFFIX]


def test_non_utf8_bytes_survive_and_round_trip(path: Path) -> None:
    path.write_bytes(b"# caf\xe9\nALL: \xff\xfe\nALL: 198.18.0.5\n")
    hd = HostsDeny(str(path))
    lines = hd.lines()
    assert hd.add(lines[1]) is False
    assert hd.remove(lines[1]) is True
    assert path.read_bytes() == b"# caf\xe9\nALL: 198.18.0.5\n"


@pytest.mark.parametrize("bad", ["ALL: 1.2.3.4\nALL: ALL", "ALL: 1.2.3.4\rX", "a\0b", "", "  \r"])
def test_lines_must_be_single_non_empty_lines(path: Path, bad: str) -> None:
    hd = HostsDeny(str(path))
    with pytest.raises(ValueError):
        hd.add(bad)
    with pytest.raises(ValueError):
        hd.remove(bad)
    assert path.read_bytes() == ORIGINAL


def test_symlink_refused(path: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.deny"
    link.symlink_to(path)
    hd = HostsDeny(str(link))
    for op in (lambda: hd.add("ALL: 198.18.0.5"), lambda: hd.remove("ALL: 198.18.0.1"), hd.lines):
        with pytest.raises(HostsDenyError, match="symlink"):
            op()
    assert path.read_bytes() == ORIGINAL


def test_dangling_symlink_refused_not_created(tmp_path: Path) -> None:
    link = tmp_path / "hosts.deny"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HostsDenyError, match="symlink"):
        HostsDeny(str(link)).add("ALL: 198.18.0.5")
    assert not (tmp_path / "elsewhere").exists()


def test_lock_file_symlink_refused(path: Path, tmp_path: Path) -> None:
    Path(str(path) + LOCK_SUFFIX).symlink_to(tmp_path / "victim")
    with pytest.raises(HostsDenyError, match="symlink"):
        HostsDeny(str(path)).add("ALL: 198.18.0.5")
    assert not (tmp_path / "victim").exists()


def test_loose_lock_file_refused(path: Path) -> None:
    lock = Path(str(path) + LOCK_SUFFIX)
    lock.touch()
    lock.chmod(0o644)
    with pytest.raises(HostsDenyError, match="chmod 600"):
        HostsDeny(str(path)).add("ALL: 198.18.0.5")


def test_world_writable_refused(path: Path) -> None:
    path.chmod(0o646)
    with pytest.raises(HostsDenyError, match="world-writable"):
        HostsDeny(str(path)).add("ALL: 198.18.0.5")
    assert path.read_bytes() == ORIGINAL


def test_not_a_regular_file_refused(tmp_path: Path) -> None:
    (tmp_path / "hosts.deny").mkdir()
    with pytest.raises((HostsDenyError, IsADirectoryError)):
        HostsDeny(str(tmp_path / "hosts.deny")).lines()


def test_world_writable_directory_without_sticky_bit_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(HostsDenyError, match="sticky"):
        HostsDeny(str(d / "hosts.deny")).add("ALL: 198.18.0.5")
    d.chmod(0o1777)
    assert HostsDeny(str(d / "hosts.deny")).add("ALL: 198.18.0.5")


def test_lock_held_elsewhere_times_out(path: Path) -> None:
    hd = HostsDeny(str(path), lock_timeout=0.2)
    hd.lines()  # creates the lock file
    fd = os.open(str(path) + LOCK_SUFFIX, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(HostsDenyError, match="still locked"):
            hd.add("ALL: 198.18.0.5")
    finally:
        os.close(fd)
    assert hd.add("ALL: 198.18.0.5")


def test_threads_add_the_same_line_once(path: Path) -> None:
    hd = HostsDeny(str(path))
    others = [HostsDeny(str(path)) for _ in range(3)]  # separate instances lock via flock
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def worker(i: int) -> None:
        target = hd if i % 2 else others[i % 3]
        barrier.wait()
        for n in range(20):
            results.append(target.add(f"ALL: 198.18.1.{n}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 20
    lines = hd.lines()
    for n in range(20):
        assert lines.count(f"ALL: 198.18.1.{n}") == 1


def test_processes_add_the_same_lines_once(path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from portsentry.responders.hostsdeny import HostsDeny
        hd = HostsDeny({str(path)!r})
        for n in range(100):
            hd.add(f"ALL: 198.18.2.{{n}}")
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    hd = HostsDeny(str(path))
    for n in range(100):
        hd.add(f"ALL: 198.18.2.{n}")
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    lines = hd.lines()
    for n in range(100):
        assert lines.count(f"ALL: 198.18.2.{n}") == 1


APPENDER = """
import os, sys, time
path, count, started = sys.argv[1], int(sys.argv[2]), sys.argv[3]
open(started, "w").close()
for i in range(count):
    # What `printf ... >> file` does: open O_APPEND, one write, close; no lock.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, f"ALL: foreign-{i}\\n".encode())
    os.close(fd)
    time.sleep(0.0005)
"""


def _cycle_while(proc: subprocess.Popen[bytes], hd: HostsDeny, at_least: int) -> int:
    ours = "ALL: 198.18.3.3"
    cycles = 0
    while cycles < at_least or proc.poll() is None:
        assert hd.add(ours) is True
        assert hd.remove(ours) is True
        cycles += 1
    assert hd.add(ours) is True
    return cycles


@pytest.mark.parametrize("appender", ["python", "shell"])
def test_concurrent_lockless_appender_loses_nothing(
    path: Path, tmp_path: Path, appender: str
) -> None:
    started = tmp_path / "started"
    if appender == "python":
        argv = [sys.executable, "-c", APPENDER, str(path), "500", str(started)]
    else:
        loop = (
            ': > "$3"; i=0; while [ $i -lt "$2" ]; do '
            'printf "ALL: foreign-%d\\n" $i >> "$1"; i=$((i+1)); done'
        )
        argv = ["/bin/sh", "-c", loop, "sh", str(path), "500", str(started)]
    hd = HostsDeny(str(path))
    proc = subprocess.Popen(argv)
    while not started.exists() and proc.poll() is None:
        pass
    cycles = _cycle_while(proc, hd, at_least=200)
    assert proc.wait(timeout=60) == 0
    assert cycles >= 200
    lines = hd.lines()
    missing = [i for i in range(500) if f"ALL: foreign-{i}" not in lines]
    assert missing == []
    foreign = [line for line in lines if line.startswith("ALL: foreign-")]
    assert len(foreign) == 500  # none copied twice by remove()'s catch-up
    assert lines.count("ALL: 198.18.3.3") == 1
    # Under load this once found 508 lines, a blank one among the foreign lines: an append seen
    # half done (test_an_append_seen_half_done_leaves_no_blank_line). Say which line is extra.
    others = [line for line in lines if not line.startswith("ALL: foreign-") and line != "ALL: 198.18.3.3"]
    assert len(lines) == 6 + 500 + 1, f"besides ours and the 500 foreign lines: {others!r}"
    # Everything that was there before is still there, first and in order.
    assert "\n".join(lines[:6]) + "\n" == ORIGINAL.decode()


def test_appends_during_a_rewrite_are_kept_even_without_a_lease(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the file system has no leases, late appends are caught by the size checks.
    import contextlib

    from portsentry.journal.fileio import pwrite_all as real

    hd = HostsDeny(str(path))
    assert hd.add("ALL: 198.18.0.9")
    appended: list[int] = []

    def pwrite_then_append(fd: int, data: bytes, offset: int) -> None:
        real(fd, data, offset)
        if len(appended) < 2:  # a lockless `printf >> hosts.deny` right after each of our writes
            with open(path, "ab") as other:
                other.write(f"ALL: foreign-{len(appended)}\n".encode())
            appended.append(1)

    monkeypatch.setattr("portsentry.responders.hostsdeny._write_lease",
                        lambda fd, timeout: contextlib.nullcontext())
    monkeypatch.setattr("portsentry.responders.hostsdeny.pwrite_all", pwrite_then_append)
    assert hd.remove("ALL: 198.18.0.9")
    assert path.read_bytes() == ORIGINAL + b"ALL: foreign-0\nALL: foreign-1\n"


def test_a_write_lease_holds_other_openers_off_until_the_rewrite_is_done(path: Path) -> None:
    from portsentry.responders.hostsdeny import _write_lease

    fd = os.open(path, os.O_RDWR)
    try:
        with _write_lease(fd, 1.0):
            other = subprocess.Popen([sys.executable, "-c",
                                      f"open({str(path)!r}, 'ab').write(b'ALL: late\\n')"])
            time.sleep(0.5)
            assert other.poll() is None  # its open() waits for the lease
            assert b"late" not in os.pread(fd, 65536, 0)
        assert other.wait(timeout=10) == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == ORIGINAL + b"ALL: late\n"


def test_a_line_already_there_is_not_ours(path: Path) -> None:
    # issue 9.3: the admin's (or fail2ban's) identical line: nothing appended, nothing recorded.
    path.write_bytes(ORIGINAL + b"ALL: 198.18.0.7\n")
    recorded: list[str] = []
    hd = HostsDeny(str(path))
    assert hd.add("ALL: 198.18.0.7", on_append=lambda: recorded.append("ours")) is False
    assert recorded == []
    assert hd.add("ALL: 198.18.0.8", on_append=lambda: recorded.append("ours")) is True
    assert recorded == ["ours"]


def test_a_failing_on_append_writes_nothing(path: Path) -> None:
    def refuse() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        HostsDeny(str(path)).add("ALL: 198.18.0.8", on_append=refuse)
    assert path.read_bytes() == ORIGINAL


def test_a_short_append_is_rolled_back(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 9.4: ENOSPC after a few bytes left "ALL: 198.18." behind, which denies 198.18.0.0/16.
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[:12])

    monkeypatch.setattr("os.write", full_disk)
    with pytest.raises(OSError, match="short write"):
        HostsDeny(str(path)).add("ALL: 198.18.0.66")
    monkeypatch.undo()
    assert path.read_bytes() == ORIGINAL


def test_a_failed_rewrite_puts_the_old_content_back(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path.write_bytes(ORIGINAL + b"ALL: 198.18.0.9\n")
    before = path.read_bytes()

    def no_room(fd: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("os.ftruncate", no_room)
    with pytest.raises(OSError):
        HostsDeny(str(path)).remove("ALL: 198.18.0.9")
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_lock_file_can_live_elsewhere(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "hosts.deny"
    target.parent.mkdir()
    lock = tmp_path / "run" / "portsentry" / "hosts.deny.lock"
    hd = HostsDeny(str(target), lock_path=str(lock))
    assert hd.add("ALL: 198.18.0.1")
    assert sorted(p.name for p in target.parent.iterdir()) == ["hosts.deny"]  # nothing else in /etc
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert stat.S_IMODE(lock.parent.stat().st_mode) == 0o700


def test_a_read_only_hosts_deny_says_what_to_do(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_open = os.open

    def read_only(target: object, flags: int, *args: object) -> int:
        if str(target) == str(path) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(target, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("os.open", read_only)
    with pytest.raises(HostsDenyError, match="restart portsentry to write it again"):
        HostsDeny(str(path)).add("ALL: 198.18.0.4")


def test_an_append_seen_half_done_leaves_no_blank_line(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lockless appender's line written across a page boundary is visible for a moment
    without its end (seen once in 150 loaded runs of the test above: a blank line between two
    foreign lines). Here its writer finishes right after add() has looked at the last byte."""
    path.write_bytes(ORIGINAL + b"ALL: foreign-24")  # "3\n" still to come
    real_pread = os.pread
    finished: list[bool] = []

    def pread_then_finish(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        if length == 1 and not finished:
            finished.append(True)
            with open(path, "ab") as writer:
                writer.write(b"3\n")
        return data

    hd = HostsDeny(str(path))
    monkeypatch.setattr(os, "pread", pread_then_finish)
    assert hd.add("ALL: 198.18.3.3") is True
    monkeypatch.undo()
    assert finished == [True]
    assert path.read_bytes() == ORIGINAL + b"ALL: foreign-243\nALL: 198.18.3.3\n"


def test_an_unterminated_last_line_still_gets_its_newline(path: Path) -> None:
    path.write_bytes(ORIGINAL + b"ALL: 198.18.0.7")  # written by an editor without a final newline
    assert HostsDeny(str(path)).add("ALL: 198.18.3.3") is True
    assert path.read_bytes() == ORIGINAL + b"ALL: 198.18.0.7\nALL: 198.18.3.3\n"


def tcpd_rules(data: bytes) -> list[bytes]:
    """The non-blank rules of a hosts.deny as tcpd's xgets reads them: a line ending in a
    backslash and newline is joined to the next. An unterminated last line is read as it is,
    but for a final backslash: appending must end that line, and then the backslash continues
    it (into the blank line that HostsDeny puts after it); as a word of a rule it matched nothing."""
    rules: list[bytes] = []
    current = b""
    parts = data.split(b"\n")
    for index, part in enumerate(parts):
        if index == len(parts) - 1:
            rules.append(current + part.removesuffix(b"\\"))
        elif part.endswith(b"\\"):
            current += part[:-1]
        else:
            rules.append(current + part)
            current = b""
    return [rule.rstrip(b" \t\r") for rule in rules if rule.strip()]


OURS = b"ALL: 198.18.0.5"
PIECES = [OURS, b"sshd: 198.18.0.9", b"# note", b"\\", b"\n", b"\r\n", b" ", b"\\\n"]


def test_a_rule_continued_by_a_backslash_is_not_joined_to_ours(path: Path) -> None:
    # The admin's last line ended in a backslash: our line was appended right after it, so tcpd
    # read "sshd: 198.18.0.9 ALL: 198.18.0.5" (one broken rule) and the ban was not in force.
    # And a copy of our line that continues someone's rule is theirs, not a rule of its own.
    hd = HostsDeny(str(path))
    for before in (b"sshd: 198.18.0.9 \\\n", b"sshd: 198.18.0.9 \\", b"sshd: 198.18.0.9 \\\n" + OURS + b"\n"):
        path.write_bytes(before)
        assert hd.add(OURS.decode()) is True
        assert tcpd_rules(path.read_bytes())[-1] == OURS
        assert hd.remove(OURS.decode()) is True
        assert tcpd_rules(path.read_bytes()) == tcpd_rules(before)
        path.write_bytes(before)  # the same through the bulk calls (block --file, restore)
        assert hd.add_many([OURS.decode()]) == [OURS.decode()]
        assert tcpd_rules(path.read_bytes())[-1] == OURS
        assert hd.remove_many([OURS.decode()]) == 1
        assert tcpd_rules(path.read_bytes()) == tcpd_rules(before)


@given(st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join))
def test_our_line_is_a_rule_of_its_own_and_its_removal_leaves_the_others(before: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        deny = Path(directory) / "hosts.deny"
        deny.write_bytes(before)
        hd = HostsDeny(str(deny))
        added = hd.add(OURS.decode())
        after = deny.read_bytes()
        assert OURS in tcpd_rules(after)
        if not added:
            assert after == before
            return
        assert after.startswith(before)
        assert hd.remove(OURS.decode()) is True
        assert tcpd_rules(deny.read_bytes()) == tcpd_rules(before)
