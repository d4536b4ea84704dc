"""The unit suite's offline guard (tests/unit/conftest.py) works (issue 9.10)."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.unit.conftest import OfflineViolation


def test_the_guard_refuses_the_network_and_package_downloads() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(OfflineViolation):
        sock.connect(("198.18.0.1", 9))
    with pytest.raises(OfflineViolation):
        subprocess.run(["apt-get", "download", "portsentry"], check=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex(("127.0.0.1", 9)) != 0  # loopback is fine (nothing listens)
