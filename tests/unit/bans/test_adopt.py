"""Fleet peers' bans made here: idempotent, the longer ban holds, the origin's expiry, its origin kept."""

from __future__ import annotations

from ipaddress import ip_address

from portsentry.bans.adopt import RemoteBan, adopt_bans, lift_remote, longer
from tests.unit.bans.test_lifecycle import manager

NOW = 1_700_000_000.0
A, B = ip_address("198.18.9.1"), ip_address("fd00::9")


def test_a_decision_applied_twice_changes_nothing_the_second_time(tmp_path):
    bans, kernel, _lines, _commands = manager(tmp_path)
    wanted = [RemoteBan(A, NOW + 600, "h1", "fleet: scan"), RemoteBan(B, None, "h1", "fleet: scan")]
    made = adopt_bans(bans, wanted, NOW, "ALL: $TARGET$")
    assert [ban.address for ban in made] == [A, B]
    assert kernel.held == {A: 600.0, B: None}  # the origin's expiry, not this host's BLOCK_TIME
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.9.1\nALL: [fd00::9]\n"
    changes = len(bans.store.changes(0))
    assert adopt_bans(bans, wanted, NOW + 1, "ALL: $TARGET$") == []
    assert len(bans.store.changes(0)) == changes
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.9.1\nALL: [fd00::9]\n"
    stored = bans.store.get(A)
    assert stored is not None and stored.origin == "h1" and stored.expires == NOW + 600


def test_the_longer_ban_holds_whoever_made_it(tmp_path):
    bans, kernel, _lines, _commands = manager(tmp_path)
    bans.store.ban(A, reason="scan", mode="tcp", port=1, now=NOW, duration=1000)
    assert adopt_bans(bans, [RemoteBan(A, NOW + 500, "h1", "fleet")], NOW) == []
    assert bans.store.get(A).origin == "local"  # type: ignore[union-attr]
    made = adopt_bans(bans, [RemoteBan(A, NOW + 5000, "h1", "fleet")], NOW)
    assert [(ban.origin, ban.expires) for ban in made] == [("h1", NOW + 5000)]
    assert kernel.held[A] == 5000.0
    # Within one batch the longest of an address's decisions is taken; an expired one never is.
    made = adopt_bans(bans, [RemoteBan(B, NOW + 10, "h3", "x"), RemoteBan(B, NOW + 99, "h2", "x"),
                             RemoteBan(ip_address("198.18.9.2"), NOW - 1, "h2", "x")], NOW)
    assert [(ban.address, ban.origin, ban.expires) for ban in made] == [(B, "h2", NOW + 99)]
    assert longer(None, NOW) and not longer(NOW, None) and not longer(NOW, NOW)


def test_a_peers_lift_is_recorded_as_theirs(tmp_path):
    bans, kernel, _lines, _commands = manager(tmp_path)
    adopt_bans(bans, [RemoteBan(A, NOW + 600, "h1", "fleet")], NOW)
    assert lift_remote(bans, A, "h1", NOW + 1)
    assert A not in kernel.held
    last = bans.store.changes(0)[-1]
    assert (last.kind, last.origin) == ("lift", "h1")
    assert not lift_remote(bans, A, "h1", NOW + 2)  # twice: nothing to do


def test_an_unblock_while_fleet_bans_are_applied_leaves_kernel_and_store_agreeing(tmp_path):
    # A fleet batch puts its bans in the kernel, then records them. An admin's unblock of one of
    # them in between (another thread) found no record, took it out of the kernel and said "not
    # blocked"; the record came after: a ban in the store (the engine ignores the host) that the
    # kernel no longer held. The unblock now waits for the batch and then lifts all of it.
    import threading

    bans, kernel, _lines, _commands = manager(tmp_path)
    assert isinstance(bans.backend, type(kernel))
    unblocked: list[bool] = []
    admin = threading.Thread(target=lambda: unblocked.append(bans.lift(A, NOW, "unblocked by admin")))
    add = kernel.add

    def add_then_unblock(address, timeout):
        add(address, timeout)
        if address == A and not admin.is_alive() and not unblocked:
            admin.start()
            admin.join(0.5)  # it finishes here unless it has to wait for the batch

    kernel.add = add_then_unblock  # type: ignore[method-assign]
    adopt_bans(bans, [RemoteBan(A, NOW + 600, "h1", "fleet: scan")], NOW)
    admin.join()
    held = bans.store.get(A)
    assert (held is not None and held.active(NOW)) == (A in kernel.held)
    assert unblocked == [True] and A not in kernel.held
