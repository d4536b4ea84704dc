"""BanStore: bans extend, expire, lift and escalate; the schema is versioned; concurrent writers
in two processes lose nothing."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from portsentry.bans.records import LONGEST_BAN
from portsentry.bans.store import SCHEMA_VERSION, BanStore, StoreError, ban_duration, normalise

SRC = str(Path(__file__).resolve().parents[3] / "src")
A = IPv4Address("198.18.0.5")
B = IPv6Address("fd00::5")
T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path):
    s = BanStore(str(tmp_path / "state" / "bans.sqlite3"))
    yield s
    s.close()


def ban(s: BanStore, address=A, now=T0, duration: float | None = 60.0, **kw):
    kw.setdefault("reason", "TCP SYN/Normal scan")
    kw.setdefault("mode", "stcp")
    kw.setdefault("port", 23)
    return s.ban(address, now=now, duration=duration, **kw)


def test_creates_private_directory_and_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "state" / "bans.sqlite3"
    BanStore(str(path)).close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_new_ban(store: BanStore) -> None:
    b = ban(store, hosts_deny_line="ALL: 198.18.0.5", backends=("nftables",))
    assert b.address == A
    assert (b.reason, b.mode, b.port) == ("TCP SYN/Normal scan", "stcp", 23)
    assert (b.first_seen, b.last_seen, b.count) == (T0, T0, 1)
    assert b.expires == T0 + 60
    assert b.offences == 1
    assert b.hosts_deny_line == "ALL: 198.18.0.5"
    assert b.backends == ("nftables",)
    assert store.get(A) == b
    assert store.get("198.18.0.5") == b


def test_ipv4_mapped_is_stored_as_ipv4(store: BanStore) -> None:
    b = ban(store, address=IPv6Address("::ffff:198.18.0.5"))
    assert b.address == A
    assert store.get(A) == b
    assert store.get("::ffff:198.18.0.5") == b
    assert normalise("::ffff:198.18.0.5") == A
    assert normalise(B) == B


def test_a_zone_id_is_not_part_of_the_stored_address(store: BanStore) -> None:
    # `block fe80::1%eth0` stored "fe80::1%eth0", which inet_pton cannot read back: every later
    # active(), expired() and start-up raised OSError, so one request broke expiry for good.
    b = ban(store, address="fe80::1%eth0", duration=60.0)
    assert b.address == IPv6Address("fe80::1") and str(b.address) == "fe80::1"
    assert [x.address for x in store.active(T0)] == [IPv6Address("fe80::1")]
    assert [x.address for x in store.expired(T0 + 120)] == [IPv6Address("fe80::1")]
    assert store.get("fe80::1") == b
    assert normalise(IPv6Address("fe80::1%2")) == IPv6Address("fe80::1")


def test_ban_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "bans.sqlite3")
    with BanStore(path) as s:
        first = ban(s, address=B, duration=None, backends=("nftables", "route"))
    with BanStore(path) as s:
        assert s.get(B) == first
        assert s.active(T0 + 10**9) == [first]


def test_extend_counts_and_keeps_later_expiry(store: BanStore) -> None:
    ban(store, duration=100, hosts_deny_line="ALL: 198.18.0.5", backends=("nftables",))
    b = ban(store, now=T0 + 10, duration=20, port=80, mode="tcp", reason="Connect", backends=("route",))
    assert b.count == 2
    assert b.first_seen == T0
    assert b.last_seen == T0 + 10
    assert b.expires == T0 + 100  # the earlier ban lasts longer
    assert b.offences == 1
    assert (b.port, b.mode, b.reason) == (80, "tcp", "Connect")
    assert b.hosts_deny_line == "ALL: 198.18.0.5"
    assert b.backends == ("nftables", "route")
    b = ban(store, now=T0 + 50, duration=200, backends=("nftables",))
    assert b.expires == T0 + 250
    assert b.count == 3
    assert b.backends == ("nftables", "route")
    b = ban(store, now=T0 + 60, duration=None)
    assert b.expires is None
    b = ban(store, now=T0 + 70, duration=5)
    assert b.expires is None  # forever stays forever
    assert [e.kind for e in store.history()] == ["ban", "extend", "extend", "extend", "extend"]


def test_active_and_expired(store: BanStore) -> None:
    short = ban(store, duration=10)
    forever = ban(store, address=B, duration=None)
    assert store.active(T0 + 5) == [short, forever]
    assert store.expired(T0 + 5) == []
    assert store.active(T0 + 10) == [forever]  # expiry is the first moment it no longer holds
    assert store.expired(T0 + 10) == [short]
    assert store.get(A) == short  # still there until lifted


def test_lift_keeps_offences_and_history(store: BanStore) -> None:
    b = ban(store, duration=100)
    assert store.offences(A) == 0
    lifted = store.lift(A, T0 + 5, "unblocked by admin")
    assert lifted == b
    assert store.get(A) is None
    assert store.active(T0 + 5) == []
    assert store.offences(A) == 1
    assert store.lift(A, T0 + 6, "again") is None
    again = ban(store, now=T0 + 10)
    assert again.offences == 2
    assert again.count == 1
    assert again.first_seen == T0 + 10
    events = store.history()
    assert [(e.kind, e.at) for e in events] == [("ban", T0), ("lift", T0 + 5), ("ban", T0 + 10)]
    assert events[1].detail == "unblocked by admin"
    assert events[1].address == A
    assert "offence 2" in events[2].detail


def test_lift_after_expiry_is_recorded_as_expire(store: BanStore) -> None:
    ban(store, duration=10)
    assert store.lift(A, T0 + 11, "expired") is not None
    assert store.history()[-1].kind == "expire"
    assert store.offences(A) == 1


def test_ban_after_unlifted_expiry_is_a_new_offence(store: BanStore) -> None:
    ban(store, duration=10)
    assert store.offences(A) == 0
    assert store.offences(A, now=T0 + 20) == 1  # the expired ban counts once `now` says it is over
    assert store.offences(A, now=T0 + 5) == 0
    b = ban(store, now=T0 + 20, duration=10)
    assert b.offences == 2
    assert b.count == 1
    assert b.first_seen == T0 + 20
    assert [e.kind for e in store.history()] == ["ban", "expire", "ban"]
    assert store.offences(A) == 1


def test_escalation_with_ban_duration(store: BanStore) -> None:
    durations = []
    now = T0
    for _ in range(4):
        d = ban_duration(60, 2, 300, store.offences(A, now=now))
        durations.append(d)
        ban(store, now=now, duration=d)
        now += 1000
    assert durations == [60, 120, 240, 300]
    assert store.get(A) is not None
    assert store.get(A).offences == 4  # type: ignore[union-attr]


def test_ban_duration() -> None:
    assert ban_duration(0, 2, 100, 5) is None  # base 0 = forever
    assert ban_duration(60, 2, 0, 0) == 60
    assert ban_duration(60, 2, 0, 3) == 480  # cap 0 = no cap
    assert ban_duration(60, 2, 100, 3) == 100
    assert ban_duration(60, 1, 100, 50) == 60
    assert ban_duration(60, 2, 3600, 10_000) == 3600  # no overflow error
    assert ban_duration(60, 2, 0, 10_000) is None  # uncapped beyond any float: forever
    with pytest.raises(ValueError, match="must not be negative"):
        ban_duration(-1, 2, 0, 0)


def test_a_ban_longer_than_a_century_is_forever(store: BanStore) -> None:
    # Uncapped escalation (BLOCK_TIME_MAX 0) reached 3600 * 100**7 s, and recording that ban
    # raised OSError in the store's time formatting: the ban was never made.
    assert ban_duration(3600, 100, 0, 2) == 3600 * 100.0**2
    assert ban_duration(3600, 100, 0, 3) is None and ban_duration(3600, 100, 0, 7) is None
    assert ban_duration(LONGEST_BAN, 1, 0, 3) == LONGEST_BAN
    now = 1_000_000.0
    ban = store.ban(A, reason="x", mode="tcp", port=1, now=now, duration=ban_duration(3600, 100, 0, 7))
    assert ban.expires is None and store.get(A) is not None


def test_duration_must_be_positive(store: BanStore) -> None:
    with pytest.raises(ValueError, match="positive seconds or None"):
        ban(store, duration=0)
    with pytest.raises(ValueError, match="positive seconds or None"):
        ban(store, duration=-5)
    assert store.get(A) is None


def test_history_limit_and_record(store: BanStore) -> None:
    for i in range(5):
        store.record("lift", A, f"n{i}", T0 + i)
    assert [e.detail for e in store.history(limit=2)] == ["n3", "n4"]
    assert len(store.history()) == 5
    with pytest.raises(ValueError, match="must be one of ban, extend, lift, expire"):
        store.record("nuke", A, "x", T0)  # type: ignore[arg-type]


def owned_ban(store: BanStore, line: str, **kwargs: Any) -> None:
    """A ban whose hosts.deny line we appended (HostsDeny.add's on_append)."""
    ban(store, hosts_deny_line=line, **kwargs)
    store.own_line(kwargs.get("address", A), line, kwargs.get("now", T0))


def test_stale_lines_and_forget(store: BanStore) -> None:
    owned_ban(store, "ALL: 198.18.0.5", duration=10)
    owned_ban(store, "ALL: [fd00::5]", address=B, duration=None)
    assert store.stale_lines(T0 + 5) == set()
    assert store.stale_lines(T0 + 10) == {"ALL: 198.18.0.5"}  # expired, not yet lifted
    store.lift(A, T0 + 11, "expired")
    assert store.stale_lines(T0 + 11) == {"ALL: 198.18.0.5"}
    store.lift(B, T0 + 12, "admin")
    assert store.stale_lines(T0 + 12) == {"ALL: 198.18.0.5", "ALL: [fd00::5]"}
    store.forget_lines(["ALL: 198.18.0.5"], T0 + 12)
    assert store.stale_lines(T0 + 12) == {"ALL: [fd00::5]"}


def test_a_line_is_ours_only_once_we_appended_it(store: BanStore) -> None:
    # issue 9.3: recording the ban's intended line does not make an identical line ours.
    ban(store, duration=10, hosts_deny_line="ALL: 198.18.0.5")
    assert not store.owns_line(A, "ALL: 198.18.0.5")
    assert store.owned_lines(T0 + 20) == ({}, {})
    store.own_line("::ffff:198.18.0.5", "ALL: 198.18.0.5", T0)
    assert store.owns_line(A, "ALL: 198.18.0.5")
    assert store.owned_lines(T0 + 1) == ({"ALL: 198.18.0.5": 1}, {})
    store.disown_line(A, "ALL: 198.18.0.5")
    assert not store.owns_line(A, "ALL: 198.18.0.5")


def test_forget_keeps_rows_of_addresses_banned_again(store: BanStore) -> None:
    owned_ban(store, "ALL: 198.18.0.5", duration=10)
    store.lift(A, T0 + 11, "expired")
    ban(store, now=T0 + 20, duration=10, hosts_deny_line="ALL: 198.18.0.5")
    store.forget_lines(["ALL: 198.18.0.5"], T0 + 21)
    store.lift(A, T0 + 22, "admin")
    assert store.stale_lines(T0 + 22) == {"ALL: 198.18.0.5"}


def test_schema_version_and_migration_table(tmp_path: Path) -> None:
    path = str(tmp_path / "bans.sqlite3")
    BanStore(path).close()
    BanStore(path).close()  # reopening migrates nothing again
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
        versions = db.execute("SELECT version FROM schema_migrations").fetchall()
        assert versions == [(1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,)]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "bans.sqlite3")
    BanStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError) as info:
        BanStore(path)
    assert str(info.value) == (
        f"{path}: ban store schema version {SCHEMA_VERSION + 1} is newer than this portsentry "
        f"understands ({SCHEMA_VERSION}); "
        "run the newer portsentry or move the file away"
    )


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bans.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"bans.sqlite3: not a usable ban store .*move it away"):
        BanStore(str(path))


def test_a_store_another_process_is_writing_is_read_not_refused(tmp_path: Path, monkeypatch) -> None:
    # Opening took the write lock (to see whether the schema needed migrating) and, with the
    # daemon in a long transaction (a `block --file`), `portsentry list` waited 10 s and then
    # said "not a usable ban store (database is locked); move it away": advice that loses every ban.
    import portsentry.bans.store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 300)
    path = str(tmp_path / "bans.sqlite3")
    first = BanStore(path)
    first.ban(IPv4Address("198.18.0.1"), reason="r", mode="tcp", port=1, now=T0, duration=None)
    first.close()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        second = BanStore(path)  # before: StoreError once BUSY_TIMEOUT_MS had passed
        assert [str(ban.address) for ban in second.active(T0)] == ["198.18.0.1"]
        second.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_store_that_stays_locked_is_said_to_be_busy_not_unusable(tmp_path: Path, monkeypatch) -> None:
    import portsentry.bans.store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 100)
    path = str(tmp_path / "bans.sqlite3")
    writer = sqlite3.connect(path, isolation_level=None)  # a new file: opening it must migrate
    try:
        writer.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError) as info:
            BanStore(path)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert str(info.value) == (f"{path}: busy: another process has held its write lock for over 0.1 s; "
                               "try again")


def test_uncreatable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    # Said as what it is: "File exists" read as if the store were in the way.
    with pytest.raises(StoreError, match=f"cannot create the ban store: {tmp_path / 'file'} is not a "
                                         r"directory \(STATE_DIR\)"):
        BanStore(str(tmp_path / "file" / "bans.sqlite3"))


def test_threads_share_one_store(store: BanStore) -> None:
    def worker() -> None:
        for i in range(50):
            ban(store, now=T0 + i)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(A).count == 200  # type: ignore[union-attr]


WRITER = """
import os, sys, time
from portsentry.bans.store import BanStore
path, go, n, who = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
store = BanStore(path)
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(n):
    store.ban("198.18.0.5", reason=who, mode="tcp", port=i, now=1.0 + i, duration=None)
    store.ban(f"198.18.{who}.{i % 250}", reason=who, mode="tcp", port=i, now=1.0 + i, duration=None)
    store.record("lift", "198.18.0.9", who, 1.0)
store.close()
"""


def test_two_processes_lose_no_update(tmp_path: Path) -> None:
    path = str(tmp_path / "bans.sqlite3")
    go = tmp_path / "go"
    BanStore(path).close()
    n = 150
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, path, str(go), str(n), who],
            env=env,
            stderr=subprocess.PIPE,
        )
        for who in ("1", "2")
    ]
    time.sleep(0.3)  # both have opened the store and are waiting
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    with BanStore(path) as s:
        shared = s.get("198.18.0.5")
        assert shared is not None
        assert shared.count == 2 * n  # every extend counted: no read-modify-write lost
        assert shared.offences == 1
        assert len(s.active(0)) == 1 + 2 * min(n, 250)
        events = s.history(limit=100_000)
        assert len(events) == 2 * n * 3
        assert sum(e.kind == "ban" for e in events) == 1 + 2 * min(n, 250)


# --- the change feed and bounded history (issue 10.1, 10.2) ---------------------------------


def test_every_ban_extension_and_lift_is_a_change_with_a_growing_id(store: BanStore) -> None:
    assert store.last_change() == 0
    ban(store, duration=60)
    ban(store, now=T0 + 1, duration=120)  # extends
    store.lift(A, T0 + 2, "unblocked by admin", origin="admin")
    changes = store.changes(after=0)
    assert [(c.kind, c.address, c.expires, c.origin) for c in changes] == [
        ("ban", A, T0 + 60, "local"), ("extend", A, T0 + 121, "local"), ("lift", A, None, "admin")]
    assert [c.id for c in changes] == sorted(c.id for c in changes)
    assert changes[0].bans and changes[1].bans and not changes[2].bans
    assert store.changes(after=changes[1].id) == changes[2:]
    assert store.last_change() == changes[-1].id
    assert store.changes(after=0, limit=1) == changes[:1]


def test_reading_the_feed_costs_what_changed_not_what_is_banned(store: BanStore) -> None:
    # The daemon's tick follows the feed instead of reading every active ban each second: the
    # query must seek by id, not scan the table.
    plan = " ".join(str(row[-1]) for row in store._db.execute(
        "EXPLAIN QUERY PLAN SELECT id, at, kind, address, expires, origin, detail FROM history "
        "WHERE id > ? ORDER BY id LIMIT ?", (0, 10)))
    assert "SEARCH history USING INTEGER PRIMARY KEY" in plan, plan
    for n in range(100):
        ban(store, address=f"198.19.0.{n}", duration=None)
    cursor = store.last_change()
    ban(store, address=B)
    assert [c.address for c in store.changes(after=cursor)] == [B]
    assert store.active_count(T0) == 101


def test_old_v1_stores_are_migrated_and_their_history_becomes_local_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "v1.sqlite3")
    db = sqlite3.connect(path)
    from portsentry.bans.store import MIGRATIONS

    for statement in MIGRATIONS[0][2].split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO history (at, kind, address, detail) VALUES (1.0, 'ban', '198.18.0.5', 'x')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with BanStore(path) as s:
        [change] = s.changes(after=0)
        assert (change.kind, change.origin, change.expires) == ("ban", "local", None)
        # What happened before the upgrade was reported then (or never will be): not said again.
        assert s.claim_unreported() == []


def test_history_and_offenders_are_pruned_by_age_and_count(store: BanStore) -> None:
    for n in range(10):
        ban(store, now=T0 + n, duration=1)
        store.lift(A, T0 + n + 0.5, "expired")
    assert len(store.history(limit=1000)) == 20
    assert store.prune(T0 + 10, retention=1000, max_rows=6) == 14
    assert len(store.history(limit=1000)) == 6
    assert store.offences(A) == 10
    # Far in the future everything is over: history and escalation memory go.
    store.prune(T0 + 10_000, retention=1000)
    assert store.history(limit=1000) == [] and store.offences(A) == 0


def test_zero_means_no_limit_for_history_age_and_count(store: BanStore) -> None:
    for n in range(5):
        ban(store, now=T0 + n, duration=1)
        store.lift(A, T0 + n + 0.5, "expired")
    assert store.prune(T0 + 10_000, retention=0, max_rows=0) == 0
    assert len(store.history(limit=1000)) == 10 and store.offences(A) == 5
    assert store.prune(T0 + 10_000, retention=0, max_rows=4) == 6
    assert store.prune(T0 + 10_000, retention=100, max_rows=0) == 4


def test_history_limits_come_from_the_configuration() -> None:
    from portsentry.bans.lifecycle import BanPolicy
    from portsentry.config.settings import ConfigError, parse_config

    config = parse_config('HISTORY_RETENTION="86400"\nHISTORY_MAX_ROWS="0"\n', "portsentry.conf").config
    policy = BanPolicy.from_config(config)
    assert (policy.history_retention, policy.history_max_rows) == (86400.0, 0)
    assert BanPolicy.from_config(parse_config("", "portsentry.conf").config).history_retention == 90 * 86400
    with pytest.raises(ConfigError, match=r"portsentry\.conf:1: HISTORY_MAX_ROWS"):
        parse_config('HISTORY_MAX_ROWS="-1"\n', "portsentry.conf")


def test_hit_aggregates_merge_across_batches_and_age_out(store: BanStore) -> None:
    from portsentry.journal.hits import HitRow

    hour = int(T0 // 3600)
    store.add_hits([HitRow("198.18.0.2", 79, "stcp", hour, "TCP SYN/Normal scan", 3, 1, T0, T0 + 5)],
                   [(hour, "ban rate limit reached", 2)])
    store.add_hits([HitRow("198.18.0.2", 79, "stcp", hour, "TCP SYN/Normal scan", 2, 0, T0 - 1, T0 + 9)],
                   [(hour, "ban rate limit reached", 1)])
    with store._lock:
        rows = store._db.execute("SELECT count, below, first, last FROM hits").fetchall()
        refused = store._db.execute("SELECT reason, count FROM refusals").fetchall()
    assert rows == [(5, 1, T0 - 1, T0 + 9)] and refused == [("ban rate limit reached", 3)]
    store.prune(T0 + 10 * 86400, retention=86400)
    with store._lock:
        assert store._db.execute("SELECT count(*) FROM hits").fetchone()[0] == 0


def test_origin_is_who_set_the_expiry(tmp_path: Path) -> None:
    """A fleet peer's ban keeps its origin; a local extension that lengthens it takes it over,
    one that does not leaves it (the longer ban holds, and says whose it is)."""
    with BanStore(str(tmp_path / "bans.sqlite3")) as store:
        address = normalise("198.18.0.9")
        made = store.ban(address, reason="fleet", mode="tcp", port=0, now=T0, duration=100, origin="host1")
        assert made.origin == "host1" and store.get(address).origin == "host1"  # type: ignore[union-attr]
        shorter = store.ban(address, reason="scan", mode="tcp", port=1, now=T0 + 1, duration=10)
        assert shorter.origin == "host1" and shorter.expires == T0 + 100
        longer = store.ban(address, reason="scan", mode="tcp", port=1, now=T0 + 2, duration=500)
        assert longer.origin == "local" and store.get(address).origin == "local"  # type: ignore[union-attr]
        assert [change.origin for change in store.changes(0)] == ["host1", "local", "local"]


def test_ban_absent_is_ban_many_in_bulk(tmp_path: Path) -> None:
    """The same rows, history and offences as ban_many; an address with a row goes the usual way."""
    from portsentry.bans.store import BanRequest

    with BanStore(str(tmp_path / "a.sqlite3")) as bulk, BanStore(str(tmp_path / "b.sqlite3")) as usual:
        for store in (bulk, usual):
            store.ban("198.18.0.1", reason="old", mode="tcp", port=1, now=T0 - 100, duration=10)
            store.lift("198.18.0.1", T0 - 50, "done")
            store.ban("198.18.0.3", reason="held", mode="tcp", port=1, now=T0 - 1, duration=1000)
        requests = [BanRequest(normalise(a), "fleet", "tcp", 0, d, None, ("nftables",))
                    for a, d in (("198.18.0.1", 60.0), ("198.18.0.2", None), ("198.18.0.3", 5000.0))]
        made = bulk.ban_absent(requests, T0, "h1")
        assert made == usual.ban_many(requests, T0, origin="h1")
        assert [b.offences for b in made] == [2, 1, 1] and made[2].count == 2
        # The same changes; the bulk rows are written after the one that went the usual way.
        assert sorted((c.address, c.kind, c.origin, c.detail) for c in bulk.changes(0)) == sorted(
            (c.address, c.kind, c.origin, c.detail) for c in usual.changes(0))


def test_the_wal_file_shrinks_back_after_a_large_transaction(tmp_path: Path) -> None:
    """A bulk import writes a WAL the size of the whole transaction; without a size limit the
    file kept that size for ever (25 MB after 100,000 bans). The next writes after SQLite's
    automatic checkpoint cut it back to bans.store.WAL_SIZE_LIMIT."""
    from ipaddress import IPv4Address

    from portsentry.bans.store import BanRequest

    limit = 4 << 20  # WAL_SIZE_LIMIT, written out: the test predates the constant

    path = tmp_path / "bans.sqlite3"
    store = BanStore(str(path))
    store.ban_absent([BanRequest(IPv4Address(0xC6130000 + i), "scan", "tcp", 0, 3600.0, None, ())
                      for i in range(50_000)], 1.0, "local")
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 1.5 * limit
    for i in range(5):
        store.ban(f"198.18.1.{i}", reason="scan", mode="tcp", port=1, now=2.0, duration=600)
    assert wal.stat().st_size <= limit
    assert store.active_count(3.0) == 50_005
    store.close()


def test_a_peers_ban_lifted_here_only_is_kept_until_the_peer_lifts_it_or_it_ends(store: BanStore) -> None:
    from portsentry.bans.store import ORIGIN_LOCAL_ONLY, BanRequest

    one, two, three, mine = (IPv4Address(f"198.18.0.{n}") for n in (1, 2, 3, 4))
    assert store.lifted_here([one]) == {}  # the empty table's shortcut
    store.ban_absent([BanRequest(one, "fleet", "tcp", 0, 60.0, None, ()),
                      BanRequest(two, "fleet", "tcp", 0, None, None, ()),
                      BanRequest(three, "fleet", "tcp", 0, 600.0, None, ())], T0, "h1")
    ban(store, mine)
    store.lift(one, T0 + 1, "here only", origin=ORIGIN_LOCAL_ONLY)
    assert store.lift_many([two, mine], T0 + 1, "here only", origin=ORIGIN_LOCAL_ONLY) == 2
    store.lift(three, T0 + 1, "everywhere")  # a fleet-wide unblock: nothing to remember
    # This host's own ban is not remembered: its peers' copies of it are echoes here.
    assert store.lifted_here([one, two, three, mine]) == {one: ("h1", T0 + 60), two: ("h1", None)}
    store.lift(two, T0 + 2, "unblocked on h2 (fleet)", origin="h2")  # another peer: stays
    store.lift(two, T0 + 2, "unblocked on h1 (fleet)", origin="h1")  # its origin: forgotten
    assert store.lifted_here([one, two]) == {one: ("h1", T0 + 60)}
    store.prune(T0 + 59)
    assert one in store.lifted_here([one])
    store.prune(T0 + 61)
    assert store.lifted_here([one]) == {}


def test_an_expiry_lift_leaves_a_ban_made_again_since(store: BanStore) -> None:
    # The expiry's lift is decided in the same transaction that would retire the row, so a ban
    # made again by another writer after the expiry read the row is not taken down with it.
    ban(store, duration=60.0)
    again = ban(store, now=T0 + 61, duration=60.0)
    assert store.lift(A, T0 + 61, "ban expired", expired_only=True) is None
    assert store.get(A) == again
    assert store.lift(A, T0 + 200, "ban expired", expired_only=True) == again
    assert store.get(A) is None
