"""wrappers_check: hosts.allow rules that admit everyone, and whether anything uses libwrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.host import wrappers_check
from portsentry.host.wrappers_check import (
    check_wrappers,
    hosts_allow_warnings,
    wrapper_users,
    wrappers_in_use,
)

ADVICE = (
    "before hosts.deny is read, so PortSentry's hosts.deny entries do not stop them; remove or "
    "narrow that rule, or block with KILL_ROUTE or a firewall backend instead"
)

# The rules FreeBSD's stock /etc/hosts.allow ends with (shortened).
FREEBSD = """\
#
# hosts.allow access control file for "tcp wrapped" applications.
#
# Start by allowing everything (this prevents the rest of the file
# from working, so remove it when you need protection).
# The rules here work on a "First match wins" basis.
ALL : ALL : allow

# Wrapping sshd(8) is not normally a good idea, but if you
# need to do it, here's how
#sshd : .evil.cracker.example.com : deny

# Prevent those with no reverse DNS from connecting.
ALL : PARANOID : RFC931 20 : deny
"""


def test_freebsd_default() -> None:
    assert hosts_allow_warnings(FREEBSD) == [
        f"/etc/hosts.allow:7: 'ALL : ALL : allow' admits every client to every service {ADVICE}"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ALL: ALL\n", "'ALL: ALL' admits every client to every service"),
        ("all : all\n", "'all : all' admits every client to every service"),
        ("sshd, vsftpd: ALL\n", "'sshd, vsftpd: ALL' admits every client to sshd vsftpd"),
        ("ALL EXCEPT in.fingerd: ALL\n", "admits every client to every service except in.fingerd"),
        ("ALL: ALL EXCEPT 198.18.0.1\n", "admits every client except 198.18.0.1 to every service"),
        ("ALL@198.18.0.254: ALL\n", "admits every client to every service"),
        ("sshd: 0.0.0.0/0\n", "admits every client to sshd"),
        ("sshd: [::]/0\n", "admits every client to sshd"),
        ("sshd: *\n", "admits every client to sshd"),
        ("ALL: ALL: spawn /bin/echo %a >> /var/log/x\n", "admits every client to every service"),
        ("ALL : \\\n  ALL\n", "'ALL : ALL' admits every client to every service"),
    ],
)
def test_rules_that_admit_everyone(text: str, expected: str) -> None:
    (warning,) = hosts_allow_warnings(text, path="hosts.allow")
    assert warning.startswith("hosts.allow:1: ")
    assert expected in warning
    assert warning.endswith(ADVICE)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# ALL: ALL\n",
        "   # ALL: ALL\n",
        "ALL: 198.18.0.0/15\n",
        "sshd: [fd00::1]\n",
        "sshd: LOCAL\n",
        "ALL: ALL: deny\n",
        "ALL: ALL: DENY\n",
        "ALL: ALL: severity auth.info : deny\n",
        "ALL: ALL: twist /bin/echo go away\n",
        "ALL\n",
        ": ALL\n",
        "# comment \\\nALL: ALL\n",  # the continued comment swallows the rule, as in tcpd
    ],
)
def test_rules_that_do_not(text: str) -> None:
    assert hosts_allow_warnings(text) == []


def test_line_numbers_count_physical_lines() -> None:
    text = "# a\n\nsshd: 198.18.0.1 \\\n  198.18.0.2\nALL: ALL\n"
    (warning,) = hosts_allow_warnings(text, path="x")
    assert warning.startswith("x:5: 'ALL: ALL'")


def test_long_rules_are_shortened() -> None:
    text = "sshd: ALL : spawn " + "x" * 200 + "\n"
    (warning,) = hosts_allow_warnings(text)
    shown = warning.split("'")[1]
    assert len(shown) == 80
    assert shown.endswith("...")


@given(st.text(max_size=300))
def test_hosts_allow_warnings_never_raises(text: str) -> None:
    warnings = hosts_allow_warnings(text)
    assert all(isinstance(w, str) and w.startswith("/etc/hosts.allow:") for w in warnings)


@given(
    st.lists(
        st.sampled_from(["ALL", ":", " ", ",", "EXCEPT", "[", "]", "\\\n", "\n", "#", "deny", "sshd", "@"])
    )
)
def test_hosts_allow_warnings_never_raises_on_syntax_soup(parts: list[str]) -> None:
    assert isinstance(hosts_allow_warnings("".join(parts)), list)


# -- libwrap ---------------------------------------------------------------------------------


def fake_proc(root: Path, processes: dict[str, tuple[str, bytes | None]]) -> Path:
    """A /proc with pid -> (comm, maps); maps None makes it unreadable (a directory)."""
    proc = root / "proc"
    proc.mkdir()
    (proc / "self").mkdir()
    (proc / "cpuinfo").write_text("x")
    for pid, (comm, maps) in processes.items():
        d = proc / pid
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        if maps is None:
            (d / "maps").mkdir()
        else:
            (d / "maps").write_bytes(maps)
    return proc


LIBC = b"7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
WRAP = b"7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libwrap.so.0.7.6\n"


def test_running_wrapper_user_means_no_warning(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {"1": ("init", LIBC), "42": ("xinetd", LIBC + WRAP), "43": ("sshd", None)})
    assert wrapper_users(str(proc)) == (["xinetd"], 1)
    assert wrappers_in_use(str(proc), daemons=()) == []


def test_nothing_uses_libwrap(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {"1": ("init", LIBC), "7": ("sshd", LIBC)})
    assert wrappers_in_use(str(proc), daemons=()) == [
        "no running daemon uses TCP wrappers (libwrap): hosts.deny entries stop nothing here; "
        "block with KILL_ROUTE or a firewall backend instead"
    ]


def test_installed_but_not_running(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {"1": ("init", LIBC)})
    sshd = tmp_path / "sshd"
    sshd.write_bytes(b"\x7fELF" + b"\0" * 100 + b"libwrap.so.0\0libc.so.6\0")
    (warning,) = wrappers_in_use(str(proc), daemons=(str(sshd), str(tmp_path / "missing")))
    assert warning.endswith(f"(installed but not running: {sshd})")


def test_unreadable_processes_with_an_installed_wrapper_user(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {"1": ("init", None), "5": ("sh", LIBC)})
    sshd = tmp_path / "sshd"
    sshd.write_bytes(b"libwrap.so.0")
    assert wrappers_in_use(str(proc), daemons=(str(sshd),)) == []
    (warning,) = wrappers_in_use(str(proc), daemons=(str(tmp_path / "missing"),))
    assert warning.startswith("no readable running process (1 could not be read")
    assert warning.endswith(
        "and none of the common daemons (missing) uses TCP wrappers (libwrap): "
        "hosts.deny entries probably stop nothing here"
    )


def test_no_proc(tmp_path: Path) -> None:
    (warning,) = wrappers_in_use(str(tmp_path / "nope"), daemons=("/x/sshd", "/y/sshd"))
    assert warning == (
        f"{tmp_path / 'nope'} is not available, and none of the common daemons (sshd) uses TCP "
        "wrappers (libwrap): hosts.deny entries probably stop nothing here"
    )


def test_libwrap_name_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wrappers_check, "_CHUNK", 16)
    binary = tmp_path / "d"
    for offset in range(0, 20):
        binary.write_bytes(b"x" * offset + b"libwrap.so.0" + b"y" * 30)
        assert wrappers_check._links_libwrap(str(binary)), offset
    binary.write_bytes(b"libwrap.s" + b"x" * 60)
    assert not wrappers_check._links_libwrap(str(binary))


def test_check_wrappers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wrappers_check, "wrappers_in_use", lambda: ["libwrap warning"])
    allow = tmp_path / "hosts.allow"
    allow.write_text("ALL: ALL\n")
    warnings = check_wrappers(str(allow))
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{allow}:1: 'ALL: ALL' admits every client")
    assert warnings[1] == "libwrap warning"
    assert check_wrappers(str(tmp_path / "missing")) == ["libwrap warning"]
    unreadable = tmp_path / "dir"
    unreadable.mkdir()
    assert check_wrappers(str(unreadable))[0] == (
        f"{unreadable}: cannot read it (Is a directory), so rules there that admit everyone could "
        "not be checked"
    )


def test_real_system_does_not_raise() -> None:
    warnings = check_wrappers()
    assert all(isinstance(w, str) for w in warnings)
    users, unreadable = wrapper_users()
    assert unreadable >= 0
    assert all(isinstance(u, str) for u in users)
    assert os.path.isdir("/proc")
