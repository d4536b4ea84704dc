"""The last sweep of one test or bench run: its namespaces (by the run's name prefix), every
process inside them, every process started with the run's mark in its environment, and its
/tmp directories (by the same prefix). Nothing of any other run is touched.

Run as a script (by tests/system/teardown.py) it waits, in a session of its own and deaf to
SIGINT, SIGTERM and SIGHUP, until the run's process is gone, however it went (SIGKILL after a CI
job's grace period, an OOM kill, a lost terminal: no `finally` of the run gets to run then), and
sweeps. Standard library only, so it starts fast and works whatever the run's sys.path was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

TMP = Path("/tmp")
# The environment variable whose value marks a run's processes; set by tests/system/teardown.py.
MARK_ENV = "PORTSENTRY_TEST_RUN"


@dataclass
class Leftovers:
    namespaces: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.processes or self.dirs)

    def describe(self) -> str:
        parts = [f"namespaces {self.namespaces}" if self.namespaces else "",
                 f"processes {self.processes}" if self.processes else "",
                 f"directories {self.dirs}" if self.dirs else ""]
        return "; ".join(p for p in parts if p)


def _ip(*args: str) -> str:
    """The output of `ip args`; none where there is no `ip` (a unit-test run elsewhere)."""
    try:
        # A group of its own: a second Ctrl-C at the terminal must not kill the cleanup's tools.
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                              check=False, process_group=0).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def namespaces(prefix: str) -> list[str]:
    names = (line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip())
    return sorted(name for name in names if name.startswith(prefix))


def _namespace_pids(name: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", name).split()]


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:100]


def marked_pids(run_id: str, exclude: Collection[int] = ()) -> list[int]:
    """Processes whose environment, as they were started, carries this run's mark."""
    wanted = f"{MARK_ENV}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def _kill_all(pids: Collection[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_inside(name: str, skip: Collection[int] = (), wait: float = 5.0) -> tuple[list[str], list[int]]:
    """SIGKILL every process in namespace `name` until none is left or `wait` has passed:
    (those killed, as "pid command"; those still there)."""
    killed: list[str] = []
    deadline = time.monotonic() + wait
    while inside := [p for p in _namespace_pids(name) if p not in skip]:
        if time.monotonic() > deadline:
            return killed, inside
        killed += [f"{pid} {_command(pid)}" for pid in inside]
        _kill_all(inside)
        time.sleep(0.05)
    return killed, []


def sweep(prefix: str, run_id: str, exclude: Collection[int] = ()) -> Leftovers:
    """Kill and remove everything of the run still there; return what was found."""
    found = Leftovers()
    skip = {os.getpid(), *exclude}
    pids = marked_pids(run_id, skip)
    found.processes += [f"{pid} {_command(pid)}" for pid in pids]
    _kill_all(pids)
    for name in namespaces(prefix):
        found.namespaces.append(name)
        killed, _survivors = kill_inside(name, skip)
        found.processes += [entry for entry in killed if entry not in found.processes]
        _ip("netns", "del", name)
    for path in sorted(TMP.glob(f"{prefix}*")):
        found.dirs.append(str(path))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def main(argv: list[str]) -> int:
    prefix, run_id = argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # The run holds the other end of stdin and never writes: end of file is the run's end.
    while os.read(0, 4096):
        pass
    try:
        left = sweep(prefix, run_id)
    except Exception as error:  # said, where it can be: nothing else would
        with contextlib.suppress(OSError):
            print(f"reaper: the sweep of run {prefix} failed: {error!r}", file=sys.stderr, flush=True)
        return 1
    if left:
        with contextlib.suppress(OSError):
            print(f"reaper: run {prefix} ended and left {left.describe()}; removed",
                  file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
