"""Release artefacts and the conventions around the package (issue 14): `python -m build` makes a
wheel and an sdist; the wheel, installed into a fresh venv, runs and carries the manual pages and
shell completions; logrotate accepts the snippet; a rotated event log is reopened on SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from portsentry import __version__
from tests.system.rig import eventually, run_in

pytestmark = [pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_into_a_fresh_venv_with_its_pages_and_completions(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    argv = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)]
    built = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheels = list(dist.glob("portsentry-*.whl"))
    sdists = list(dist.glob("portsentry-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    assert wheels[0].name.startswith(f"portsentry-{__version__}-")  # the version lives in one place

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # --no-deps: prometheus-client is imported only when METRICS_LISTEN is set; nothing is fetched.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
                   check=True, timeout=120)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    version = subprocess.run([str(venv / "bin" / "portsentry"), "--version"], capture_output=True, text=True,
                             timeout=60, check=True, env=env)
    assert version.stdout.strip() == f"portsentry {__version__}"
    conf = tmp_path / "portsentry.conf"
    conf.write_text(f'TCP_PORTS="1,79"\nIGNORE_FILE="{tmp_path}/ignore"\nSTATE_DIR="{tmp_path}/state"\n')
    (tmp_path / "ignore").write_text("127.0.0.1\n")
    checked = subprocess.run([str(venv / "bin" / "portsentry"), "check-config", "-c", str(conf), "-stcp"],
                             capture_output=True, text=True, timeout=60, check=False, env=env)
    assert checked.returncode == 0 and "configuration OK" in checked.stdout, checked.stderr
    for installed in ("share/man/man8/portsentry.8", "share/man/man5/portsentry.conf.5",
                      "share/bash-completion/completions/portsentry.bash",
                      "share/zsh/vendor-completions/_portsentry",
                      "share/fish/vendor_completions.d/portsentry.fish"):
        assert (venv / installed).is_file(), installed
    if shutil.which("man"):
        page = subprocess.run(["man", "-l", str(venv / "share/man/man5/portsentry.conf.5")],
                              capture_output=True, text=True, timeout=60, check=True,
                              env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        assert "KERNEL_BAN" in page.stdout


def test_logrotate_accepts_the_snippet(tmp_path: Path) -> None:
    if shutil.which("logrotate") is None:
        pytest.fail("logrotate is installed by scripts/setup")
    done = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"),
                           str(REPO / "packaging" / "logrotate" / "portsentry")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_a_rotated_event_log_is_reopened_on_sighup(daemon_factory, namespaces, syslog, tmp_path):
    net = namespaces
    events = tmp_path / "events.jsonl"
    daemon = daemon_factory("-tcp", EVENT_LOG=str(events), TCP_PORTS="1,2")

    def connect(port: int) -> None:
        run_in(net.scanner, [sys.executable, "-c", f"import socket\ntry: socket.create_connection(("
                             f"'{net.target_ip4}', {port}), 2).close()\nexcept OSError: pass"], timeout=10)

    connect(1)
    eventually(lambda: events.exists() and events.read_text().strip(), what="first event")
    events.rename(tmp_path / "events.jsonl.1")  # what logrotate does
    os.kill(daemon.pid, signal.SIGHUP)
    syslog.wait_for("PortSentry reloaded its configuration")
    connect(2)
    eventually(lambda: events.exists() and any(json.loads(line).get("port") == 2
                                               for line in events.read_text().splitlines()),
               what="an event in the new file")
    rotated = (tmp_path / "events.jsonl.1").read_text().splitlines()
    assert rotated and all(json.loads(line).get("port") != 2 for line in rotated)
