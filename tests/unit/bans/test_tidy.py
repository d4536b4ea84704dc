"""hosts-deny tidy: repeated rules and lines of bans that are over go, everything else stays put;
clean files and dry runs are not written; the HostsDeny lock is honoured."""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.bans.store import BanStore
from portsentry.bans.tidy import Ownership, TidyReport, format_report, plan_tidy, tidy_hosts_deny
from portsentry.responders.hostsdeny import LOCK_SUFFIX, HostsDeny, HostsDenyError

T0 = 1_700_000_000.0

MESSY = (
    b"# /etc/hosts.deny: list of hosts that are _not_ allowed to access the system.\n"
    b"#\n"
    b"ALL: 198.18.0.1\n"
    b"sshd: 198.18.7.7\n"
    b"\n"
    b"ALL: 198.18.0.1\n"  # repeated (ours or not: identical rule)
    b"ALL: 198.18.0.2\n"  # ours, ban lifted
    b"#\n"  # repeated comment: layout, stays
    b"in.telnetd: ALL \\\n"
    b"  EXCEPT 198.18.9.9\n"
    b"sshd: 198.18.7.7\n"  # repeated foreign rule
    b"ALL: 198.18.0.3\n"  # ours, ban active
    b"in.telnetd: ALL \\\n"
    b"  EXCEPT 198.18.9.9\n"  # repeated two-line rule
    b"ALL: 198.18.0.2\n"  # the same text again: one copy is ours, the other someone else's
    b"vsftpd: 198.18.3.3 \\\n"
    b"  EXCEPT 198.18.9.9\n"  # same second line as above, different rule: stays
    b"ALL: 198.18.0.4"  # ours, lifted, no final newline
)
TIDY = (
    b"# /etc/hosts.deny: list of hosts that are _not_ allowed to access the system.\n"
    b"#\n"
    b"ALL: 198.18.0.1\n"
    b"sshd: 198.18.7.7\n"
    b"\n"
    b"ALL: 198.18.0.2\n"
    b"#\n"
    b"in.telnetd: ALL \\\n"
    b"  EXCEPT 198.18.9.9\n"
    b"ALL: 198.18.0.3\n"
    b"vsftpd: 198.18.3.3 \\\n"
    b"  EXCEPT 198.18.9.9\n"
)


@pytest.fixture
def store(tmp_path: Path):
    s = BanStore(str(tmp_path / "state" / "bans.sqlite3"))
    for last, duration in (("2", 100.0), ("3", None), ("4", 100.0)):
        s.ban(
            f"198.18.0.{last}",
            reason="Connect",
            mode="tcp",
            port=23,
            now=T0,
            duration=duration,
            hosts_deny_line=f"ALL: 198.18.0.{last}",
        )
        s.own_line(f"198.18.0.{last}", f"ALL: 198.18.0.{last}", T0)
    s.lift("198.18.0.2", T0 + 1, "admin")
    s.lift("198.18.0.4", T0 + 1, "admin")
    yield s
    s.close()


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    p = tmp_path / "hosts.deny"
    p.write_bytes(MESSY)
    p.chmod(0o640)
    return p


def test_plan_tidy_exact() -> None:
    lines = MESSY.decode().split("\n")
    out, report = plan_tidy(lines, stale("ALL: 198.18.0.2", "ALL: 198.18.0.4", "ALL: 198.18.0.99"))
    assert out == TIDY.decode().split("\n")[:-1]
    assert report == TidyReport(
        removed_duplicates=[
            (6, "ALL: 198.18.0.1"),
            (11, "sshd: 198.18.7.7"),
            (13, "in.telnetd: ALL \\"),
            (14, "  EXCEPT 198.18.9.9"),
        ],
        removed_expired=[(15, "ALL: 198.18.0.2"), (18, "ALL: 198.18.0.4")],
        kept=12,
    )


def stale(*lines: str) -> Ownership:
    """One copy of each line is ours, for a ban that is over."""
    return Ownership(stale=dict.fromkeys(lines, 1))


def test_a_rule_someone_else_wrote_stays_even_when_it_reads_like_ours() -> None:
    # issue 9.3: the admin wrote "ALL: 198.18.0.2" first, so our ban never appended a copy.
    lines = ["ALL: 198.18.0.2", "x: y"]
    assert plan_tidy(lines, Ownership())[0] == lines
    # Ours was appended, then the admin added the same rule: one copy stays after our ban ends.
    out, report = plan_tidy(["ALL: 198.18.0.2", "ALL: 198.18.0.2"], stale("ALL: 198.18.0.2"))
    assert out == ["ALL: 198.18.0.2"] and len(report.removed_expired) == 1
    # With our ban still in force, our copy and one of theirs stay.
    three = ["ALL: 198.18.0.2"] * 3
    assert plan_tidy(three, Ownership(active={"ALL: 198.18.0.2": 1}))[0] == three[:2]


def test_plan_tidy_matches_stale_lines_like_hostsdeny() -> None:
    # HostsDeny ignores trailing blanks/CR when it compares; so does tidy for our lines.
    out, report = plan_tidy(["ALL: 198.18.0.2 \r", "x: y"], stale("ALL: 198.18.0.2"))
    assert out == ["x: y"]
    assert report.removed_expired == [(1, "ALL: 198.18.0.2 \r")]


def test_plan_tidy_only_whole_single_lines_are_ours() -> None:
    lines = ["ALL: 198.18.0.2 \\", "  : DENY", "ALL: 198.18.0.2"]
    out, report = plan_tidy(lines, stale("ALL: 198.18.0.2"))
    assert out == lines[:2]
    assert report.removed_expired == [(3, "ALL: 198.18.0.2")]


def test_tidy_file_exact(messy: Path, store: BanStore) -> None:
    before = messy.stat()
    report = tidy_hosts_deny(str(messy), store, T0 + 2, dry_run=False)
    assert messy.read_bytes() == TIDY
    assert [n for n, _ in report.removed_duplicates] == [6, 11, 13, 14]
    assert [n for n, _ in report.removed_expired] == [15, 18]
    assert report.kept == 12
    after = messy.stat()
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    lock = Path(str(messy) + LOCK_SUFFIX)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    # Removed lines are no longer tracked; the active ban's line still is ours.
    assert store.stale_lines(T0 + 2) == set()
    store.lift("198.18.0.3", T0 + 3, "admin")
    assert store.stale_lines(T0 + 3) == {"ALL: 198.18.0.3"}


def test_without_store_only_repeats_go(messy: Path) -> None:
    report = tidy_hosts_deny(str(messy), None, T0, dry_run=False)
    assert report.removed_expired == []
    assert [n for n, _ in report.removed_duplicates] == [6, 11, 13, 14, 15]
    assert b"ALL: 198.18.0.2\n" in messy.read_bytes()
    assert messy.read_bytes().endswith(b"\nALL: 198.18.0.4")  # no newline added


def test_expired_but_not_lifted_counts_as_over(tmp_path: Path, store: BanStore) -> None:
    p = tmp_path / "hosts.deny"
    p.write_bytes(b"ALL: 198.18.0.5\nALL: 198.18.0.3\n")
    store.ban(
        "198.18.0.5", reason="x", mode="tcp", port=1, now=T0, duration=10, hosts_deny_line="ALL: 198.18.0.5"
    )
    store.own_line("198.18.0.5", "ALL: 198.18.0.5", T0)
    assert tidy_hosts_deny(str(p), store, T0 + 5, dry_run=False).changed is False
    report = tidy_hosts_deny(str(p), store, T0 + 10, dry_run=False)
    assert report.removed_expired == [(1, "ALL: 198.18.0.5")]
    assert p.read_bytes() == b"ALL: 198.18.0.3\n"


def test_clean_file_is_not_written(tmp_path: Path, store: BanStore) -> None:
    p = tmp_path / "hosts.deny"
    p.write_bytes(TIDY)
    past = time.time_ns() - 3_600 * 10**9
    os.utime(p, ns=(past, past))
    inode = p.stat().st_ino
    # As after the tidy that made it: our copies of the lifted bans' lines are gone and forgotten.
    store.forget_lines(["ALL: 198.18.0.2", "ALL: 198.18.0.4"], T0 + 2)
    report = tidy_hosts_deny(str(p), store, T0 + 2, dry_run=False)
    assert not report.changed
    assert report.kept == 12
    assert p.stat().st_mtime_ns == past
    assert p.stat().st_ino == inode
    assert p.read_bytes() == TIDY


def test_dry_run_changes_nothing(messy: Path, store: BanStore) -> None:
    past = time.time_ns() - 3_600 * 10**9
    os.utime(messy, ns=(past, past))
    stale = store.stale_lines(T0 + 2)
    report = tidy_hosts_deny(str(messy), store, T0 + 2, dry_run=True)
    assert len(report.removed_duplicates) == 4
    assert len(report.removed_expired) == 2
    assert messy.read_bytes() == MESSY
    assert messy.stat().st_mtime_ns == past
    assert store.stale_lines(T0 + 2) == stale


def test_missing_file_is_empty_and_not_created(tmp_path: Path) -> None:
    p = tmp_path / "hosts.deny"
    assert tidy_hosts_deny(str(p), None, T0, dry_run=False) == TidyReport([], [], 0)
    assert not p.exists()


def test_symlink_is_refused(tmp_path: Path, messy: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(messy)
    with pytest.raises(HostsDenyError, match="symlink"):
        tidy_hosts_deny(str(link), None, T0, dry_run=False)
    assert messy.read_bytes() == MESSY


def test_waits_for_the_hostsdeny_lock(messy: Path) -> None:
    fd = os.open(str(messy) + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()

    def run() -> None:
        tidy_hosts_deny(str(messy), None, T0, dry_run=False)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    try:
        assert not done.wait(0.3)  # held off by the lock
        assert messy.read_bytes() == MESSY
    finally:
        os.close(fd)  # releases the lock
    t.join(10)
    assert done.is_set()
    assert messy.read_bytes() != MESSY


def test_daemon_add_after_tidy_still_dedups(messy: Path) -> None:
    tidy_hosts_deny(str(messy), None, T0, dry_run=False)
    hd = HostsDeny(str(messy))
    assert hd.add("ALL: 198.18.0.1") is False
    assert hd.add("ALL: 198.18.0.9") is True
    assert messy.read_bytes().endswith(b"\nALL: 198.18.0.4\nALL: 198.18.0.9\n")


def test_undecodable_bytes_survive(tmp_path: Path) -> None:
    p = tmp_path / "hosts.deny"
    p.write_bytes(b"# caf\xe9\nALL: 198.18.0.1\r\nALL: 198.18.0.1\r\n\xff\xfe: x\n")
    tidy_hosts_deny(str(p), None, T0, dry_run=False)
    assert p.read_bytes() == b"# caf\xe9\nALL: 198.18.0.1\r\n\xff\xfe: x\n"


def test_format_report() -> None:
    report = TidyReport(
        removed_duplicates=[(6, "ALL: 198.18.0.1")], removed_expired=[(2, "ALL: 198.18.0.2")], kept=4
    )
    assert format_report(report, path="/etc/hosts.deny") == (
        "/etc/hosts.deny: removed 1 repeated and 1 lifted/expired ban lines; 4 lines kept\n"
        "  line 2: ban over: 'ALL: 198.18.0.2'\n"
        "  line 6: repeated: 'ALL: 198.18.0.1'"
    )
    assert format_report(report, dry_run=True).startswith("hosts.deny: would remove 1 repeated")
    assert format_report(TidyReport([], [], 7)) == "hosts.deny: nothing to tidy (7 lines)"


# -- properties ------------------------------------------------------------------------------

OURS = ["ALL: 198.18.0.2", "ALL: 198.18.0.4"]
LINE = st.one_of(
    st.sampled_from(
        [
            *OURS,
            "ALL: 198.18.0.1",
            "sshd: 198.18.7.7",
            "",
            "#",
            "# comment",
            "in.telnetd: ALL \\",
            "  EXCEPT 198.18.9.9",
            "ALL: 198.18.0.2 ",
            "\\",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=["Cs"]), max_size=12),
)
LINES = st.lists(LINE, max_size=30)


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


@given(LINES, st.sets(st.sampled_from([*OURS, "x"])))
def test_plan_tidy_is_idempotent(lines: list[str], ours: set[str]) -> None:
    once, report = plan_tidy(lines, stale(*ours))
    # What was removed is no longer tracked (tidy forgets it), so the second run owns nothing.
    twice, again = plan_tidy(once, Ownership())
    assert twice == once
    assert not again.removed_duplicates and not again.removed_expired
    assert report.kept == len(once)
    assert report.kept + len(report.removed_duplicates) + len(report.removed_expired) == len(lines)


@given(LINES, st.sets(st.sampled_from(OURS)))
def test_plan_tidy_keeps_foreign_lines_in_order(lines: list[str], ours: set[str]) -> None:
    out, report = plan_tidy(lines, stale(*ours))
    assert _is_subsequence(out, lines)
    removed = {n for n, _ in report.removed_duplicates + report.removed_expired}
    # Kept lines are exactly the others, in their order.
    assert out == [line for n, line in enumerate(lines, 1) if n not in removed]
    # Comments and blank lines that start a logical line are never removed.
    after_continuation = False
    for n, line in enumerate(lines, 1):
        if not after_continuation and (
            not line.strip(" \t\r\f\v") or line.lstrip(" \t\r\f\v").startswith("#")
        ):
            assert n not in removed
        after_continuation = line.endswith("\\")
    # Every distinct foreign one-line rule survives once.
    foreign = {
        line
        for i, line in enumerate(lines)
        if line.strip()
        and not line.lstrip().startswith("#")
        and not line.endswith("\\")
        and (i == 0 or not lines[i - 1].endswith("\\"))
        and line.rstrip(" \t\r") not in ours
    }
    assert {line.rstrip(" \t\r") for line in foreign} <= {line.rstrip(" \t\r") for line in out}


@given(st.lists(st.sampled_from(["ALL: 198.18.0.1", "ALL: 198.18.0.2", "# c", ""]), max_size=20))
def test_tidy_file_matches_plan(lines: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "hosts.deny"
        p.write_text("".join(line + "\n" for line in lines))
        report = tidy_hosts_deny(str(p), None, T0, dry_run=False)
        expected, planned = plan_tidy(lines, Ownership())
        assert report == planned
        assert p.read_text() == "".join(line + "\n" for line in expected)


def test_store_lines_are_ipv4_normalised(tmp_path: Path) -> None:
    with BanStore(str(tmp_path / "b.sqlite3")) as s:
        s.ban(
            "::ffff:198.18.0.8",
            reason="x",
            mode="tcp",
            port=1,
            now=T0,
            duration=5,
            hosts_deny_line="ALL: 198.18.0.8",
        )
        s.own_line("::ffff:198.18.0.8", "ALL: 198.18.0.8", T0)
        assert s.get(IPv4Address("198.18.0.8")) is not None
        assert s.stale_lines(T0 + 5) == {"ALL: 198.18.0.8"}
