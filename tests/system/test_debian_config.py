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


# As Debian's postinst (debconf) writes /etc/default/portsentry; not in the .deb itself.
DEBIAN_DEFAULTS = 'TCP_MODE="atcp"\nUDP_MODE="sudp"\n'


def test_debian_s_untouched_files_pass_check_config_and_the_service_takes_its_modes(
        namespaces, syslog, tmp_path):
    """Debian's portsentry.conf and portsentry.ignore.static as shipped (no portsentry.ignore:
    Debian's init script builds it), its /etc/default/portsentry, and the unit's command line.
    /etc, /var and /run are overlays in a private mount namespace inside the test's network
    namespace: nothing on this host changes."""
    import re
    import shutil
    import subprocess
    import sys

    from tests.system.rig import daemon_env, popen_in, stop_process

    shipped = debian_conf().parent
    layers = tmp_path / "layers"
    for sub in ("etc-upper/portsentry", "etc-upper/default", "etc-work", "var-upper/lib/portsentry",
                "var-work"):
        (layers / sub).mkdir(parents=True)
    for name in ("portsentry.conf", "portsentry.ignore.static"):
        shutil.copy(shipped / name, layers / "etc-upper" / "portsentry" / name)
    (layers / "etc-upper" / "default" / "portsentry").write_text(DEBIAN_DEFAULTS)
    unit = (REPO_ROOT / "packaging" / "systemd" / "portsentry.service").read_text()
    (check_line,) = [line.split("=", 1)[1] for line in unit.splitlines()
                     if line.startswith("ExecStartPre=/usr/bin/portsentry check-config")]
    (start_line,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
    python = f"{sys.executable} -m portsentry"
    check = check_line.replace("/usr/bin/portsentry", python)
    start = start_line.replace("/usr/bin/portsentry", python)
    script = (
        "set -e; "
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={layers}/etc-upper,"
        f"workdir={layers}/etc-work /etc; "
        f"mount -t overlay overlay -o lowerdir=/var,upperdir={layers}/var-upper,"
        f"workdir={layers}/var-work /var; "
        "mount -t tmpfs tmpfs /run; "
        f"{check} > {tmp_path}/check.out 2>&1; "
        f"exec {start} --syslog-socket {syslog.path}"
    )
    proc = popen_in(namespaces.target, ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=daemon_env())
    try:
        syslog.wait_for("PortSentry is now active and listening.", timeout=30)
        checked = (tmp_path / "check.out").read_text()
        assert "configuration OK" in checked, checked
        assert "portsentry.ignore does not exist; using /etc/portsentry/portsentry.ignore.static" in checked
        # The modes are /etc/default/portsentry's (-atcp -sudp), not the unit's fallback flags.
        assert syslog.find("Advanced Stealth scan detection mode activated")
        assert syslog.find(re.compile(r"Going into stealth listen mode on UDP port"))
        assert syslog.find(re.compile(r"Going into listen mode on TCP port")) is None
        assert syslog.find(re.compile(r"Going into listen mode on UDP port")) is None
    finally:
        stop_process(proc)
    assert not (Path("/etc/portsentry")).exists()  # the host's /etc is as it was
