"""A test run that is interrupted leaves nothing behind: not its namespaces, not its daemons or
redis-server, not its socket directories. A pytest of its own runs held_by_interrupt.py (a
daemon from the fixtures, a fleet from test_fleet's context manager) and is ended as CI jobs
and admins end runs: Ctrl-C, SIGTERM, Ctrl-C again while the first one's teardown runs, and
SIGKILL (a CI runner's last word after its grace period)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system import rig

pytestmark = pytest.mark.system

HELD = Path(__file__).with_name("held_by_interrupt.py")
TAG_ENV = "PORTSENTRY_HELD_TAG"


def tagged(tag: str) -> list[str]:
    """Processes started with TAG_ENV=tag, as "pid command" (every child inherits it)."""
    wanted = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {command[:100]}")
    return found


def leftovers(prefix: str, tag: str, held: dict[str, Any]) -> list[str]:
    # The pids too: redis-server writes its title over its environment, hiding the tag.
    return [*rig.list_namespaces(prefix), *tagged(tag),
            *(f"pid {pid}" for pid in held.get("pids", []) if alive(pid)),
            *(d for d in held.get("dirs", []) if Path(d).exists())]


def remove(prefix: str, tag: str, held: dict[str, Any]) -> None:
    """What a failing case left, removed so that the failure leaks nothing itself."""
    for pid in [int(entry.split()[0]) for entry in tagged(tag)] + held.get("pids", []):
        with contextlib.suppress(ProcessLookupError):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(rig.RigError):
        rig.destroy_namespaces(rig.list_namespaces(prefix))
    for directory in held.get("dirs", []):
        shutil.rmtree(directory, ignore_errors=True)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.parametrize(("signals", "status"), [
    pytest.param([signal.SIGINT], 2, id="ctrl-c"),
    pytest.param([signal.SIGTERM], 2, id="sigterm"),
    pytest.param([signal.SIGINT, signal.SIGINT], 2, id="ctrl-c-twice"),
    pytest.param([signal.SIGKILL], -signal.SIGKILL, id="sigkill"),
])
def test_an_interrupted_run_leaves_nothing_behind(tmp_path: Path, signals: list[signal.Signals],
                                                  status: int) -> None:
    ready, tag = tmp_path / "held.json", secrets.token_hex(8)
    env = {**rig.daemon_env(), "HELD_READY": str(ready), TAG_ENV: tag}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
         str(tmp_path / "inner"), str(HELD)],
        cwd=rig.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prefix = f"ps-{run.pid}-"
    held: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert run.poll() is None, f"the inner run ended early:\n{run.communicate()[0]}"
            assert time.monotonic() < deadline, "the inner run never got its fleet up"
            time.sleep(0.1)
        held = json.loads(ready.read_text())
        assert all(name.startswith(prefix) for name in held["namespaces"]), held
        assert all(alive(pid) for pid in held["pids"]) and tagged(tag), held
        run.send_signal(signals[0])
        if len(signals) > 1:
            # Again once the teardown is under way: the first host's daemon has stopped, the
            # second one, redis-server and the namespaces are still to go.
            deadline = time.monotonic() + 15
            while alive(held["first_host_pid"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            run.send_signal(signals[1])
        output, _ = run.communicate(timeout=60)
        # The reaper of a killed run needs a moment; a clean run has nothing to wait for.
        deadline = time.monotonic() + 10
        while (left := leftovers(prefix, tag, held)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], f"{[s.name for s in signals]} left these behind:\n{output}"
        # Interrupted, as pytest says it (2), and no leftovers found by its own sweep either.
        assert run.returncode == status, output
        assert "left behind" not in output, output
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        remove(prefix, tag, held)
