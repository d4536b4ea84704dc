"""build_sensors, run for real in a network namespace of its own: what the modes say when one of
them finds nothing to watch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

# argv: start|reload, ports some other program holds (comma list or -), the modes. Builds and
# opens the sensors with TCP_PORTS 20001,20002, then prints what they logged and watch.
_OPEN = """
import json, socket, sys, time
from portsentry.config.settings import parse_config
from portsentry.core.probe import Mode
from portsentry.service.wiring import build_sensors
held = []
for port in ([] if sys.argv[2] == "-" else sys.argv[2].split(",")):
    held.append(socket.socket(socket.AF_INET6))
    held[-1].bind(("::", int(port)))
    held[-1].listen(1)
config = parse_config('TCP_PORTS="20001,20002"\\nCAPTURE="packet"\\n', "p.conf").config
lines = []
sensors = build_sensors(config, [Mode(m) for m in sys.argv[3:]], lines.append, time.time,
                        at_start=sys.argv[1] == "start")
handles = [h for sensor in sensors for h in sensor.open()]
print(json.dumps({"lines": lines, "handles": len(handles),
                  "describe": [d for sensor in sensors for d in sensor.describe()]}))
"""


def _open(when: str, held: str, *modes: str) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root for unshare --net and the packet capture")
    argv = ["unshare", "--net", sys.executable, "-c", _OPEN, when, held, *modes]
    found: dict[str, Any] = json.loads(
        subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout)
    return found


def test_stcp_beside_tcp_watches_nothing_and_does_not_say_the_daemon_shuts_down():
    # `portsentry -tcp -stcp`: the -tcp sockets hold every TCP_PORTS port, so -stcp found them in
    # use and logged 1.2's "All supplied TCP sockets are in use and will not be listened to.
    # Shutting down." just before "PortSentry is now active and listening."; it ran on with -tcp.
    found = _open("start", "-", "tcp", "stcp")
    assert not [line for line in found["lines"] if "Shutting down" in line], found["lines"]
    assert found["lines"][-1] == ("adminalert: ERROR: All supplied TCP sockets are in use and will "
                                  "not be listened to: -stcp watches nothing")
    assert found["handles"] == 2  # the two -tcp sockets


@pytest.mark.parametrize("when,tail", [("start", ". Shutting down."), ("reload", ": -tcp watches nothing")])
def test_a_sole_mode_that_watches_nothing_says_1_2s_shutting_down_at_start_only(when: str, tail: str):
    # 1.2 ran one mode a process: its only mode watching nothing, the start shuts down, as 1.2's
    # line says. At a reload (refused, the old sensors open again) the daemon goes on.
    found = _open(when, "20001,20002", "tcp")
    assert found["lines"][-1] == f"adminalert: ERROR: could not bind ANY TCP sockets{tail}"
    assert found["handles"] == 0
    # `status` listed "-tcp: TCP ports  bound (IPv4)".
    assert found["describe"] == ["-tcp: no TCP port could be bound: watching nothing"]
