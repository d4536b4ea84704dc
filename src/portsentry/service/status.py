"""`portsentry status`: ask the running daemon, or say it is not running and what the store holds."""

from __future__ import annotations

import os
import sys
import time

from portsentry.config.settings import Config
from portsentry.service import control

NOT_RUNNING = 3  # LSB / systemctl status: "program is not running"
UNKNOWN = 4  # LSB: "program or service status is unknown" (it answered, but not with its status)
# A daemon that takes the request and sends nothing back in this long is hung, not gone.
STATUS_TIMEOUT = 10.0


def show_status(config: Config, as_json: bool, now: float) -> int:
    import json

    try:
        answer = control.request(config.control_socket, {"command": "status"}, timeout=STATUS_TIMEOUT)
    except control.NotRunning:
        answer = {"ok": True, "status": {"running": False, **stored_bans(config, now)}}
    except PermissionError:
        print(f"portsentry: {config.control_socket}: permission denied (run as root)", file=sys.stderr)
        return UNKNOWN
    except OSError as error:
        # Something listens but gave no status (hung up, timed out): that is "cannot tell", not
        # the 1 that LSB's status codes, and so monitoring, read as "dead, pid file exists".
        reason = "no answer in time" if isinstance(error, TimeoutError) else str(error)
        if not reason.startswith(config.control_socket):
            reason = f"{config.control_socket}: {reason}"
        print(f"portsentry: {reason}", file=sys.stderr)
        return UNKNOWN
    if not answer.get("ok"):
        # A daemon answered (busy, or refusing this peer): running, whatever else is unknown.
        print(f"portsentry: {answer.get('error')}", file=sys.stderr)
        return UNKNOWN
    state = answer.get("status", {})
    if as_json:
        print(json.dumps(state, indent=2, sort_keys=True))
    else:
        print(format_status(state))
    return 0 if state.get("running") else NOT_RUNNING


def stored_bans(config: Config, now: float) -> dict[str, object]:
    from portsentry.bans.store import BanStore, StoreError
    from portsentry.service.admin import store_path

    if not os.path.exists(store_path(config)):
        return {"active_bans": 0}
    try:
        store = BanStore(store_path(config))
    except StoreError as error:
        return {"store_error": str(error)}
    try:
        # Counted, not read: a store of 100,000 bans is counted in milliseconds.
        return {"active_bans": store.active_count(now)}
    except StoreError as error:  # damage past the schema shows only when the bans are read
        return {"store_error": str(error)}
    finally:
        store.close()


def format_status(state: dict[str, object]) -> str:
    if not state.get("running"):
        lines = ["portsentry is not running"]
        if "active_bans" in state:
            lines.append(f"active bans in the store: {state['active_bans']} (still enforced by the kernel "
                         "backend if one is configured)")
        if state.get("store_error"):
            lines.append(f"ban store: cannot be read: {state['store_error']}")
        return "\n".join(lines)
    rows = [
        ("state", f"running, pid {state['pid']}, up {_duration(float(str(state['uptime'])))}"),
        ("config", state["config"]),
        ("modes", " ".join(f"-{m}" for m in state["modes"])),  # type: ignore[attr-defined]
        ("ban backend", state["backend"] or "none (classic KILL_* commands only)"),
        *([("fast lane", state["fast_lane"])] if state.get("fast_lane") else []),
        ("ignore list", f"{state['ignore_entries']} entries"),
        ("active bans", state["active_bans"]),
        *([("ban store", _ban_store(store))] if isinstance(store := state.get("ban_store"), dict) else []),
        ("probes", f"{state['probes_seen']} since start, {state['probes_last_hour']} in the last hour"),
        ("hosts blocked", f"{state['hosts_blocked']} since start, {state['hosts_blocked_last_hour']} "
                          "in the last hour"),
    ]
    out = [f"{name + ':':<15}{value}" for name, value in rows]
    fleet = state.get("fleet")
    if isinstance(fleet, dict):
        out += format_fleet(fleet)
    # Evidence that could not be written is the first thing an admin must hear about.
    for failure in state.get("write_failures") or []:  # type: ignore[attr-defined]
        when = time.strftime("%H:%M:%S", time.localtime(float(failure["last_at"])))
        out.append(f"{'NOT WRITTEN:':<15}{failure['failures']} records to {failure['file']} "
                   f"{failure['path']}, last at {when}: {failure['last_error']}")
    dropped = state.get("packets_dropped") or {}
    if dropped:
        out.append(f"{'dropped:':<15}" + ", ".join(f"{count} {reason}" for reason, count
                                                   in sorted(dropped.items())))  # type: ignore[attr-defined]
    out.append("watching:")
    out += [f"  {line}" for line in state["watching"]]  # type: ignore[attr-defined]
    out.append("last events:")
    events = state["recent_events"] or []
    out += [f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['message']}"
            for e in events] or ["  (none)"]  # type: ignore[attr-defined]
    return "\n".join(out)


def _ban_store(store: dict[str, object]) -> str:
    if store.get("in_memory"):
        return (f"IN MEMORY ONLY, {store.get('error') or store['path']}; a stop loses the bans made "
                "since; written there once it can be opened")
    if store.get("unsaved"):
        return (f"{store['path']} ({store['unsaved']} records not written yet: kept in memory, "
                "retried every second)")
    return str(store["path"])


def format_fleet(fleet: dict[str, object]) -> list[str]:
    """The fleet link (docs/fleet.md): up or down since when, the traffic, the lag."""
    link = f"{fleet['link']} to {fleet['redis']}, fleet {fleet['name']!r} as {fleet['host_id']}"
    if fleet.get("link") != "up":
        since = fleet.get("down_since")
        if isinstance(since, int | float):
            link += f", down since {time.strftime('%H:%M:%S', time.localtime(since))}"
        if fleet.get("error"):
            link += f" ({fleet['error']})"
    lag = fleet.get("lag_ms")
    refused = fleet.get("refused") or {}
    traffic = (f"{fleet['published']} published, {fleet['received']} received, {fleet['applied']} applied, "
               f"{sum(refused.values())} refused")  # type: ignore[attr-defined]
    if refused:
        traffic += " (" + ", ".join(f"{n} {r}" for r, n in sorted(refused.items())) + ")"  # type: ignore[attr-defined]
    return [f"{'fleet:':<15}{link}", f"{'fleet traffic:':<15}{traffic}",
            f"{'fleet lag:':<15}" + ("-" if lag is None else f"{lag} ms last, {fleet['lag_max_ms']} ms max")
            + (f"; {fleet['backlog']} local changes not sent yet" if fleet.get("backlog") else "")]


def _duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"
