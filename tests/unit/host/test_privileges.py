"""Dropping capabilities: the KEEP_CAPABILITIES parser, and the real drop, run in a child process
(as root) whose capability sets, and those of a /bin/sh it starts, are read from /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from portsentry.host.privileges import (
    CAPABILITIES,
    CAPABILITY_NAMES,
    KEPT,
    CapabilitySets,
    names,
    parse_keep,
    read_status,
)

SRC = Path(__file__).resolve().parents[3] / "src"
KEPT_MASK = sum(1 << cap for cap in KEPT)
DAC_OVERRIDE = CAPABILITIES["CAP_DAC_OVERRIDE"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping capabilities needs root")


def test_capability_numbers_follow_the_kernel_headers():
    assert (CAPABILITIES["CAP_CHOWN"], CAPABILITIES["CAP_SETPCAP"], CAPABILITIES["CAP_NET_BIND_SERVICE"],
            CAPABILITIES["CAP_NET_ADMIN"], CAPABILITIES["CAP_NET_RAW"], CAPABILITIES["CAP_SYS_ADMIN"],
            CAPABILITIES["CAP_CHECKPOINT_RESTORE"]) == (0, 8, 10, 12, 13, 21, 40)
    assert len(set(CAPABILITY_NAMES)) == len(CAPABILITY_NAMES) == 41


def test_kept_set_is_the_three_network_capabilities():
    assert names(KEPT) == "CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_NET_RAW"
    assert names(0) == "none"
    assert names(1 << 12 | 1 << 50) == "CAP_NET_ADMIN capability 50"


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, KEPT),
        ("", KEPT),
        ("CAP_DAC_OVERRIDE", KEPT | {1}),
        ("cap_dac_override, setuid  SETGID", KEPT | {1, 6, 7}),
        ("CAP_NET_RAW", KEPT),
        ("all", None),
        (" ALL ", None),
    ],
)
def test_parse_keep(value, expected):
    assert parse_keep(value) == expected


@pytest.mark.parametrize("value", ["CAP_NOPE", "all CAP_KILL", "net-admin"])
def test_parse_keep_refuses_unknown_names(value):
    with pytest.raises(ValueError, match="is not a capability"):
        parse_keep(value)


def test_read_status_parses_the_cap_lines(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000003400\n"
                      "CapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0\n")
    assert read_status(str(status)) == CapabilitySets(0x3000, 0x3400, 0, 0x1FFFFFFFFFF)


# The child: optionally prepares itself (PREPARE), drops, reports the result and what a /bin/sh
# it then starts has, and waits so that the test can read its /proc status from outside.
CHILD = textwrap.dedent("""
    import json, os, subprocess, sys, threading
    from portsentry.host import privileges
    PREPARE
    result = privileges.restrict(privileges.parse_keep(sys.argv[1] or None))
    shell = subprocess.run(["/bin/sh", "-c", "grep ^Cap /proc/self/status"], capture_output=True,
                           text=True, check=True).stdout
    print(json.dumps({"ok": result.ok, "message": result.message, "shell": shell}), flush=True)
    sys.stdin.read()
""")


def run_child(keep: str = "", prepare: str = "") -> tuple[dict[str, object], CapabilitySets, CapabilitySets]:
    """(result, the child's own sets read from outside, its /bin/sh's sets)."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-c", CHILD.replace("PREPARE", prepare), keep],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, f"child died: {proc.wait(10)}"
        report = json.loads(line)
        own = read_status(f"/proc/{proc.pid}/status")
        shell = {}
        for entry in str(report["shell"]).splitlines():
            key, _, value = entry.partition(":")
            shell[key] = int(value.strip(), 16)
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return report, own, CapabilitySets(shell["CapEff"], shell["CapPrm"], shell["CapInh"], shell["CapBnd"])


def test_a_shell_started_by_root_without_the_drop_has_everything():
    """The reason for the bounding set: root's children get it back as permitted on execve."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    report, own, shell = run_child(keep="all")
    assert report["ok"] and "not dropped" in str(report["message"])
    assert shell.permitted & ~KEPT_MASK and own.bounding & ~KEPT_MASK


@needs_root
def test_drop_leaves_only_the_kept_set_in_the_process_and_its_children():
    report, own, shell = run_child()
    assert report == {"ok": True, "shell": report["shell"],
                      "message": "adminalert: capabilities limited to "
                                 "CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_NET_RAW"}
    for sets in (own, shell):
        assert sets.effective == sets.permitted == KEPT_MASK, sets
        assert sets.bounding == KEPT_MASK, sets
        assert sets.inheritable & ~KEPT_MASK == 0, sets


@needs_root
def test_keep_capabilities_adds_to_the_kept_set():
    report, own, shell = run_child(keep="CAP_DAC_OVERRIDE")
    assert report["ok"], report
    wanted = KEPT_MASK | 1 << DAC_OVERRIDE
    assert own.permitted == own.bounding == shell.permitted == shell.bounding == wanted


@needs_root
def test_not_root_is_logged_and_the_bounding_set_left_alone():
    # Imported as root first: this test's Python may live where uid 65534 cannot read.
    report, _own, _shell = run_child(prepare="import encodings.ascii; os.setresuid(65534, 65534, 65534)")
    assert report["ok"] is False
    assert report["message"] == ("adminalert: not running as root (uid 65534): capabilities limited "
                                 "to none; the bounding set is left as it is")


@needs_root
def test_a_failed_drop_is_reported_and_the_process_goes_on():
    """Without CAP_SETPCAP the bounding set cannot shrink: one line says so, no exception."""
    give_up_setpcap = textwrap.dedent("""
        k = privileges._Kernel(); s = k.get(); bit = 1 << privileges.CAPABILITIES["CAP_SETPCAP"]
        k.set(s.effective & ~bit, s.permitted & ~bit, s.inheritable & ~bit)
    """)
    report, own, _shell = run_child(prepare=give_up_setpcap)
    assert report["ok"] is False
    message = str(report["message"])
    assert message.startswith("adminalert: ERROR: could not drop capabilities (PR_CAPBSET_DROP CAP_")
    assert message.endswith(": Operation not permitted); going on with the capabilities it has")
    assert own.bounding & ~KEPT_MASK  # nothing pretended


@needs_root
def test_threads_started_before_the_drop_are_reported():
    start_thread = "t = threading.Thread(target=threading.Event().wait, daemon=True); t.start()"
    report, _own, _shell = run_child(prepare=start_thread)
    assert report["ok"] is False
    assert report["message"] == ("adminalert: ERROR: capabilities dropped in one thread only; "
                                 "1 other thread(s) started earlier keep theirs")


@needs_root
def test_a_non_root_daemon_with_capabilities_gives_up_the_others_too():
    # Started as a user with capabilities (file capabilities, or kept across setuid as here;
    # with ambient ones under a User= unit) it kept every one of them, CAP_SYS_ADMIN and
    # CAP_DAC_OVERRIDE included, for its whole life: "not running as root" was taken to mean
    # that nothing could be dropped, but lowering the permitted set needs no privilege.
    keep_them = textwrap.dedent("""
        import ctypes, encodings.ascii  # imported as root: see test_not_root_is_logged_...
        ctypes.CDLL(None).prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: permitted survives setresuid
        os.setresuid(65534, 65534, 65534)
        k = privileges._Kernel(); s = k.get(); k.set(s.permitted, s.permitted, s.permitted)
        for cap in range(k.last_cap() + 1):  # the ambient set, which a child's execve keeps
            if s.permitted >> cap & 1:
                ctypes.CDLL(None).prctl(47, 2, cap, 0, 0)  # PR_CAP_AMBIENT_RAISE
    """)
    report, own, shell = run_child(prepare=keep_them)
    assert report["ok"] is False  # logged, not only at verbose level: the bounding set stays
    assert report["message"] == ("adminalert: not running as root (uid 65534): capabilities limited "
                                 "to CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_NET_RAW; the bounding set "
                                 "is left as it is")
    assert own.permitted == own.effective == KEPT_MASK
    assert shell.permitted & ~KEPT_MASK == 0 and shell.effective & ~KEPT_MASK == 0
