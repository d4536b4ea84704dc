"""`portsentry demo` end to end: the narrated run succeeds with either ban backend, and it leaves
no namespace, daemon or temp dir behind, also when interrupted by Ctrl-C or SIGTERM midway."""

from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from portsentry.cli import demo
from tests.system.rig import REPO_ROOT, list_namespaces

DETECTION = "attackalert: TCP SYN/Normal scan from host: 198.18.0.2/198.18.0.2 to TCP port: "


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains `text`; the demo's
    temp dir (in the daemon's -c argument) is named after the demo's pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry.name), cmdline))
    return found


def temp_dirs(prefix: str) -> list[Path]:
    return [p for base in {Path(tempfile.gettempdir()), Path("/tmp")} for p in base.glob(f"{prefix}*")]


def assert_nothing_left(pid: int) -> None:
    prefix = f"psdemo-{pid}-"
    assert list_namespaces(prefix) == []
    assert processes_mentioning(prefix) == []
    assert temp_dirs(prefix) == []


@pytest.mark.parametrize("backend", ["nftables", "route"])
def test_demo_in_process_succeeds_and_cleans_up(monkeypatch, backend):
    if backend == "route":
        monkeypatch.setattr(demo.Demo, "nft_works", lambda self: False)
    out = io.StringIO()
    started = time.monotonic()
    status = demo.run_demo(out)
    elapsed = time.monotonic() - started
    text = out.getvalue()
    assert status == 0, text
    assert elapsed < 60, text
    assert f"psdemo-{os.getpid()}-" in text
    assert "Scanner 198.18.0.2 runs: nmap" in text
    assert DETECTION in text
    via = "nftables for 60 seconds" if backend == "nftables" else "dropped route using command"
    assert f"attackalert: Host 198.18.0.2 has been blocked via {via}" in text
    if backend == "nftables":
        assert "elements = { 198.18.0.2" in text
    else:
        assert "blackhole 198.18.0.2" in text
    first_scan = text.split("Step 1")[1].split("Step 2")[0]
    if backend == "nftables":  # banned by the kernel on the first probe: nmap learns nothing
        assert "1/tcp   filtered" in first_scan and "closed" not in first_scan.replace('"closed"', "")
    else:
        assert "1/tcp   closed" in first_scan
    assert "1/tcp   filtered" in text.split("Step 4")[1]
    assert "    ALL: 198.18.0.2\n" in text
    assert "Host: 198.18.0.2/198.18.0.2 Port: " in text
    assert f"It works: PortSentry saw 198.18.0.2's SYN scan, blocked it via {backend}" in text
    assert_nothing_left(os.getpid())


def test_demo_says_what_it_measured_and_what_the_kernel_does(monkeypatch):
    # The closing "blocked it within Xs of the first scan starting" was measured after every step,
    # the second scan included; and with the kernel ban Step 4 claimed PortSentry sees each probe
    # of a banned scanner, which the kernel drops before the capture.
    slow_step = 3.0
    show_ban = demo.Demo.show_ban

    def slow_show_ban(self: demo.Demo) -> None:
        time.sleep(slow_step)
        show_ban(self)

    monkeypatch.setattr(demo.Demo, "show_ban", slow_show_ban)
    out = io.StringIO()
    assert demo.run_demo(out) == 0, out.getvalue()
    text = out.getvalue()
    within = float(text.split("within ")[-1].split("s of the first scan")[0])
    assert within < slow_step, text
    if "(KERNEL_BAN)" in text.split("Step 2")[0]:
        assert "watches packets before the firewall" not in text
        assert "dropped by the kernel before PortSentry's capture saw them" in text
    assert_nothing_left(os.getpid())


@pytest.mark.parametrize("keep_going", [False, True])
def test_a_step_that_does_not_happen_fails_clearly(monkeypatch, keep_going):
    # The daemon watches none of the scanned ports, so nothing is detected or blocked.
    monkeypatch.setattr(demo, "WATCHED_TCP_PORTS", "2000")
    monkeypatch.setattr(demo, "DETECT_TIMEOUT", 2.0)
    monkeypatch.setattr(demo, "EFFECT_TIMEOUT", 1.0)
    out = io.StringIO()
    assert demo.run_demo(out, keep_going=keep_going) == 1
    text = out.getvalue()
    assert "!! FAILED (detection): detection: no daemon line containing" in text
    assert "It works" not in text
    if keep_going:
        assert "4 step(s) failed" in text
        assert "1/tcp   closed" in text.split("Step 4")[1]  # the follow-up scan still ran
    else:
        assert "Step 3" not in text
        assert "The demo stopped early" in text
    assert "Cleaned up: daemon stopped" in text
    assert_nothing_left(os.getpid())

def test_demo_without_root_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = io.StringIO()
    assert demo.run_demo(out) == 2
    assert "must run as root" in out.getvalue()


def test_demo_names_the_missing_package(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "nmap" else real_which(tool))
    out = io.StringIO()
    assert demo.run_demo(out) == 2
    assert "needs `nmap`" in out.getvalue()
    assert "apt install nmap" in out.getvalue()


def _reader(stream, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.parametrize(("sig", "marker"), [
    (signal.SIGINT, "Step 1: a port scan"),
    (signal.SIGTERM, "Step 3: the ban"),
])
def test_interrupted_demo_cleans_up(sig, marker):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "portsentry.cli.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 40
        while not any(marker in line for line in seen):
            assert time.monotonic() < deadline, "".join(seen)
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, "demo ended before the marker:\n" + "".join(seen)
            seen.append(line)
        # Midway: the namespaces and the daemon exist right now.
        assert len(list_namespaces(f"psdemo-{proc.pid}-")) == 2, "".join(seen)
        assert processes_mentioning(f"psdemo-{proc.pid}-"), "".join(seen)
        proc.send_signal(sig)
        status = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=5)) is not None:
        seen.append(line)
    text = "".join(seen)
    assert status == 128 + sig, text
    assert "Interrupted" in text
    assert "Cleaned up: daemon stopped" in text
    assert "Traceback" not in text
    assert_nothing_left(proc.pid)
