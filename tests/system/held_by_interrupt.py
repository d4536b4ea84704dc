"""A run to be interrupted, for test_interrupted_runs.py: no `test_` in the file's name, so pytest
collects it only when it is named on the command line. Its one test holds what the rig makes
(a daemon from the fixtures; a fleet of two hosts and a redis-server from test_fleet's context
manager), says what it holds in the file $HELD_READY, and waits to be interrupted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.system.rig import DaemonFactory, Namespaces, SyslogReceiver
from tests.system.test_fleet import fleet


def test_holds_a_daemon_and_a_fleet_until_interrupted(
    daemon_factory: DaemonFactory, namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path
) -> None:
    daemon = daemon_factory("-tcp", TCP_PORTS="1")
    with fleet(tmp_path, 2) as (net, redis, hosts, _key):
        assert redis.proc is not None
        held = {
            "namespaces": [*namespaces.names, *net.names],
            "dirs": [str(syslog.path.parent), *(str(host.sock_dir) for host in hosts)],
            "pids": [daemon.pid, redis.proc.pid, *(host.daemon.pid for host in hosts)],
            "first_host_pid": hosts[0].daemon.pid,
        }
        ready = Path(os.environ["HELD_READY"])
        ready.with_suffix(".part").write_text(json.dumps(held))
        ready.with_suffix(".part").rename(ready)  # whole when it appears
        time.sleep(120)
