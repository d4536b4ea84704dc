"""Suite-wide pytest setup: hypothesis profiles (PORTSENTRY_FUZZ_EXAMPLES=N selects a long "fuzz"
run) and the `system` marker, which tests under tests/system/ get automatically and which is
skipped where root, network namespaces or nmap are missing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

FUZZ_ENV = "PORTSENTRY_FUZZ_EXAMPLES"
# scripts/test sets this when run as root, so a broken environment fails the run loudly instead
# of quietly skipping every system test.
REQUIRE_SYSTEM_ENV = "PORTSENTRY_REQUIRE_SYSTEM"
SYSTEM_DIR = Path(__file__).resolve().parent / "system"


def _fuzz_examples() -> int | None:
    raw = os.environ.get(FUZZ_ENV, "").strip()
    if not raw:
        return None
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise pytest.UsageError(f"{FUZZ_ENV}={raw!r}: expected a positive number of examples")
    return count


def _interrupt_on_signal(signum: int, _frame: object) -> None:
    # SIGTERM (a CI job's timeout, `kill`) or SIGHUP (the terminal or ssh session gone) would end
    # pytest before any teardown ran, leaving namespaces, daemons and Redis servers behind. As an
    # interrupt, pytest tears every fixture down first, as it does for Ctrl-C.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def pytest_configure(config: pytest.Config) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt_on_signal)
    # No deadline: timing varies a lot when system tests and CI load share the machine, and a
    # slow example is not a wrong one.
    settings.register_profile("portsentry", deadline=None)
    examples = _fuzz_examples()
    if examples is not None:
        settings.register_profile(
            "fuzz",
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        settings.load_profile("fuzz")
    else:
        settings.load_profile("portsentry")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Now, while pytest's capture is off: the reaper's report of what a killed run left behind
    # must reach the real stderr, and it must be there before anything it may have to remove.
    from tests.system.teardown import start_reaper

    start_reaper()


def _system_unavailable() -> str | None:
    """Why system tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "system tests need root (network namespaces)"
    for tool in ("ip", "nmap"):
        if shutil.which(tool) is None:
            return f"system tests need {tool!r} (run scripts/setup)"
    from tests.system.teardown import RUN_PREFIX

    probe = f"{RUN_PREFIX}probe"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cannot create network namespaces: {exc}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True, timeout=10)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    system_items = []
    for item in items:
        if item.path.is_relative_to(SYSTEM_DIR):
            item.add_marker(pytest.mark.system)
        if item.get_closest_marker("system") is not None:
            system_items.append(item)
    if not system_items:
        return
    reason = _system_unavailable()
    if reason is None:
        return
    if os.environ.get(REQUIRE_SYSTEM_ENV) == "1":
        raise pytest.UsageError(f"{REQUIRE_SYSTEM_ENV}=1 but {reason}")
    skip = pytest.mark.skip(reason=reason)
    for item in system_items:
        item.add_marker(skip)
