"""The demos' readers of what the daemon and nmap print: exact cases, then any bytes at all."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from portsentry.cli.demokit import SyslogLine, nmap_ports, nmap_table, parse_syslog

NMAP_OUTPUT = """Starting Nmap 7.93 ( https://nmap.org ) at 2026-12-05 23:00 UTC
Nmap scan report for 198.18.0.1
Host is up (0.000040s latency).

PORT    STATE    SERVICE
1/tcp   closed   tcpmux
11/tcp  filtered systat
79/tcp  closed   finger

Nmap done: 1 IP address (1 host up) scanned in 0.05 seconds
"""


def test_parse_syslog_reads_the_daemons_datagrams() -> None:
    line = parse_syslog(b"<29>Dec  5 23:00:01 portsentry[4242]: attackalert: SYN/Normal scan\n\0")
    assert line == SyslogLine(pid=4242, message="attackalert: SYN/Normal scan")


def test_parse_syslog_refuses_what_is_not_a_syslog_line() -> None:
    assert parse_syslog(b"attackalert without a header") is None
    assert parse_syslog(b"<29>Dec  5 23:00:01 portsentry[12a]: x") is None


def test_parse_syslog_refuses_a_pid_no_process_can_have() -> None:
    # Before: int() of 5000 digits raised ValueError (Python's limit on digit strings) and of
    # Arabic-Indic digits gave a pid; both are now "not a syslog line".
    assert parse_syslog(b"<29>Dec  5 23:00:01 portsentry[" + b"1" * 5000 + b"]: x") is None
    assert parse_syslog("<29>Dec  5 23:00:01 portsentry[٤٢]: x".encode()) is None


@given(st.binary(max_size=300))
def test_parse_syslog_never_raises(data: bytes) -> None:
    line = parse_syslog(data)
    assert line is None or 0 <= line.pid < 10**10


_MESSAGES = st.text(max_size=80).filter(lambda text: "\0" not in text and not text.endswith("\n"))


@given(st.integers(0, 4_194_304), _MESSAGES)
def test_parse_syslog_round_trips(pid: int, message: str) -> None:
    line = parse_syslog(f"<29>Dec  5 23:00:01 portsentry[{pid}]: {message}".encode())
    assert line == SyslogLine(pid=pid, message=message)


def test_nmap_ports_and_table_read_the_port_lines() -> None:
    assert nmap_ports(NMAP_OUTPUT) == {1: "closed", 11: "filtered", 79: "closed"}
    assert nmap_table(NMAP_OUTPUT) == ["PORT    STATE    SERVICE", "1/tcp   closed   tcpmux",
                                       "11/tcp  filtered systat", "79/tcp  closed   finger"]


def test_nmap_ports_skips_what_is_no_port() -> None:
    assert nmap_ports("99999/tcp closed x\n" + "1" * 5000 + "/tcp open y\n22/tcp open ssh") == {22: "open"}


def test_nmap_table_says_so_when_there_is_none() -> None:
    assert nmap_table("Nmap done: 0 IP addresses") == ["(no port table)"]
    assert nmap_table("All 4 scanned ports on 198.18.0.1 are in ignored states.\n"
                      "Not shown: 4 filtered tcp ports (no-response)") == [
        "Not shown: 4 filtered tcp ports (no-response)"]


@given(st.text(max_size=400))
def test_nmap_readers_never_raise(output: str) -> None:
    assert all(0 <= port <= 65535 for port in nmap_ports(output))
    assert nmap_table(output)
