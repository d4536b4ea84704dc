"""Fixtures for the system tests: per-test namespaces, a syslog receiver and daemons, all torn
down even when a test fails, plus a session-end sweep for namespaces this run left behind."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.system.rig import (
    RUN_PREFIX,
    Daemon,
    DaemonFactory,
    Namespaces,
    SyslogReceiver,
    destroy_namespaces,
    list_namespaces,
    namespaces_up,
    short_socket_dir,
)


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Fixtures clean up after themselves; anything left here means a rig bug, so remove it and
    # make the run fail rather than leak namespaces on the machine.
    try:
        leftovers = list_namespaces(RUN_PREFIX)
    except Exception:
        return
    if leftovers:
        destroy_namespaces(leftovers)
        print(f"\nERROR: namespaces left behind by this run (now removed): {leftovers}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
