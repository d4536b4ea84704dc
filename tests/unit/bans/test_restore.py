"""What the kernel's ban sets hold after a start (bans.restore): the store's bans and no other,
replaced only when something may have put others there; a clean stop vouches for the sets."""

from __future__ import annotations

import json
from collections.abc import Iterable
from ipaddress import ip_address
from pathlib import Path

import pytest

from portsentry.bans import restore
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.restore import remember_stop, restore_bans
from portsentry.bans.store import MEMORY, BanStore
from portsentry.core.probe import IPAddress
from portsentry.responders.backend import BackendError, unpacked
from portsentry.responders.hostsdeny import HostsDeny
from tests.unit.bans.test_lifecycle import Kernel

A = ip_address("198.18.0.2")
STRAY = ip_address("198.18.0.99")  # in the kernel, unknown to the store
NOW = 1_800_000_000.0


class ReplacingKernel(Kernel):
    """A set that can be replaced whole, as nftables and ipset do; records how it was filled."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.refuse = False

    def holds_any(self) -> bool:
        return bool(self.held)

    def restore_many(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        self.calls.append("restore_many")
        super().restore_many(bans)

    def replace_all(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        self.calls.append("replace_all")
        if self.refuse:
            raise BackendError("nf_tables refused the update")
        self.held = {unpacked(packed): timeout for packed, timeout in bans}


@pytest.fixture(autouse=True)
def same_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restore, "kernel_id", lambda: "boot-1 netns-cookie:1")


def manager(tmp_path: Path, store: str | None = None) -> tuple[BanManager, ReplacingKernel, list[str]]:
    kernel, lines = ReplacingKernel(), list[str]()
    bans = BanManager(BanStore(store or str(tmp_path / "bans.sqlite3")), kernel,
                      HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(), lines.append)
    return bans, kernel, lines


def banned(bans: BanManager, address: IPAddress = A) -> None:
    bans.remember(address, reason="scan", mode="tcp", port=1, now=NOW, duration=None,
                  hosts_deny_line=None, native=True)


def test_a_kernel_entry_the_store_does_not_know_is_gone_after_a_start(tmp_path: Path) -> None:
    # bans.sqlite3 deleted while the daemon was stopped: BLOCK_TIME 0 kept the kernel's entry for
    # ever, `list` did not show it, and `unblock` said "not blocked" while removing it.
    bans, kernel, lines = manager(tmp_path)
    banned(bans)
    kernel.held = {A: None, STRAY: None}
    restore_bans(bans, NOW + 1)
    assert kernel.held == {A: None}
    assert lines[-1] == ("adminalert: fake: the ban sets now hold the 1 bans of the ban store and no "
                         "other (the last stop was not clean, or the store changed since)")


def test_empty_sets_are_only_added_to_and_an_in_memory_store_replaces_nothing(tmp_path: Path) -> None:
    bans, kernel, _lines = manager(tmp_path)
    banned(bans)
    restore_bans(bans, NOW + 1)  # a reboot: nothing can be there that the store lacks
    assert kernel.calls == ["restore_many"] and kernel.held == {A: None}
    # The disk store could not be opened: the stand-in knows no ban, the kernel's stay in force.
    bans, kernel, _lines = manager(tmp_path, MEMORY)
    bans.fallback_from = str(tmp_path / "bans.sqlite3")
    kernel.held = {STRAY: None}
    restore_bans(bans, NOW + 1)
    assert kernel.calls == [] and kernel.held == {STRAY: None}


def test_a_refused_replace_still_puts_every_stored_ban_in(tmp_path: Path) -> None:
    bans, kernel, lines = manager(tmp_path)
    banned(bans)
    kernel.held, kernel.refuse = {STRAY: None}, True
    restore_bans(bans, NOW + 1)
    assert kernel.calls == ["replace_all", "restore_many"] and A in kernel.held
    assert "nf_tables refused the update" in lines[-1]


def test_a_clean_stop_vouches_for_the_sets_until_anything_changes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stop = str(tmp_path / "kernel-sync")
    bans, kernel, _lines = manager(tmp_path)
    banned(bans)
    restore_bans(bans, NOW + 1, stop_path=stop)
    remember_stop(bans, stop)
    kernel.held[STRAY] = None  # by hand, say: a clean stop's record is believed
    kernel.calls.clear()
    restore_bans(bans, NOW + 2, stop_path=stop)
    assert kernel.calls == ["restore_many"] and STRAY in kernel.held
    # Read once: a run that then crashes leaves no record, and the next start replaces.
    assert not Path(stop).exists()
    restore_bans(bans, NOW + 3, stop_path=stop)
    assert kernel.calls[-1] == "replace_all" and STRAY not in kernel.held

    def replaced_after(change: str) -> bool:
        kernel.held[STRAY] = None
        remember_stop(bans, stop)
        state = json.loads(Path(stop).read_text())
        if change == "store":
            bans.store.lift(A, NOW + 4, "unblocked by admin")  # as `unblock` while stopped does
        elif change == "kernel":
            Path(stop).write_text(json.dumps({**state, "kernel": "boot-0 netns-cookie:1"}))
        elif change == "clock":  # set back a minute while stopped
            Path(stop).write_text(json.dumps({**state, "wall": state["wall"] + 60}))
        elif change == "replaced":
            other = BanStore(str(tmp_path / "other.sqlite3"))
            bans.store = other
        restore_bans(bans, NOW + 5, stop_path=stop)
        return kernel.calls[-1] == "replace_all" and STRAY not in kernel.held

    assert not replaced_after("nothing")
    for change in ("store", "kernel", "clock", "replaced"):
        assert replaced_after(change), change


def test_no_record_when_the_sets_may_not_match_the_store(tmp_path: Path) -> None:
    stop = tmp_path / "kernel-sync"
    bans, _kernel, _lines = manager(tmp_path)
    bans.kernel_unsure = True  # a removal from the kernel failed
    remember_stop(bans, str(stop))
    assert not stop.exists()
    bans, _kernel, _lines = manager(tmp_path)
    bans._unsaved_lines.append((A, "ALL: 198.18.0.2", NOW))  # held until the store takes it
    remember_stop(bans, str(stop))
    assert not stop.exists()
    bans, _kernel, _lines = manager(tmp_path)
    remember_stop(bans, str(stop))
    assert stop.exists()


def test_a_hosts_deny_that_refuses_its_lines_at_a_start_is_said_and_the_kernel_bans_still_go_in(
        tmp_path: Path) -> None:
    # A world-writable hosts.deny (or its lock held past the timeout by block --file) raised
    # HostsDenyError out of the restore: the daemon died at start with a traceback, and under
    # Restart=on-failure did so every 5 s, scanning nothing, while a scan's block over the same
    # file is only logged.
    bans, kernel, lines = manager(tmp_path)
    bans.remember(A, reason="scan", mode="tcp", port=1, now=NOW, duration=None,
                  hosts_deny_line="ALL: 198.18.0.2", native=True)
    path = tmp_path / "hosts.deny"
    path.write_text("")
    path.chmod(0o666)
    restore_bans(bans, NOW + 1)
    assert kernel.held == {A: None}
    assert any("cannot restore 1 hosts.deny lines" in line and "world-writable" in line for line in lines)
