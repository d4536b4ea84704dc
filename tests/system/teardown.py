"""Teardown that a second Ctrl-C (or a SIGTERM, SIGHUP) cannot cut short: the signals are held
while a Shield is up and delivered when it comes down, so that every namespace, process and
directory of a test or bench run is removed however impatient the one ending it is."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

# The signals a run is ended with; while a shield is up they are held until it comes down.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_depth = 0
_held: list[int] = []
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
_previous: dict[int, _Handler] = {}


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
