"""`portsentry status` output for a running and a stopped daemon (the socket path is system-tested)."""

from __future__ import annotations

from portsentry.status import format_status


def test_running_status_shows_what_an_admin_asks_first():
    text = format_status({
        "running": True, "pid": 4242, "uptime": 3725.0, "config": "/etc/portsentry/portsentry.conf",
        "modes": ["tcp", "atcp"], "backend": "nftables", "ignore_entries": 5, "active_bans": 2,
        "probes_seen": 40, "probes_last_hour": 12, "hosts_blocked": 3, "hosts_blocked_last_hour": 1,
        "watching": ["-tcp: TCP ports 1,11 bound (IPv4+IPv6)"],
        "recent_events": [{"at": 0.0, "message": "attackalert: Connect from host: a/a to TCP port: 1"}],
    })
    assert "running, pid 4242, up 01:02:05" in text
    assert "-tcp -atcp" in text and "nftables" in text and "2\n" in text
    assert "40 since start, 12 in the last hour" in text
    assert "  -tcp: TCP ports 1,11 bound (IPv4+IPv6)" in text
    assert "attackalert: Connect from host" in text


def test_stopped_status_says_so_and_counts_stored_bans():
    assert format_status({"running": False, "active_bans": 7}).splitlines() == [
        "portsentry is not running",
        "active bans in the store: 7 (still enforced by the kernel backend if one is configured)",
    ]
