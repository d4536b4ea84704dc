"""The fleet node when Redis fails part-way (a refill or a publish cut short), and when the wall
clock is set back under the publisher."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

import pytest
import redis

from portsentry.fleet import node as node_module
from portsentry.fleet.decision import Decision
from portsentry.fleet.gate import Guards
from portsentry.fleet.link import Link, LinkError, Published, link_errors
from portsentry.fleet.node import FleetNode
from portsentry.fleet.settings import FleetSettings
from tests.unit.bans.test_lifecycle import manager
from tests.unit.fleet.test_node import KEY, active_in_redis, local_ban, node, wait_until


def test_a_refill_cut_short_is_finished_at_the_next_look(tmp_path, redis_url, monkeypatch):
    # Redis lost this host's bans; the refill that sends them again fails after its first batch
    # (Redis gone again, a timeout). Redis then holds the mark of that first batch: taken for the
    # last decision sent, the rest of the refill was never sent, and nothing said so.
    one, _kernel, _log = node(tmp_path, redis_url, "h1")
    admin, out = Link(one.settings), Link(one.settings)
    one.connected(out)
    for n in (1, 2, 3):
        local_ban(one, f"198.18.9.{n}")
    while one.publish_once(out):
        pass
    admin.client.flushall()
    monkeypatch.setattr(node_module, "PUBLISH_BATCH", 1)
    real = Link.publish
    batches: list[int] = []

    def cut_short(link: Link, decisions: Sequence[Decision]) -> Published:
        batches.append(len(decisions))
        if len(batches) == 2:
            raise redis.ConnectionError("Connection closed by server.")
        return real(link, decisions)

    with monkeypatch.context() as patch:
        patch.setattr(Link, "publish", cut_short)
        with pytest.raises(redis.ConnectionError):
            one.check_mark(out)
    assert len(active_in_redis(admin)) == 1
    again = Link(one.settings)
    one.connected(again)  # the publisher's reconnect
    assert active_in_redis(admin) == {"198.18.9.1", "198.18.9.2", "198.18.9.3"}
    for link in (admin, out, again):
        link.close()


def test_a_publish_cut_short_is_not_taken_for_another_host(tmp_path, redis_url, monkeypatch):
    # A connection lost (or a timeout, an OOM answer) after Redis took the first decision of a
    # batch: Redis holds a mark between the last one known taken and the last one sent. That
    # was taken for another portsentry under this FLEET_HOST_ID, said once for good, and the
    # batch's peers refused its bans sent again as replays.
    one, _kernel, log = node(tmp_path, redis_url, "h1")
    two, kernel2, _log2 = node(tmp_path, redis_url, "h2")
    admin, out, into = Link(one.settings), Link(one.settings), Link(two.settings)
    one.connected(out)
    two._catch_up(into)  # host 2 follows the stream from here on
    local_ban(one, "198.18.9.9")
    one.publish_once(out)
    for n in (1, 2, 3):
        local_ban(one, f"198.18.9.{n}")
    real = Link.publish

    def cut_short(link: Link, decisions: Sequence[Decision]) -> Published:
        real(link, decisions[:1])
        raise redis.ConnectionError("Connection closed by server.")

    with monkeypatch.context() as patch:
        patch.setattr(Link, "publish", cut_short)
        with pytest.raises(redis.ConnectionError):
            one.publish_once(out)
    while two.read_once(into, block_ms=0):  # host 2 reads the part that went in
        pass
    again = Link(one.settings)
    one.connected(again)  # the publisher's reconnect
    while one.publish_once(again):
        pass
    while two.read_once(into, block_ms=0):
        pass
    assert not any("another host publishes as" in line for line in log), log
    assert any("had a publish cut short" in line for line in log), log
    assert active_in_redis(admin) == {"198.18.9.9", "198.18.9.1", "198.18.9.2", "198.18.9.3"}
    assert {str(address) for address in kernel2.held} == active_in_redis(admin)
    assert "replay" not in two.status()["refused"]  # type: ignore[operator]
    for link in (admin, out, again, into):
        link.close()


def test_the_publisher_goes_on_looking_at_its_mark_when_the_wall_clock_is_set_back(tmp_path, redis_url):
    # The looks at this host's mark (and the prunes) were timed by the wall clock: set back a day
    # (NTP's first sync, an admin), the publisher looked again only a day later, so a Redis that
    # lost its data meanwhile was not refilled while this host banned nothing new.
    skew = [0.0]
    workdir = tmp_path / "h1"
    workdir.mkdir()
    bans, _kernel, _lines, _commands = manager(workdir)
    log: list[str] = []
    one = FleetNode(FleetSettings(redis_url, "unit", "h1", KEY), bans, str(workdir), log.append,
                    clock=lambda: time.time() + skew[0])
    admin = Link(one.settings)
    local_ban(one, "198.18.9.1")
    one.start(Guards())
    try:
        wait_until(lambda: active_in_redis(admin) == {"198.18.9.1"}, "the ban in Redis")
        skew[0] = -86400.0
        admin.client.flushall()
        wait_until(lambda: active_in_redis(admin) == {"198.18.9.1"}, "the ban back in Redis", timeout=10.0)
    finally:
        one.stop()
        admin.close()


def test_a_redis_url_that_cannot_work_is_a_link_down_with_its_reason_not_an_internal_error(tmp_path):
    # A sentinel URL without the service: its LinkError went to the threads' catch-all, which
    # said "internal error" from both threads at every retry, while status showed the link down
    # with no reason and no time.
    workdir = tmp_path / "h1"
    workdir.mkdir()
    bans, _kernel, _lines, _commands = manager(workdir)
    log: list[str] = []
    one = FleetNode(FleetSettings("redis+sentinel://198.18.0.1:26379", "unit", "h1", KEY), bans,
                    str(workdir), log.append)
    one.start(Guards())
    try:
        wait_until(lambda: one.status()["error"] is not None, "the reason in status")
        assert "names the service" in str(one.status()["error"]) and one.status()["down_since"] is not None
    finally:
        one.stop()
    assert not any("internal error" in line for line in log), log


def test_a_url_redis_py_cannot_read_is_a_link_error_not_an_internal_one():
    # redis-py's ValueError went to the threads' catch-all, an "internal error" at every retry.
    with pytest.raises(link_errors()) as caught:
        Link(FleetSettings("redis://198.18.0.1:6379/0?socket_timeout=soon", "unit", "h1", KEY))
    assert isinstance(caught.value, LinkError)


def test_the_stop_does_not_wait_for_a_redis_that_stopped_answering(tmp_path, redis_url):
    # A Redis that stopped answering (a partition that drops packets; here SIGSTOP): each fleet
    # thread waits in its command up to READ_TIMEOUT (10 s). The stop joined each for 6 s, so
    # `systemctl stop` took 6 to 12 s more and went on with a fleet thread still running.
    one, _kernel, log = node(tmp_path, redis_url, "h1")
    admin = Link(one.settings)
    pid = int(admin.client.info("server")["process_id"])
    one.start(Guards())
    threads = list(one._threads)
    try:
        wait_until(lambda: one.status()["link"] == "up", "the link up")
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.5)  # the reader in its read, the publisher in its look at its mark
        started = time.monotonic()
        one.stop()
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        admin.close()
    assert took < 1.0, f"the stop took {took:.1f} s"
    assert not any(thread.is_alive() for thread in threads)
    assert not any("internal error" in line or "is down" in line for line in log), log
