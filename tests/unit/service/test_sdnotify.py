"""sd_notify: datagrams reach a socket we bind (path and abstract), and no socket means no-op."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portsentry.service import sdnotify


class Receiver:
    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


@pytest.fixture
def path_socket() -> Iterator[tuple[Receiver, dict[str, str]]]:
    # tmp_path can be longer than AF_UNIX allows.
    directory = Path(tempfile.mkdtemp(prefix="ps-notify-", dir="/tmp"))
    receiver = Receiver(str(directory / "notify"))
    try:
        yield receiver, {"NOTIFY_SOCKET": str(directory / "notify")}
    finally:
        receiver.sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_ready_reaches_a_path_socket(path_socket: tuple[Receiver, dict[str, str]]) -> None:
    receiver, env = path_socket
    assert sdnotify.ready(env) is True
    assert receiver.recv() == "READY=1"


def test_abstract_namespace_address() -> None:
    name = f"portsentry-test-{os.getpid()}-{secrets.token_hex(4)}"
    receiver = Receiver(b"\0" + name.encode())
    try:
        assert sdnotify.stopping({"NOTIFY_SOCKET": "@" + name}) is True
        assert receiver.recv() == "STOPPING=1"
    finally:
        receiver.sock.close()


def test_reloading_carries_monotonic_usec(path_socket: tuple[Receiver, dict[str, str]]) -> None:
    receiver, env = path_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(environ=env)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.recv().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert sdnotify.reloading(12345, env)
    assert receiver.recv() == "RELOADING=1\nMONOTONIC_USEC=12345"


def test_status_is_one_line(path_socket: tuple[Receiver, dict[str, str]]) -> None:
    receiver, env = path_socket
    assert sdnotify.status("watching 26 TCP ports\nand 21 UDP ports", env)
    assert receiver.recv() == "STATUS=watching 26 TCP ports and 21 UDP ports"


def test_notify_sends_arbitrary_assignments(path_socket: tuple[Receiver, dict[str, str]]) -> None:
    receiver, env = path_socket
    assert sdnotify.notify("READY=1\nSTATUS=ok", env)
    assert receiver.recv() == "READY=1\nSTATUS=ok"


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_unusable_socket_values_are_a_no_op(value: str) -> None:
    env = {"NOTIFY_SOCKET": value} if value else {}
    assert sdnotify.ready(env) is False
    assert sdnotify.status("x", env) is False


def test_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    assert sdnotify.ready({"NOTIFY_SOCKET": str(tmp_path / "absent")}) is False


def test_defaults_to_the_process_environment(
    path_socket: tuple[Receiver, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, env = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.ready() is True
    assert receiver.recv() == "READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.ready() is False
    assert receiver.nothing_waiting()


def test_socket_address_forms() -> None:
    assert sdnotify.socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert sdnotify.socket_address("@abc") == b"\0abc"
    assert sdnotify.socket_address("abc") is None
