"""The fleet's Redis commands against a real redis-server: the stream, the active set (the longer
ban holds, a lift removes), trimming, pruning, and the hash tag every key shares."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from portsentry.fleet.decision import Decision, unpack
from portsentry.fleet.link import Link, LinkError, servers, slot_owner
from portsentry.fleet.settings import FleetSettings

KEY = b"k" * 32
NOW = 1_700_000_000.0


def settings(url: str) -> FleetSettings:
    return FleetSettings(url, "unit", "h1", KEY)


def ban(address: str, seq: int, expires: float | None) -> Decision:
    return Decision("h1", 1, seq, "ban", ip_address(address), expires, NOW)


def test_publish_read_and_the_active_set(redis_url):
    link = Link(settings(redis_url))
    assert link.last_id() == b"0-0" and link.first_id() is None
    done = link.publish([ban("198.18.9.1", 1, NOW + 100), ban("198.18.9.1", 2, NOW + 50),
                         ban("198.18.9.2", 3, None), ban("198.18.9.3", 4, NOW + 10)])
    ids = done.ids
    # The host's mark: none before this first publish, then its last decision's epoch:seq.
    assert done.before is None and link.held_mark() == b"1:4"
    assert len(ids) == 4 and link.last_id() == ids[-1] and link.first_id() == ids[0]
    first, entries = link.follow(b"0-0", 0, 10)
    assert first == ids[0]
    assert [entry_id for entry_id, _fields in entries] == ids
    assert link.follow(ids[1], 0, 1)[1][0][0] == ids[2]
    # The shorter second ban of .1 did not replace the longer one in the active set.
    active = {d.address.compressed: d.expires for batch in link.active()
              for d in (unpack(value, KEY, "unit") for value in batch)}
    assert active == {"198.18.9.1": NOW + 100, "198.18.9.2": None, "198.18.9.3": NOW + 10}
    assert link.publish([Decision("h1", 1, 5, "lift", ip_address("198.18.9.2"), None, NOW)]).before == b"1:4"
    assert link.active_count() == 2 and link.held_mark() == b"1:5"
    assert link.prune(NOW + 20) == 1  # .3 ended
    assert link.active_count() == 1
    assert link.follow(link.last_id(), 50, 10)[1] == []  # nothing new: the blocking read times out
    link.close()


def test_every_key_carries_the_fleets_hash_tag(redis_url):
    link = Link(settings(redis_url))
    link.publish([ban("198.18.9.1", 1, NOW + 100)])
    keys = sorted(str(key, "ascii") for key in Link(settings(redis_url)).client.keys("*"))
    assert keys == ["portsentry:{unit}:bans", "portsentry:{unit}:decisions", "portsentry:{unit}:expiry",
                    "portsentry:{unit}:hosts"]
    from redis.crc import key_slot

    assert len({key_slot(key.encode()) for key in keys}) == 1


def test_sentinel_and_cluster_urls_name_their_servers():
    spec = servers("rediss+sentinel://ps:secret@10.0.0.1,[fd00::2]:26380,sentinel-3:5/main/2?x=1", 26379)
    assert spec.hosts == (("10.0.0.1", 26379), ("fd00::2", 26380), ("sentinel-3", 5))
    assert spec.path == ("main", "2") and spec.username == "ps" and spec.options == {"x": "1"}
    assert spec.password == "secret" and "secret" not in repr(spec)
    assert servers("redis+cluster://[fd00::1],fd00::3", 6379).hosts == (("fd00::1", 6379), ("fd00::3", 6379))


def test_a_bad_server_list_is_an_error_that_hides_the_password():
    with pytest.raises(LinkError) as caught:
        servers("redis+cluster://u:hunter2@10.0.0.1:port", 6379)
    assert "hunter2" not in str(caught.value) and "10.0.0.1:port" in str(caught.value)


def test_the_owner_of_the_fleets_slot_is_read_from_cluster_slots():
    answer = [[0, 5460, [b"198.18.7.1", 7001, b"id1"], [b"198.18.7.4", 7004, b"id4"]],
              [5461, 10922, [b"198.18.7.2", 7002, b"id2"]], [10923, 16383, ["198.18.7.3", 7003, "id3"]]]
    assert slot_owner(answer, 0) == ("198.18.7.1", 7001)
    assert slot_owner(answer, 5461) == ("198.18.7.2", 7002)
    assert slot_owner(answer, 16383) == ("198.18.7.3", 7003)
    assert slot_owner(answer[:1], 9000) is None and slot_owner(None, 1) is None


def test_every_command_of_the_fleet_runs_under_the_acl_the_docs_give(redis_url):
    """docs/fleet.md's ACL user: its keys and the command categories it names, nothing else
    (no MULTI, no INFO): a command outside them would fail only on a production Redis."""
    admin = Link(settings(redis_url))
    rules = "on >a-long-password ~portsentry:* +@read +@write +@stream +@scripting +@connection -@dangerous"
    admin.client.execute_command("ACL", "SETUSER", "portsentry", *rules.split())
    path = redis_url.removeprefix("unix://")
    link = Link(FleetSettings(f"unix://portsentry@{path}", "unit", "h1", KEY, password="a-long-password"))
    assert admin.client.execute_command("CLIENT", "LIST").count(b"user=portsentry") == 0
    link.ping()
    assert admin.client.execute_command("CLIENT", "LIST").count(b"user=portsentry") == 1
    done = link.publish([ban("198.18.9.1", 1, NOW + 100), ban("198.18.9.2", 2, None)])
    assert done.before is None and link.held_mark() == b"1:2"
    link.set_mark(b"1:3")
    link.forget([ip_address("198.18.9.1")])
    assert link.active_count() == 1 and [len(batch) for batch in link.active()] == [1]
    assert link.follow(b"0-0", 0, 10)[0] == done.ids[0] and link.first_id() == done.ids[0]
    assert link.last_id() == done.ids[-1] and link.prune(NOW + 200) == 0
    for each in (link, admin):
        each.close()
