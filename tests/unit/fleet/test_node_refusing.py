"""The fleet node against a Redis that answers but refuses: full (maxmemory with noeviction), or
an ACL that denies a command the fleet sends."""

from __future__ import annotations

import time

from portsentry.fleet import node as node_module
from portsentry.fleet.gate import Guards
from portsentry.fleet.link import Link
from tests.unit.fleet.test_node import active_in_redis, local_ban, node, wait_until


def test_a_full_redis_is_one_link_down_not_an_up_and_down_every_retry(tmp_path, redis_url, monkeypatch):
    # Connecting and reading the host's mark work on a full Redis; only the publish is refused
    # (OOM). Each retry said "link is up" after the mark and "link is down" at the publish: two
    # lines every 5 s for as long as Redis stayed full, and status flickering to "up".
    monkeypatch.setattr(node_module, "BACKOFF_MAX", 0.05)
    one, _kernel, log = node(tmp_path, redis_url, "h1")
    admin = Link(one.settings)
    one.start(Guards())
    try:
        wait_until(lambda: one.status()["link"] == "up", "the link up")
        admin.client.config_set("maxmemory", "1")
        local_ban(one, "198.18.9.1")
        wait_until(lambda: "OutOfMemoryError" in str(one.status()["error"]), "the refusal in status")
        time.sleep(1.0)  # twenty retries at least
        assert one.status()["link"] == "down"
        ups = [line for line in log if line.endswith("is up")]
        downs = [line for line in log if "is down" in line]
        assert (len(ups), len(downs)) == (1, 1), log
        admin.client.config_set("maxmemory", "0")
        wait_until(lambda: active_in_redis(admin) == {"198.18.9.1"}, "the ban published once Redis has room")
        wait_until(lambda: one.status()["link"] == "up", "the link up again")
        assert len([line for line in log if line.endswith("is up")]) == 2, log
    finally:
        one.stop()
        admin.close()
