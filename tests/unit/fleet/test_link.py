"""The fleet's Redis commands against a real redis-server: the stream, the active set (the longer
ban holds, a lift removes), trimming, pruning, and the hash tag every key shares."""

from __future__ import annotations

import contextlib
import socket
import threading
from ipaddress import ip_address

import pytest

from portsentry.fleet.decision import Decision, unpack
from portsentry.fleet.link import Link, LinkError, describe_error, link_errors, servers, slot_owner
from portsentry.fleet.settings import FleetSettings

KEY = b"k" * 32
NOW = 1_700_000_000.0


def settings(url: str) -> FleetSettings:
    return FleetSettings(url, "unit", "h1", KEY)


def ban(address: str, seq: int, expires: float | None) -> Decision:
    return Decision("h1", 1, seq, "ban", ip_address(address), expires, NOW)


def test_publish_read_and_the_active_set(redis_url):
    link = Link(settings(redis_url))
    assert link.last_id() == b"0-0" and link.ends() == (None, None)
    done = link.publish([ban("198.18.9.1", 1, NOW + 100), ban("198.18.9.1", 2, NOW + 50),
                         ban("198.18.9.2", 3, None), ban("198.18.9.3", 4, NOW + 10)])
    ids = done.ids
    # The host's mark: none before this first publish, then its last decision's epoch:seq.
    assert done.before is None and link.held_mark() == b"1:4"
    assert len(ids) == 4 and link.last_id() == ids[-1] and link.ends() == (ids[0], ids[-1])
    first, newest, entries = link.follow(b"0-0", 0, 10)
    assert (first, newest) == (ids[0], ids[-1])
    assert [entry_id for entry_id, _fields in entries] == ids
    assert link.follow(ids[1], 0, 1)[-1][0][0] == ids[2]
    # The shorter second ban of .1 did not replace the longer one in the active set.
    active = {d.address.compressed: d.expires for batch in link.active()
              for d in (unpack(value, KEY, "unit") for value in batch)}
    assert active == {"198.18.9.1": NOW + 100, "198.18.9.2": None, "198.18.9.3": NOW + 10}
    assert link.publish([Decision("h1", 1, 5, "lift", ip_address("198.18.9.2"), None, NOW)]).before == b"1:4"
    assert link.active_count() == 2 and link.held_mark() == b"1:5"
    assert link.prune(NOW + 20) == 1  # .3 ended
    assert link.active_count() == 1
    assert link.follow(link.last_id(), 50, 10)[-1] == []  # nothing new: the blocking read times out
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
    assert link.follow(b"0-0", 0, 10)[0] == done.ids[0] and link.ends()[0] == done.ids[0]
    assert link.last_id() == done.ids[-1] and link.prune(NOW + 200) == 0
    for each in (link, admin):
        each.close()


def _hostile_redis(path: str, reply: bytes) -> socket.socket:
    """A server on `path` that greets like Redis 7 and answers every other command with `reply`:
    what a Redis in the wrong hands, or a man in the middle of a plain-TCP link, can send."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)

    def client(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                if b"HELLO" in data:
                    conn.sendall(b"%1\r\n+proto\r\n:3\r\n")
                elif b"SETINFO" in data or b"SETNAME" in data:
                    conn.sendall(b"+OK\r\n" * (data.count(b"SETINFO") + data.count(b"SETNAME")))
                else:
                    conn.sendall(reply)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=client, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_a_hostile_server_s_error_reply_is_described_in_printable_text(tmp_path):
    """The description goes to the log and to `portsentry status` on the admin's terminal: the
    server's CR, NUL and escape sequences must not reach either."""
    forged = b"attackalert: Connect from host: 10.9.8.7/10.9.8.7 to TCP port: 22"
    path = str(tmp_path / "redis.sock")
    server = _hostile_redis(path, b"-ERR x\x1b[2K\r\x00" + forged + b"\r\n")
    try:
        link = Link(settings(f"unix://{path}"))
        with pytest.raises(link_errors()) as caught:
            link.last_id()
        text = describe_error(caught.value)
    finally:
        server.close()
    assert text is not None and text.isprintable(), repr(text)
    assert forged.decode() in text


def test_a_host_whose_clock_runs_ahead_does_not_prune_running_bans(redis_url):
    # Every host prunes the active set by its own clock: one set two hours ahead (an NTP gone
    # wrong) took every ban ending within two hours out of it, so hosts joining later, or
    # reading after a trim, never made them. A ban is pruned once Redis's clock says it ended too.
    import time

    link = Link(settings(redis_url))
    now = time.time()
    link.publish([ban("198.18.9.1", 1, now + 3600), ban("198.18.9.2", 2, now - 1)])
    assert link.prune(now + 7200) == 1
    assert {unpack(value, KEY, "unit").address.compressed for batch in link.active() for value in batch} == {
        "198.18.9.1"}
    link.close()


@pytest.mark.parametrize("which", ["bans_key", "expiry_key", "hosts_key"])
def test_a_publish_to_a_key_of_the_wrong_type_adds_nothing(redis_url, which):
    # The script added the stream entry, then failed on a key of the wrong type (written by
    # anyone with access): the publisher, told it failed, sent it again at every retry, a
    # copy of each decision of the batch in the stream every few seconds, trimming its past.
    link = Link(settings(redis_url))
    link.client.set(getattr(link, which), "not what the fleet writes")
    with pytest.raises(link_errors()) as caught:
        link.publish([ban("198.18.9.1", 1, NOW + 100), ban("198.18.9.2", 2, None)])
    assert "WRONGTYPE" in str(caught.value) and which.removesuffix("_key") in str(caught.value)
    assert link.client.xlen(link.stream) == 0 and link.client.exists(link.stream) == 0
    link.close()
