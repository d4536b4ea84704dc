"""What a fleet member (or anyone with write access to the fleet's keys) can make a host read:
huge stream entries and fields, an entry of very many fields, a huge active ban or mark, on a
real redis-server. The reader takes a bounded amount of memory, refuses such entries as
malformed and goes on past them."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import ip_address

from portsentry.fleet import link as link_module
from portsentry.fleet.decision import Decision, encode, pack
from portsentry.fleet.link import Link
from portsentry.fleet.node import FleetNode
from tests.unit.fleet.test_node import KEY, node

HUGE = 48 * 2**20  # one field; the tests' peaks must stay far below it
BOUND = 8 * 2**20


@contextmanager
def peak() -> Iterator[Callable[[], int]]:
    """The most memory Python held (tracemalloc) while the block ran, in bytes."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def ban(address: str, seq: int) -> Decision:
    return Decision("h1", 1, seq, "ban", ip_address(address), None, time.time())



def read_all_within_bound(reader: FleetNode, link: Link) -> None:
    """`reader` reads all there is on `link`, holding at most BOUND bytes at any time."""
    with peak() as most:
        while reader.read_once(link, 0):
            pass
        used = most()
    assert used < BOUND, f"the reader held {used >> 20} MiB"

def test_huge_stream_entries_are_refused_as_malformed_without_being_read(tmp_path, redis_url):
    two, kernel, _log = node(tmp_path, redis_url, "h2")
    link = Link(two.settings)
    two._catch_up(link)
    big = b"x" * HUGE
    link.client.xadd(link.stream, {b"d": big, b"s": b"0" * 64})
    link.client.xadd(link.stream, {b"d": b"1|h1|1|1|ban|198.18.9.1|-|1.000000|", b"s": big})
    link.client.xadd(link.stream, {b"d": big, b"s": big, b"x": big})
    link.client.xadd(link.stream, encode(ban("198.18.9.7", 2), KEY, "unit"))
    del big
    read_all_within_bound(two, link)
    assert two.status()["refused"] == {"malformed": 2, "unsigned": 1}
    assert set(kernel.held) == {ip_address("198.18.9.7")}  # and it went on past them
    link.close()


def test_an_entry_of_very_many_fields_is_read_as_its_two(tmp_path, redis_url):
    two, kernel, _log = node(tmp_path, redis_url, "h2")
    link = Link(two.settings)
    two._catch_up(link)
    fields = encode(ban("198.18.9.8", 1), KEY, "unit")
    padding = [item for n in range(300_000) for item in (f"f{n}", "v")]
    link.client.execute_command("XADD", link.stream, "*", *padding, b"d", fields[b"d"], b"s", fields[b"s"])
    del padding
    read_all_within_bound(two, link)
    assert set(kernel.held) == {ip_address("198.18.9.8")}
    link.close()


def test_a_huge_entry_arriving_during_the_blocking_read_is_not_taken_in(tmp_path, redis_url):
    two, _kernel, _log = node(tmp_path, redis_url, "h2")
    link, writer = Link(two.settings), Link(two.settings)
    two._catch_up(link)
    big = b"x" * HUGE

    def write() -> None:
        time.sleep(0.3)
        writer.client.xadd(writer.stream, {b"d": big})

    thread = threading.Thread(target=write)
    with peak() as most:
        thread.start()
        entries = link.follow(b"0-0", 5000, 10)[-1]  # it came while the read waited
        used = most()
    thread.join()
    assert used < BOUND, f"the reader held {used >> 20} MiB"
    assert len(entries) == 1 and entries[0][1] == {}
    for each in (link, writer):
        each.close()


def test_a_huge_mark_or_active_ban_is_read_cut(tmp_path, redis_url):
    one, _kernel, _log = node(tmp_path, redis_url, "h1")
    link = Link(one.settings)
    big = b"7" * HUGE
    link.client.hset(link.hosts_key, "h1", big)
    link.client.hset(link.bans_key, "198.18.9.9", big)
    del big
    with peak() as most:
        held = link.held_mark()
        before = link.publish([ban("198.18.9.10", 5)]).before
        active = [value for batch in link.active() for value in batch]
        used = most()
    assert used < BOUND, f"the reader held {used >> 20} MiB"
    assert held is not None and held == before and len(held) <= 64
    assert sorted(len(value) for value in active)[0] == 0  # refused as malformed when applied
    link.close()


def test_a_joining_host_keeps_only_the_active_bans_that_pass_not_all_it_read(tmp_path, redis_url,
                                                                             monkeypatch):
    # The active set was read whole into memory before any value was checked: junk values of
    # 1 KiB (anyone with write access to the hash, no key needed) cost every joining host their
    # total, 100 MB for 100,000. Now one batch of them at most (1,000 here: 30,000 take 30 MB).
    monkeypatch.setattr(link_module, "SNAPSHOT_BATCH", 1000)
    two, kernel, _log = node(tmp_path, redis_url, "h2")
    link = Link(two.settings)
    junk = b"j" * 1000
    for start in range(0, 30_000, 2000):
        link.client.hset(link.bans_key, mapping={f"198.19.{n >> 8 & 255}.{n & 255}-{n}": junk
                                                 for n in range(start, start + 2000)})
    link.client.hset(link.bans_key, "198.18.9.11", pack(ban("198.18.9.11", 1), KEY, "unit"))
    with peak() as most:
        two._catch_up(link)
        used = most()
    assert used < BOUND, f"the reader held {used >> 20} MiB"
    assert two.status()["refused"] == {"malformed": 30_000}
    assert set(kernel.held) == {ip_address("198.18.9.11")}
    link.close()


_MANY_FIELDS = """
local fields = {}
for n = 1, tonumber(ARGV[2]) do fields[#fields + 1] = 'f' .. n; fields[#fields + 1] = 'v' end
for _ = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', unpack(fields)) end
"""


def test_a_read_of_entries_of_many_fields_ends_in_time_and_goes_on(tmp_path, redis_url, monkeypatch):
    # A read of 1,000 entries took as long as Redis took to go through all their fields: 100
    # entries of 100,000 fields took 5.8 s, 200 would pass READ_TIMEOUT (10 s). The read timed
    # out, was tried again from the same cursor, timed out again: the reader never got past
    # them (and Redis ran the script to its end every time). Here 0.5 s, and 9 million fields.
    two, kernel, _log = node(tmp_path, redis_url, "h2")
    writer = Link(two.settings)
    monkeypatch.setattr(link_module, "READ_TIMEOUT", 0.5)
    link = Link(two.settings)
    two._catch_up(link)
    writer.client.eval(_MANY_FIELDS, 1, writer.stream, 3000, 3000)
    writer.client.xadd(writer.stream, encode(ban("198.18.9.12", 1), KEY, "unit"))
    writer.close()
    started = time.monotonic()
    while two.read_once(link, 0):
        assert time.monotonic() - started < 60
    assert set(kernel.held) == {ip_address("198.18.9.12")}
    assert two.status()["refused"] == {"malformed": 3000}
    link.close()
