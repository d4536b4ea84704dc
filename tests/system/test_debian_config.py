"""Debian's real portsentry 1.2-14 configuration loads as 1.2 reads it.

A system test because it fetches Debian's package (scripts/fetch-debian-portsentry, which
`scripts/setup` runs too): unit tests run offline (issue 9.10).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from portsentry.config.settings import load_config
from tests.unit.config.test_settings import CLASSIC_TCP, CLASSIC_UDP, _round_trip

REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch-debian-portsentry"
DEBIAN_CONF = REPO_ROOT / ".cache" / "debian-portsentry" / "etc" / "portsentry" / "portsentry.conf"


def debian_conf() -> Path:
    if not DEBIAN_CONF.is_file():
        result = subprocess.run(
            [str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0 or not DEBIAN_CONF.is_file():
            pytest.fail(
                f"could not fetch Debian's portsentry package (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
    return DEBIAN_CONF


def test_debian_config_loads_as_1_2_reads_it() -> None:
    loaded = load_config(str(debian_conf()))
    assert loaded.warnings == ()
    config = loaded.config
    assert config.tcp_ports == tuple(sorted(set(map(int, CLASSIC_TCP.split(",")))))
    assert config.udp_ports == tuple(sorted(set(map(int, CLASSIC_UDP.split(",")))))
    assert (config.advanced_ports_tcp, config.advanced_ports_udp) == (1024, 1024)
    assert config.advanced_exclude_tcp == (113, 139)
    assert config.advanced_exclude_udp == (67, 137, 138, 520)
    assert config.ignore_file == "/etc/portsentry/portsentry.ignore"
    assert config.history_file == "/var/lib/portsentry/portsentry.history"
    assert config.blocked_file == "/var/lib/portsentry/portsentry.blocked"
    assert config.resolve_host is False  # written RESOLVE_HOST = "0", with spaces
    assert (config.block_tcp, config.block_udp) == (0, 0)
    assert config.kill_route == "/sbin/route add -host $TARGET$ reject"
    assert config.kill_hosts_deny == "ALL: $TARGET$ : DENY"
    assert config.kill_run_cmd is None
    assert config.kill_run_cmd_first is False
    assert config.scan_trigger == 0
    assert config.port_banner is None
    _round_trip(config)
