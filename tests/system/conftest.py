"""Fixtures for the system tests: per-test namespaces, a syslog receiver and daemons, all torn
down even when a test fails, plus a session-end sweep for namespaces this run left behind."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from tests.system import reaper
from tests.system.rig import (
    Daemon,
    DaemonFactory,
    Namespaces,
    SyslogReceiver,
    namespaces_up,
    short_socket_dir,
)
from tests.system.teardown import RUN_ID, RUN_PREFIX, Shield, reaper_pid, take_held


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    with namespaces_up() as net:
        yield net


@pytest.fixture
def syslog() -> Iterator[SyslogReceiver]:
    sock_dir = short_socket_dir()
    try:
        with SyslogReceiver(sock_dir / "log") as receiver:
            yield receiver
    finally:
        with Shield():
            shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def daemon_factory(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path
) -> Iterator[DaemonFactory]:
    daemons: list[Daemon] = []

    def make(
        *modes: str,
        start: bool = True,
        verbose: bool = False,
        ignore: Sequence[str] = ("127.0.0.1/32",),
        extra_args: Sequence[str] = (),
        **config: str | None,
    ) -> Daemon:
        daemon = Daemon(
            namespaces,
            tmp_path / f"daemon{len(daemons)}",
            syslog,
            modes or ("-tcp",),
            verbose=verbose,
            ignore=ignore,
            extra_args=extra_args,
            config=config,
        )
        daemons.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    # A daemon that ignores SIGTERM is a bug ("hang = failure"), reported as a teardown error.
    hung = []
    with Shield():
        for daemon in daemons:
            if daemon.proc is not None:
                daemon.stop()
                if daemon.hung:
                    hung.append(daemon)
    if hung:
        pytest.fail(
            "daemon did not exit within 10s of SIGTERM and was killed\n"
            + "\n".join(d.report() for d in hung),
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    # A Ctrl-C in a fixture's teardown would skip the test's other finalizers for good (pytest
    # has already taken them off its stack): held until they have all run, then the run stops.
    with Shield(deliver=False):
        try:
            return (yield)
        finally:
            signum = take_held()
            if signum is not None:
                item.session.shouldstop = f"{signal.Signals(signum).name} during teardown"


# Up from an interrupt's arrival in pytest's session loop to the end of the session's teardown.
_ENDING = Shield(deliver=False)


@pytest.hookimpl(tryfirst=True)
def pytest_keyboard_interrupt() -> None:
    # pytest's report of the interrupt comes first (slow: it parses the sources in the
    # traceback); a second Ctrl-C there ended pytest with a traceback of its own.
    _ENDING.__enter__()


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    # pytest tears down what an interrupt left set up in its own pytest_sessionfinish, inside
    # this wrapper: held from signals, and followed by the sweep (not preceded, which removed
    # namespaces whose fixtures were still to stop their daemons, and called that a rig bug).
    with Shield(deliver=False):
        try:
            return (yield)
        finally:
            _sweep(session)
            _ENDING.__exit__(None, None, None)
            if take_held() is not None:
                session.exitstatus = pytest.ExitCode.INTERRUPTED


def _sweep(session: pytest.Session) -> None:
    # Fixtures clean up after themselves; anything left here means a rig bug, so remove it and
    # make the run fail rather than leak namespaces, processes or directories on the machine.
    exclude = {os.getpid()} | ({pid} if (pid := reaper_pid()) is not None else set())
    try:
        left = reaper.sweep(RUN_PREFIX, RUN_ID, exclude)
    except Exception as error:
        print(f"\nERROR: the sweep of this run's leftovers failed: {error!r}")
        return
    if left:
        print(f"\nERROR: left behind by this run (now removed): {left.describe()}")
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
