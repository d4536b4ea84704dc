"""What makes a test or bench run leave nothing behind, however it ends: names unique to the run,
teardown that a second Ctrl-C (or a SIGTERM, SIGHUP) cannot cut short, and a reaper process
that sweeps the run's namespaces, processes and /tmp directories once the run is gone, even
when it was killed outright.

Every namespace and /tmp directory of the run starts with RUN_PREFIX; every process it starts
carries MARK_ENV=RUN_ID in its environment (set here, inherited by children). The pid keeps
concurrent runs apart, the random part keeps a later run that gets the same pid apart.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from tests.system.reaper import MARK_ENV

RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"
RUN_PREFIX = f"ps-{RUN_ID}-"
os.environ[MARK_ENV] = RUN_ID

REAPER = Path(__file__).resolve().with_name("reaper.py")

# The signals a run is ended with; while a shield is up they are held until it comes down.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_depth = 0
_held: list[int] = []
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
_previous: dict[int, _Handler] = {}
_reaper: subprocess.Popen[bytes] | None = None


def _hold(signum: int, _frame: FrameType | None) -> None:
    _held.append(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Shield:
    """Cleanup that runs to its end: SIGINT, SIGTERM and SIGHUP are held for its duration.

    When the outermost shield comes down, a held signal is delivered again (its own handler
    raises, as it would have), unless the cleanup is itself part of an interrupt's unwinding,
    which already ends the run. With `deliver=False` the caller takes the signal instead, with
    take_held(): pytest's hooks turn it into a stop after the teardown.
    """

    def __init__(self, deliver: bool = True) -> None:
        self.deliver = deliver
        self._active = False

    def __enter__(self) -> Shield:
        global _depth
        if self._active or not _in_main_thread():
            return self  # only the main thread gets signals, and only it may set handlers
        self._active = True
        _depth += 1
        if _depth == 1:
            for sig in HELD_SIGNALS:
                _previous[sig] = signal.signal(sig, _hold)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _depth
        if not self._active:
            return
        self._active = False
        _depth -= 1
        if _depth > 0:
            return
        for sig, handler in _previous.items():
            signal.signal(sig, handler)
        _previous.clear()
        if not self.deliver or not _held:
            return
        unwinding = exc if exc is not None else sys.exc_info()[1]
        signum = take_held()
        if isinstance(unwinding, KeyboardInterrupt) or signum is None:
            return
        signal.raise_signal(signum)


def take_held() -> int | None:
    """The first signal held by shields since the last call (None if none), forgetting them."""
    signum = _held[0] if _held else None
    _held.clear()
    return signum


def start_reaper() -> None:
    """Start this run's reaper once; it outlives the run by the time it takes to sweep."""
    global _reaper
    if _reaper is not None:
        return
    _reaper = subprocess.Popen(
        [sys.executable, str(REAPER), RUN_PREFIX, RUN_ID],
        # Its report goes to the run's stderr: start it where that is the terminal or CI log.
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        # A session of its own: what ends the run's process group (Ctrl-C at the terminal, a
        # CI runner's kill of the group) must not end the reaper with it.
        start_new_session=True,
    )


def reaper_pid() -> int | None:
    return None if _reaper is None else _reaper.pid


def run_tempdir(label: str) -> Path:
    """A fresh directory in /tmp named after the run (short, for AF_UNIX paths), swept with it."""
    start_reaper()
    return Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{label}-", dir="/tmp"))
