"""The fleet's Redis commands against a real redis-server: the stream, the active set (the longer
ban holds, a lift removes), trimming, pruning, and the hash tag every key shares."""

from __future__ import annotations

from ipaddress import ip_address

from portsentry.fleet.decision import Decision, unpack
from portsentry.fleet.link import Link
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
    ids = link.publish([ban("198.18.9.1", 1, NOW + 100), ban("198.18.9.1", 2, NOW + 50),
                        ban("198.18.9.2", 3, None), ban("198.18.9.3", 4, NOW + 10)])
    assert len(ids) == 4 and link.last_id() == ids[-1] and link.first_id() == ids[0]
    entries = link.read(b"0-0", 0, 10)
    assert [entry_id for entry_id, _fields in entries] == ids
    assert link.read(ids[1], 0, 1)[0][0] == ids[2]
    # The shorter second ban of .1 did not replace the longer one in the active set.
    active = {d.address.compressed: d.expires for batch in link.active()
              for d in (unpack(value, KEY, "unit") for value in batch)}
    assert active == {"198.18.9.1": NOW + 100, "198.18.9.2": None, "198.18.9.3": NOW + 10}
    link.publish([Decision("h1", 1, 5, "lift", ip_address("198.18.9.2"), None, NOW)])
    assert link.active_count() == 2
    assert link.prune(NOW + 20) == 1  # .3 ended
    assert link.active_count() == 1
    assert link.read(link.last_id(), 50, 10) == []  # nothing new: the blocking read times out
    link.close()


def test_every_key_carries_the_fleets_hash_tag(redis_url):
    link = Link(settings(redis_url))
    link.publish([ban("198.18.9.1", 1, NOW + 100)])
    keys = sorted(str(key, "ascii") for key in Link(settings(redis_url)).client.keys("*"))
    assert keys == ["portsentry:{unit}:bans", "portsentry:{unit}:decisions", "portsentry:{unit}:expiry"]
    from redis.crc import key_slot

    assert len({key_slot(key.encode()) for key in keys}) == 1
