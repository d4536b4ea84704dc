"""Unit tests run offline (issue 9.10): a connection to anything but this host, or a package
download, fails the test that tries it. System tests and benchmarks may fetch what they need."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import pytest

_FETCHERS = {"apt", "apt-get", "curl", "wget", "pip", "pip3", "fetch-debian-portsentry"}


def _local(address: Any) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str):
        return True  # AF_UNIX paths, AF_NETLINK (pid, groups), ...
    if host in ("localhost", ""):
        return True
    try:
        return ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it is already network


class OfflineViolation(AssertionError):
    pass


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_popen_init = subprocess.Popen.__init__

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address):
            raise OfflineViolation(f"unit tests run offline: connect to {address!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    def popen_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [args] if isinstance(args, str | bytes) else list(args)
        program = str(argv[0]).rsplit("/", 1)[-1] if argv else ""
        if program in _FETCHERS:
            raise OfflineViolation(f"unit tests run offline: {program} fetches from the network")
        real_popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    yield



class CommandSyslog:
    """What the admin commands run in a test wrote to syslog (service.audit.CommandLog)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def messages(self) -> list[str]:
        found: list[str] = []
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found
            found.append(data.decode().split("]: ", 1)[1])


@pytest.fixture(autouse=True)
def command_syslog(monkeypatch: pytest.MonkeyPatch) -> Iterator[CommandSyslog]:
    """An admin command that works without the daemon writes its lines to syslog: here, never to
    this machine's /dev/log."""
    import shutil
    import tempfile

    from portsentry.cli import admin_commands
    from portsentry.journal.receiver import bind_datagram

    directory = tempfile.mkdtemp(prefix="ps-unit-log-", dir="/tmp")
    try:
        with contextlib.closing(bind_datagram(f"{directory}/log")) as sock:
            monkeypatch.setattr(admin_commands, "SYSLOG_SOCKET", f"{directory}/log")
            yield CommandSyslog(sock)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
