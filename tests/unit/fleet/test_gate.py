"""This host's say over a peer's decision: echoes, accepted hosts, replays, guards, the rate cap."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from portsentry.config.ignore import IgnoreEntry, IgnoreList
from portsentry.fleet.decision import Decision
from portsentry.fleet.gate import ECHO, MAX_PEERS, REASONS, Gate, Guards
from portsentry.fleet.tally import MAX_SAID, Tally
from portsentry.journal.telemetry import Telemetry

NOW = 1_700_000_000.0


def ban(address: str, host: str = "h1", seq: int = 1, epoch: int = 1,
        expires: float | None = NOW + 600) -> Decision:
    return Decision(host, epoch, seq, "ban", ip_address(address), expires, NOW)


def lift(address: str, host: str = "h1", seq: int = 1) -> Decision:
    return Decision(host, 1, seq, "lift", ip_address(address), None, NOW)


GUARDS = Guards(own=frozenset({ip_address("198.18.0.1")}),
                ignore=IgnoreList([IgnoreEntry(ip_network("198.18.5.0/24"), 1, "198.18.5.0/24")]),
                protected=frozenset({ip_address("198.18.0.254")}),
                broadcasts=frozenset({ip_address("198.18.0.255")}))


def test_each_guard_refuses_its_bans_and_names_itself():
    gate = Gate("h2", guards=GUARDS)
    candidates = ["198.18.0.1", "198.18.5.9", "198.18.0.254", "198.18.0.255", "127.0.0.1", "224.0.0.1",
                  "198.18.9.9"]
    verdicts = {address: gate.check(ban(address, seq=n), NOW) for n, address in enumerate(candidates, 1)}
    assert verdicts == {"198.18.0.1": "own_address", "198.18.5.9": "ignored", "198.18.0.254": "protected",
                        "198.18.0.255": "impossible", "127.0.0.1": "impossible", "224.0.0.1": "impossible",
                        "198.18.9.9": None}
    # Lifting is never harmful: a lift of a protected address passes.
    assert gate.check(lift("198.18.0.254", seq=9), NOW) is None


def test_echoes_other_hosts_and_expired_bans():
    gate = Gate("h2", accept=frozenset({"h1"}))
    assert gate.check(ban("198.18.9.9", host="h2"), NOW) == ECHO
    assert gate.check(ban("198.18.9.9", host="h3"), NOW) == "host_not_accepted"
    assert gate.check(ban("198.18.9.9", expires=NOW - 1), NOW) == "expired"
    assert gate.check(ban("198.18.9.9", seq=2, expires=None), NOW) is None  # forever


def test_an_older_decision_of_a_host_is_a_replay_but_the_active_set_is_not_ordered():
    gate = Gate("h2")
    assert gate.check(ban("198.18.9.1", seq=10), NOW) is None
    assert gate.check(lift("198.18.9.1", seq=5), NOW) == "replay"
    assert gate.check(ban("198.18.9.2", seq=10), NOW) is None  # equal: a republished active ban
    assert gate.check(ban("198.18.9.3", seq=1, epoch=2), NOW) is None  # a new epoch starts again
    assert gate.check(ban("198.18.9.4", seq=99, epoch=1), NOW) == "replay"
    assert gate.check(ban("198.18.9.5", seq=1, epoch=1), NOW, live=False) is None
    assert gate.seen == {"h1": (2, 1)}


def test_the_rate_cap_counts_fleet_bans_a_minute():
    gate = Gate("h2", rate_limit=3)
    verdicts = [gate.check(ban(f"198.18.9.{n}", seq=n), NOW) for n in range(1, 6)]
    assert verdicts == [None, None, None, "rate_limited", "rate_limited"]
    assert gate.check(ban("198.18.9.7", seq=7), NOW + 61) is None
    # The active set loaded at start is not capped.
    assert all(gate.check(ban(f"198.18.8.{n}", seq=99), NOW + 61, live=False) is None for n in range(10))
    # Nor the stream entries read again after it: ordered still, but not counted.
    again = [gate.check(ban(f"198.18.7.{n}", seq=100 + n), NOW + 61, capped=False) for n in range(10)]
    assert again == [None] * 10
    assert gate.check(ban("198.18.7.99", seq=1), NOW + 61, capped=False) == "replay"
    assert gate.check(ban("198.18.6.1", seq=200), NOW + 61) is None  # the cap's minute: 7 then this
    assert gate.check(ban("198.18.6.2", seq=201), NOW + 61) is None
    assert gate.check(ban("198.18.6.3", seq=202), NOW + 61) == "rate_limited"
    assert Gate("h2").rate_limited(NOW) is False  # 0: no cap


def test_the_rate_cap_goes_on_when_the_wall_clock_is_set_back():
    # Bans counted just before the clock went back a day stayed "in the last minute" for that day:
    # once the cap filled up, every fleet ban was refused until the clock caught up.
    gate = Gate("h2", rate_limit=3)
    assert [gate.check(ban(f"198.18.9.{n}", seq=n), NOW) for n in (1, 2)] == [None, None]
    back = NOW - 86400
    verdicts = [gate.check(ban(f"198.18.8.{n}", seq=10 + n), back + n) for n in range(1, 5)]
    assert verdicts == [None, None, None, "rate_limited"]  # a minute's cap from then on
    assert gate.check(ban("198.18.8.9", seq=20), back + 70) is None


def test_a_protected_or_own_address_written_ipv4_mapped_guards_the_ipv4_host():
    # A peer's decision names the canonical (IPv4) form; the guards may hold the mapped one
    # (`nameserver ::ffff:a.b.c.d` in resolv.conf).
    guards = Guards(own=frozenset({ip_address("::ffff:198.18.0.1")}),
                    protected=frozenset({ip_address("::ffff:198.18.0.254")}),
                    broadcasts=frozenset({ip_address("::ffff:198.18.0.255")}))
    gate = Gate("h2", guards=guards)
    assert gate.check(ban("198.18.0.1", seq=1), NOW) == "own_address"
    assert gate.check(ban("198.18.0.254", seq=2), NOW) == "protected"
    assert gate.check(ban("198.18.0.255", seq=3), NOW) == "impossible"


def test_a_peer_signing_as_a_store_origin_of_this_host_is_not_accepted():
    # The ban store names this host's own bans "local" (and "local-only" for lifts made here
    # only): a peer decision under that id was stored as this host's own ban and published again.
    gate = Gate("h2")
    for n, host in enumerate(("local", "local-only"), 1):
        assert gate.check(ban("198.18.9.9", host=host, seq=n), NOW) == "host_not_accepted"
        assert gate.check(lift("198.18.9.9", host=host, seq=n), NOW) == "host_not_accepted"
        assert gate.check(ban("198.18.9.9", host=host, seq=n), NOW, live=False) == "host_not_accepted"


def test_a_peers_ban_of_a_link_local_address_is_not_applied_here():
    # fe80::7 or 169.254.1.7 on a peer's link is a host of that link only: the same address here
    # is whoever sits on this host's link, and no peer has seen it.
    gate = Gate("h2")
    assert gate.check(ban("fe80::7", seq=1), NOW) == "link_local"
    assert gate.check(ban("169.254.1.7", seq=2), NOW) == "link_local"
    assert gate.check(lift("fe80::7", seq=3), NOW) is None  # a lift harms nobody
    assert gate.check(ban("fd00:18::7", seq=4), NOW) is None
    assert "link_local" in REASONS


def test_a_key_holder_inventing_host_ids_cannot_grow_what_this_host_remembers():
    # Every signed decision from a new host id added an entry to `seen`, kept in memory, copied
    # at every read and written to fleet.json for good: a key holder writing lifts under 100,000
    # made-up ids made each host keep 100,000 (docs/fleet.md: the key holder can ban, at most the
    # rate cap a minute).
    gate = Gate("me")
    for n in range(MAX_PEERS):
        assert gate.check(lift("198.18.7.1", host=f"h{n}"), NOW) is None
    assert gate.check(lift("198.18.7.1", host="one-too-many"), NOW) == "host_not_accepted"
    assert "one-too-many" not in gate.seen and len(gate.seen) == MAX_PEERS
    assert gate.check(lift("198.18.7.1", host="h7", seq=2), NOW) is None  # the known go on


def test_refusals_said_once_per_host_are_said_for_a_bounded_number_of_hosts():
    lines: list[str] = []
    tally = Tally(lines.append, Telemetry(), lambda: NOW, "redis://hub")
    for n in range(3 * MAX_SAID):
        tally.refused("protected", ban("198.18.0.254", host=f"h{n}"))
    assert tally.status()["refused"] == {"protected": 3 * MAX_SAID}
    assert len(lines) == MAX_SAID + 1
    assert lines[-1].startswith(f"fleet: refusals of more than {MAX_SAID} kinds")
