"""Two hosts' fleet nodes on one real redis-server (Unix socket), each with its own ban store and
a recording kernel: what is published, what is applied, echoes, refusals, cursors, Redis down."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path

from prometheus_client import CollectorRegistry

from portsentry.bans.store import ORIGIN_LOCAL_ONLY
from portsentry.fleet.apply import CLOCK_SKEW
from portsentry.fleet.decision import Decision, encode, unpack
from portsentry.fleet.gate import Guards
from portsentry.fleet.link import Link
from portsentry.fleet.node import REFILL_WINDOW, REFILLS_MAX, FleetNode
from portsentry.fleet.settings import FleetSettings
from portsentry.journal.telemetry import Telemetry
from portsentry.service.metrics import Metrics
from tests.unit.bans.test_lifecycle import Kernel, manager

KEY = b"s" * 32
SCANNER = ip_address("198.18.9.1")


def node(tmp_path: Path, url: str, host: str, **settings: object) -> tuple[FleetNode, Kernel, list[str]]:
    workdir = tmp_path / host
    workdir.mkdir(exist_ok=True)
    bans, kernel, _lines, _commands = manager(workdir)
    log: list[str] = []
    fleet = FleetNode(FleetSettings(url, "unit", host, KEY, **settings), bans, str(workdir),  # type: ignore[arg-type]
                      log.append)
    return fleet, kernel, log


def local_ban(fleet: FleetNode, address: str, duration: float | None = 600, now: float | None = None) -> None:
    """As a scan's block does it: recorded, then put in the kernel."""
    now = time.time() if now is None else now
    fleet.bans.remember(ip_address(address), reason="TCP SYN scan", mode="stcp", port=1, now=now,
                        duration=duration, hosts_deny_line=None, native=True)
    fleet.bans.ban_native(ip_address(address), duration)


def deliver(sender: FleetNode, receiver: FleetNode, url: str) -> None:
    """One publish round on the sender and one read round on the receiver, without threads."""
    out, into = Link(sender.settings), Link(receiver.settings)
    if sender.published is None:
        sender.connected(out)
    while sender.publish_once(out):
        pass
    if receiver.stream is None:
        receiver._catch_up(into)
    while receiver.read_once(into, block_ms=0):
        pass
    out.close()
    into.close()


def test_a_ban_made_on_one_host_is_made_on_the_other_and_not_echoed(tmp_path, redis_url):
    one, _k1, _log1 = node(tmp_path, redis_url, "h1")
    two, kernel2, log2 = node(tmp_path, redis_url, "h2")
    deliver(one, two, redis_url)  # both joined, nothing yet
    local_ban(one, "198.18.9.1")
    local_ban(one, "198.18.9.2", None)
    deliver(one, two, redis_url)
    assert set(kernel2.held) == {SCANNER, ip_address("198.18.9.2")}
    assert kernel2.held[ip_address("198.18.9.2")] is None
    held = two.bans.store.get(SCANNER)
    assert held is not None and held.origin == "h1" and held.reason.startswith("fleet: ")
    assert "attackalert: Host 198.18.9.1 has been blocked via fleet (from h1)" in log2
    # Host 2 publishes nothing of it (not its ban), and host 1 skips its own entries.
    deliver(two, one, redis_url)
    assert one.status()["received"] == 0 and two.status()["published"] == 0
    assert one.status()["published"] == 2 and two.status()["applied"] == 2
    # Applying the same entries again changes nothing.
    changes = len(two.bans.store.changes(0))
    two.applier.apply_entries(Link(two.settings).follow(b"0-0", 0, 100)[-1])
    assert len(two.bans.store.changes(0)) == changes


def test_unblock_lifts_fleet_wide_except_local_only_and_expiry_is_not_sent(tmp_path, redis_url):
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    deliver(one, two, redis_url)
    for address in ("198.18.9.1", "198.18.9.2", "198.18.9.3"):
        local_ban(one, address)
    deliver(one, two, redis_url)
    now = time.time()
    one.bans.lift(ip_address("198.18.9.1"), now, "unblocked by admin")
    one.bans.lift(ip_address("198.18.9.2"), now, "unblocked here", origin=ORIGIN_LOCAL_ONLY)
    one.bans.store.lift(ip_address("198.18.9.3"), now + 10_000, "ban expired")  # recorded as expire
    published = int(str(one.status()["published"]))
    deliver(one, two, redis_url)
    assert one.status()["published"] == published + 1  # only the fleet-wide unblock
    assert set(kernel2.held) == {ip_address("198.18.9.2"), ip_address("198.18.9.3")}
    lifted = two.bans.store.changes(0)[-1]
    assert (lifted.kind, lifted.origin, lifted.address) == ("lift", "h1", SCANNER)


def test_forged_replayed_and_guarded_decisions_are_refused_and_counted(tmp_path, redis_url):
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, log2 = node(tmp_path, redis_url, "h2", accept_hosts=frozenset({"h1"}))
    registry = CollectorRegistry()
    two.tally.telemetry = Telemetry(metrics=Metrics(registry))  # what METRICS_LISTEN serves
    deliver(one, two, redis_url)
    two.gate.set_guards(Guards(protected=frozenset({ip_address("198.18.0.254")})))
    link = Link(one.settings)
    forged = Decision("h1", 1, 10**6, "ban", ip_address("198.18.9.66"), None, time.time())
    link.client.xadd(link.stream, {b"d": forged.payload()})
    link.client.xadd(link.stream, encode(forged, b"x" * 32, "unit"))
    link.client.xadd(link.stream, encode(Decision("h3", 1, 1, "ban", ip_address("198.18.9.67"), None,
                                                  time.time()), KEY, "unit"))
    local_ban(one, "198.18.0.254")
    deliver(one, two, redis_url)
    # A replay: an old signed lift copied back into the stream after a newer ban.
    local_ban(one, "198.18.9.5")
    deliver(one, two, redis_url)
    old = Decision("h1", one.epoch, 1, "lift", ip_address("198.18.9.5"), None, time.time())
    link.client.xadd(link.stream, encode(old, KEY, "unit"))
    deliver(one, two, redis_url)
    assert set(kernel2.held) == {ip_address("198.18.9.5")}
    assert two.status()["refused"] == {"unsigned": 1, "bad_signature": 1, "host_not_accepted": 1,
                                       "protected": 1, "replay": 1}
    assert any("refused ban of 198.18.0.254 from h1: protected" in line for line in log2)
    refused = two.status()["refused"]
    assert isinstance(refused, dict)
    for reason, count in refused.items():
        assert registry.get_sample_value("portsentry_fleet_refused_total", {"reason": reason}) == count
    assert registry.get_sample_value("portsentry_fleet_applied_total") == two.status()["applied"] == 1
    assert registry.get_sample_value("portsentry_fleet_received_total") == two.status()["received"]
    assert (registry.get_sample_value("portsentry_fleet_lag_seconds") or 0.0) > 0.0


def test_a_late_host_loads_the_active_set_and_cursors_survive_a_restart(tmp_path, redis_url):
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    deliver(one, one, redis_url)
    for n in range(1, 51):
        local_ban(one, f"198.18.9.{n}")
    deliver(one, one, redis_url)
    late, kernel, log = node(tmp_path, redis_url, "h3")
    deliver(one, late, redis_url)
    assert len(kernel.held) == 50
    assert any(line.startswith("fleet: loaded the fleet's active set: 50 of 50") for line in log)
    late._save(force=True)
    state = json.loads((tmp_path / "h3" / "fleet.json").read_text())
    assert state["fleet"] == "unit" and state["stream"] == late.stream.decode()  # type: ignore[union-attr]
    again = FleetNode(late.settings, late.bans, str(tmp_path / "h3"), log.append)
    assert again.stream == late.stream and again.epoch == late.epoch


def test_redis_down_leaves_local_bans_alone_and_the_backlog_goes_out_later(tmp_path, redis_url):
    down = str(tmp_path / "nothing.sock")
    one, kernel1, log = node(tmp_path, f"unix://{down}", "h1")
    one.start(Guards())
    try:
        local_ban(one, "198.18.9.1")
        deadline = time.monotonic() + 5
        while one.status()["link"] != "down" or one.status()["error"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert SCANNER in kernel1.held  # the local ban stands
        assert one.status()["published"] == 0
    finally:
        one.stop()
    # The same host with Redis back: what waited in its store goes out.
    back = FleetNode(FleetSettings(redis_url, "unit", "h1", KEY), one.bans, str(tmp_path / "h1"), log.append)
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    for fleet in (two, back):
        fleet.start(Guards())
    try:
        deadline = time.monotonic() + 10
        while SCANNER not in kernel2.held:
            assert time.monotonic() < deadline, (back.status(), two.status())
            time.sleep(0.02)
        local_ban(back, "198.18.9.2")  # woken at once by the ban, not at the next poll
        deadline = time.monotonic() + 2
        while ip_address("198.18.9.2") not in kernel2.held:
            assert time.monotonic() < deadline, (back.status(), two.status())
            time.sleep(0.005)
        assert back.status()["link"] == "up" and two.status()["lag_ms"] is not None
    finally:
        back.stop()
        two.stop()


def test_entries_read_again_after_a_failure_are_not_replays(tmp_path, redis_url, monkeypatch):
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    deliver(one, two, redis_url)
    local_ban(one, "198.18.9.1")
    local_ban(one, "198.18.9.2")  # two: the first one's seq is below the second's
    out = Link(one.settings)
    while one.publish_once(out):
        pass
    entries = Link(two.settings).follow(two.stream or b"0-0", 0, 100)[-1]
    from portsentry.bans.store import StoreError

    def busy(*_args, **_kwargs):
        raise StoreError("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(two.bans.store, "ban_absent", busy)
        try:
            two.applier.apply_entries(entries)
        except StoreError:
            pass
        else:
            raise AssertionError("the failure did not come through")
    two.applier.apply_entries(entries)  # the reader reads them again from its unchanged cursor
    assert set(kernel2.held) == {SCANNER, ip_address("198.18.9.2")}
    assert "replay" not in two.status()["refused"]  # type: ignore[operator]


def wait_until(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def settled(read: Callable[[], object], quiet: float = 0.5, timeout: float = 15.0) -> object:
    """What `read` gives once it gave the same twice `quiet` seconds apart."""
    deadline, last = time.monotonic() + timeout, read()
    while True:
        time.sleep(quiet)
        now = read()
        if now == last:
            return now
        assert time.monotonic() < deadline, f"still moving: {now}"
        last = now


def active_in_redis(link: Link) -> set[str]:
    return {unpack(value, KEY, "unit").address.compressed for batch in link.active() for value in batch}


def test_a_redis_that_lost_its_data_without_an_error_is_refilled(tmp_path, redis_url):
    """A Redis restarted without persistence while a host sat idle: redis-py reconnects that
    host's dead connection without a word, so no command fails. FLUSHALL on a live connection
    is the same loss with no error at all: the host's mark tells it."""
    one, _kernel, log = node(tmp_path, redis_url, "h1")
    admin = Link(one.settings)
    one.start(Guards())
    try:
        local_ban(one, "198.18.9.1")
        local_ban(one, "198.18.9.2", None)
        wait_until(lambda: active_in_redis(admin) == {"198.18.9.1", "198.18.9.2"}, "the bans in Redis")
        admin.client.flushall()
        wait_until(lambda: active_in_redis(admin) == {"198.18.9.1", "198.18.9.2"}, "the bans back in Redis")
        assert any("lost decisions of this host (it holds none" in line for line in log), log
        # The refill is counted after its mark is set, a moment after its bans show in Redis, and
        # how many decisions the join sent depends on when the bans were made: the count read
        # once it has stood still for half a second, not at once (it moved on during the wait).
        published = settled(lambda: one.status()["published"])
        time.sleep(1.5)
        assert one.status()["published"] == published
    finally:
        one.stop()
        admin.close()


def test_redis_back_from_an_older_snapshot_forgets_lost_unblocks_and_gets_the_bans_back(tmp_path, redis_url):
    one, _k1, log = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    admin = Link(one.settings)
    keys = one.settings.keys()
    deliver(one, two, redis_url)
    local_ban(one, "198.18.9.1")
    deliver(one, two, redis_url)
    snapshot = {key: admin.client.dump(key) for key in keys}
    local_ban(one, "198.18.9.2")
    one.bans.lift(SCANNER, time.time(), "unblocked by admin")
    deliver(one, two, redis_url)
    assert set(kernel2.held) == {ip_address("198.18.9.2")} and active_in_redis(admin) == {"198.18.9.2"}
    local_ban(two, "198.18.9.1")  # the scanner came back to host 2 after the unblock
    for key, value in snapshot.items():  # Redis restarted from the snapshot taken before those two
        admin.client.restore(key, 0, value, replace=True)
    assert active_in_redis(admin) == {"198.18.9.1"}
    # Nothing new to publish: the periodic look at the mark finds the loss.
    out = Link(one.settings)
    one.check_mark(out)
    assert active_in_redis(admin) == {"198.18.9.2"}
    assert any("lost decisions of this host (it holds " in line and "none" not in line for line in log), log
    # A host that joins now loads the right set. Host 2 keeps the ban it made after the unblock:
    # the lost unblock is not sent down the stream again, where it would be a stale lift there.
    late, kernel3, _l3 = node(tmp_path, redis_url, "h3")
    deliver(one, late, redis_url)
    deliver(one, two, redis_url)
    assert set(kernel3.held) == {ip_address("198.18.9.2")}
    assert set(kernel2.held) == {ip_address("198.18.9.1"), ip_address("198.18.9.2")}
    held = two.bans.store.get(SCANNER)
    assert held is not None and held.origin == "local"
    assert not two.status()["refused"]
    for link in (out, admin):
        link.close()


def test_a_publish_into_a_redis_that_lost_its_data_refills_it(tmp_path, redis_url):
    one, _k1, _log = node(tmp_path, redis_url, "h1")
    admin = Link(one.settings)
    out = Link(one.settings)
    one.connected(out)
    local_ban(one, "198.18.9.1")
    while one.publish_once(out):
        pass
    admin.client.flushall()
    local_ban(one, "198.18.9.2")
    one.publish_once(out)  # the mark Redis held before this publish is not the last one sent
    assert active_in_redis(admin) == {"198.18.9.1", "198.18.9.2"}
    assert admin.held_mark() == out.held_mark() is not None
    for link in (out, admin):
        link.close()


def test_a_reader_whose_next_entries_were_trimmed_loads_the_set_and_keeps_the_lifts_left(tmp_path, redis_url):
    """Trimmed (or lost) while the reader stayed connected: every read checks, not only a
    reconnect. The lift that survived the trim is applied after the set, not skipped."""
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, log2 = node(tmp_path, redis_url, "h2")
    deliver(one, two, redis_url)
    local_ban(one, "198.18.9.1")
    deliver(one, two, redis_url)
    local_ban(one, "198.18.9.2")
    local_ban(one, "198.18.9.3")
    one.bans.lift(SCANNER, time.time(), "unblocked by admin")
    out = Link(one.settings)
    while one.publish_once(out):
        pass
    entries = out.follow(two.stream or b"0-0", 0, 10)[-1]
    assert len(entries) == 3  # ban .2, ban .3, lift .1
    out.client.xtrim(out.stream, minid=entries[1][0], approximate=False)  # ban .2 is gone
    into = Link(two.settings)
    while two.read_once(into, block_ms=0):
        pass
    assert set(kernel2.held) == {ip_address("198.18.9.2"), ip_address("198.18.9.3")}
    assert any("what followed this host's cursor is gone" in line for line in log2), log2
    assert not two.status()["refused"]
    for link in (out, into):
        link.close()


def test_two_hosts_under_one_id_are_named_and_do_not_make_each_other_resend(tmp_path, redis_url):
    """Cloned machines keep one host name, the default FLEET_HOST_ID: each sees a mark it never
    sent. Taken for a loss, each publish of one would make the other resend every ban."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, _k1, log1 = node(tmp_path / "a", redis_url, "web")
    time.sleep(0.01)  # another epoch, as another machine's state has
    second, _k2, log2 = node(tmp_path / "b", redis_url, "web")
    links = [Link(first.settings), Link(second.settings)]
    for fleet, link in zip((first, second), links, strict=True):
        fleet.connected(link)
    for n in range(1, 6):
        for fleet, link in zip((first, second), links, strict=True):
            local_ban(fleet, f"198.18.9.{n}")
            fleet.publish_once(link)
            fleet.check_mark(link)
    assert first.status()["published"] == second.status()["published"] == 5  # each ban once, no resend
    for log in (log1, log2):
        said = [line for line in log if "another host publishes as 'web'" in line]
        assert len(said) == 1 and "FLEET_HOST_ID" in said[0], log
        assert not any("lost decisions" in line for line in log), log
    for link in links:
        link.close()


def test_a_redis_that_keeps_losing_data_is_refilled_at_most_so_often(tmp_path, redis_url):
    one, _kernel, log = node(tmp_path, redis_url, "h1")
    admin, out = Link(one.settings), Link(one.settings)
    one.connected(out)
    local_ban(one, "198.18.9.1")
    one.publish_once(out)
    refills = 0
    for _ in range(REFILLS_MAX + 2):
        admin.client.flushall()
        refills += one.check_mark(out)
    assert refills == REFILLS_MAX and active_in_redis(admin) == set()
    assert sum("times within 60 s" in line for line in log) == 1
    # The window passes: the loss seen while at the cap is refilled at the next look.
    one._refills = deque(at - REFILL_WINDOW for at in one._refills)
    assert one.check_mark(out) and active_in_redis(admin) == {"198.18.9.1"}
    assert not one.check_mark(out)  # and once only
    for link in (admin, out):
        link.close()


def test_entries_read_again_after_loading_the_set_do_not_use_up_the_rate_cap(tmp_path, redis_url):
    """They are the fleet's past, already in the set just loaded; only what comes after counts."""
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2", ban_rate_limit=2)
    deliver(one, two, redis_url)
    local_ban(one, "198.18.9.1")
    deliver(one, two, redis_url)
    for n in (2, 3, 4, 5):
        local_ban(one, f"198.18.9.{n}")
    out = Link(one.settings)
    while one.publish_once(out):
        pass
    entries = out.follow(two.stream or b"0-0", 0, 10)[-1]
    out.client.xtrim(out.stream, minid=entries[1][0], approximate=False)  # ban .2 is gone
    into = Link(two.settings)
    while two.read_once(into, block_ms=0):
        pass
    assert len(kernel2.held) == 5 and not two.status()["refused"]
    # What comes after still counts against the cap (two a minute; .1 took one before the trim).
    for n in (6, 7):
        local_ban(one, f"198.18.9.{n}")
    deliver(one, two, redis_url)
    assert two.status()["refused"] == {"rate_limited": 1}
    for link in (out, into):
        link.close()


def test_a_ban_lifted_here_only_stays_lifted_when_its_origin_sends_it_again(tmp_path, redis_url):
    """`unblock --local` of a peer's ban on host 2, then Redis loses everything and host 1 sends
    its bans again: the same bans, so host 2 does not make them again, from the stream or from the
    active set. A ban host 1 lengthens, or makes anew after a fleet-wide unblock, is news."""
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    timed, forever, other = (ip_address(f"198.18.9.{n}") for n in (1, 2, 3))
    deliver(one, two, redis_url)
    local_ban(one, str(timed))
    local_ban(one, str(forever), None)
    local_ban(one, str(other))
    deliver(one, two, redis_url)
    for address in (timed, forever):
        assert two.bans.lift(address, time.time(), "unblocked here", origin=ORIGIN_LOCAL_ONLY)
    assert set(kernel2.held) == {other}
    admin, out = Link(one.settings), Link(one.settings)
    admin.client.flushall()
    one.check_mark(out)  # the loss found: all three sent again, under new seqs
    assert active_in_redis(admin) == {str(timed), str(forever), str(other)}
    deliver(one, two, redis_url)
    assert set(kernel2.held) == {other}
    two.applier.apply_active(admin.active())
    assert set(kernel2.held) == {other}
    # Host 1 sees the scanner again: a longer ban is another ban.
    local_ban(one, str(timed), 1200)
    deliver(one, two, redis_url)
    assert set(kernel2.held) == {timed, other}
    # A fleet-wide unblock, then a new ban for ever: made here too.
    one.bans.lift(forever, time.time(), "unblocked by admin")
    deliver(one, two, redis_url)
    local_ban(one, str(forever), None)
    deliver(one, two, redis_url)
    assert set(kernel2.held) == {timed, forever, other}
    for link in (out, admin):
        link.close()


# nf_tables refuses (ERANGE) a set element timeout of 2**64 ns or more, about 584 years: one such
# element fails the whole batch it is sent in, the other bans of the batch with it.
NFT_TIMEOUT_LIMIT = (2**64 - 1) / 1e9


def test_a_local_ban_longer_than_a_decision_can_say_does_not_stall_publishing(tmp_path, redis_url):
    # `portsentry block ADDR --duration 99999999w` is taken by the store; its decision once raised
    # in every publish, so neither it nor any later ban ever left this host.
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    deliver(one, two, redis_url)
    local_ban(one, "198.18.9.1", 99999999 * 7 * 86400)
    local_ban(one, "198.18.9.2", 600)
    deliver(one, two, redis_url)
    assert one.status()["backlog"] == 0
    assert kernel2.held[ip_address("198.18.9.1")] is None  # further out than any kernel can time
    assert 0 < kernel2.held[ip_address("198.18.9.2")] <= 600  # type: ignore[operator]


def test_a_peer_ban_beyond_what_the_kernel_can_time_is_made_forever(tmp_path, redis_url):
    # A peer (another version, or a clock far off) may sign any expiry below 10**12: as a timeout,
    # one in the year 3000 made nf_tables refuse the whole batch, on every host of the fleet.
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    deliver(one, two, redis_url)
    link = Link(one.settings)
    far = Decision("h1", one.epoch, 1, "ban", ip_address("198.18.9.7"), 32503680000.0, time.time())
    link.publish([far])
    deliver(one, two, redis_url)
    late, kernel3, _l3 = node(tmp_path, redis_url, "h3")  # loads it from the active set
    deliver(one, late, redis_url)
    for kernel in (kernel2, kernel3):
        timeout = kernel.held[ip_address("198.18.9.7")]
        assert timeout is None or timeout < NFT_TIMEOUT_LIMIT
    link.close()


def test_a_lift_read_late_spares_a_ban_this_host_made_after_it(tmp_path, redis_url):
    # Host 2 was behind on the stream (Redis away) when its own detection banned the scanner,
    # after host 1's admin had unblocked it: that lift, read now, is older than the ban and must
    # not take it, or the scanner would be banned on every host but the one that saw it. A ban
    # made within CLOCK_SKEW of the lift cannot be told newer by two hosts' clocks: it is lifted.
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, _l2 = node(tmp_path, redis_url, "h2")
    deliver(one, two, redis_url)
    now = time.time()
    lifted_at = now - 4 * CLOCK_SKEW
    early, taken, close = ip_address("198.18.9.3"), ip_address("198.18.9.2"), ip_address("198.18.9.4")
    for address in (SCANNER, taken, early, close):
        local_ban(one, str(address), now=lifted_at - 1)
    local_ban(two, str(early), now=lifted_at - 1)  # before the lift: lifted with the others
    for address in (SCANNER, taken, early, close):
        one.bans.lift(address, lifted_at, "unblocked by admin")
    out = Link(one.settings)
    while one.publish_once(out):
        pass
    out.close()
    local_ban(two, str(SCANNER), now=now)  # well after the lift: its own, newer evidence
    local_ban(two, str(close), now=lifted_at + CLOCK_SKEW / 2)  # after it by a skewed clock only
    deliver(one, two, redis_url)
    held = two.bans.store.get(SCANNER)
    assert held is not None and held.active(time.time()) and SCANNER in kernel2.held
    assert two.status()["refused"] == {"stale": 1}
    assert taken not in kernel2.held and early not in kernel2.held and close not in kernel2.held


def test_a_reader_ahead_of_a_redis_restarted_empty_with_its_clock_behind_loads_the_set(tmp_path, redis_url):
    """Redis came back empty on a machine whose clock is behind the one it ran on: the ids of its
    new entries lie below the reader's cursor, so XREAD after the cursor returns nothing until
    the clock catches up, and a stream that is not empty did not look lost."""
    one, _k1, _l1 = node(tmp_path, redis_url, "h1")
    two, kernel2, log2 = node(tmp_path, redis_url, "h2")
    local_ban(one, "198.18.9.1")
    deliver(one, two, redis_url)
    assert set(kernel2.held) == {ip_address("198.18.9.1")}
    # The cursor an hour ahead of this Redis's clock: where the old server's ids had got to.
    two.stream = f"{int(time.time() * 1000) + 3_600_000}-0".encode()
    admin = Link(one.settings)
    admin.client.flushall()
    local_ban(one, "198.18.9.2")
    deliver(one, two, redis_url)  # the publisher refills Redis; the reader reads on
    assert set(kernel2.held) == {ip_address("198.18.9.1"), ip_address("198.18.9.2")}
    assert any("what followed this host's cursor is gone" in line for line in log2), log2
    admin.close()
